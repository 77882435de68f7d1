"""The trainer's process-wide allocator setting (bench.device.keep_freed_memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.device import keep_freed_memory

_SECOND_PASS_FAULTS = """
import ctypes, resource, sys
from bench.device import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 8 << 20
p = libc.malloc(size); libc.memset(p, 1, size); libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(size); libc.memset(p, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, end="")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_work_buffer_is_reused_without_page_faults() -> None:
    """An 8 MB buffer freed and allocated again, as a training step's work tensors are: under glibc's
    default it is a fresh mapping each time (about one page fault per 4 KiB touched); kept, the second pass
    reuses the first one's pages."""
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _SECOND_PASS_FAULTS, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "kept")
    }
    assert faults["default"] > 1000  # 2048 pages of 4 KiB
    assert faults["kept"] < 100


def test_applies_once_per_process() -> None:
    assert keep_freed_memory() is keep_freed_memory()

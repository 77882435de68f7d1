"""Where computation runs: the device a ``--device`` names, each worker's device and core share, and whether
``--precision`` means bf16 autocast there."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

import torch

from .errors import BenchError

__all__ = [
    "PRECISIONS",
    "bind_worker",
    "cpu_has_bf16",
    "keep_freed_memory",
    "resolve_device",
    "resolve_precision",
    "worker_device",
    "worker_threads",
]

#: ``--precision``: ``auto`` is bf16 autocast on CUDA and fp32 on the CPU
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512-BF16 or AMX; None where unknown). Without
    it bf16 autocast on the CPU is far slower than fp32 (this repo's 2-core AVX2 machine: ~9x per step)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast: ``auto`` on CUDA, or ``bf16`` on any device (the CPU included;
    the methods keep their fp32 islands, e.g. MoMKD's memory and losses, through ``autocast(enabled=False)``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def resolve_device(spec: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {spec}: no CUDA device is available here. Use --device cpu or auto.")
    return device


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` gives them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 256 << 20, 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 256 MiB in the heap for reuse (and give memory back to the system
    only above 1 GiB free), instead of unmapping each large block when it is freed; returns whether it applied
    (False off glibc). Once per process.

    Why: a training step allocates and frees work tensors of a few MB (a graph layer's per-edge buffers at a few
    hundred patches); under glibc's default each of them is a fresh ``mmap``, so every pass page-faults once
    per 4 KiB it touches. ``benchmarks/step_cost.py`` (D = 128, N = 350, 1 thread) measured MoMKD's step at
    0.089 -> 0.052 s with these two thresholds before its graph layers kept their own work buffers
    (benchmarks/README.md); since then its gain there is within noise, and the setting covers every other
    method's and window's large temporaries. Peak memory is unchanged: the blocks are reused, not added; the
    process keeps what it freed until it exits or frees more than 1 GiB.
    """
    if not sys.platform.startswith("linux"):  # glibc's parameters; other platforms keep their allocator
        return False
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the cores this process may use, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def worker_device(spec: str, slot: int) -> torch.device:
    """Worker ``slot``'s device: round robin over the GPUs for ``auto``/``cuda`` when there are several."""
    if spec in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return torch.device(f"cuda:{slot % torch.cuda.device_count()}")
    return resolve_device(spec)


def bind_worker(spec: str, slot: int, workers: int) -> torch.device:
    """Set up worker process ``slot`` of ``workers``: its device (made the current CUDA device) and its share
    of the cores; returns the device."""
    device = worker_device(spec, slot)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    torch.set_num_threads(worker_threads(workers))
    return device

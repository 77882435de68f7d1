"""Writing files so that readers never see half of one, and turning results into plain data for JSON/YAML."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write_text", "fsync", "plain", "umask"]


def umask() -> int:
    """The process umask, read without changing it where the OS allows (no window with another mask)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never publishes data still in cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename (readers never see half a
    file); the file gets the user's umask like any other (a shared ``--out`` stays shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def plain(obj: Any) -> Any:
    """``obj`` as JSON/YAML-safe builtins: tuples as lists, paths and string subclasses as strings, NumPy scalars as Python ones;
    mapping keys stay integers where they are (``best.yaml``'s folds), anything else becomes a string."""
    if isinstance(obj, dict):
        return {k if isinstance(k, int) else str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, Path | str):  # str subclasses too (torch.__version__)
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

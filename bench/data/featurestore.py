"""One memory-mapped copy of each feature file per machine, shared by every process that reads it.

Without it each worker process of ``bench run --workers N`` would read every feature file into its own memory
(N copies, plus the parent's from the cohort check). The store keeps, per feature file, what
:func:`~bench.data.formats.read_slide` returns as plain ``.npy`` files in ``$BENCH_CACHE/features/<entry>/``;
processes map them (copy-on-write), so the pages live once in the page cache whatever the number of workers,
and a bag's features are those mapped pages, never a private copy.

- An entry is named by the file's stem and a digest of its resolved path, size, modification time and inode
  (and :data:`FORMAT_VERSION`): a changed, replaced or re-extracted file gets a new entry; the old one is no
  longer read (delete ``$BENCH_CACHE/features/`` to reclaim the space).
- An entry is written into a temporary folder renamed into place (atomic): a reader sees a complete entry or
  none; processes that race to build one each write their own and all but the first rename discard theirs;
  temporaries of builds killed on this host are removed by the next build of that entry.
- The arrays are exactly ``read_slide``'s (float32 features, grid-unit coordinates, the extra datasets), so
  bags from the store are bit-identical to bags read from the files. Each entry also records how many patches
  have a NaN/inf feature, so checking a cohort's values maps no feature page once its entries exist.
- Maps are copy-on-write (``mmap_mode="c"``): a method that wrote into ``bag.features`` in place would change
  a private copy of those pages, never the store or another process's view.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import cache_root
from ..locks import HOST, remove_dead_temporaries
from .formats import SlideFeatures, read_slide

__all__ = ["FORMAT_VERSION", "StoredSlide", "entry_path", "load_or_store", "nonfinite_patches", "store_root"]

FORMAT_VERSION = 1
_META = "meta.json"


@dataclass(frozen=True)
class StoredSlide:
    """A feature file as the store serves it: its contents (arrays mapped from disk) and its value check."""

    slide: SlideFeatures
    nonfinite: int  # patches with a NaN or infinite feature


def store_root() -> Path | None:
    """Where the store lives: ``$BENCH_CACHE/features`` by default, the folder ``BENCH_FEATURE_STORE`` names
    (e.g. a node-local disk when ``BENCH_CACHE`` is on a network file system), or None when it is ``0``/``off``
    (each process then keeps its own copy of every file it reads, as bench did before the store existed)."""
    value = os.environ.get("BENCH_FEATURE_STORE", "").strip()
    if value.lower() in ("0", "false", "no", "off"):
        return None
    return cache_root() / "features" if value.lower() in ("", "1", "true", "yes", "on") else Path(value)


def nonfinite_patches(features: np.ndarray) -> int:
    """How many rows of ``features`` hold a NaN or infinite value."""
    return int((~np.isfinite(features)).any(axis=1).sum()) if features.ndim == 2 else 0


def entry_path(path: str | Path, root: Path) -> Path:
    """The store entry of feature file ``path`` under ``root``, named by the file's identity (resolved path,
    size, modification time, inode) so that a changed file maps to a new entry."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    ident = [FORMAT_VERSION, str(resolved), st.st_size, st.st_mtime_ns, st.st_ino]
    return Path(root) / f"{resolved.stem}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]}"


def load_or_store(path: str | Path, root: Path) -> StoredSlide:
    """Feature file ``path`` served from its entry under ``root``, which is built on first use.

    Raises:
        DataError: the file cannot be read (as :func:`read_slide` says).
        OSError: the entry cannot be written or read (callers fall back to reading the file).
    """
    entry = entry_path(path, root)
    if not (entry / _META).is_file():
        _publish(Path(path), entry)
    return _open(entry)


def _publish(path: Path, entry: Path) -> None:
    """Write the entry of ``path`` into a temporary folder beside ``entry``, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(entry.parent, f".{entry.name}")
    tmp = entry.with_name(f".{entry.name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        sf = read_slide(path)  # a DataError leaves nothing behind
        tmp.mkdir()
        np.save(tmp / "features.npy", sf.features)
        if sf.coords is not None:
            np.save(tmp / "coords.npy", sf.coords)
        if sf.extras:
            np.savez(tmp / "extras.npz", **sf.extras)
        meta = {
            "source": str(path),
            "step_level0": sf.step_level0,
            "has_coords": sf.coords is not None,
            "nonfinite": nonfinite_patches(sf.features),
        }
        (tmp / _META).write_text(json.dumps(meta))  # written last: a folder without it is never renamed
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / _META).is_file():  # not a lost race (another process published first)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mapped(file: Path) -> np.ndarray:
    """The array in ``file`` mapped copy-on-write (an empty array is loaded: there is nothing to map)."""
    array = np.load(file, mmap_mode="c")
    return np.load(file) if array.size == 0 else array


def _open(entry: Path) -> StoredSlide:
    meta = json.loads((entry / _META).read_text())
    extras: dict[str, np.ndarray] = {}
    if (entry / "extras.npz").is_file():
        with np.load(entry / "extras.npz") as npz:
            extras = {k: npz[k] for k in npz.files}
    slide = SlideFeatures(
        features=_mapped(entry / "features.npy"),
        coords=_mapped(entry / "coords.npy") if meta["has_coords"] else None,
        step_level0=meta["step_level0"],
        extras=extras,
    )
    return StoredSlide(slide, int(meta["nonfinite"]))

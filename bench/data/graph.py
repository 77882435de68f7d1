"""Spatial kNN graphs on patch coordinates, built once per slide and cached on disk.

The graph is MoMKD's (``graph.py``: sklearn ``kneighbors_graph(coords, k, include_self=False)``, stored as
``edge_index = stack(adj.nonzero())``): row 0 is a patch i, row 1 one of its k nearest patches j. PyG reads
row 0 as source and row 1 as target, so each patch aggregates from the patches that count it among *their*
k nearest (out-degree k, in-degree varies). ``symmetric=True`` adds the reverse of every edge (a variant).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from ..errors import DataError

__all__ = ["graph_cache_path", "knn_edge_index", "load_or_build_graph"]


def knn_edge_index(coords: np.ndarray, k: int = 8, symmetric: bool = False) -> np.ndarray:
    """Edges from every patch to its ``k`` nearest patches (Euclidean, self excluded), via a k-d tree.

    Ties are broken as sklearn's ``kneighbors_graph`` breaks them, so the neighbours are MoMKD's.
    A slide with ``N <= k`` patches links each patch to all others.

    Args:
        coords: patch coordinates of shape ``(N, 2)``.
        k: neighbours per patch (MoMKD: 8).
        symmetric: also add every reverse edge (duplicates removed).

    Returns:
        int64 array of shape ``(2, E)``: row 0 the patch, row 1 its neighbour; ``E = N·k`` unless symmetric.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {coords.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n = coords.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((2, 0), dtype=np.int64)
    neighbours = NearestNeighbors(n_neighbors=k).fit(coords).kneighbors(return_distance=False)  # (N, k)
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    dst = neighbours.reshape(-1).astype(np.int64)
    if symmetric:
        codes = np.unique(np.concatenate([src * n + dst, dst * n + src]))
        src, dst = codes // n, codes % n
    return np.stack([src, dst])


def graph_cache_path(feature_file: Path, k: int, symmetric: bool, cache_dir: Path) -> Path:
    """Cache file of a slide's graph, keyed by its feature file (path, size, mtime) and the settings."""
    resolved = Path(feature_file).resolve()
    stat = resolved.stat()
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|k={k}|symmetric={symmetric}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{resolved.stem}-k{k}{'s' if symmetric else ''}-{digest}.npy"


def load_or_build_graph(
    feature_file: Path, coords: np.ndarray | None, k: int, symmetric: bool, cache_dir: Path
) -> torch.Tensor:
    """The slide's kNN ``edge_index`` (long, ``(2, E)``), read from the cache or built and cached.

    A changed feature file (size or modification time) gets a new cache entry; an unreadable entry is rebuilt.

    Raises:
        DataError: the file has no coordinates (CLAM ``.pt``), so no spatial graph can be built.
    """
    if coords is None:
        raise DataError(
            "this method needs patch coordinates for its spatial kNN graph, but the feature file has none "
            "(CLAM .pt files store features only)",
            feature_file,
            fix="point the task's features at the .h5 files (TRIDENT or CLAM), which store coords.",
        )
    path = graph_cache_path(feature_file, k, symmetric, cache_dir)
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path)).long()
        except (OSError, ValueError):
            pass
    edge_index = knn_edge_index(coords, k=k, symmetric=symmetric)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, edge_index.astype(np.int32))
    os.replace(tmp, path)
    return torch.from_numpy(edge_index)

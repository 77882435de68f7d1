"""Spatial kNN graph: neighbours on a hand-made grid, MoMKD's edge direction, the disk cache, missing coords."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.data.graph as graph
from bench.data.graph import knn_edge_index, load_or_build_graph
from bench.errors import DataError

# A 3 x 3 grid plus one far patch:   6 7 8
#                                    3 4 5
#                                    0 1 2          9 (at x = 10)
GRID = np.array([[x, y] for y in range(3) for x in range(3)] + [[10, 0]], dtype=np.float32)


def _neighbours(edge_index: np.ndarray, node: int) -> set[int]:
    return set(edge_index[1, edge_index[0] == node].tolist())


def test_knn_on_a_grid_finds_the_nearest_patches_without_self():
    edge_index = knn_edge_index(GRID, k=4)
    assert edge_index.shape == (2, 40) and edge_index.dtype == np.int64
    assert _neighbours(edge_index, 4) == {1, 3, 5, 7}  # the centre: its four direct neighbours
    corner = _neighbours(edge_index, 0)
    assert {1, 3, 4} <= corner and len(corner & {2, 6}) == 1  # then a tie at distance 2: one of them
    assert 9 not in _neighbours(edge_index, 2)
    assert 2 in _neighbours(edge_index, 9)  # the far patch still has k neighbours, the nearest first
    assert not (edge_index[0] == edge_index[1]).any()


def test_direction_is_patch_to_its_neighbours_and_in_degree_varies():
    edge_index = knn_edge_index(GRID, k=4)
    assert np.array_equal(np.bincount(edge_index[0]), np.full(10, 4))  # out-degree k (row 0 = the patch)
    in_degree = np.bincount(edge_index[1], minlength=10)
    assert in_degree[9] == 0 and in_degree[4] == 8  # nobody counts the far patch among its 4 nearest


def test_symmetric_graph_adds_reverse_edges_once():
    edge_index = knn_edge_index(GRID, k=4, symmetric=True)
    pairs = set(map(tuple, edge_index.T.tolist()))
    assert len(pairs) == edge_index.shape[1]
    assert all((j, i) in pairs for i, j in pairs)
    assert (9, 2) in pairs and (2, 9) in pairs


def test_small_slides_link_every_patch_to_all_others():
    assert knn_edge_index(GRID[:3], k=8).shape == (2, 6)
    assert knn_edge_index(GRID[:1], k=8).shape == (2, 0)


def test_cache_is_hit_on_second_use_and_invalidated_by_a_changed_file(tmp_path: Path, monkeypatch):
    features = tmp_path / "slide.h5"
    features.write_bytes(b"features")
    calls = []
    real_builder = graph.knn_edge_index

    def counting_builder(*args, **kwargs):
        calls.append(1)
        return real_builder(*args, **kwargs)

    monkeypatch.setattr(graph, "knn_edge_index", counting_builder)
    first = load_or_build_graph(features, GRID, 4, False, tmp_path / "cache")
    second = load_or_build_graph(features, GRID, 4, False, tmp_path / "cache")
    assert len(calls) == 1
    assert second.dtype == torch.long and torch.equal(first, second)
    assert np.array_equal(first.numpy(), real_builder(GRID, k=4))
    load_or_build_graph(features, GRID, 5, False, tmp_path / "cache")  # another k: another entry
    load_or_build_graph(features, GRID, 4, True, tmp_path / "cache")  # symmetric: another entry
    assert len(calls) == 3
    stat = features.stat()
    os.utime(features, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    load_or_build_graph(features, GRID, 4, False, tmp_path / "cache")
    assert len(calls) == 4


def test_slides_without_coordinates_are_a_clear_error(tmp_path: Path):
    features = tmp_path / "slide.pt"
    features.write_bytes(b"x")
    with pytest.raises(DataError, match=r"coordinates.*\.h5"):
        load_or_build_graph(features, None, 8, False, tmp_path / "cache")

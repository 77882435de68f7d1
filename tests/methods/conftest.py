"""Small seeded bags for the method tests (patch features, a kNN graph on a square grid, omics on most)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from bench.data.graph import knn_edge_index
from methods import Bag


def make_bags(sizes: Sequence[int], dim: int, genes: int, seed: int = 0, no_omics: int = 3) -> list[Bag]:
    """One bag per size, labels alternating, bag ``no_omics`` without omics."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i, n in enumerate(sizes):
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack(np.unravel_index(np.arange(n), (side, side)), axis=1).astype(np.float32)
        bags.append(
            Bag(
                features=torch.randn(n, dim, generator=g),
                label=torch.tensor(i % 2),
                coords=torch.from_numpy(coords),
                edge_index=torch.from_numpy(knn_edge_index(coords, k=4)),
                omics=None if i == no_omics else torch.randn(genes, generator=g),
                slide_id=f"s{i}",
                case_id=f"c{i}",
            )
        )
    return bags


@pytest.fixture(scope="session")
def bag_maker() -> Callable[..., list[Bag]]:
    """:func:`make_bags`, for tests that need bags of their own sizes."""
    return make_bags

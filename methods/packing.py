"""Many bags in one forward: the packed layout and the per-bag (segment) reductions on it.

Prediction is per bag, so several bags can share one forward pass without changing any bag's output:
their patches are concatenated into one ``(T, D)`` tensor (no padding), every per-patch map runs once on
all of them, and every reduction over a bag's patches (softmax, sum, mean, max) runs per segment. A graph
becomes block-diagonal (each bag's edges shifted by its offset), so message passing never crosses bags.
Methods use this in ``predict_logits``; ``tests/methods/test_batched.py`` checks it against one bag at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Bag

__all__ = [
    "PackedBags",
    "chunk_bags",
    "pack_bags",
    "pad_segments",
    "padding_mask",
    "segment_max",
    "segment_mean",
    "segment_pool",
    "segment_softmax",
    "segment_sum",
]


@dataclass
class PackedBags:
    """Bags concatenated along the patch axis.

    Attributes:
        features: all patches, shape ``(T, D)``, bag after bag.
        segment: bag index of each patch, long ``(T,)``.
        lengths: patches per bag, long ``(B,)`` on the patches' device.
        sizes: the same, as host ints.
        offsets: first patch of each bag (host ints), length B.
        edge_index: the bags' graphs as one block-diagonal graph ``(2, E)``, or None when a bag has none.
    """

    features: Tensor
    segment: Tensor
    lengths: Tensor
    sizes: list[int]
    offsets: list[int]
    edge_index: Tensor | None

    @property
    def num_bags(self) -> int:
        return len(self.sizes)

    def slices(self) -> Iterator[slice]:
        """The patch range of each bag."""
        for first, n in zip(self.offsets, self.sizes, strict=True):
            yield slice(first, first + n)


def pack_bags(bags: Sequence[Bag]) -> PackedBags:
    """Concatenate ``bags`` (all on one device) into a :class:`PackedBags`."""
    if not bags:
        raise ValueError("pack_bags needs at least one bag")
    sizes = [b.num_patches for b in bags]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    device = bags[0].features.device
    features = bags[0].features if len(bags) == 1 else torch.cat([b.features for b in bags])
    lengths = torch.tensor(sizes, device=device)
    segment = torch.repeat_interleave(torch.arange(len(bags), device=device), lengths, output_size=sum(sizes))
    edge_index = None
    if all(b.edge_index is not None for b in bags):
        edge_index = torch.cat([b.edge_index + first for b, first in zip(bags, offsets, strict=True)], dim=1)
    return PackedBags(features, segment, lengths, sizes, offsets, edge_index)


def chunk_bags(bags: Sequence[Bag], max_patches: int) -> Iterator[list[int]]:
    """Indices of consecutive bags, in order, grouped so that each group holds at most ``max_patches``
    patches (a larger bag is a group of its own)."""
    group: list[int] = []
    total = 0
    for i, bag in enumerate(bags):
        n = bag.num_patches
        if group and total + n > max_patches:
            yield group
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        yield group


def _reduce(x: Tensor, packed: PackedBags, how: str) -> Tensor:
    if packed.num_bags == 1:  # the single-bag reduction itself
        return getattr(x, "amax" if how == "max" else how)(0, keepdim=True)
    return torch.segment_reduce(x, how, lengths=packed.lengths)


def segment_sum(x: Tensor, packed: PackedBags) -> Tensor:
    """Per-bag sum over patches: ``(T, ...)`` -> ``(B, ...)``."""
    return _reduce(x, packed, "sum")


def segment_mean(x: Tensor, packed: PackedBags) -> Tensor:
    """Per-bag mean over patches: ``(T, ...)`` -> ``(B, ...)``."""
    return _reduce(x, packed, "mean")


def segment_max(x: Tensor, packed: PackedBags) -> Tensor:
    """Per-bag elementwise maximum over patches: ``(T, ...)`` -> ``(B, ...)``."""
    return _reduce(x, packed, "max")


def segment_softmax(scores: Tensor, packed: PackedBags) -> Tensor:
    """Softmax over each bag's patches of ``scores`` ``(T,)`` (max-shifted, as ``Tensor.softmax``; the shift
    is a constant to autograd, as in ``Tensor.softmax``'s own backward: softmax does not depend on it)."""
    if packed.num_bags == 1:
        return scores.softmax(0)
    e = (scores - segment_max(scores.detach(), packed)[packed.segment]).exp()
    return e / segment_sum(e, packed)[packed.segment]


def segment_pool(weights: Tensor, x: Tensor, packed: PackedBags) -> Tensor:
    """Per-bag weighted sum ``Σ_n w_n x_n``: weights ``(T,)``, x ``(T, F)`` -> ``(B, F)``; one
    vector-matrix product per bag, as the single-bag ``w @ x`` (no ``(T, F)`` product is formed). The bags
    are split off in one op each, whose backward is one concatenation (slicing each bag would make each
    bag's backward write a zero-filled ``(T, F)`` gradient)."""
    if packed.num_bags == 1:
        return (weights @ x).unsqueeze(0)
    pairs = zip(weights.split(packed.sizes), x.split(packed.sizes), strict=True)
    return torch.stack([w @ h for w, h in pairs])


def padding_mask(packed: PackedBags) -> Tensor:
    """Which positions of the padded layout (:func:`pad_segments`) hold a patch: bool ``(B, N_max)``."""
    positions = torch.arange(max(packed.sizes), device=packed.lengths.device)
    return positions < packed.lengths.unsqueeze(1)


def pad_segments(x: Tensor, packed: PackedBags, value: float = 0.0) -> Tensor:
    """The packed rows ``(T, ...)`` laid out per bag, ``(B, N_max, ...)``, ``value`` past each bag's end
    (differentiable: one scatter forward, one gather backward)."""
    if packed.num_bags == 1:
        return x.unsqueeze(0)
    first = torch.tensor(packed.offsets, device=x.device)
    position = torch.arange(x.shape[0], device=x.device) - first[packed.segment]
    out = x.new_full((packed.num_bags, max(packed.sizes), *x.shape[1:]), value)
    return out.index_put((packed.segment, position), x)

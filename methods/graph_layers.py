"""Graph layers shared by the graph MIL methods: MoMKD's two-layer GATv2 encoder and a padded GATv2.

A spatial kNN graph has a small, bounded in-degree, so GATv2 attention can be computed on a padded
``(N, K)`` neighbour table with a mask (dense gathers, a softmax over a short axis) instead of PyG's
scatter-based message passing. Both paths read the same ``GATv2Conv`` parameters, so a model can switch
between them (``fast=``) without touching its weights.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Workspace

if TYPE_CHECKING:
    from torch_geometric.nn import GATv2Conv

__all__ = ["GATv2Encoder", "NeighbourTable", "gatv2_padded", "in_neighbour_table"]

#: a block's fixed cost (its Python dispatch and op launches in both passes) in table slots: the partition of
#: :func:`in_neighbour_table` pads a block rather than start a new one when that costs fewer slots
BLOCK_COST_SLOTS = 128


class NeighbourTable(NamedTuple):
    """Incoming neighbours of every node (self loop included), rows sorted by in-degree, padded per block.

    Rows are targets in the order ``order`` (largest in-degree first), so consecutive rows have similar
    degrees and each block of rows is padded only to its own largest degree.

    Attributes:
        index: source node of each slot, shape ``(N, K)``, K the largest in-degree; padding points at
            the row's own node.
        mask: True on real slots, shape ``(N, K)``.
        order: target node of each row, shape ``(N,)``.
        blocks: ``(first row, end row, width)`` of each block; ``width`` is the block's largest degree.
    """

    index: Tensor
    mask: Tensor
    order: Tensor
    blocks: tuple[tuple[int, int, int], ...]


def in_neighbour_table(edge_index: Tensor, num_nodes: int, block_slots: int = 4096) -> NeighbourTable:
    """Padded table of the sources each target aggregates (PyG: row 0 source, row 1 target).

    Self loops in ``edge_index`` are dropped and one is added per node, as ``GATv2Conv(add_self_loops=True)``
    does. Duplicate edges are kept (PyG counts them twice too).

    Args:
        edge_index: long tensor of shape ``(2, E)``.
        num_nodes: N.
        block_slots: at most this many (row, slot) pairs per block (rows x width), which bounds the
            temporaries of :func:`gatv2_padded` to ``block_slots x heads x channels`` elements.

    The blocks are cut where the degree changes, as few as pay for the padding they save (:func:`_partition`).
    """
    device = edge_index.device
    nodes = torch.arange(num_nodes, device=device)
    keep = edge_index[0] != edge_index[1]
    src = torch.cat([nodes, edge_index[0][keep]])
    dst = torch.cat([nodes, edge_index[1][keep]])
    degree = torch.bincount(dst, minlength=num_nodes)
    order = torch.argsort(degree, descending=True, stable=True)
    row_of = torch.empty_like(order)
    row_of[order] = nodes
    rows = row_of[dst]
    by_row = torch.argsort(rows, stable=True)  # self loops stay in slot 0
    src, rows = src[by_row], rows[by_row]
    sorted_degree = degree[order]
    start = torch.cumsum(sorted_degree, 0) - sorted_degree
    slot = torch.arange(rows.numel(), device=device) - start[rows]
    width = int(sorted_degree[0]) if num_nodes else 0
    index = order.unsqueeze(1).repeat(1, width)  # padding: the row's own node (no hot row in scatters)
    index[rows, slot] = src
    mask = torch.zeros(num_nodes, width, dtype=torch.bool, device=device)
    mask[rows, slot] = True
    return NeighbourTable(index, mask, order, _partition(sorted_degree.tolist(), block_slots))


def _partition(degree: list[int], block_slots: int) -> tuple[tuple[int, int, int], ...]:
    """Blocks ``(first row, end row, width)`` of rows sorted by degree (largest first) that minimise the
    padded slots plus :data:`BLOCK_COST_SLOTS` per block, each block at most ``block_slots`` slots (or one
    row): a dynamic programme over the runs of equal degree, whose boundaries are the only useful cuts."""
    starts = [i for i in range(len(degree)) if i == 0 or degree[i] != degree[i - 1]]
    bounds = [*starts, len(degree)]
    best: list[tuple[float, int]] = [(0.0, 0)] + [(math.inf, 0)] * len(starts)  # cost, previous bound
    for j in range(1, len(bounds)):
        for i in range(j):  # rows bounds[i]:bounds[j] padded to the width of their first row
            w, rows = degree[bounds[i]], bounds[j] - bounds[i]
            per_block = max(1, block_slots // w)
            cost = best[i][0] + rows * w + BLOCK_COST_SLOTS * math.ceil(rows / per_block)
            if cost < best[j][0]:
                best[j] = (cost, i)
    blocks: list[tuple[int, int, int]] = []
    j = len(bounds) - 1
    while j > 0:
        i = best[j][1]
        per_block = max(1, block_slots // degree[bounds[i]])
        blocks[:0] = [
            (first, min(bounds[j], first + per_block), degree[first])
            for first in range(bounds[i], bounds[j], per_block)
        ]
        j = i
    return tuple(blocks)


class _PaddedGATv2Attention(torch.autograd.Function):
    """GATv2 attention and aggregation over a :class:`NeighbourTable`, block by block.

    Nothing of size ``E x heads x channels`` is stored: the backward pass recomputes each block's gathered
    neighbours from ``x_l``, so memory is the inputs plus ``(N, K, heads)`` attention weights. Each pass
    works in two block-sized buffers (``out=`` and in-place ops, kept between calls in a :class:`Workspace`).
    Inputs: ``x_l``, ``x_r`` of shape ``(N, H, C)``, ``att`` of shape ``(H, C)``; output ``(N, H, C)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_l: Tensor,
        x_r: Tensor,
        att: Tensor,
        table: NeighbourTable,
        slope: float,
        p: float,
        training: bool,
        workspace: Workspace | None,
    ) -> Tensor:
        n, heads, ch = x_l.shape
        dtype, hc = x_l.dtype, heads * ch
        x_l2, x_r2, att_c = x_l.reshape(n, hc), x_r.reshape(n, hc).to(dtype), att.to(dtype)
        out = x_l.new_empty(n, hc)
        alpha = torch.zeros((*table.index.shape, heads), dtype=torch.float32, device=x_l.device)
        scale = F.dropout(torch.ones_like(alpha), p) if training and p > 0 else None
        gathered, work = _block_buffers(x_l, table, hc, workspace)
        for first, end, w in table.blocks:
            b, slots = end - first, (end - first) * w
            neighbour_ids, targets = table.index[first:end, :w].reshape(-1), table.order[first:end]
            g = torch.index_select(
                x_l2, 0, neighbour_ids, out=gathered[:slots]
            )  # (S, H*C) neighbours' W_l x_j
            z = torch.add(
                g.view(b, w, hc), x_r2.index_select(0, targets).unsqueeze(1), out=work[:slots].view(b, w, hc)
            )
            z = F.leaky_relu_(z, slope).view(slots, heads, ch)
            score = torch.stack([torch.mv(z[:, h], att_c[h]) for h in range(heads)], -1).float()
            a = score.view(b, w, heads).masked_fill_(~table.mask[first:end, :w].unsqueeze(-1), float("-inf"))
            a = a.softmax(dim=1)  # (B, w, H)
            alpha[first:end, :w] = a
            if scale is not None:
                a = a * scale[first:end, :w]
            weighted = torch.mul(
                a.to(dtype).unsqueeze(-1), g.view(b, w, heads, ch), out=work[:slots].view(b, w, heads, ch)
            )
            out.index_copy_(0, targets, weighted.sum(1).view(b, hc))
        ctx.save_for_backward(x_l, x_r, att, alpha, scale)
        ctx.table, ctx.slope, ctx.workspace = table, slope, workspace
        return out.view(n, heads, ch)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_l, x_r, att, alpha, scale = ctx.saved_tensors
        table, slope, workspace = ctx.table, ctx.slope, ctx.workspace
        n, heads, ch = x_l.shape
        dtype, hc = x_l.dtype, heads * ch
        x_l2, x_r2, att_c = x_l.reshape(n, hc), x_r.reshape(n, hc).to(dtype), att.to(dtype)
        grad_out = grad_out.reshape(n, hc).to(dtype)
        grad_l = torch.zeros(n, hc, dtype=dtype, device=x_l.device)
        grad_r = torch.empty(n, hc, dtype=dtype, device=x_l.device)
        grad_att = torch.zeros(heads, ch, dtype=torch.float32, device=att.device)
        gathered, work = _block_buffers(x_l, table, hc, workspace)
        for first, end, w in table.blocks:
            b, slots = end - first, (end - first) * w
            neighbour_ids, targets = table.index[first:end, :w].reshape(-1), table.order[first:end]
            g = torch.index_select(x_l2, 0, neighbour_ids, out=gathered[:slots])
            z = torch.add(
                g.view(b, w, hc), x_r2.index_select(0, targets).unsqueeze(1), out=work[:slots].view(b, w, hc)
            )
            z = F.leaky_relu_(z, slope).view(slots, heads, ch)
            go = grad_out.index_select(0, targets).view(b, 1, heads, ch)
            a = alpha[first:end, :w]
            a_drop = a if scale is None else a * scale[first:end, :w]
            grad_a = g.view(b, w, heads, ch).mul_(go).sum(-1, dtype=torch.float32)  # (B, w, H); g is spent
            if scale is not None:
                grad_a = grad_a * scale[first:end, :w]
            grad_score = a * (grad_a - (a * grad_a).sum(1, keepdim=True))  # softmax backward; 0 on padding
            gs = grad_score.to(dtype).view(slots, heads)
            grad_att += torch.einsum("sh,shc->hc", gs, z).float()
            grad_z = torch.mul(gs.unsqueeze(-1), att_c, out=gathered[:slots].view(slots, heads, ch))
            torch.ops.aten.leaky_relu_backward.grad_input(grad_z, z, slope, True, grad_input=grad_z)
            grad_r.index_copy_(0, targets, grad_z.view(b, w, hc).sum(1))
            grad_z.view(b, w, heads, ch).addcmul_(a_drop.to(dtype).unsqueeze(-1), go)  # w.r.t. gathered x_l
            grad_l.index_add_(0, neighbour_ids, grad_z.view(slots, hc))
        return grad_l.view_as(x_l), grad_r.view_as(x_r), grad_att.to(att.dtype), None, None, None, None, None


def _block_buffers(
    like: Tensor, table: NeighbourTable, width: int, workspace: Workspace | None
) -> tuple[Tensor, Tensor]:
    """Two ``(largest block's slots, width)`` work buffers shared by all blocks of one pass."""
    slots = max(((end - first) * w for first, end, w in table.blocks), default=0)
    if workspace is None:
        return like.new_empty(slots, width), like.new_empty(slots, width)
    gathered, work = workspace.buffers(like, (slots, width), 2)
    return gathered, work


def gatv2_padded(
    conv: GATv2Conv, x: Tensor, table: NeighbourTable, workspace: Workspace | None = None
) -> Tensor:
    r"""``conv(x, edge_index)`` computed on a padded neighbour table, with ``conv``'s own parameters.

    .. math::
        e_{ij} = a^\top \mathrm{LeakyReLU}(W_r x_i + W_l x_j),\quad
        \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal N(i) \cup \{i\}}(e_{ij}),\quad
        x'_i = \sum_j \mathrm{Dropout}(\alpha_{ij})\, W_l x_j + b

    Supports what MoMKD uses: one node set, self loops, ``concat=True``, no edge features, no residual.
    ``workspace``: work buffers kept between calls (:class:`Workspace`); None: fresh ones each pass.

    Shapes:
        x ``(N, in_dim)``, a table built for the same N -> ``(N, heads * out_channels)``.
    """
    if conv.edge_dim is not None or conv.res is not None or not conv.concat or not conv.add_self_loops:
        raise ValueError(
            "gatv2_padded supports GATv2Conv(concat=True, add_self_loops=True, edge_dim=None, "
            "residual=False) only"
        )
    n, heads, ch = x.shape[0], conv.heads, conv.out_channels
    x_l = conv.lin_l(x).view(n, heads, ch)
    x_r = x_l if conv.share_weights else conv.lin_r(x).view(n, heads, ch)
    att = conv.att.view(heads, ch)
    out = _PaddedGATv2Attention.apply(
        x_l, x_r, att, table, conv.negative_slope, conv.dropout, conv.training, workspace
    )
    out = out.reshape(n, heads * ch)
    return out if conv.bias is None else out + conv.bias


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout from a uniform draw: the same distribution as ``F.dropout``, a few times faster on
    CPU (``bernoulli_`` is slow there)."""
    if not training or p == 0:
        return x
    keep = torch.rand_like(x) >= p
    return x * (keep.to(x.dtype) / (1 - p))


class _Maximum(torch.autograd.Function):
    """``torch.maximum`` with a backward pass of multiplies (CPU ``where`` is slow); ties split the gradient
    equally, as ``torch.maximum`` does. Ties are common here: where dropout zeroes a block, ``h2 = h1``."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.maximum(a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        share = (a > b).to(grad.dtype).add_((a == b).to(grad.dtype), alpha=0.5)  # a's share of the gradient
        grad_a = grad * share
        return grad_a, grad - grad_a


class GATv2Encoder(nn.Module):
    r"""MoMKD's WSI encoder: two residual GATv2 layers with jumping-knowledge max.

    From CAIR-LAB-WFUSM/MoMKD ``models/mkd.py`` (``WsiEncoder``, commit 226ad63):

    .. math::
        h_1 &= \mathrm{Dropout}(\mathrm{ELU}(\mathrm{LN}(\mathrm{GATv2}_1(x)))) + W_{res} x \\
        h_2 &= \mathrm{Dropout}(\mathrm{ELU}(\mathrm{LN}(\mathrm{GATv2}_2(h_1)))) + h_1 \\
        h &= \max(h_1, h_2)\ \text{(elementwise)}

    Each GATv2 has ``heads`` heads of width ``hidden_dim / heads`` (concatenated), attention dropout,
    self loops, PyG's default initialisation. The residual map is a Linear when ``in_dim != hidden_dim``.

    Args:
        in_dim: patch feature width D.
        hidden_dim: output width Dw (MoMKD: 256 class default, 512 in its run script).
        heads: attention heads per layer (MoMKD: 2); must divide ``hidden_dim``.
        dropout: dropout after each ELU (MoMKD: 0.5).
        attn_dropout: dropout on the attention coefficients (MoMKD: 0.5, GATv2Conv's ``dropout``).
        fast: compute attention on a padded neighbour table (:func:`gatv2_padded`) instead of PyG's
            scatters; same parameters and outputs, faster on bounded-degree graphs such as kNN graphs.

    Shapes:
        x ``(N, in_dim)``, edge_index ``(2, E)`` (row 0 source, row 1 target) -> ``(N, hidden_dim)``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        heads: int = 2,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        fast: bool = True,
    ) -> None:
        from torch_geometric.nn import (
            GATv2Conv,
        )  # deferred: ~130 MB and seconds, needed by graph methods only

        super().__init__()
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by heads ({heads})")
        self.fast = fast
        self.dropout = dropout
        width = hidden_dim // heads
        self.gat1 = GATv2Conv(in_dim, width, heads=heads, dropout=attn_dropout, add_self_loops=True)
        self.gat2 = GATv2Conv(hidden_dim, width, heads=heads, dropout=attn_dropout, add_self_loops=True)
        self.res1 = nn.Linear(in_dim, hidden_dim) if in_dim != hidden_dim else nn.Identity()
        self.ln1 = nn.LayerNorm(hidden_dim)
        self.ln2 = nn.LayerNorm(hidden_dim)
        # neighbour tables of the graphs seen, by id of their (never modified) edge_index while it lives: a
        # slide's graph is the same every epoch, so the table is built once per slide and the step neither
        # rebuilds it nor waits on the device for its block sizes
        self._tables: dict[int, NeighbourTable] = {}
        self._workspace = Workspace()

    def _block(
        self, conv: GATv2Conv, norm: nn.LayerNorm, x: Tensor, graph: Tensor | NeighbourTable
    ) -> Tensor:
        if isinstance(graph, NeighbourTable):
            out = gatv2_padded(conv, x, graph, self._workspace)
            return _dropout(F.elu(norm(out)), self.dropout, self.training)
        return F.dropout(F.elu(norm(conv(x, graph))), p=self.dropout, training=self.training)

    def _table(self, edge_index: Tensor, num_nodes: int) -> NeighbourTable:
        key = id(edge_index)
        table = self._tables.get(key)
        if table is None or table.index.shape[0] != num_nodes or table.index.device != edge_index.device:
            if table is None:  # forget the table when the graph is freed (before its id can be reused)
                weakref.finalize(edge_index, self._tables.pop, key, None)
            table = in_neighbour_table(edge_index, num_nodes)
            self._tables[key] = table
        return table

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        graph = self._table(edge_index, x.shape[0]) if self.fast else edge_index
        h1 = self._block(self.gat1, self.ln1, x, graph) + self.res1(x)  # (N, hidden)
        h2 = self._block(self.gat2, self.ln2, h1, graph) + h1  # (N, hidden)
        return _Maximum.apply(h1, h2) if self.fast else torch.maximum(h1, h2)

    def extra_repr(self) -> str:
        return f"fast={self.fast}, dropout={self.dropout}"

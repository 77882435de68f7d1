"""Graph layers shared by the graph MIL methods: MoMKD's two-layer GATv2 encoder and a padded GATv2.

A spatial kNN graph has a small, bounded in-degree, so GATv2 attention can be computed on a padded
``(N, K)`` neighbour table with a mask (dense gathers, a softmax over a short axis) instead of PyG's
scatter-based message passing. Both paths read the same ``GATv2Conv`` parameters, so a model can switch
between them (``fast=``) without touching its weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv

__all__ = ["GATv2Encoder", "NeighbourTable", "gatv2_padded", "in_neighbour_table"]


class NeighbourTable(NamedTuple):
    """Incoming neighbours of every node, padded to the largest in-degree.

    Attributes:
        index: source node of each slot, shape ``(N, K)``; padded slots point at the node itself.
        mask: True on real slots, shape ``(N, K)``.
    """

    index: Tensor
    mask: Tensor


def in_neighbour_table(edge_index: Tensor, num_nodes: int, self_loops: bool = True) -> NeighbourTable:
    """Padded table of the sources aggregated by each target (PyG: row 0 source, row 1 target).

    Self loops in ``edge_index`` are dropped and, when ``self_loops``, one is added per node in slot 0,
    as ``GATv2Conv(add_self_loops=True)`` does. Duplicate edges are kept (PyG counts them twice too).

    Args:
        edge_index: long tensor of shape ``(2, E)``.
        num_nodes: N.
        self_loops: add one self loop per node.
    """
    src, dst = edge_index[0], edge_index[1]
    keep = src != dst
    src, dst = src[keep], dst[keep]
    if self_loops:
        nodes = torch.arange(num_nodes, device=edge_index.device)
        src, dst = torch.cat([nodes, src]), torch.cat([nodes, dst])
    order = torch.argsort(dst, stable=True)
    src, dst = src[order], dst[order]
    degree = torch.bincount(dst, minlength=num_nodes)
    start = torch.cumsum(degree, 0) - degree
    slot = torch.arange(dst.numel(), device=dst.device) - start[dst]
    width = max(int(degree.max()), 1) if num_nodes else 1
    index = torch.arange(num_nodes, device=dst.device).unsqueeze(1).repeat(1, width)
    index[dst, slot] = src
    mask = torch.zeros(num_nodes, width, dtype=torch.bool, device=dst.device)
    mask[dst, slot] = True
    return NeighbourTable(index, mask)


def gatv2_padded(conv: GATv2Conv, x: Tensor, table: NeighbourTable) -> Tensor:
    r"""``conv(x, edge_index)`` computed on a padded neighbour table, with ``conv``'s own parameters.

    .. math::
        e_{ij} = a^\top \mathrm{LeakyReLU}(W_r x_i + W_l x_j),\quad
        \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal N(i)}(e_{ij}),\quad
        x'_i = \sum_j \alpha_{ij} W_l x_j + b

    Supports what MoMKD uses: a single node set, ``concat=True``, no edge features, no residual.

    Shapes:
        x ``(N, in_dim)``, table built with the same N -> ``(N, heads * out_channels)``.
    """
    if conv.edge_dim is not None or conv.res is not None or not conv.concat:
        raise ValueError("gatv2_padded supports GATv2Conv(concat=True, edge_dim=None, residual=False) only")
    n, heads, ch = x.shape[0], conv.heads, conv.out_channels
    x_l = conv.lin_l(x).view(n, heads, ch)
    x_r = x_l if conv.share_weights else conv.lin_r(x).view(n, heads, ch)
    x_j = x_l[table.index]  # (N, K, H, C)
    score = (F.leaky_relu(x_j + x_r.unsqueeze(1), conv.negative_slope) * conv.att).sum(-1)  # (N, K, H)
    score = score.masked_fill(~table.mask.unsqueeze(-1), float("-inf"))
    alpha = F.dropout(score.softmax(dim=1), p=conv.dropout, training=conv.training)  # (N, K, H)
    out = torch.einsum("nkh,nkhc->nhc", alpha, x_j).reshape(n, heads * ch)
    return out if conv.bias is None else out + conv.bias


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

    def _block(
        self, conv: GATv2Conv, norm: nn.LayerNorm, x: Tensor, graph: Tensor | NeighbourTable
    ) -> Tensor:
        h = gatv2_padded(conv, x, graph) if isinstance(graph, NeighbourTable) else conv(x, graph)
        return F.dropout(F.elu(norm(h)), p=self.dropout, training=self.training)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        graph = in_neighbour_table(edge_index, x.shape[0]) if self.fast else edge_index
        h1 = self._block(self.gat1, self.ln1, x, graph) + self.res1(x)  # (N, hidden)
        h2 = self._block(self.gat2, self.ln2, h1, graph) + h1  # (N, hidden)
        return torch.maximum(h1, h2)

    def extra_repr(self) -> str:
        return f"fast={self.fast}, dropout={self.dropout}"

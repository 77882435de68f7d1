"""Layers shared by several methods."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["GatedAttention"]


class GatedAttention(nn.Module):
    r"""Gated attention scores of Ilse et al. (ICML 2018), as CLAM's ``Attn_Net_Gated``.

    .. math::
        s_n = w^\top \big(\tanh(V h_n) \odot \sigma(U h_n)\big)

    Args:
        in_dim: width of the patch embeddings h.
        hidden_dim: width of V and U.
        dropout: dropout after tanh and after sigmoid (CLAM: 0.25 when enabled).
        out_dim: number of attention branches (1 for single-branch MIL).

    Shapes:
        input ``(N, in_dim)`` -> unnormalised scores ``(N, out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float = 0.0, out_dim: int = 1) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.c = nn.Linear(hidden_dim, out_dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.c(self.a(h) * self.b(h))

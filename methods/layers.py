"""Layers shared by several methods."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BilinearFusion", "GatedAttention", "Workspace", "init_linear_normal_fan_in"]


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


def init_linear_normal_fan_in(module: nn.Module) -> None:
    r"""Weights :math:`\mathcal N(0, 1/\sqrt{\mathrm{fan\_in}})`, zero biases, on every plain ``nn.Linear``.

    The ``init_max_weights`` of PathomicFusion, reused by MKD (zqb77/MICCAI25) and Xing et al.; as there,
    ``nn.Bilinear`` and ``nn.Linear`` subclasses are left at PyTorch's default.
    """
    for m in module.modules():
        if type(m) is nn.Linear:
            nn.init.normal_(m.weight, 0.0, m.weight.shape[1] ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class BilinearFusion(nn.Module):
    r"""Gated bilinear fusion of two vectors (PathomicFusion, Chen et al. TMI 2020), as in MKD's reference.

    .. math::
        o_k = \mathrm{Drop}\big(\mathrm{ReLU}(L^o_k(\sigma(\mathrm{Bil}_k(v_1, v_2))
              \odot \mathrm{ReLU}(L^h_k v_k)))\big),\quad k \in \{1, 2\}

    .. math::
        f = \mathrm{Enc}_2\big([\mathrm{Enc}_1(\mathrm{Drop}(\mathrm{vec}([o_1; 1][o_2; 1]^\top)));
            v_1; v_2]\big)

    with ``Enc`` = Linear–ReLU–Dropout and the skip ``[v_1; v_2]`` only when ``skip``.

    Args:
        dim1, dim2: widths of the two inputs.
        scale1, scale2: each gated unit has width ``dim_k // scale_k`` (MKD: 8, so 256 -> 32).
        hidden_dim: width of the first encoder (PathomicFusion: 256).
        out_dim: width of the fused vector (``mmhid``).
        dropout: dropout rate of every dropout layer.
        skip: append the raw inputs before the second encoder.

    Shapes:
        ``(B, dim1)``, ``(B, dim2)`` -> ``(B, out_dim)``.
    """

    def __init__(
        self,
        dim1: int,
        dim2: int,
        scale1: int = 1,
        scale2: int = 1,
        hidden_dim: int = 256,
        out_dim: int = 256,
        dropout: float = 0.25,
        skip: bool = True,
    ) -> None:
        super().__init__()
        g1, g2 = dim1 // scale1, dim2 // scale2
        self.skip = skip
        self.h1 = nn.Sequential(nn.Linear(dim1, g1), nn.ReLU())
        self.z1 = nn.Bilinear(dim1, dim2, g1)
        self.o1 = nn.Sequential(nn.Linear(g1, g1), nn.ReLU(), nn.Dropout(dropout))
        self.h2 = nn.Sequential(nn.Linear(dim2, g2), nn.ReLU())
        self.z2 = nn.Bilinear(dim1, dim2, g2)
        self.o2 = nn.Sequential(nn.Linear(g2, g2), nn.ReLU(), nn.Dropout(dropout))
        self.post_dropout = nn.Dropout(dropout)
        self.encoder1 = nn.Sequential(
            nn.Linear((g1 + 1) * (g2 + 1), hidden_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        skip_dim = dim1 + dim2 if skip else 0
        self.encoder2 = nn.Sequential(
            nn.Linear(hidden_dim + skip_dim, out_dim), nn.ReLU(), nn.Dropout(dropout)
        )

    @staticmethod
    def _bilinear(bil: nn.Bilinear, v1: Tensor, v2: Tensor) -> Tensor:
        """``bil(v1, v2)`` as one matrix product and a reduction: the same values, several times faster on
        CPU than ``F.bilinear`` (whose backward builds large intermediates)."""
        out, d1, _ = bil.weight.shape
        t = (bil.weight.view(out * d1, -1) @ v2.T).view(out, d1, -1)  # (out, d1, B)
        return torch.einsum("bi,oib->bo", v1, t) + bil.bias

    def forward(self, v1: Tensor, v2: Tensor) -> Tensor:
        o1 = self.o1(self._bilinear(self.z1, v1, v2).sigmoid() * self.h1(v1))  # (B, g1)
        o2 = self.o2(self._bilinear(self.z2, v1, v2).sigmoid() * self.h2(v2))  # (B, g2)
        o1 = F.pad(o1, (0, 1), value=1.0)
        o2 = F.pad(o2, (0, 1), value=1.0)
        outer = (o1.unsqueeze(2) * o2.unsqueeze(1)).flatten(1)  # (B, (g1+1)(g2+1))
        out = self.encoder1(self.post_dropout(outer))
        if self.skip:
            out = torch.cat((out, v1, v2), dim=1)
        return self.encoder2(out)


class Workspace:
    """Work buffers of a blocked custom operation, kept between its calls on the CPU.

    Freshly allocated, buffers of a few megabytes cost a page fault per 4 KiB on every pass (glibc hands
    such blocks back to the system when they are freed): for MoMKD's GATv2 passes at N = 350 that was a
    third of the encoder's step. A workspace is shared by operations that run one after another (the
    layers of one model, forward and backward); it holds the largest set of buffers asked for so far.
    What a caller gets is scratch: its contents are undefined and the next call may overwrite them.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def buffers(self, like: Tensor, shape: tuple[int, ...], count: int) -> tuple[Tensor, ...]:
        """``count`` distinct buffers of ``shape`` with ``like``'s dtype and device."""
        size = math.prod(shape)
        if like.device.type != "cpu":  # the device's caching allocator already reuses memory
            return tuple(like.new_empty(shape) for _ in range(count))
        key = (like.device, like.dtype)
        held = self._held.get(key)
        if held is None or held.numel() < size * count:
            with torch.inference_mode(False):  # a normal tensor, so training may write it after inference
                held = torch.empty(size * count, dtype=like.dtype, device=like.device)
            self._held[key] = held
        return tuple(held[i * size : (i + 1) * size].view(shape) for i in range(count))

    def __reduce__(self) -> tuple[type[Workspace], tuple[Any, ...]]:
        return Workspace, ()  # scratch memory: a copied or pickled model gets its own, empty one

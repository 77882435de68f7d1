"""Small helpers shared by the method modules (one place, one signature each)."""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor, nn

T = TypeVar("T")


def exists(x: object) -> bool:
    return x is not None


def default(x: T | None, d: T) -> T:
    return d if x is None else x


def init_linear_xavier(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases on every ``nn.Linear`` (CLAM's ``initialize_weights``)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def masked_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax that ignores ``-inf`` entries and returns zeros for all-masked rows."""
    out = scores.softmax(dim=dim)
    return out.nan_to_num(0.0)

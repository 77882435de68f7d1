"""Small helpers shared by the method modules (one place, one signature each)."""

from __future__ import annotations

from torch import nn


def init_linear_xavier(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases on every ``nn.Linear`` (CLAM's ``initialize_weights``)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

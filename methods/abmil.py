"""ABMIL: attention-based MIL (Ilse et al., ICML 2018, arXiv 1802.04712) in CLAM's gated form.

Reference code: mahmoodlab/CLAM (``Attn_Net_Gated``, ``CLAM_SB`` without instance clustering) and
AMLab-Amsterdam/AttentionDeepMIL (the ``ilse`` variant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ._utils import init_linear_xavier
from .base import Bag, MethodCfg, MILMethod, MILOutput
from .layers import GatedAttention
from .packing import pack_bags, segment_pool, segment_softmax
from .registry import register_method

__all__ = ["ABMIL", "ABMILCfg"]


@dataclass
class ABMILCfg(MethodCfg):
    """CLAM defaults: Adam 1e-4, weight decay 1e-5, dropout 0.25, up to 200 epochs, early stop on val loss
    with CLAM's ``EarlyStopping(patience=20, stop_epoch=50)``, which stops only at an epoch index above 50,
    i.e. after at least 52 epochs (``min_epochs=52`` under this trainer's rule). That class counts only a
    strictly lower validation loss as worse, so a tie becomes the new best (``keep_tied_best``)."""

    hidden_dim: int = 512
    attn_dim: int = 256
    epochs: int = 200
    patience: int = 20
    min_epochs: int = 52
    monitor: str = "loss"
    keep_tied_best: bool = True


@register_method("abmil")
class ABMIL(MILMethod):
    r"""Gated-attention MIL.

    .. math::
        h_n = \mathrm{Dropout}(\mathrm{ReLU}(W x_n)),\quad
        a = \mathrm{softmax}_n\big(w^\top(\tanh(V h_n) \odot \sigma(U h_n))\big),\quad
        \hat y = \mathrm{Linear}\Big(\sum_n a_n h_n\Big)

    Default: CLAM's sizes (512/256) and training settings. Variant ``ilse``: the AMLab original
    (M = 500, L = 128, no dropout, Adam 5e-4, weight decay 1e-4).
    """

    cfg_class = ABMILCfg
    variants = {
        "ilse": {"hidden_dim": 500, "attn_dim": 128, "dropout": 0.0, "lr": 5e-4, "weight_decay": 1e-4},
    }
    summary = "WSI-only gated-attention MIL in CLAM's form (variant `ilse`: the AMLab original)"
    #: defaults and the gated form from CLAM (``Attn_Net_Gated``, ``core_utils.py``); the ``ilse`` variant
    #: follows AMLab-Amsterdam/AttentionDeepMIL at eb0434b
    paper = "Ilse et al., ICML 2018"
    paper_url = "https://arxiv.org/abs/1802.04712"
    code_url = "https://github.com/mahmoodlab/CLAM"
    code_commit = "53e2409d4a8189c682c173382964a85f114f923c"

    def __init__(self, cfg: ABMILCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__(cfg, in_dim, omics_dim)
        self.encoder = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attn_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, cfg.num_classes)
        init_linear_xavier(self)

    def forward(self, bag: Bag) -> MILOutput:
        h = self.encoder(bag.features)  # (N, hidden)
        a = self.attention(h).squeeze(-1).softmax(dim=0)  # (N,)
        m = a @ h  # (hidden,)
        return MILOutput(logits=self.classifier(m), embedding=m, attention=a)

    def predict_logits(self, bags: Sequence[Bag]) -> Tensor:
        """The bags in one packed forward: per-patch maps on all patches, softmax and pooling per bag."""
        packed = pack_bags(bags)
        h = self.encoder(packed.features)  # (T, hidden)
        a = segment_softmax(self.attention(h).squeeze(-1), packed)  # (T,)
        return self.classifier(segment_pool(a, h, packed))  # (B, C)

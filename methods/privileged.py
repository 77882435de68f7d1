"""The privileged-information student: ABMIL trained with the patients' true latent programs as an auxiliary
target (learning using privileged information, Vapnik & Vashist, Neural Networks 2009).

It exists for the report's ceilings on synthetic tasks, not as a published method: with the very programs
that generate every label as a training-time target, it is the most that distillation from perfect genomics
could add to label-only ABMIL, and the distillation methods are measured by the share of that gap they close.
Its slide predictions come from the H&E features alone (the auxiliary head is used in ``loss`` only), exactly
as ABMIL's; ``DataNeeds.privileged`` asks the harness to put the z-scored programs in ``bag.omics`` (training
bags only), which only a synthetic cohort has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .abmil import ABMIL, ABMILCfg
from .base import Bag, DataNeeds, MILOutput
from .registry import register_method

__all__ = ["PrivilegedABMIL", "PrivilegedABMILCfg"]


@dataclass
class PrivilegedABMILCfg(ABMILCfg):
    """ABMIL's (CLAM's) settings, plus the weight of the auxiliary term (1: the mean squared error of z-scored
    programs, about 1 at the start, weighs as much as the cross-entropy; not tuned)."""

    privileged_weight: float = 1.0

    def needs(self) -> DataNeeds:
        return DataNeeds(graph=self.needs_graph, omics=False, gene_groups=False, privileged=True)


@register_method("ceiling-privileged")
class PrivilegedABMIL(ABMIL):
    r"""ABMIL with a linear head regressing the true programs from the slide embedding.

    .. math::
        \mathcal L = \mathrm{CE}(\hat y, y) + \lambda \,\lVert W_z m + b_z - z \rVert^2 / K

    with ``m`` ABMIL's attention-pooled embedding, ``z`` the patient's ``K`` latent programs (z-scored on the
    fold's training patients) and λ = ``privileged_weight``. The ABMIL part is built first, so with one seed it
    starts from the same weights as label-only ABMIL.
    """

    cfg_class = PrivilegedABMILCfg
    variants = {}
    label_only_twin = "abmil"
    summary = (
        "Ceiling, synthetic tasks only (not in `--methods all`): ABMIL + an auxiliary regression of the true "
        "latent programs from its slide embedding (privileged information: the most perfect genomics could teach)"
    )
    paper = (
        "Vapnik & Vashist, Neural Networks 2009 (learning using privileged information; bench's own ceiling)"
    )
    paper_url = "https://doi.org/10.1016/j.neunet.2009.06.042"
    code_url = "https://github.com/mahmoodlab/CLAM"
    code_commit = "53e2409d4a8189c682c173382964a85f114f923c"

    def __init__(self, cfg: PrivilegedABMILCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__(cfg, in_dim, omics_dim)
        # K outputs, one per program (the harness passes K as omics_dim); none without a target width
        self.privileged_head = nn.Linear(cfg.hidden_dim, omics_dim) if omics_dim else None

    def loss(self, bag: Bag, out: MILOutput) -> dict[str, Tensor]:
        terms = super().loss(bag, out)
        if self.privileged_head is not None and bag.omics is not None:
            target = bag.omics.to(out.embedding.dtype)
            terms["privileged"] = self.cfg.privileged_weight * F.mse_loss(
                self.privileged_head(out.embedding), target
            )
        return terms

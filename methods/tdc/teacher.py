"""TDC's settings (:class:`TDCCfg`) and its stage-1 multimodal teacher (``PathomicNet``) with its training."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..abmil import ABMIL, ABMILCfg
from ..base import Bag, MethodCfg, linear_decay
from ..layers import BilinearFusion, init_linear_normal_fan_in

__all__ = ["MultimodalTeacher", "TDCCfg", "train_teacher"]


@dataclass
class TDCCfg(MethodCfg):
    """Defaults of Xing et al.'s ``options.py`` and README (stage 2: ``--distill crd -a 1 -b 0.02 --nce_p2 20
    --num_teachers 2 --CE_grads True --assign_weights True``; ``kd_T`` 1, ``nce_t`` 0.07, ``nce_m`` 0.5,
    ``nce_k2`` 512, ``feat_dim`` 128, ``ema_decay`` 0.99): Adam lr 5e-4 (betas 0.9, 0.999), weight decay 4e-4,
    linear decay to zero over 30 epochs (``niter 0, niter_decay 30``), no early stop, plain shuffling; omics
    and fusion dropout 0.1 (``--dropout_rate``). Student and teacher pathology branch: the benchmark's ABMIL
    (CLAM 512/256, dropout 0.25); omics branch ``MaxNet`` (64-48-32-128); fusion at scale 1, ``mmhid`` 128,
    no skip. The teacher's stage 1 uses the same optimiser settings (``teacher_*``). The checkpoint kept is
    a strictly better validation AUC (``avg_metric > best_acc``; ``keep_tied_best`` off)."""

    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 4e-4
    scheduler: str = "linear"
    epochs: int = 30
    patience: int = 30
    monitor: str = "auc"
    uses_omics: bool = True
    hidden_dim: int = 512
    attn_dim: int = 256
    omics_hidden: tuple[int, ...] = (64, 48, 32)
    path_dim: int = 128  # --path_dim: the pathology vector entering the fusion
    omics_feature_dim: int = 128  # --omic_dim
    omics_dropout: float = 0.1  # --dropout_rate of MaxNet and the fusion
    fusion_dim: int = 128  # --mmhid (gated units at scale 1: --path_scale 1 --omic_scale 1)
    teacher_epochs: int = 30  # stage 1 (capped by ``epochs`` for quick runs)
    teacher_lr: float = 5e-4
    teacher_weight_decay: float = 4e-4
    teacher_seed: int = 0
    temperature: float = 1.0  # --kd_T
    alpha: float = 1.0  # logit KD weight (-a)
    beta: float = 0.02  # feature KD weight (-b)
    proj_dim: int = 128  # --feat_dim
    nce_temperature: float = 0.07  # --nce_t
    bank_momentum: float = 0.5  # --nce_m
    num_pos: int = 20  # --nce_p2: positives, the slide itself included
    num_neg: int = 512  # --nce_k2
    refine: str = "aekd"  # aekd (AEKD_loss, run) | mask (AEKD_loss_v2, commented out) | none
    num_teachers: int = 2  # --num_teachers: 2 = frozen multimodal + self-EMA teacher; 1 = multimodal only
    ema_decay: float = 0.99  # --ema_decay of the self-EMA teacher
    #: crd: CRDLoss as the code runs it (two halves over key memories without gradient, relations in each
    #: CRD's projected space, NCE with a fixed Z); infonce: the benchmark's earlier one-sided reading
    contrast: str = "crd"
    rank_by: str = "code"  # code: student minus teacher relation (what it computes) | paper: the reverse
    select_pos: str = "mid"  # --select_pos_mode: mid (random ranks of the 10-33 % band) | hard (top ranks)
    teacher_dropout: bool = True  # fix_model.train(): the frozen teacher runs with dropout in stage 2


class MultimodalTeacher(nn.Module):
    """Stage-1 ``PathomicNet``: ABMIL pathology branch (its slide vector projected to ``path_dim``, as the
    reference's ResNet ends in ``path_dim``), ``MaxNet`` omics branch, gated bilinear fusion; the fusion side
    does not back-propagate into the two branches (``--cut_fuse_grad``); one head per branch."""

    def __init__(self, cfg: TDCCfg, in_dim: int, omics_dim: int) -> None:
        super().__init__()
        self.path = ABMIL(
            ABMILCfg(
                hidden_dim=cfg.hidden_dim,
                attn_dim=cfg.attn_dim,
                dropout=cfg.dropout,
                num_classes=cfg.num_classes,
            ),
            in_dim,
        )
        self.path_proj = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.path_dim), nn.ReLU())
        layers: list[nn.Module] = []
        widths = (omics_dim, *cfg.omics_hidden, cfg.omics_feature_dim)
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ELU(), nn.AlphaDropout(cfg.omics_dropout)]
        self.omics = nn.Sequential(*layers, nn.ReLU())
        self.omics_head = nn.Linear(cfg.omics_feature_dim, cfg.num_classes)
        init_linear_normal_fan_in(self.omics)
        init_linear_normal_fan_in(self.omics_head)
        self.fusion = BilinearFusion(
            cfg.path_dim,
            cfg.omics_feature_dim,
            hidden_dim=cfg.fusion_dim,
            out_dim=cfg.fusion_dim,
            dropout=cfg.omics_dropout,
            skip=False,
        )
        self.head = nn.Linear(cfg.fusion_dim, cfg.num_classes)

    def forward(self, bag: Bag) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> fused logits ``(C,)``, fused feature ``(fusion_dim,)``, pathology and omics logits ``(C,)``."""
        p = self.path(bag)
        o = self.omics(bag.omics)  # (omics_dim,)
        v = self.path_proj(p.embedding.detach())  # (path_dim,)
        f = self.fusion(v.unsqueeze(0), o.detach().unsqueeze(0)).squeeze(0)
        return self.head(f), f, p.logits, self.omics_head(o)


def train_teacher(
    teacher: MultimodalTeacher,
    bags: Sequence[Bag],
    cfg: TDCCfg,
    device: torch.device,
    task_loss: Callable[[Tensor, Bag], Tensor],
) -> None:
    """Stage 1: train ``teacher`` ``min(teacher_epochs, epochs)`` epochs on ``bags`` (all with omics), one bag
    per step, loss :math:`CE(z_f) + CE(z_p) + CE(z_o)` (``task_loss``: the student's, so a survival task's
    teacher is trained with the survival likelihood), Adam with the ``teacher_*`` settings and linear decay;
    seeded by ``teacher_seed`` with torch's global RNG left as it was."""
    epochs = min(cfg.teacher_epochs, cfg.epochs) if bags else 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.teacher_seed)
        order = torch.Generator().manual_seed(cfg.teacher_seed)
        optimizer = torch.optim.Adam(
            teacher.parameters(),
            lr=cfg.teacher_lr,
            weight_decay=cfg.teacher_weight_decay,
            fused=True,
        )
        scheduler = linear_decay(optimizer, epochs)
        teacher.train()
        for _ in range(epochs):
            for i in torch.randperm(len(bags), generator=order).tolist():
                z_f, _, z_p, z_o = teacher(bags[i])
                loss = sum(task_loss(z, bags[i]) for z in (z_f, z_p, z_o))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()

"""MKD: multi-modal knowledge decomposition with online distillation (Zhang et al., MICCAI 2025).

"Multi-modal Knowledge Decomposition based Online Distillation for Biomarker Prediction in Breast Cancer
Histopathology". Reference code: zqb77/MICCAI25 at 545555a (``models/online_kd.py``, ``models/snnmil.py``,
``trainer/online_kd_trainer.py``, ``utils/loss/SP.py``, ``utils/loss/KD.py``, ``utils/MMD_loss.py``,
``train_kd.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Bag, MethodCfg, MILMethod, MILOutput
from .layers import BilinearFusion, GatedAttention, init_linear_normal_fan_in
from .packing import PackedBags, pack_bags, segment_pool, segment_softmax
from .registry import register_method

__all__ = ["MKD", "MKDCfg", "coral", "distill_kl", "orthogonality", "similarity_preserving"]


# ---- window losses (each on the stacked window, B rows) -------------------------------------------------


def similarity_preserving(f_a: Tensor, f_b: Tensor) -> Tensor:
    r"""Similarity-preserving KD (Tung & Mori, ICCV 2019) as ``utils/loss/SP.py``:
    :math:`\lVert \mathrm{rownorm}(F_b F_b^\top) - \mathrm{rownorm}(F_a F_a^\top) \rVert_F^2 / B^2`.

    Shapes: ``(B, d_a)``, ``(B, d_b)`` -> scalar.
    """
    g_a = F.normalize(f_a @ f_a.T, dim=1)
    g_b = F.normalize(f_b @ f_b.T, dim=1)
    return (g_b - g_a).pow(2).sum() / f_a.shape[0] ** 2


def distill_kl(z_s: Tensor, z_t: Tensor, temperature: float) -> Tensor:
    r"""Hinton KD as ``utils/loss/KD.py``: :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z_t/T)\,\|\,
    \mathrm{softmax}(z_s/T))`, averaged over rows (``batchmean``). The caller detaches the target.

    Shapes: ``(B, C)``, ``(B, C)`` -> scalar.
    """
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


def orthogonality(f_s: Tensor, f_o: Tensor, f_m: Tensor) -> Tensor:
    r"""Decomposition term of ``online_kd_trainer.py``: the mean row-wise dot product of each pair of raw
    features, in absolute value, summed and divided by 6.

    Shapes: three ``(B, d)`` -> scalar.
    """
    pairs = ((f_m, f_s), (f_o, f_s), (f_o, f_m))
    return sum((a * b).sum(1).mean().abs() for a, b in pairs) / 6


def coral(x: Tensor, y: Tensor) -> Tensor:
    r"""CORAL alignment (``MMD_Loss(kernel_type='mean_cov')``): mean squared difference of the means plus mean
    squared difference of the unbiased covariances.

    Shapes: ``(B, d)``, ``(B, d)`` with B >= 2 -> scalar.
    """
    mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cx, cy = x - mx, y - my
    cov_x = cx.T @ cx / (x.shape[0] - 1)
    cov_y = cy.T @ cy / (y.shape[0] - 1)
    return (mx - my).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


# ---- the three models ----------------------------------------------------------------------------------


@dataclass
class MKDCfg(MethodCfg):
    """Defaults from ``train_kd.py`` and ``utils/core_utils_train.py`` of zqb77/MICCAI25.

    AdamW 2e-4, weight decay 1e-5 (``--reg``), cosine schedule with ``T_max=50`` over up to 100 epochs,
    dropout 0.25, weighted sampling (README command), ``--gc 16`` (the window), temperature 4. Early stopping:
    ``EarlyStopping(patience=5, stop_epoch=5, metric='auc')``, which stops only after epoch index 5, i.e.
    no stop before 7 epochs (``min_epochs=7`` under this trainer's rule); that class counts a tie as no
    improvement (``score <= best_score``), so only a strictly better mean AUC is kept.

    ``validate_classification_coattn`` puts only the student in eval mode: the teachers are scored with
    their dropout active (``teacher_val_dropout``), and ``core_utils_train`` saves the teachers after every
    epoch while ``EarlyStopping`` saves the student alone, so the teachers kept are the last epoch's
    (``teachers_last_epoch``; only the student predicts, so this changes what ``model.pt`` holds, not any
    prediction).
    """

    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 1e-5
    scheduler: str = "cosine"
    cosine_t_max: int = 50
    epochs: int = 100
    patience: int = 5
    min_epochs: int = 7
    monitor: str = "mean-auc"  # core_utils_train: mean of the student's and both teachers' val AUCs
    balanced_sampling: bool = True
    accumulation_steps: int = 16  # the window: the trainer steps exactly once per window
    uses_omics: bool = True
    hidden_dim: int = 256  # feature_dim of every model
    attn_dim: int = 128  # gated attention width (Attention_Gated D=128)
    token_size: int = 512  # genes per omics token
    fusion_scale: int = 8  # BilinearFusion scale_dim1 = scale_dim2 = 8 -> 32-d gated units
    temperature: float = 4.0  # --temp
    sp_weight: float = 1.0  # --intermediate_loss_fn SP (0 = NOT)
    kl_weight: float = 1.0  # --logits_loss_fn KL (0 = NOT)
    decomposition_weight: float = 1.0  # --OR: orthogonality + CORAL (0 = NOR)
    teacher_val_dropout: bool = True  # teachers keep dropout on when scored for the mean-auc monitor
    teachers_last_epoch: bool = True  # the teachers keep their last epoch's weights, not the best epoch's
    #: one batched forward and backward per window of W slides (``window_loss``); False: slide by slide, as
    #: the code (the same gradient; the dropout masks drawn in the code's order)
    batched_windows: bool = True


class _Student(nn.Module):
    """``ABMIL`` of ``models/online_kd.py``: Linear(D->256)-ReLU, gated attention (no dropout), Dropout,
    Linear(256->C); N(0, 1/sqrt(fan_in)) init."""

    def __init__(self, in_dim: int, cfg: MKDCfg) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU())
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attn_dim)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden_dim, cfg.num_classes))
        init_linear_normal_fan_in(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(N, D)`` -> logits ``(C,)``, slide feature ``(256,)``, attention ``(N,)``."""
        h = self.fc(x)  # (N, 256)
        a = self.attention(h).squeeze(-1).softmax(0)  # (N,)
        f = a @ h  # (256,)
        return self.head(f), f, a

    def forward_packed(self, packed: PackedBags) -> tuple[Tensor, Tensor]:
        """Logits ``(B, C)`` and slide features ``(B, 256)`` of packed bags, each as :meth:`forward` alone."""
        h = self.fc(packed.features)  # (T, 256)
        a = segment_softmax(self.attention(h).squeeze(-1), packed)  # (T,)
        f = segment_pool(a, h, packed)
        return self.head(f), f


def _omics_tokens(cfg: MKDCfg) -> nn.Sequential:
    """Per-token SNN block of both teachers: Linear(512->256)-ELU-AlphaDropout."""
    return nn.Sequential(nn.Linear(cfg.token_size, cfg.hidden_dim), nn.ELU(), nn.AlphaDropout(cfg.dropout))


class _OmicsTeacher(nn.Module):
    """``SNNMIL`` of ``models/snnmil.py``: tokens -> SNN block -> gated attention pooling -> Dropout ->
    Linear; N(0, 1/sqrt(fan_in)) init. (The reference also builds an unused ``classifier``; not here.)"""

    def __init__(self, cfg: MKDCfg) -> None:
        super().__init__()
        self.tokens = _omics_tokens(cfg)
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attn_dim)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden_dim, cfg.num_classes))
        init_linear_normal_fan_in(self)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(T, 512)`` -> logits ``(C,)``, omics feature ``(256,)``."""
        h = self.tokens(tokens)  # (T, 256)
        f = self.attention(h).squeeze(-1).softmax(0) @ h  # (256,)
        return self.head(f), f

    def forward_many(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, 512)`` -> logits ``(B, C)``, omics features ``(B, 256)``, each row as :meth:`forward` of
        that slide alone."""
        h = self.tokens(tokens)  # (B, T, 256)
        a = self.attention(h).squeeze(-1).softmax(-1)  # (B, T)
        f = (a.unsqueeze(1) @ h).squeeze(1)
        return self.head(f), f


class _MultimodalTeacher(nn.Module):
    """``ABMIL_SNN(fusion='bilinear')`` of ``models/online_kd.py``: pathology branch Linear-ReLU-Dropout with
    gated pooling, omics token branch with gated pooling, gated bilinear fusion (scale 8, skip), Linear.
    PyTorch's default init (the reference does not re-initialise this model)."""

    def __init__(self, in_dim: int, cfg: MKDCfg) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.path_fc = nn.Sequential(nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.tokens = _omics_tokens(cfg)
        self.path_attention = GatedAttention(d, cfg.attn_dim)
        self.omics_attention = GatedAttention(d, cfg.attn_dim)
        self.fusion = BilinearFusion(
            d, d, cfg.fusion_scale, cfg.fusion_scale, hidden_dim=256, out_dim=d, dropout=cfg.dropout
        )
        self.classifier = nn.Linear(d, cfg.num_classes)

    def forward(self, x: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, D)``, ``(T, 512)`` -> logits ``(C,)``, fused feature ``(256,)``."""
        h = self.path_fc(x)  # (N, 256)
        p = self.path_attention(h).squeeze(-1).softmax(0) @ h  # (256,)
        o = self.tokens(tokens)  # (T, 256)
        g = self.omics_attention(o).squeeze(-1).softmax(0) @ o  # (256,)
        f = self.fusion(p.unsqueeze(0), g.unsqueeze(0)).squeeze(0)  # (256,)
        return self.classifier(f), f

    def forward_many(self, packed: PackedBags, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Packed bags and their ``(B, T, 512)`` tokens -> logits ``(B, C)``, fused features ``(B, 256)``,
        each as :meth:`forward` alone."""
        h = self.path_fc(packed.features)  # (T_all, 256)
        p = segment_pool(segment_softmax(self.path_attention(h).squeeze(-1), packed), h, packed)
        o = self.tokens(tokens)  # (B, T, 256)
        g = (self.omics_attention(o).squeeze(-1).softmax(-1).unsqueeze(1) @ o).squeeze(1)  # (B, 256)
        f = self.fusion(p, g)
        return self.classifier(f), f


@register_method("mkd")
class MKD(MILMethod):
    r"""Online three-model distillation: WSI student, omics teacher, multimodal teacher, trained together.

    Per slide (``online_kd_trainer.py``): :math:`L_{CE} = (CE(z_s) + CE(z_m) + CE(z_o)) / W`, W = 16.
    Every window of W slides, on the stacked ``(B, 256)`` features F and ``(B, C)`` logits Z:

    .. math::
        L_{SP} = W\,[SP(F_s, F_m) + SP(F_s, F_o)],\quad
        L_{KL} = \sum_{t \in \{m, o\}} KD_T(Z_s, sg(Z_t)) + KD_T(Z_t, sg(Z_s)),\ T = 4

    .. math::
        L_{orth} = \tfrac16 \sum_{(a,b)} \big|\mathrm{mean}_i \langle F_a^i, F_b^i \rangle\big|,\quad
        L_{CORAL} = \sum_{(a,b)} \lVert \mu_a - \mu_b \rVert^2_{mean} + \lVert C_a - C_b \rVert^2_{mean}

    over the pairs (m, s), (o, s), (o, m). The reference back-propagates each slide's CE at once and the KD
    terms at the window's end, then steps; the sum of those gradients is the gradient of the window's sum,
    so here, with ``accumulation_steps = W``, the trainer hands the whole window to :meth:`window_loss`
    (``batched_windows``, default): each of the three models runs once on the window's slides (the student
    and the multimodal teacher's pathology branch on their packed patches, the omics teacher on the stacked
    tokens), and one backward of the window's terms gives the reference's gradient; one optimiser step per
    window. Dropout is elementwise, so the window draws from the same distribution as slide by slide, in
    another order (the one difference from the reference's run). ``batched_windows=False`` keeps the
    reference's slide-by-slide schedule: ``loss`` buffers each slide's terms (with their graphs) and returns
    the whole window's terms on its W-th slide (``{}`` before). Either way a partial last window is dropped,
    as the reference's ``zero_grad`` at epoch end does (``on_epoch_start`` clears the buffer;
    ``window_loss`` returns ``{}`` for it).

    Inference: the student alone (``forward`` never reads omics). The omics vector is cut into tokens of 512
    genes; a width that is not a multiple of 512 is zero-padded to the next multiple (the reference needs
    8192). A slide without omics contributes its student CE; the KD terms use only the window's slides with
    omics (none when fewer than two).

    Model selection: as the reference, early stopping and the kept checkpoint follow the mean validation AUC
    of the three models (``monitor="mean-auc"``; the teachers are scored on the validation patients with
    omics, which the runner attaches for this monitor only); variant ``student-monitor``: the student's AUC.
    As the code, the teachers are scored in train mode (dropout active) and keep their last epoch's weights;
    variant ``eval-teachers`` scores them in eval mode and keeps them at the selected epoch with the student
    (deterministic teacher scores: a cleaner monitor, not the authors' run).
    """

    cfg_class = MKDCfg
    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "no-sp": {"sp_weight": 0.0},
        "no-kl": {"kl_weight": 0.0},
        "no-decomposition": {"decomposition_weight": 0.0},
        "student-monitor": {"monitor": "auc"},
        "eval-teachers": {"teacher_val_dropout": False, "teachers_last_epoch": False},
    }
    summary = (
        "Online KD: ABMIL student + omics and bilinear-fusion teachers, SP/KL/orthogonal/CORAL losses, 16-slide "
        "KD windows; teachers scored with dropout on and kept at their last epoch, as the code"
    )
    paper = "Zhang et al., MICCAI 2025"
    paper_url = "https://arxiv.org/abs/2508.17213"
    code_url = "https://github.com/zqb77/MICCAI25"
    code_commit = "545555a9ea01dae0ad34ada40b30a3a97b5fa7bc"

    def __init__(self, cfg: MKDCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__(cfg, in_dim, omics_dim)
        self.student = _Student(in_dim, cfg)
        self.omics_teacher = _OmicsTeacher(cfg)
        self.multimodal_teacher = _MultimodalTeacher(in_dim, cfg)
        self.num_tokens = math.ceil((omics_dim or cfg.token_size) / cfg.token_size)
        self._window: list[dict[str, Tensor]] = []

    def forward(self, bag: Bag) -> MILOutput:
        logits, feature, attention = self.student(bag.features)
        return MILOutput(logits=logits, embedding=feature, attention=attention)

    def predict_logits(self, bags: Sequence[Bag]) -> Tensor:
        return self.student.forward_packed(pack_bags(bags))[0]

    def validation_logits_batch(self, bags: Sequence[Bag]) -> dict[str, tuple[list[int], Tensor]]:
        """:meth:`validation_logits` of several bags in packed forwards (the teachers: the bags with omics, in
        train mode when ``teacher_val_dropout``: every dropout is elementwise, so each bag's scores have the
        distribution they have alone)."""
        out = {"student": (list(range(len(bags))), self.student.forward_packed(pack_bags(bags))[0])}
        rows = [i for i, b in enumerate(bags) if b.omics is not None]
        if rows:
            sub = [bags[i] for i in rows]
            tokens = torch.stack([self._tokens(b.omics) for b in sub])  # (B', T, 512)
            teachers = (self.omics_teacher, self.multimodal_teacher)
            modes = [t.training for t in teachers]
            for t in teachers:
                t.train(self.cfg.teacher_val_dropout or t.training)
            out["omics_teacher"] = (rows, self.omics_teacher.forward_many(tokens)[0])
            out["multimodal_teacher"] = (
                rows,
                self.multimodal_teacher.forward_many(pack_bags(sub), tokens)[0],
            )
            for t, mode in zip(teachers, modes, strict=True):
                t.train(mode)
        return out

    def _tokens(self, omics: Tensor) -> Tensor:
        """``(G,)`` -> ``(T, 512)``, zero-padded to ``T * 512`` genes."""
        pad = self.num_tokens * self.cfg.token_size - omics.shape[0]
        return F.pad(omics, (0, pad)).view(self.num_tokens, self.cfg.token_size)

    def validation_logits(self, bag: Bag) -> dict[str, Tensor]:
        """Logits ``(C,)`` of the student and, when the bag has omics, of both teachers (in train mode when
        ``teacher_val_dropout``, as the reference; their modes are restored)."""
        out = {"student": self.student(bag.features)[0]}
        if bag.omics is not None:
            tokens = self._tokens(bag.omics)
            teachers = (self.omics_teacher, self.multimodal_teacher)
            modes = [t.training for t in teachers]
            for t in teachers:
                t.train(self.cfg.teacher_val_dropout or t.training)
            out["omics_teacher"] = self.omics_teacher(tokens)[0]
            out["multimodal_teacher"] = self.multimodal_teacher(bag.features, tokens)[0]
            for t, mode in zip(teachers, modes, strict=True):
                t.train(mode)
        return out

    def last_epoch_modules(self) -> tuple[str, ...]:
        return ("omics_teacher", "multimodal_teacher") if self.cfg.teachers_last_epoch else ()

    def on_epoch_start(self, epoch: int) -> None:
        self._window.clear()

    @property
    def batches_windows(self) -> bool:
        return self.cfg.batched_windows

    def window_loss(self, bags: Sequence[Bag]) -> dict[str, Tensor]:
        """The window's terms in one batched forward of each model (the student on all W slides, both
        teachers on those with omics): what :meth:`loss` returns on the window's W-th slide; ``{}`` for a
        partial window, which the per-slide path drops. With dropout the masks are drawn in another order
        than slide by slide (one draw per layer for the whole window), so a run differs from the per-slide
        one by its dropout draws alone; without dropout the gradients are the same
        (``tests/methods/test_windows.py``)."""
        cfg = self.cfg
        if len(bags) < cfg.accumulation_steps:
            return {}
        z_s, f_s = self.student.forward_packed(pack_bags(bags))
        ce = self.task_loss_sum(z_s, bags)
        rows = [i for i, b in enumerate(bags) if b.omics is not None]
        stacked = {}
        if rows:
            sub = [bags[i] for i in rows]
            tokens = torch.stack([self._tokens(b.omics) for b in sub])  # (B', T, 512)
            z_o, f_o = self.omics_teacher.forward_many(tokens)
            z_m, f_m = self.multimodal_teacher.forward_many(pack_bags(sub), tokens)
            ce = ce + self.task_loss_sum(z_o, sub) + self.task_loss_sum(z_m, sub)
            keep = torch.tensor(rows, device=z_s.device) if len(rows) < len(bags) else None
            stacked = {"f_o": f_o, "z_o": z_o, "f_m": f_m, "z_m": z_m}
            stacked["f_s"], stacked["z_s"] = (f_s, z_s) if keep is None else (f_s[keep], z_s[keep])
        terms = {self.task_term: ce / cfg.accumulation_steps}
        if len(rows) >= 2:
            terms.update(self._window_terms(stacked))
        return terms

    def loss(self, bag: Bag, out: MILOutput) -> dict[str, Tensor]:
        cfg = self.cfg
        ce = self.task_loss(out.logits, bag)
        if not self.training:  # e.g. a validation loss: the student's CE, the window untouched
            return {self.task_term: ce}
        entry = {"f_s": out.embedding, "z_s": out.logits}
        if bag.omics is not None:
            tokens = self._tokens(bag.omics)
            entry["z_o"], entry["f_o"] = self.omics_teacher(tokens)
            entry["z_m"], entry["f_m"] = self.multimodal_teacher(bag.features, tokens)
            ce = ce + self.task_loss(entry["z_o"], bag)
            ce = ce + self.task_loss(entry["z_m"], bag)
        entry["ce"] = ce / cfg.accumulation_steps
        self._window.append(entry)
        if len(self._window) < cfg.accumulation_steps:
            return {}
        window, self._window = self._window, []
        terms = {self.task_term: torch.stack([e["ce"] for e in window]).sum()}
        with_omics = [e for e in window if "f_o" in e]
        if len(with_omics) >= 2:
            keys = ("f_s", "z_s", "f_o", "z_o", "f_m", "z_m")
            terms.update(self._window_terms({k: torch.stack([e[k] for e in with_omics]) for k in keys}))
        return terms

    def _window_terms(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        """The KD terms on the window's slides with omics (float32), each already weighted: ``stacked`` has
        the student's and both teachers' features ``f_*`` ``(B, 256)`` and logits ``z_*`` ``(B, C)``."""
        cfg = self.cfg
        f_s, f_o, f_m = (stacked[k].float() for k in ("f_s", "f_o", "f_m"))
        terms: dict[str, Tensor] = {}
        if cfg.sp_weight:
            sp = similarity_preserving(f_s, f_m) + similarity_preserving(f_s, f_o)
            terms["sp"] = cfg.sp_weight * cfg.accumulation_steps * sp
        if cfg.kl_weight:
            z_s, z_o, z_m = (stacked[k].float() for k in ("z_s", "z_o", "z_m"))
            t = cfg.temperature
            kl = sum(distill_kl(z_s, z.detach(), t) + distill_kl(z, z_s.detach(), t) for z in (z_m, z_o))
            terms["kl"] = cfg.kl_weight * kl
        if cfg.decomposition_weight:
            terms["orthogonal"] = cfg.decomposition_weight * orthogonality(f_s, f_o, f_m)
            terms["coral"] = cfg.decomposition_weight * (coral(f_m, f_s) + coral(f_o, f_s) + coral(f_o, f_m))
        return terms

    def training_report(self) -> dict[str, Any]:
        padded = self.num_tokens * self.cfg.token_size - (self.omics_dim or 0)
        return {"omics_tokens": self.num_tokens, "omics_zero_padded_genes": padded}

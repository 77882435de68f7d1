"""MoMKD: genomics-to-pathology distillation through a class-conditional memory (Guo et al., CVPR 2026).

Paper: "Momentum Memory for Knowledge Distillation in Computational Pathology", arXiv 2602.21395.
Reference code: CAIR-LAB-WFUSM/MoMKD at 226ad63 (``models/mkd.py``, ``utils/Mkd_train_utils.py``,
``utils/core_utils.py``, the vendored ``vq/`` VectorQuantize it configures). Every place where paper and code
disagree is a named variant; ``docs/momkd.md`` lists them.
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
from .graph_layers import GATv2Encoder
from .packing import pack_bags, segment_pool, segment_softmax
from .registry import register_method

__all__ = ["MoMKD", "MoMKDCfg", "soft_angle_loss", "spherical_kmeans"]

MEMORY_MODES = ("gradient", "ema", "fixed")


@dataclass
class MoMKDCfg(MethodCfg):
    """MoMKD settings; defaults are the reference code's (CAIR-LAB-WFUSM/MoMKD 226ad63).

    Sizes: ``MKD.__init__`` defaults (Dw 256, E 256, S 128, K 4, classifier 128); ``RnaEncoder`` hidden 512
    and dropout 0.25; ``WsiEncoder`` heads 2, dropout 0.5 (features and attention); head dropout 0.5.
    Loss: ``train_mkd``'s ``train_hparams`` (0.5 CE, 0.05 omics alignment, 0.2 WSI alignment, 0.05
    reconstruction, margin 0.3), ``alpha_mem = 0.1`` in ``mkd_train_loop``, LogSumExp scale 5 and softplus
    sharpness 20 in ``PrototypicalAlignmentLoss``, orthogonality weight 10 on the VectorQuantize memories.
    Memory: ``ema_update=False``, so AdamW trains the codebooks (``memory_mode="gradient"``); k-means on up to
    50,000 patches per class, 20 iterations (``bootstrap_codebooks``); learnable log τ, init 0.2.
    Training: AdamW lr 2e-4 (``main.py``), weight decay 1e-4 (hard-coded in ``train_mkd``), ReduceLROnPlateau
    (max, factor 0.2, patience 5) on val AUC, grad-norm clip 16 (``run.sh``: ``--gc 16``), class-balanced
    sampling with replacement, up to 100 epochs (``run.sh``), early stopping on val AUC with ``main.py``'s
    defaults patience 20 and stop epoch 50 (``run.sh`` sets 1 and 1, a debugging setting; not used); its
    CLAM-style ``EarlyStopping`` stops only at an epoch index above ``stop_epoch``, so ``min_epochs=52``;
    it counts only ``score < best`` as worse, so a tied validation AUC becomes the new best
    (``keep_tied_best``). It is always on: ``main.py``'s ``--early_stopping`` flag is never read.
    """

    wsi_dim: int = 256  # Dw, width of the graph encoder
    omics_hidden_dim: int = 512
    omics_embed_dim: int = 256  # E, width of the omics embedding
    shared_dim: int = 128  # S, the spherical space
    memory_size: int = 4  # K, components per class
    cls_hidden_dim: int = 128
    heads: int = 2
    dropout: float = 0.5  # graph encoder features and classifier head
    attn_dropout: float = 0.5  # GATv2 attention coefficients
    omics_dropout: float = 0.25
    memory_mode: str = "gradient"  # gradient | ema | fixed
    ema_decay: float = 0.99
    kmeans_patches: int = 50_000  # per class (paper: 10,000)
    kmeans_iters: int = 20
    tau_init: float = 0.2
    learn_tau: bool = True  # paper: fixed τ = 0.2
    margin: float = 0.3
    lse_scale: float = 5.0
    softplus_beta: float = 20.0
    ortho_weight: float = 10.0
    active_threshold: float = 0.01  # a memory component is "active" above this share of its class's patches
    ce_weight: float = 0.5
    mem_weight: float = 0.1
    align_omics_weight: float = 0.05
    align_wsi_weight: float = 0.2
    recon_weight: float = 0.05  # paper: 0.01
    fast_graph: bool = True
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 1e-4
    scheduler: str = "plateau"
    plateau_factor: float = 0.2
    plateau_patience: int = 5
    epochs: int = 100
    patience: int = 20
    min_epochs: int = 52
    monitor: str = "auc"
    keep_tied_best: bool = True
    grad_clip: float | None = 16.0
    balanced_sampling: bool = True
    needs_graph: bool = True
    graph_k: int = 8
    graph_symmetric: bool = False
    uses_omics: bool = True


def spherical_kmeans(x: Tensor, k: int, iters: int) -> Tensor:
    """Spherical k-means as the reference ``bootstrap_codebooks``: cosine assignment, normalised means.

    Centres start at ``k`` distinct random points (torch's global RNG, so seeded runs repeat; with fewer than
    ``k`` points some start duplicated); a centre that loses all its points keeps its place.

    Args:
        x: points of shape ``(M, S)`` (normalised here).
        k: number of centres.
        iters: assignment/update rounds.

    Returns:
        unit centres of shape ``(k, S)``.
    """
    x = F.normalize(x.float(), dim=-1)
    m = x.shape[0]
    start = torch.randperm(m)[torch.arange(k) % m].to(x.device)
    centres = x[start].clone()
    codes = torch.arange(k, device=x.device)
    for _ in range(iters):
        onehot = ((x @ centres.T).argmax(dim=1, keepdim=True) == codes).to(x.dtype)  # (M, k)
        sums = onehot.T @ x  # (k, S)
        centres = torch.where(onehot.sum(0).unsqueeze(1) > 0, F.normalize(sums, dim=-1), centres)
    return centres


def soft_angle_loss(
    x: Tensor, memory: Tensor, label: Tensor, margin: float, scale: float = 5.0, beta: float = 20.0
) -> Tensor:
    r"""Soft-angle alignment of one unit vector with the two class memories (``PrototypicalAlignmentLoss``).

    .. math::
        \phi(x, C) = \tfrac{1}{s}\log\sum_k e^{s\langle x, c_k\rangle},\quad
        \Delta = \phi(x, C^{+}) - \phi(x, C^{-}),\quad
        L = \mathrm{softplus}\big(\beta\,(m - (2y - 1)\,\Delta)\big)

    Args:
        x: unit vector of shape ``(S,)``.
        memory: unit memory of shape ``(2, K, S)``: row 0 is C− (class 0), row 1 is C+ (class 1).
        label: class index, long tensor of shape ``()``.
        margin: m; scale: s (LogSumExp sharpness); beta: β (softplus sharpness).

    Returns:
        scalar loss.
    """
    phi = torch.logsumexp(scale * (memory @ x), dim=-1) / scale  # (2,)
    sign = 2.0 * label.to(phi.dtype) - 1.0
    return F.softplus(beta * (margin - sign * (phi[1] - phi[0])))


class _OmicsMLP(nn.Sequential):
    """Linear–LayerNorm–ReLU–Dropout–Linear, MoMKD's ``RnaEncoder`` (and, mirrored, ``RnaDecoder``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )


@register_method("momkd")
class MoMKD(MILMethod):
    r"""MoMKD: WSI graph encoder, omics teacher, and two class memories that are the only bridge between them.

    Encoding (patch features x_n, graph G, omics o): h = GATv2Encoder(x, G) ∈ R^{N×Dw};
    z_n = norm(P_z h_n), r = norm(P_r f(o)), with f the omics MLP; g the decoder, ô = g(f(o)).

    Memory-guided pooling (training and inference alike; the memory is detached here):

    .. math::
        s_n = \max_k \langle z_n, \bar c^{+}_k\rangle - \max_k \langle z_n, \bar c^{-}_k\rangle,\quad
        a = \mathrm{softmax}_n(s / \tau),\quad V = \textstyle\sum_n a_n h_n,\quad
        w = \mathrm{norm}(P_w V),\quad \hat y = \mathrm{head}(V)

    with :math:`\bar c = \mathrm{sg}(c)/\lVert c\rVert`, τ = exp(log τ) clamped to [0.01, 2].

    Loss (``mkd_train_loop``), with C_y the slide's own class memory:

    .. math::
        L = 0.5\,\mathrm{CE}
            + 0.1\,\big[\tfrac{1}{NS}\textstyle\sum_n \lVert z_n - \mathrm{sg}(c_{y,k^*_n})\rVert^2
            + 10\cdot\tfrac{1}{K^2}\textstyle\sum_{i\ne j}\cos^2(c_{y,i}, c_{y,j})\big]
            + 0.05\,L_{align}(r) + 0.2\,L_{align}(w) + 0.05\,\mathrm{MSE}(\hat o, o)

    with k*_n the Euclidean-nearest raw code (the VectorQuantize commitment) and L_align the
    :func:`soft_angle_loss`. The alignment terms reach the memory; CE does not (detached in the pooling);
    the omics terms never reach the WSI encoder (they share nothing but the memory).

    Memory modes (``memory_mode``): ``gradient`` (the code: AdamW trains the codebooks), ``ema`` (the paper's
    "momentum" reading: each used code moves by EMA towards the mean of its own-class patch embeddings
    assigned to it, after each optimiser step; no gradient), ``fixed`` (k-means initialisation, frozen).
    """

    cfg_class = MoMKDCfg
    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "wsi-baseline": {
            "align_omics_weight": 0.0,
            "align_wsi_weight": 0.0,
            "recon_weight": 0.0,
            "uses_omics": False,
        },
        "wsi-align-only": {"align_omics_weight": 0.0, "recon_weight": 0.0, "uses_omics": False},
        "omics-align-only": {"align_wsi_weight": 0.0},
        "no-recon": {"recon_weight": 0.0},
        "fixed-memory": {"memory_mode": "fixed"},
        "ema-memory": {"memory_mode": "ema"},
        "paper-recon": {"recon_weight": 0.01},
        "fixed-tau": {"learn_tau": False},
        "paper-kmeans": {"kmeans_patches": 10_000},
        "paper": {"recon_weight": 0.01, "learn_tau": False, "kmeans_patches": 10_000},
        "paper-run": {"wsi_dim": 512, "omics_embed_dim": 512, "shared_dim": 64, "memory_size": 16},
        "symmetric-graph": {"graph_symmetric": True},
    }
    #: the paper's ablation table and its fixed-vs-momentum memory study (default "" = gradient memory).
    ablations: ClassVar[dict[str, list[tuple[str, str]]]] = {
        "ablation": [
            ("WSI baseline (no distillation)", "wsi-baseline"),
            ("WSI + WSI alignment only", "wsi-align-only"),
            ("WSI + omics alignment only", "omics-align-only"),
            ("No omics reconstruction", "no-recon"),
            ("MoMKD (full)", ""),
        ],
        "memory_modes": [
            ("Fixed memory (k-means, frozen)", "fixed-memory"),
            ("EMA memory (momentum)", "ema-memory"),
            ("Gradient memory (code: AdamW)", ""),
        ],
    }
    summary = "genomics->WSI distillation through class-conditional memories, GATv2 encoder (Guo et al. 2026)"

    def __init__(self, cfg: MoMKDCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__(cfg, in_dim, omics_dim)
        if cfg.num_classes != 2:
            raise ValueError(
                "MoMKD has one positive and one negative memory: "
                f"num_classes must be 2, got {cfg.num_classes}"
            )
        if cfg.memory_mode not in MEMORY_MODES:
            raise ValueError(f"unknown memory_mode {cfg.memory_mode!r}; use one of {', '.join(MEMORY_MODES)}")
        dw, s, k = cfg.wsi_dim, cfg.shared_dim, cfg.memory_size
        self.encoder = GATv2Encoder(
            in_dim,
            dw,
            heads=cfg.heads,
            dropout=cfg.dropout,
            attn_dropout=cfg.attn_dropout,
            fast=cfg.fast_graph,
        )
        self.patch_proj = nn.Linear(dw, s)
        self.pool_proj = nn.Linear(dw, s)
        self.head = nn.Sequential(
            nn.LayerNorm(dw),
            nn.Linear(dw, cfg.cls_hidden_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.cls_hidden_dim, 2),
        )
        wants_omics = cfg.align_omics_weight > 0 or cfg.recon_weight > 0
        if omics_dim and wants_omics:
            e = cfg.omics_embed_dim
            self.omics_encoder: nn.Module | None = _OmicsMLP(
                omics_dim, cfg.omics_hidden_dim, e, cfg.omics_dropout
            )
            self.omics_decoder: nn.Module | None = _OmicsMLP(
                e, cfg.omics_hidden_dim, omics_dim, cfg.omics_dropout
            )
            self.omics_proj: nn.Module | None = nn.Linear(e, s)
        else:
            self.omics_encoder = self.omics_decoder = self.omics_proj = None
        # memory[0] = C- (class 0), memory[1] = C+ (class 1); overwritten by k-means in prepare().
        self.memory = nn.Parameter(
            F.normalize(torch.randn(2, k, s), dim=-1), requires_grad=cfg.memory_mode == "gradient"
        )
        log_tau = torch.tensor(math.log(cfg.tau_init))
        if cfg.learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        # own-class patch assignments counted over the current training epoch (saved with the weights).
        self.register_buffer("usage", torch.zeros(2, k))
        # EMA mode: sums and counts of assigned embeddings since the last optimiser step.
        self.register_buffer("_ema_sum", torch.zeros(2, k, s), persistent=False)
        self.register_buffer("_ema_count", torch.zeros(2, k), persistent=False)

    # ---------------------------------------------------------------- forward (H&E only)

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp().clamp(0.01, 2.0)

    def _project_patches(self, bag: Bag) -> tuple[Tensor, Tensor]:
        """Graph-encoded patches ``h (N, Dw)`` and their unit projections ``z (N, S)``."""
        if bag.edge_index is None:
            raise ValueError(
                f"MoMKD needs the spatial kNN graph of slide {bag.slide_id!r} (bag.edge_index is None); "
                "the runner attaches it when cfg.needs_graph is True"
            )
        h = self.encoder(bag.features, bag.edge_index)  # (N, Dw)
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            z = F.normalize(self.patch_proj(h), dim=-1)  # (N, S)
        return h, z

    def _memory_scores(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Cosines ``(N, 2, K)`` of the patches to the (detached) memory codes, and the pooling logits
        ``s_n / τ`` ``(N,)``."""
        k, s = self.memory.shape[1:]
        memory = F.normalize(self.memory.detach(), dim=-1)  # (2, K, S)
        sim = (z @ memory.view(2 * k, s).T).view(-1, 2, k)  # (N, 2, K) cosines
        best = sim.amax(dim=-1)  # (N, 2)
        return sim, (best[:, 1] - best[:, 0]) / self.tau

    def forward(self, bag: Bag) -> MILOutput:
        h, z = self._project_patches(bag)
        with torch.autocast(h.device.type, enabled=False):
            sim, score = self._memory_scores(z)
            attention = score.softmax(dim=0)  # (N,)
            pooled = attention @ h  # (Dw,)
            w = F.normalize(self.pool_proj(pooled), dim=-1)  # (S,)
        logits = self.head(pooled)  # (2,)
        return MILOutput(
            logits=logits, embedding=pooled, attention=attention, extras={"z": z, "w": w, "sim": sim}
        )

    def predict_logits(self, bags: Sequence[Bag]) -> Tensor:
        """The bags in one packed forward: the graph encoder on their block-diagonal graph (messages never
        cross bags), the memory pooling per bag."""
        for bag in bags:
            if bag.edge_index is None:
                self._project_patches(bag)  # raises the missing-graph error for that slide
        packed = pack_bags(bags)
        h, z = self._project_patches(Bag(packed.features, bags[0].label, edge_index=packed.edge_index))
        with torch.autocast(h.device.type, enabled=False):
            attention = segment_softmax(self._memory_scores(z)[1], packed)  # (T,)
            pooled = segment_pool(attention, h, packed)  # (B, Dw)
        return self.head(pooled)

    # ---------------------------------------------------------------- training losses

    def loss(self, bag: Bag, out: MILOutput) -> dict[str, Tensor]:
        cfg = self.cfg
        label = bag.label.view(())
        z, w = out.extras["z"], out.extras["w"]
        terms = {"ce": cfg.ce_weight * F.cross_entropy(out.logits.float().unsqueeze(0), label.view(1))}
        with torch.autocast(z.device.type, enabled=False):
            memory_n = F.normalize(self.memory, dim=-1)  # (2, K, S), gradient into the memory
            own = self.memory.index_select(0, label.view(1)).squeeze(0)  # (K, S), own class, raw
            if cfg.mem_weight > 0:
                terms["mem"] = cfg.mem_weight * (
                    self._commitment(z, own) + cfg.ortho_weight * _orthogonality(own)
                )
            if cfg.align_wsi_weight > 0:
                terms["align_wsi"] = cfg.align_wsi_weight * self._align(w, memory_n, label)
            if bag.omics is not None and self.omics_encoder is not None:
                emb = self.omics_encoder(bag.omics.float())  # (E,)
                if cfg.align_omics_weight > 0:
                    r = F.normalize(self.omics_proj(emb), dim=-1)  # (S,)
                    terms["align_omics"] = cfg.align_omics_weight * self._align(r, memory_n, label)
                if cfg.recon_weight > 0:
                    terms["recon"] = cfg.recon_weight * F.mse_loss(self.omics_decoder(emb), bag.omics.float())
        if self.training and torch.is_grad_enabled():
            self._record_assignments(z.detach(), out.extras["sim"], own.detach(), label)
        return terms

    def _align(self, x: Tensor, memory_n: Tensor, label: Tensor) -> Tensor:
        cfg = self.cfg
        return soft_angle_loss(x, memory_n, label, cfg.margin, cfg.lse_scale, cfg.softplus_beta)

    @staticmethod
    def _commitment(z: Tensor, codes: Tensor) -> Tensor:
        """Mean of ``(z_n - sg(c_k*))^2`` over patches and dims, k* the Euclidean-nearest raw code.

        ``||z - c||^2 = ||z||^2 - (2<z, c> - ||c||^2)``, so the nearest code and its distance come from one
        matrix product and a max (no gather).
        """
        codes = codes.detach()
        score = 2 * z @ codes.T - codes.pow(2).sum(-1)  # (N, K)
        return (z.pow(2).sum(-1) - score.amax(dim=-1)).mean() / z.shape[1]

    @torch.no_grad()
    def _record_assignments(self, z: Tensor, sim: Tensor, own: Tensor, label: Tensor) -> None:
        """Count own-class cosine assignments (memory use) and, in EMA mode, collect VQ statistics."""
        k = own.shape[0]
        codes = torch.arange(k, device=z.device)
        own_sim = sim.index_select(1, label.view(1)).squeeze(1)  # (N, K)
        counts = (own_sim.argmax(dim=-1, keepdim=True) == codes).sum(0).to(self.usage.dtype)  # (K,)
        self.usage.index_add_(0, label.view(1), counts.unsqueeze(0))
        if self.cfg.memory_mode == "ema":
            score = 2 * z @ own.T - own.pow(2).sum(-1)  # (N, K), as the commitment's assignment
            onehot = (score.argmax(dim=-1, keepdim=True) == codes).to(z.dtype)  # (N, K)
            self._ema_sum.index_add_(0, label.view(1), (onehot.T @ z).unsqueeze(0))
            self._ema_count.index_add_(0, label.view(1), onehot.sum(0).unsqueeze(0))

    # ---------------------------------------------------------------- hooks

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA mode: move each code used since the last step towards the mean embedding assigned to it."""
        if self.cfg.memory_mode != "ema":
            return
        count = self._ema_count.unsqueeze(-1)  # (2, K, 1)
        mean = self._ema_sum / count.clamp(min=1)
        self.memory.copy_(torch.where(count > 0, self.memory.lerp(mean, 1 - self.cfg.ema_decay), self.memory))
        self._ema_sum.zero_()
        self._ema_count.zero_()

    def on_epoch_start(self, epoch: int) -> None:
        self.usage.zero_()
        self._ema_sum.zero_()
        self._ema_count.zero_()

    @torch.no_grad()
    def prepare(self, train_bags: Sequence[Bag]) -> None:
        """Spherical k-means initialisation of each class memory on projected patch embeddings ``z`` of
        that class's training slides, taken with the untrained encoder in eval mode.

        Per class, slides are visited in a random order (torch's RNG) until ``kmeans_patches`` patches are
        collected; a random subset of exactly that many is clustered. A class without slides keeps its
        random initialisation. The code's version visits slides in its weighted sampler's order, with
        replacement, and keeps every patch of the slides it visited.
        """
        was_training = self.training
        self.eval()
        device = self.memory.device
        budget, k = self.cfg.kmeans_patches, self.cfg.memory_size
        for cls in (0, 1):
            bags = [b for b in train_bags if int(b.label) == cls]
            chunks: list[Tensor] = []
            collected = 0
            for i in torch.randperm(len(bags)).tolist():
                if collected >= budget:
                    break
                _, z = self._project_patches(bags[i].to(device))
                chunks.append(z)
                collected += z.shape[0]
            if not chunks:
                continue
            z = torch.cat(chunks)
            if z.shape[0] > budget:
                z = z[torch.randperm(z.shape[0])[:budget].to(device)]
            self.memory[cls] = spherical_kmeans(z, k, self.cfg.kmeans_iters)
        self.memory.copy_(F.normalize(self.memory, dim=-1))
        self.train(was_training)

    def training_report(self) -> dict[str, Any]:
        """Memory use in the last training epoch of the kept weights: share of each class's patches whose
        nearest (cosine) code in its own class memory is each component, and the components above
        ``active_threshold`` (the paper's "adaptive capacity")."""
        usage = self.usage.cpu()
        report: dict[str, Any] = {"memory_mode": self.cfg.memory_mode, "memory_size": self.cfg.memory_size}
        for cls, name in ((1, "positive"), (0, "negative")):
            total = float(usage[cls].sum())
            share = (usage[cls] / total).tolist() if total > 0 else [0.0] * usage.shape[1]
            active = [i for i, v in enumerate(share) if v >= self.cfg.active_threshold]
            report[f"memory_{name}_share"] = [round(v, 4) for v in share]
            report[f"memory_{name}_active"] = active
            report[f"memory_{name}_num_active"] = len(active)
        report["tau"] = float(self.tau.detach())
        return report

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {
            "margin": trial.suggest_float("margin", 0.0, 0.6),
            "memory_size": trial.suggest_categorical("memory_size", [2, 4, 8, 16, 32, 64]),
            "lr": trial.suggest_float("lr", 5e-5, 1e-3, log=True),
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, memory_mode={self.cfg.memory_mode}, memory_size={self.cfg.memory_size}"
        )


def _orthogonality(codes: Tensor) -> Tensor:
    """(1/K^2) Σ_{i≠j} cos^2(c_i, c_j) of codes ``(K, S)`` (``orthogonal_loss_fn`` of the vendored vq)."""
    unit = F.normalize(codes, dim=-1)
    cos2 = (unit @ unit.T).pow(2)
    k = codes.shape[0]
    return (cos2.sum() - cos2.diagonal().sum()) / k**2

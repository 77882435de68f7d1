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

from .base import Bag, MethodCfg, MILMethod, MILOutput, PatchMap
from .graph_layers import GATv2Encoder
from .packing import pack_bags, segment_pool, segment_softmax
from .registry import register_method

__all__ = ["MoMKD", "MoMKDCfg", "soft_angle_loss", "spherical_kmeans"]

#: how the memory moves; ``docs/momkd.md`` says what reaches it in each mode.
MEMORY_MODES = ("gradient", "momentum", "vq-ema", "fixed")


@dataclass
class MoMKDCfg(MethodCfg):
    """MoMKD settings; defaults are the reference code's (CAIR-LAB-WFUSM/MoMKD 226ad63).

    Sizes: ``MKD.__init__`` defaults (Dw 256, E 256, S 128, K 4, classifier 128); ``RnaEncoder`` hidden 512
    and dropout 0.25; ``WsiEncoder`` heads 2, dropout 0.5 (features and attention); head dropout 0.5.
    Loss: ``train_mkd``'s ``train_hparams`` (0.5 CE, 0.05 omics alignment, 0.2 WSI alignment, 0.05
    reconstruction, margin 0.3), ``alpha_mem = 0.1`` in ``mkd_train_loop``, LogSumExp scale 5 and softplus
    sharpness 20 in ``PrototypicalAlignmentLoss``, orthogonality weight 10 on the VectorQuantize memories.
    Memory: ``ema_update=False``, so AdamW trains the codebooks (``memory_mode="gradient"``, the default:
    the authors' code; the paper's "momentum-updated memory" is the named variant ``momentum-memory``);
    k-means on up to 50,000 patches per class, 20 iterations (``bootstrap_codebooks``); learnable log τ,
    init 0.2. The memory-mode and adaptive-size settings (``ema_decay`` ... ``split_threshold``) are bench's
    own (the code has no counterpart): they only act in the modes that name them.
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
    memory_mode: str = "gradient"  # gradient | momentum | vq-ema | fixed
    #: momentum: decay of the momentum copy; vq-ema: decay of the running counts and sums (per optimiser step)
    ema_decay: float = 0.99
    ema_omics_weight: float = 1.0  # vq-ema: mass of the patient's omics embedding (a slide's patches: 1)
    ema_epsilon: float = 1e-5  # vq-ema: Laplace smoothing of the running counts
    dead_code_threshold: float = 0.1  # vq-ema: re-seed a code whose count is below this × its class's mean
    adaptive_memory: bool = False  # prune components whose use stays below active_threshold
    prune_patience: int = 3  # adaptive: epochs in a row below active_threshold before a component is pruned
    split_threshold: float = 0.0  # adaptive: split a component above this share into a free slot (0: never)
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
    x: Tensor,
    memory: Tensor,
    label: Tensor,
    margin: float,
    scale: float = 5.0,
    beta: float = 20.0,
    mask: Tensor | None = None,
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
        mask: which components take part, bool ``(2, K)`` with at least one per class (None: all).

    Returns:
        scalar loss.
    """
    logits = scale * (memory @ x)  # (2, K)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    phi = torch.logsumexp(logits, dim=-1) / scale  # (2,)
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

    Memory-guided pooling (training and inference alike; the memory read here is never differentiated):

    .. math::
        s_n = \max_k \langle z_n, \bar c^{+}_k\rangle - \max_k \langle z_n, \bar c^{-}_k\rangle,\quad
        a = \mathrm{softmax}_n(s / \tau),\quad V = \textstyle\sum_n a_n h_n,\quad
        w = \mathrm{norm}(P_w V),\quad \hat y = \mathrm{head}(V)

    with :math:`\bar c = \mathrm{sg}(c)/\lVert c\rVert` (in ``momentum`` mode the momentum copy), τ =
    exp(log τ) clamped to [0.01, 2].

    Loss (``mkd_train_loop``), with C_y the slide's own class memory:

    .. math::
        L = 0.5\,\mathrm{CE}
            + 0.1\,\big[\tfrac{1}{NS}\textstyle\sum_n \lVert z_n - \mathrm{sg}(c_{y,k^*_n})\rVert^2
            + 10\cdot\tfrac{1}{K^2}\textstyle\sum_{i\ne j}\cos^2(c_{y,i}, c_{y,j})\big]
            + 0.05\,L_{align}(r) + 0.2\,L_{align}(w) + 0.05\,\mathrm{MSE}(\hat o, o)

    with k*_n the Euclidean-nearest raw code (the VectorQuantize commitment) and L_align the
    :func:`soft_angle_loss`. The omics terms never reach the WSI encoder (they share nothing but the memory)
    and CE never reaches the memory (it is detached in the pooling).

    Memory modes (``memory_mode``; what reaches the memory in each, tested in ``tests/methods/test_momkd.py``):

    - ``gradient`` (default, the authors' code: ``VectorQuantize(ema_update=False)`` with an orthogonal
      regulariser): AdamW trains the codebooks with the gradients of both alignments and the orthogonality.
    - ``momentum`` (``momentum-memory``, the paper's "momentum-updated memory" read as MoCo's key encoder):
      the online memory is trained as in ``gradient`` and renormalised to the sphere after each optimiser
      step; a momentum copy ``ĉ ← norm(m ĉ + (1 − m) c)`` (m = ``ema_decay``, once per optimiser step) is
      what the attention, the commitment and the WSI alignment read. The WSI alignment's gradient with
      respect to the copy is applied to the online memory (straight-through), so it still shapes the memory;
      the omics alignment reads (and anchors) the online memory.
    - ``vq-ema`` (``vq-ema-memory``): no gradient; a VQ-VAE-style EMA codebook (van den Oord et al. 2017,
      appendix A.1) of running counts and sums with Laplace smoothing, renormalised to the sphere, whose
      targets are the slide's patch embeddings (each slide's patches mass 1 in total) and the patient's omics
      embedding r (mass ``ema_omics_weight``), each assigned to its nearest own-class code; a code whose
      count falls below ``dead_code_threshold`` × its class's mean is re-seeded from the slide's patches.
      The omics alignment trains r towards the memory, and r moves the memory through the EMA.
    - ``fixed`` (``fixed-memory``): the k-means initialisation, frozen; nothing reaches the memory.

    In ``vq-ema`` and ``fixed`` the memory has no gradient, so the orthogonality term (a constant) is left
    out of ``mem``. With ``adaptive_memory`` a component whose share of its class's patches stays below
    ``active_threshold`` for ``prune_patience`` epochs is pruned (masked out of attention, losses and
    updates), and with ``split_threshold`` > 0 an overloaded one is split into a free slot
    (:meth:`on_epoch_end`).
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
        "momentum-memory": {"memory_mode": "momentum"},
        "vq-ema-memory": {"memory_mode": "vq-ema"},
        "memory-16": {"memory_size": 16},
        "adaptive-memory": {"memory_size": 16, "adaptive_memory": True},
        "paper-recon": {"recon_weight": 0.01},
        "fixed-tau": {"learn_tau": False},
        "paper-kmeans": {"kmeans_patches": 10_000},
        "paper": {"recon_weight": 0.01, "learn_tau": False, "kmeans_patches": 10_000},
        "paper-run": {"wsi_dim": 512, "omics_embed_dim": 512, "shared_dim": 64, "memory_size": 16},
        "symmetric-graph": {"graph_symmetric": True},
    }
    #: the paper's ablation table, its fixed-vs-momentum memory study (default "" = gradient memory), and
    #: the memory size chosen by the data against fixed sizes.
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
            ("VQ-EMA memory (counts, omics in the target)", "vq-ema-memory"),
            ("Momentum memory (paper: momentum copy)", "momentum-memory"),
            ("Gradient memory (code: AdamW)", ""),
        ],
        "memory_capacity": [
            ("K = 4 (code default)", ""),
            ("K = 16", "memory-16"),
            ("Adaptive, from K = 16", "adaptive-memory"),
        ],
    }
    ablation_notes: ClassVar[dict[str, str]] = {
        "memory_modes": (
            "What reaches the memory: fixed: nothing (k-means init, frozen); VQ-EMA: no gradient, an EMA "
            "codebook of the slide's patch embeddings and the patient's omics embedding (the omics alignment "
            "trains the omics embedding, which moves the memory through the EMA); momentum: gradients of the "
            "omics alignment, the WSI alignment (straight-through from the momentum copy) and the "
            "orthogonality term train the online memory, while attention and WSI alignment read its momentum "
            "copy; gradient (the authors' code): the same gradients, read directly. Classification never "
            "reaches the memory. The paper's claim for this study (ODX, internal to its in-house cohort): fixed "
            "memory drops from 81.9 to 73.5, momentum memory from 82.3 to 79.4."
        ),
        "memory_capacity": (
            "Adaptive: components whose share of their class's training patches stays below 1 % for 3 epochs "
            "are pruned; the components kept per class are in each fold's metrics.json (method_report, and "
            "per epoch in history) and in the report's memory table."
        ),
    }
    summary = (
        "Genomics->WSI KD through class-conditional memories, GATv2 encoder; memory modes gradient (code, "
        "default), momentum (paper), vq-ema, fixed; adaptive memory size (docs/momkd.md)"
    )
    paper = "Guo et al., CVPR 2026"
    paper_url = "https://arxiv.org/abs/2602.21395"
    code_url = "https://github.com/CAIR-LAB-WFUSM/MoMKD"
    code_commit = "226ad631d93d50790d9c842e6c5dc3ea641a9ae2"

    def __init__(self, cfg: MoMKDCfg, in_dim: int, omics_dim: int | None = None) -> None:
        super().__init__(cfg, in_dim, omics_dim)
        if cfg.num_classes != 2:
            raise ValueError(
                "MoMKD has one positive and one negative memory: "
                f"num_classes must be 2, got {cfg.num_classes}"
            )
        if cfg.memory_mode not in MEMORY_MODES:
            renamed = " ('ema' is now 'vq-ema')" if cfg.memory_mode == "ema" else ""
            raise ValueError(
                f"unknown memory_mode {cfg.memory_mode!r}{renamed}; use one of {', '.join(MEMORY_MODES)}"
            )
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
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
            F.normalize(torch.randn(2, k, s), dim=-1),
            requires_grad=cfg.memory_mode in ("gradient", "momentum"),
        )
        log_tau = torch.tensor(math.log(cfg.tau_init))
        if cfg.learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        # own-class patch assignments counted over the current training epoch (saved with the weights).
        self.register_buffer("usage", torch.zeros(2, k))
        # components taking part: adaptive memory prunes them (and saves the mask with the weights; without
        # it every component takes part and the weights keep the authors' keys).
        self.register_buffer("active", torch.ones(2, k, dtype=torch.bool), persistent=cfg.adaptive_memory)
        self.register_buffer("_low_epochs", torch.zeros(2, k, dtype=torch.long), persistent=False)
        if cfg.memory_mode == "momentum":
            self.register_buffer("momentum_memory", self.memory.detach().clone())
        if cfg.memory_mode == "vq-ema":
            # running (EMA) counts and sums of the codebook, and this optimiser step's statistics.
            self.register_buffer("ema_count", torch.ones(2, k))
            self.register_buffer("ema_sum", self.memory.detach().clone())
            self.register_buffer("_step_count", torch.zeros(2, k), persistent=False)
            self.register_buffer("_step_sum", torch.zeros(2, k, s), persistent=False)
            self._reseed_pool: tuple[Tensor, Tensor] | None = None  # last bag's (z, label)

    # ---------------------------------------------------------------- forward (H&E only)

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp().clamp(0.01, 2.0)

    def read_memory(self) -> Tensor:
        """The unit memory ``(2, K, S)`` the attention reads, without gradient: the momentum copy in
        ``momentum`` mode, else the normalised memory."""
        if self.cfg.memory_mode == "momentum":
            return self.momentum_memory
        return F.normalize(self.memory.detach(), dim=-1)

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
        """Cosines ``(N, 2, K)`` of the patches to the memory codes the attention reads (``read_memory``;
        pruned components masked out), and the pooling logits ``s_n / τ`` ``(N,)``."""
        k, s = self.memory.shape[1:]
        memory = self.read_memory()  # (2, K, S)
        sim = (z @ memory.view(2 * k, s).T).view(-1, 2, k)  # (N, 2, K) cosines
        if self.cfg.adaptive_memory:
            sim = sim.masked_fill(~self.active, -math.inf)
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

    def explain_maps(self, bag: Bag, out: MILOutput) -> dict[str, PatchMap]:
        """Each patch's nearest memory code among all 2K by cosine (``out.extras["sim"]``, pruned components
        at −inf so never chosen): its bank (0 = C−, 1 = C+), and the code itself, C− first
        (bank · K + component)."""
        sim = out.extras["sim"].float()  # (N, 2, K)
        k = sim.shape[2]
        nearest = sim.reshape(sim.shape[0], 2 * k).argmax(dim=1)  # (N,) bank * K + component
        codes = tuple(f"C−{i}" for i in range(k)) + tuple(f"C+{i}" for i in range(k))
        return {
            "nearest class memory bank": PatchMap(
                values=torch.div(nearest, k, rounding_mode="floor").float(),
                categories=("C− (negative)", "C+ (positive)"),
                classes=(0, 1),
            ),
            "nearest memory component": PatchMap(
                values=nearest.float(), categories=codes, classes=(0,) * k + (1,) * k
            ),
        }

    # ---------------------------------------------------------------- training losses

    def loss(self, bag: Bag, out: MILOutput) -> dict[str, Tensor]:
        cfg = self.cfg
        label = bag.label.view(())
        z, w = out.extras["z"], out.extras["w"]
        terms = {"ce": cfg.ce_weight * F.cross_entropy(out.logits.float().unsqueeze(0), label.view(1))}
        mask = self.active if cfg.adaptive_memory else None
        own_mask = None if mask is None else mask.index_select(0, label.view(1)).squeeze(0)  # (K,)
        r = None
        with torch.autocast(z.device.type, enabled=False):
            memory_n = F.normalize(self.memory, dim=-1)  # (2, K, S), gradient into the memory
            memory_wsi = memory_n
            if cfg.memory_mode == "momentum":  # the copy's values, the gradient to the online memory
                memory_wsi = self.momentum_memory + (memory_n - memory_n.detach())
            own = self.memory.index_select(0, label.view(1)).squeeze(0)  # (K, S), own class, raw
            if cfg.mem_weight > 0:
                read = own
                if cfg.memory_mode == "momentum":  # patches commit to the codes the attention reads
                    read = self.momentum_memory.index_select(0, label.view(1)).squeeze(0)
                mem = self._commitment(z, read, own_mask)
                if self.memory.requires_grad:
                    mem = mem + cfg.ortho_weight * _orthogonality(own, own_mask)
                terms["mem"] = cfg.mem_weight * mem
            if cfg.align_wsi_weight > 0:
                terms["align_wsi"] = cfg.align_wsi_weight * self._align(w, memory_wsi, label, mask)
            if bag.omics is not None and self.omics_encoder is not None:
                emb = self.omics_encoder(bag.omics.float())  # (E,)
                r = F.normalize(self.omics_proj(emb), dim=-1)  # (S,)
                if cfg.align_omics_weight > 0:
                    terms["align_omics"] = cfg.align_omics_weight * self._align(r, memory_n, label, mask)
                if cfg.recon_weight > 0:
                    terms["recon"] = cfg.recon_weight * F.mse_loss(self.omics_decoder(emb), bag.omics.float())
        if self.training and torch.is_grad_enabled():
            self._record_assignments(z.detach(), out.extras["sim"].detach(), label, r)
        return terms

    def _align(self, x: Tensor, memory_n: Tensor, label: Tensor, mask: Tensor | None) -> Tensor:
        cfg = self.cfg
        return soft_angle_loss(x, memory_n, label, cfg.margin, cfg.lse_scale, cfg.softplus_beta, mask)

    @staticmethod
    def _commitment(z: Tensor, codes: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean of ``(z_n - sg(c_k*))^2`` over patches and dims, k* the Euclidean-nearest raw code (among
        the components in ``mask``, bool ``(K,)``; None: all).

        ``||z - c||^2 = ||z||^2 - (2<z, c> - ||c||^2)``, so the nearest code and its distance come from one
        matrix product and a max (no gather).
        """
        codes = codes.detach()
        score = 2 * z @ codes.T - codes.pow(2).sum(-1)  # (N, K)
        if mask is not None:
            score = score.masked_fill(~mask, -math.inf)
        return (z.pow(2).sum(-1) - score.amax(dim=-1)).mean() / z.shape[1]

    @torch.no_grad()
    def _record_assignments(self, z: Tensor, sim: Tensor, label: Tensor, r: Tensor | None) -> None:
        """Count own-class cosine assignments (memory use) and, in ``vq-ema`` mode, collect this step's
        codebook statistics: each patch (weight 1/N) and the omics embedding r (``ema_omics_weight``) at
        its nearest own-class code (cosine: the codes are unit)."""
        k = sim.shape[2]
        codes = torch.arange(k, device=z.device)
        own_sim = sim.index_select(1, label.view(1)).squeeze(1)  # (N, K), inactive components at -inf
        onehot = (own_sim.argmax(dim=-1, keepdim=True) == codes).to(z.dtype)  # (N, K)
        self.usage.index_add_(0, label.view(1), onehot.sum(0).unsqueeze(0).to(self.usage.dtype))
        if self.cfg.memory_mode != "vq-ema":
            return
        weights = onehot / z.shape[0]
        counts, sums = weights.sum(0), weights.T @ z  # (K,), (K, S)
        if r is not None and self.cfg.ema_omics_weight > 0:
            r = r.detach()
            r_sim = self.memory.index_select(0, label.view(1)).squeeze(0) @ r  # (K,)
            if self.cfg.adaptive_memory:
                r_sim = r_sim.masked_fill(~self.active.index_select(0, label.view(1)).squeeze(0), -math.inf)
            r_hot = (r_sim.argmax() == codes).to(z.dtype) * self.cfg.ema_omics_weight  # (K,)
            counts, sums = counts + r_hot, sums + r_hot.unsqueeze(1) * r
        self._step_count.index_add_(0, label.view(1), counts.unsqueeze(0))
        self._step_sum.index_add_(0, label.view(1), sums.unsqueeze(0))
        self._reseed_pool = (z, label)

    # ---------------------------------------------------------------- hooks

    @torch.no_grad()
    def after_step(self) -> None:
        """Once per optimiser step: ``momentum`` renormalises the online memory and moves the copy
        towards it; ``vq-ema`` updates the codebook from this step's statistics."""
        mode = self.cfg.memory_mode
        if mode == "momentum":
            m = self.cfg.ema_decay
            self.memory.copy_(F.normalize(self.memory, dim=-1))
            self.momentum_memory.copy_(F.normalize(self.momentum_memory.lerp(self.memory, 1 - m), dim=-1))
        elif mode == "vq-ema":
            self._vq_ema_update()

    def _vq_ema_update(self) -> None:
        r"""EMA codebook step for each class that got statistics since the last step (no host sync):

        .. math::
            N_k \leftarrow m N_k + (1 - m) n_k,\quad M_k \leftarrow m M_k + (1 - m) s_k,\quad
            c_k = \mathrm{norm}\Big(M_k \Big/ \tfrac{N_k + \epsilon}{N + K\epsilon} N\Big),\quad N = \textstyle\sum_k N_k

        then every active code with N_k < ``dead_code_threshold`` · N / K_active of the last bag's class is
        re-seeded at a random patch embedding of that bag, with N_k = N / K_active and M_k = N_k c_k.
        """
        cfg = self.cfg
        m, k = cfg.ema_decay, self.memory.shape[1]
        seen = (self._step_count.sum(-1) > 0).unsqueeze(-1)  # (2, 1)
        count = torch.where(seen, self.ema_count.lerp(self._step_count, 1 - m), self.ema_count)
        sums = torch.where(seen.unsqueeze(-1), self.ema_sum.lerp(self._step_sum, 1 - m), self.ema_sum)
        total = count.sum(-1, keepdim=True)  # (2, 1)
        smoothed = (count + cfg.ema_epsilon) / (total + k * cfg.ema_epsilon) * total
        codes = F.normalize(sums / smoothed.unsqueeze(-1), dim=-1)
        if self._reseed_pool is not None:
            z, label = self._reseed_pool
            n_active = self.active.sum(-1, keepdim=True).clamp(min=1)  # (2, 1)
            mean = total / n_active
            of_bag = torch.arange(2, device=z.device).unsqueeze(1) == label  # (2, 1)
            dead = self.active & seen & of_bag & (count < cfg.dead_code_threshold * mean)  # (2, K)
            seeds = z[torch.randint(z.shape[0], (k,), device=z.device)].expand(2, k, -1)  # (2, K, S)
            codes = torch.where(dead.unsqueeze(-1), seeds, codes)
            count = torch.where(dead, mean.expand(2, k), count)
            sums = torch.where(dead.unsqueeze(-1), seeds * count.unsqueeze(-1), sums)
        self.memory.copy_(torch.where(self.active.unsqueeze(-1), codes, self.memory))
        self.ema_count.copy_(count)
        self.ema_sum.copy_(sums)
        self._step_count.zero_()
        self._step_sum.zero_()
        self._reseed_pool = None

    def on_epoch_start(self, epoch: int) -> None:
        self.usage.zero_()
        if self.cfg.memory_mode == "vq-ema":
            self._step_count.zero_()
            self._step_sum.zero_()
            self._reseed_pool = None

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        """Adaptive memory: prune the components whose share of their class's patches has stayed below
        ``active_threshold`` for ``prune_patience`` epochs (never a class's most used one), then split the
        most used one into a free slot when its share exceeds ``split_threshold`` (a copy plus small noise;
        the orthogonality term, the EMA or the patches then separate the two). Returns this epoch's memory
        use for the trainer's history: components in use and kept, per class."""
        cfg = self.cfg
        total = self.usage.sum(-1, keepdim=True)
        share = self.usage / total.clamp(min=1)  # (2, K)
        seen = total > 0
        if cfg.adaptive_memory:
            low = self.active & seen & (share < cfg.active_threshold)
            self._low_epochs.copy_(torch.where(low, self._low_epochs + 1, torch.zeros_like(self._low_epochs)))
            top = F.one_hot(share.masked_fill(~self.active, -1.0).argmax(-1), share.shape[1]).bool()
            prune = (self._low_epochs >= cfg.prune_patience) & ~top
            self.active &= ~prune
            self._low_epochs.masked_fill_(prune, 0)
            if cfg.split_threshold > 0:
                self._split(share, seen.squeeze(-1))
        record: dict[str, Any] = {}
        for cls, name in ((1, "positive"), (0, "negative")):
            record[f"memory_{name}_num_active"] = int(
                ((share[cls] >= cfg.active_threshold) & self.active[cls]).sum()
            )
            record[f"memory_{name}_kept"] = int(self.active[cls].sum())
        return record

    def _split(self, share: Tensor, seen: Tensor) -> None:
        """Per class, copy the most used active component into the first free slot, both moved apart by
        noise of norm 0.05 in opposite directions, when its share exceeds ``split_threshold``."""
        for cls in range(2):
            free = (~self.active[cls]).nonzero().flatten()
            if not bool(seen[cls]) or free.numel() == 0:
                continue
            top = int(share[cls].masked_fill(~self.active[cls], -1.0).argmax())
            if float(share[cls, top]) <= self.cfg.split_threshold:
                continue
            slot = int(free[0])
            noise = 0.05 * F.normalize(torch.randn_like(self.memory[cls, top]), dim=-1)
            banks = [self.memory] + ([self.momentum_memory] if self.cfg.memory_mode == "momentum" else [])
            for bank in banks:
                code = bank[cls, top].clone()
                bank[cls, top] = F.normalize(code + noise, dim=-1)
                bank[cls, slot] = F.normalize(code - noise, dim=-1)
            if self.cfg.memory_mode == "vq-ema":
                half = self.ema_count[cls, top] / 2
                self.ema_count[cls, [top, slot]] = half
                self.ema_sum[cls, top] = self.memory[cls, top] * half
                self.ema_sum[cls, slot] = self.memory[cls, slot] * half
            self.active[cls, slot] = True
            self._low_epochs[cls, [top, slot]] = 0

    @torch.no_grad()
    def prepare(self, train_bags: Sequence[Bag]) -> None:
        """Spherical k-means initialisation of each class memory on projected patch embeddings ``z`` of
        that class's training slides, taken with the untrained encoder in eval mode.

        Per class, slides are visited in a random order (torch's RNG) until ``kmeans_patches`` patches are
        collected; a random subset of exactly that many is clustered. A class without slides keeps its
        random initialisation. The code's version visits slides in its weighted sampler's order, with
        replacement, and keeps every patch of the slides it visited. The momentum copy and the EMA sums
        start at the k-means centres (EMA counts at one per code); every component starts active.
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
        self.active.fill_(True)
        self._low_epochs.zero_()
        if self.cfg.memory_mode == "momentum":
            self.momentum_memory.copy_(self.memory)
        if self.cfg.memory_mode == "vq-ema":
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(self.memory)
        self.train(was_training)

    def training_report(self) -> dict[str, Any]:
        """Memory use in the last training epoch of the kept weights: share of each class's patches whose
        nearest (cosine) code in its own class memory is each component, the components above
        ``active_threshold`` (the paper's "adaptive capacity") and, with ``adaptive_memory``, the components
        kept after pruning."""
        usage = self.usage.cpu()
        report: dict[str, Any] = {
            "memory_mode": self.cfg.memory_mode,
            "memory_size": self.cfg.memory_size,
            "adaptive_memory": self.cfg.adaptive_memory,
        }
        for cls, name in ((1, "positive"), (0, "negative")):
            total = float(usage[cls].sum())
            share = (usage[cls] / total).tolist() if total > 0 else [0.0] * usage.shape[1]
            kept = self.active[cls].tolist()
            active = [i for i, v in enumerate(share) if v >= self.cfg.active_threshold and kept[i]]
            report[f"memory_{name}_share"] = [round(v, 4) for v in share]
            report[f"memory_{name}_active"] = active
            report[f"memory_{name}_num_active"] = len(active)
            report[f"memory_{name}_kept"] = sum(kept)
        report["tau"] = float(self.tau.detach())
        return report

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {
            "margin": trial.suggest_float("margin", 0.0, 0.6),
            "memory_size": trial.suggest_categorical("memory_size", [2, 4, 8, 16, 32, 64]),
            "lr": trial.suggest_float("lr", 5e-5, 1e-3, log=True),
            "adaptive_memory": trial.suggest_categorical("adaptive_memory", [False, True]),
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, memory_mode={self.cfg.memory_mode}, memory_size={self.cfg.memory_size}"
            + (", adaptive_memory=True" if self.cfg.adaptive_memory else "")
        )


def _orthogonality(codes: Tensor, mask: Tensor | None = None) -> Tensor:
    """(1/K^2) Σ_{i≠j} cos^2(c_i, c_j) of codes ``(K, S)`` (``orthogonal_loss_fn`` of the vendored vq); with
    ``mask`` (bool ``(K,)``) over the K' components it keeps, divided by K'^2."""
    unit = F.normalize(codes, dim=-1)
    cos2 = (unit @ unit.T).pow(2)
    if mask is None:
        k = codes.shape[0]
        return (cos2.sum() - cos2.diagonal().sum()) / k**2
    keep = mask.to(cos2.dtype)
    pair = keep.unsqueeze(0) * keep.unsqueeze(1)
    return ((cos2 * pair).sum() - (cos2.diagonal() * keep).sum()) / keep.sum() ** 2

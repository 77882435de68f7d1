"""The MoMKD method: graph encoder, memory-guided pooling, the training losses and the k-means start."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Bag, MILMethod, MILOutput, PatchMap
from ..graph_layers import GATv2Encoder
from ..packing import pack_bags, segment_pool, segment_softmax
from ..registry import register_method
from .config import MEMORY_MODES, MoMKDCfg
from .memory import MemoryDynamics, _orthogonality, bank_names, soft_angle_loss, spherical_kmeans

__all__ = ["MoMKD"]


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
class MoMKD(MemoryDynamics, MILMethod):
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

    Beyond two classes (bench's own extension: the paper and the code are binary; docs/momkd.md): one memory
    bank per class; per-class memory-guided attention, class c's patch score
    :math:`s_{n,c} = \max_k \cos(z_n, \bar c_{c,k}) - \max_{c' \ne c} \max_k \cos(z_n, \bar c_{c',k})`,
    :math:`a_c = \mathrm{softmax}_n(s_{\cdot,c} / \tau)`, :math:`V_c = \sum_n a_{n,c} h_n` and logit c the
    c-th output of the shared head on :math:`V_c`; the WSI alignment uses :math:`w = \mathrm{norm}(P_w V_y)`,
    the slide's own class's pooled vector; the soft-angle loss compares the own bank with each other bank
    (:func:`soft_angle_loss`). At C = 2 the class-1 score is the authors' :math:`s_n` and the authors' single
    attention is kept, so binary runs are unchanged. ``out.attention`` is the predicted class's.
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
        if cfg.num_classes < 2:
            raise ValueError(
                f"MoMKD has one memory bank per class: num_classes must be >= 2, got {cfg.num_classes}"
            )
        if cfg.memory_mode not in MEMORY_MODES:
            renamed = " ('ema' is now 'vq-ema')" if cfg.memory_mode == "ema" else ""
            raise ValueError(
                f"unknown memory_mode {cfg.memory_mode!r}{renamed}; use one of {', '.join(MEMORY_MODES)}"
            )
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
        dw, s = cfg.wsi_dim, cfg.shared_dim
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
            nn.Linear(cfg.cls_hidden_dim, cfg.num_classes),
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
        self._init_memory(cfg)

    # ---------------------------------------------------------------- forward (H&E only)

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
        """Cosines ``(N, C, K)`` of the patches to the memory codes the attention reads (``read_memory``;
        pruned components masked out), and the pooling logits ``s_n / τ``: ``(N,)`` with two classes,
        ``(N, C)`` (one column per class's attention) with more."""
        c, k, s = self.memory.shape
        memory = self.read_memory()  # (C, K, S)
        sim = (z @ memory.view(c * k, s).T).view(-1, c, k)  # (N, C, K) cosines
        if self.cfg.adaptive_memory:
            sim = sim.masked_fill(~self.active, -math.inf)
        best = sim.amax(dim=-1)  # (N, C)
        if c == 2:
            return sim, (best[:, 1] - best[:, 0]) / self.tau
        top2 = best.topk(2, dim=1)
        is_top = F.one_hot(top2.indices[:, 0], c).bool()  # (N, C)
        other = torch.where(is_top, top2.values[:, 1:2], top2.values[:, 0:1])  # best of the other banks
        return sim, (best - other) / self.tau

    def _classify(self, pooled: Tensor) -> Tensor:
        """Logits from the pooled vector(s): the head on ``V`` ``(..., Dw)``, or with one pooled vector per
        class ``(..., C, Dw)``, class c's logit from the head on ``V_c``."""
        logits = self.head(pooled)
        if self.memory.shape[0] == 2:
            return logits
        return logits.diagonal(dim1=-2, dim2=-1)

    def forward(self, bag: Bag) -> MILOutput:
        h, z = self._project_patches(bag)
        with torch.autocast(h.device.type, enabled=False):
            sim, score = self._memory_scores(z)
            attention = score.softmax(dim=0)  # (N,) or (N, C)
            pooled = attention @ h if attention.ndim == 1 else attention.T @ h  # (Dw,) or (C, Dw)
            w = F.normalize(self.pool_proj(pooled), dim=-1)  # (S,) or (C, S)
        logits = self._classify(pooled)  # (C,)
        extras = {"z": z, "w": w, "sim": sim}
        if score.ndim == 2:
            predicted = logits.detach().argmax().view(1)
            extras["class_attention"] = attention
            attention = attention.index_select(1, predicted).squeeze(1)
            pooled = pooled.index_select(0, predicted).squeeze(0)
        return MILOutput(logits=logits, embedding=pooled, attention=attention, extras=extras)

    def predict_logits(self, bags: Sequence[Bag]) -> Tensor:
        """The bags in one packed forward: the graph encoder on their block-diagonal graph (messages never
        cross bags), the memory pooling per bag."""
        for bag in bags:
            if bag.edge_index is None:
                self._project_patches(bag)  # raises the missing-graph error for that slide
        packed = pack_bags(bags)
        h, z = self._project_patches(Bag(packed.features, bags[0].label, edge_index=packed.edge_index))
        with torch.autocast(h.device.type, enabled=False):
            score = self._memory_scores(z)[1]  # (T,) or (T, C)
            columns = [score] if score.ndim == 1 else score.unbind(1)
            pooled = torch.stack(
                [segment_pool(segment_softmax(s, packed), h, packed) for s in columns], dim=-2
            ).squeeze(-2)  # (B, Dw) or (B, C, Dw)
        return self._classify(pooled)

    def explain_maps(self, bag: Bag, out: MILOutput) -> dict[str, PatchMap]:
        """Each patch's nearest memory code among all C·K by cosine (``out.extras["sim"]``, pruned components
        at −inf so never chosen): its bank (binary: 0 = C−, 1 = C+), and the code itself, class 0 first
        (bank · K + component)."""
        sim = out.extras["sim"].float()  # (N, C, K)
        c, k = sim.shape[1:]
        nearest = sim.reshape(sim.shape[0], c * k).argmax(dim=1)  # (N,) bank * K + component
        label = {cls: short for cls, _, short in bank_names(c)}
        names = ("C− (negative)", "C+ (positive)") if c == 2 else tuple(label[i] for i in range(c))
        return {
            "nearest class memory bank": PatchMap(
                values=torch.div(nearest, k, rounding_mode="floor").float(),
                categories=names,
                classes=tuple(range(c)),
            ),
            "nearest memory component": PatchMap(
                values=nearest.float(),
                categories=tuple(f"{label[b]}{i}" for b in range(c) for i in range(k)),
                classes=tuple(b for b in range(c) for _ in range(k)),
            ),
        }

    # ---------------------------------------------------------------- training losses

    def loss(self, bag: Bag, out: MILOutput) -> dict[str, Tensor]:
        cfg = self.cfg
        label = bag.label.view(())
        z, w = out.extras["z"], out.extras["w"]
        if w.ndim == 2:  # one pooled vector per class: the slide's own class's
            w = w.index_select(0, label.view(1)).squeeze(0)
        terms = {self.task_term: cfg.ce_weight * self.task_loss(out.logits.float(), bag)}
        mask = self.active if cfg.adaptive_memory else None
        own_mask = None if mask is None else mask.index_select(0, label.view(1)).squeeze(0)  # (K,)
        r = None
        with torch.autocast(z.device.type, enabled=False):
            memory_n = F.normalize(self.memory, dim=-1)  # (C, K, S), gradient into the memory
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
        for cls in range(self.memory.shape[0]):
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

"""MoMKD's class memories: spherical k-means initialisation, the soft-angle alignment, the commitment and
orthogonality terms, and :class:`MemoryDynamics`, how the memories move between optimiser steps and epochs
(momentum copy, VQ-EMA codebook, usage counts, adaptive pruning and splitting) and what is reported of them.

Memory layout everywhere: ``(C, K, S)``, one bank per class; binary: row 0 the C− memory (class 0), row 1
the C+ memory (class 1). More than two classes is bench's own extension (docs/momkd.md, "Beyond two classes").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import MoMKDCfg

__all__ = ["MemoryDynamics", "bank_names", "soft_angle_loss", "spherical_kmeans"]


def bank_names(num_classes: int) -> list[tuple[int, str, str]]:
    """``(class, name in reports, short label)`` of each memory bank, in report order: binary C+ then C−
    (the authors' names), else class 0, 1, … (``class_0``, ``C0``)."""
    if num_classes == 2:
        return [(1, "positive", "C+"), (0, "negative", "C−")]
    return [(c, f"class_{c}", f"C{c}") for c in range(num_classes)]


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
    r"""Soft-angle alignment of one unit vector with the class memories (``PrototypicalAlignmentLoss``).

    .. math::
        \phi(x, C) = \tfrac{1}{s}\log\sum_k e^{s\langle x, c_k\rangle},\quad
        \Delta = \phi(x, C^{+}) - \phi(x, C^{-}),\quad
        L = \mathrm{softplus}\big(\beta\,(m - (2y - 1)\,\Delta)\big)

    With more than two banks (bench's extension; the paper and code have two), the own class's bank against
    each other class's, averaged: :math:`L = \frac{1}{C-1}\sum_{c \ne y}
    \mathrm{softplus}(\beta\,(m - (\phi(x, C_y) - \phi(x, C_c))))`, which is the binary form at C = 2.

    Args:
        x: unit vector of shape ``(S,)``.
        memory: unit memory of shape ``(C, K, S)``: binary, row 0 is C− (class 0), row 1 is C+ (class 1).
        label: class index, long tensor of shape ``()``.
        margin: m; scale: s (LogSumExp sharpness); beta: β (softplus sharpness).
        mask: which components take part, bool ``(C, K)`` with at least one per class (None: all).

    Returns:
        scalar loss.
    """
    logits = scale * (memory @ x)  # (C, K)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    phi = torch.logsumexp(logits, dim=-1) / scale  # (C,)
    if phi.shape[0] > 2:
        others = torch.arange(phi.shape[0], device=phi.device) != label
        gap = phi.index_select(0, label.view(1)) - phi[others]  # (C - 1,)
        return F.softplus(beta * (margin - gap)).mean()
    sign = 2.0 * label.to(phi.dtype) - 1.0
    return F.softplus(beta * (margin - sign * (phi[1] - phi[0])))


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


class MemoryDynamics(nn.Module):
    """The memory side of :class:`~methods.momkd.MoMKD` (a mixin of that ``nn.Module``): its parameters and
    buffers, the usage counts each training step records, and the hooks that move the memory
    (``after_step``, ``on_epoch_start``, ``on_epoch_end``) or report on it (``training_report``)."""

    cfg: MoMKDCfg
    memory: nn.Parameter
    usage: Tensor
    active: Tensor

    def _init_memory(self, cfg: MoMKDCfg) -> None:
        """Register the memory, the temperature and the memory's buffers (in this order: the order of the
        weights in a saved model and of the parameters the optimiser and the gradient clipping see)."""
        c, k, s = cfg.num_classes, cfg.memory_size, cfg.shared_dim
        # memory[y] = class y's bank (binary: memory[0] = C-, memory[1] = C+); overwritten by k-means in prepare().
        self.memory = nn.Parameter(
            F.normalize(torch.randn(c, k, s), dim=-1),
            requires_grad=cfg.memory_mode in ("gradient", "momentum"),
        )
        log_tau = torch.tensor(math.log(cfg.tau_init))
        if cfg.learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        # own-class patch assignments counted over the current training epoch (saved with the weights).
        self.register_buffer("usage", torch.zeros(c, k))
        # components taking part: adaptive memory prunes them (and saves the mask with the weights; without
        # it every component takes part and the weights keep the authors' keys).
        self.register_buffer("active", torch.ones(c, k, dtype=torch.bool), persistent=cfg.adaptive_memory)
        self.register_buffer("_low_epochs", torch.zeros(c, k, dtype=torch.long), persistent=False)
        if cfg.memory_mode == "momentum":
            self.register_buffer("momentum_memory", self.memory.detach().clone())
        if cfg.memory_mode == "vq-ema":
            # running (EMA) counts and sums of the codebook, and this optimiser step's statistics.
            self.register_buffer("ema_count", torch.ones(c, k))
            self.register_buffer("ema_sum", self.memory.detach().clone())
            self.register_buffer("_step_count", torch.zeros(c, k), persistent=False)
            self.register_buffer("_step_sum", torch.zeros(c, k, s), persistent=False)
            self._reseed_pool: tuple[Tensor, Tensor] | None = None  # last bag's (z, label)

    @property
    def tau(self) -> Tensor:
        """The pooling temperature τ = exp(log τ), clamped to [0.01, 2]."""
        return self.log_tau.exp().clamp(0.01, 2.0)

    def read_memory(self) -> Tensor:
        """The unit memory ``(C, K, S)`` the attention reads, without gradient: the momentum copy in
        ``momentum`` mode, else the normalised memory."""
        if self.cfg.memory_mode == "momentum":
            return self.momentum_memory
        return F.normalize(self.memory.detach(), dim=-1)

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
        c, k = self.memory.shape[:2]
        m = cfg.ema_decay
        seen = (self._step_count.sum(-1) > 0).unsqueeze(-1)  # (C, 1)
        count = torch.where(seen, self.ema_count.lerp(self._step_count, 1 - m), self.ema_count)
        sums = torch.where(seen.unsqueeze(-1), self.ema_sum.lerp(self._step_sum, 1 - m), self.ema_sum)
        total = count.sum(-1, keepdim=True)  # (C, 1)
        smoothed = (count + cfg.ema_epsilon) / (total + k * cfg.ema_epsilon) * total
        codes = F.normalize(sums / smoothed.unsqueeze(-1), dim=-1)
        if self._reseed_pool is not None:
            z, label = self._reseed_pool
            n_active = self.active.sum(-1, keepdim=True).clamp(min=1)  # (C, 1)
            mean = total / n_active
            of_bag = torch.arange(c, device=z.device).unsqueeze(1) == label  # (C, 1)
            dead = self.active & seen & of_bag & (count < cfg.dead_code_threshold * mean)  # (C, K)
            seeds = z[torch.randint(z.shape[0], (k,), device=z.device)].expand(c, k, -1)  # (C, K, S)
            codes = torch.where(dead.unsqueeze(-1), seeds, codes)
            count = torch.where(dead, mean.expand(c, k), count)
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
        share = self.usage / total.clamp(min=1)  # (C, K)
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
        for cls, name, _ in bank_names(self.memory.shape[0]):
            record[f"memory_{name}_num_active"] = int(
                ((share[cls] >= cfg.active_threshold) & self.active[cls]).sum()
            )
            record[f"memory_{name}_kept"] = int(self.active[cls].sum())
        return record

    def _split(self, share: Tensor, seen: Tensor) -> None:
        """Per class, copy the most used active component into the first free slot, both moved apart by
        noise of norm 0.05 in opposite directions, when its share exceeds ``split_threshold``."""
        for cls in range(self.memory.shape[0]):
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
        if usage.shape[0] > 2:  # binary reports keep the keys they always had
            report["memory_classes"] = usage.shape[0]
        for cls, name, _ in bank_names(usage.shape[0]):
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

    reports_caption = (
        "class memories: components in use (share of the class's training patches whose nearest own-class "
        "code it is, in the last training epoch of the kept weights, at least the method's active_threshold, "
        "1 % by default), mean ± SD over folds / components kept (fewer than K where adaptive memory pruned "
        "them), mean over folds, of K"
    )

    @classmethod
    def summarise_reports(cls, reports: Sequence[dict[str, Any]]) -> dict[str, str]:
        """Per class memory (C+, C−; C0, C1, … beyond two classes): ``used ± SD / kept of K`` over the folds'
        :meth:`training_report`."""
        banks = bank_names(int(reports[0].get("memory_classes", 2))) if reports else []
        reports = [m for m in reports if banks and f"memory_{banks[0][1]}_num_active" in m]
        if not reports:
            return {}
        size = max(int(m.get("memory_size", 0)) for m in reports)
        cells = {}
        for _, name, label in banks:
            used = [float(m[f"memory_{name}_num_active"]) for m in reports]
            kept = [float(m.get(f"memory_{name}_kept", size)) for m in reports]
            spread = f" ± {statistics.stdev(used):.1f}" if len(used) > 1 else ""
            cells[label] = f"{statistics.fmean(used):.1f}{spread} / {statistics.fmean(kept):.1f} of {size}"
        return cells

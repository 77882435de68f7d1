"""The trainer: one bag per step, as every method's reference code; knows nothing about any method.

Per epoch: ``on_epoch_start``; for each bag (class-balanced sampling with replacement when the method's
config says so): forward, the method's named loss terms summed, backward; an optimiser step every
``accumulation_steps`` bags, gradient clipping, then ``after_step``. A partial last window is stepped at
the epoch's end, or, with ``carry_partial_window``, its gradients are carried into the next epoch's first
window (G-HANet's code, which never zeroes them between epochs); with ``accumulation_mean`` each bag's loss
is divided by ``accumulation_steps`` before its backward (G-HANet's ``loss / gc``: the window's gradient is
the mean of its bags', not their sum). After each epoch: ``on_epoch_end`` (its facts join the epoch's
history record), then the validation patients are scored (``cfg.monitor``: AUC, loss, or the mean AUC of
the models a method exposes through ``validation_logits``, e.g. MKD's student and teachers): the best epoch's weights are kept (with ``keep_tied_best`` a later epoch that ties the best
score replaces it, as the ``EarlyStopping`` classes of CLAM and MoMKD and WiKG's ``train.py`` do; the
submodules ``last_epoch_modules`` names keep their last epoch's weights instead), the plateau scheduler
steps on that score, and training stops early after ``patience`` epochs without improvement (never before
``min_epochs``).

The hot loop has no host synchronisation: losses are accumulated on the device and read once per epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods import MILMethod, create_method
from methods.base import Bag, MethodCfg
from methods.packing import chunk_bags

from .evaluate import binary_metrics, patient_level, predict, predict_patches, slide_predictions

__all__ = [
    "MONITORS",
    "PRECISIONS",
    "TrainResult",
    "epoch_order",
    "fit",
    "mean_model_auc",
    "resolve_precision",
    "seed_everything",
]

#: ``cfg.monitor`` -> the validation record's key it selects on
MONITORS = {"auc": "val_auc", "loss": "val_loss", "mean-auc": "val_mean_auc"}
#: ``--precision``: ``auto`` is bf16 autocast on CUDA and fp32 on the CPU
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512-BF16 or AMX; None where unknown). Without
    it bf16 autocast on the CPU is far slower than fp32 (this repo's 2-core AVX2 machine: ~9x per step)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast: ``auto`` on CUDA, or ``bf16`` on any device (the CPU included;
    the methods keep their fp32 islands, e.g. MoMKD's memory and losses, through ``autocast(enabled=False)``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass
class TrainResult:
    model: MILMethod
    best_epoch: int
    epochs_run: int
    best_score: float
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(labels: torch.Tensor, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """Indices of one epoch: a permutation, or as many class-balanced draws with replacement."""
    n = labels.numel()
    if not balanced:
        return torch.randperm(n, generator=generator)
    counts = torch.bincount(labels, minlength=2).clamp(min=1).double()
    weights = (1.0 / counts)[labels]
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _patient_auc(bags: Sequence[Bag], probs: np.ndarray, aggregation: str) -> float:
    pat = patient_level(slide_predictions(bags, probs, "val"), aggregation)
    return binary_metrics(pat.label.to_numpy(), pat.prob.to_numpy(), 0.5)["auc"]


@torch.inference_mode()
def mean_model_auc(
    model: MILMethod, bags: Sequence[Bag], device: torch.device, autocast: bool, aggregation: str
) -> float:
    """Mean over the models of ``model.validation_logits`` of their patient-level AUC, each on the bags it
    scores (a teacher that needs omics: the bags with omics); a model with one class only is left out.
    Several bags per forward (``validation_logits_batch``)."""
    was_training = model.training
    model.eval()
    scored: dict[str, list[tuple[list[Bag], torch.Tensor]]] = {}
    for group in chunk_bags(bags, predict_patches(device)):
        chunk = [bags[i] for i in group]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model.validation_logits_batch([b.to(device, non_blocking=True) for b in chunk])
        for name, (rows, z) in logits.items():
            scored.setdefault(name, []).append(([chunk[i] for i in rows], z.float().softmax(-1)[:, 1]))
    model.train(was_training)
    aucs = []
    for parts in scored.values():
        kept = [b for chunk, _ in parts for b in chunk]
        if kept:
            probs = torch.cat([p for _, p in parts]).cpu().numpy()
            aucs.append(_patient_auc(kept, probs, aggregation))
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def _validate(
    model: MILMethod, bags: Sequence[Bag], device: torch.device, autocast: bool, aggregation: str
) -> dict[str, float]:
    probs = predict(model, bags, device, autocast)
    labels = np.array([int(b.label) for b in bags])
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    record = {
        "val_auc": _patient_auc(bags, probs, aggregation),
        "val_loss": float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))),
    }
    if model.cfg.monitor == "mean-auc":
        record["val_mean_auc"] = mean_model_auc(model, bags, device, autocast, aggregation)
    return record


def fit(
    method: str,
    cfg: MethodCfg,
    in_dim: int,
    omics_dim: int | None,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    device: torch.device,
    seed: int,
    aggregation: str = "mean",
    on_epoch: Callable[[int, int, dict[str, float]], Any] | None = None,
    precision: str = "auto",
) -> TrainResult:
    """Build ``method`` with ``cfg`` (seeded), prepare it on the training bags, train, and return it holding
    the weights of its best validation epoch; forward and loss under bf16 autocast when ``precision`` says
    so (:func:`resolve_precision`)."""
    seed_everything(seed)
    autocast = resolve_precision(precision, device)
    model = create_method(method, in_dim=in_dim, omics_dim=omics_dim, cfg=cfg).to(device)
    train_bags = [b.to(device, non_blocking=True) for b in train_bags]
    model.prepare(train_bags)
    optimizer, scheduler = model.configure_optimizer()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([int(b.label) for b in train_bags])
    if cfg.monitor not in MONITORS:
        raise ValueError(f"unknown monitor {cfg.monitor!r}; use one of {', '.join(MONITORS)}")
    maximise = cfg.monitor != "loss"
    best_score, best_epoch, best_state = -math.inf if maximise else math.inf, -1, None
    history: list[dict[str, Any]] = []
    acc = max(1, cfg.accumulation_steps)
    backward_scale = 1.0 / acc if cfg.accumulation_mean else 1.0

    epoch = 0
    pending = False
    optimizer.zero_grad(set_to_none=True)
    for epoch in range(cfg.epochs):
        model.train()
        model.on_epoch_start(epoch)
        loss_sum = torch.zeros((), device=device)
        if not cfg.carry_partial_window:
            pending = False
            optimizer.zero_grad(set_to_none=True)
        for i, idx in enumerate(epoch_order(labels, cfg.balanced_sampling, generator).tolist()):
            bag = train_bags[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(bag)
                terms = model.loss(bag, out)
            if terms:
                total = torch.stack([t.float() for t in terms.values()]).sum()
                (total * backward_scale).backward()
                loss_sum += total.detach()
                pending = True
            if pending and (i + 1) % acc == 0:
                _step(model, optimizer, cfg)
                pending = False
        if pending and not cfg.carry_partial_window:
            _step(model, optimizer, cfg)
            pending = False
        record = {"epoch": epoch, "train_loss": float(loss_sum) / max(1, len(labels))}
        record.update(model.on_epoch_end(epoch))
        record.update(_validate(model, val_bags, device, autocast, aggregation))
        history.append(record)
        score = record[MONITORS[cfg.monitor]]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score)
        elif scheduler is not None:
            scheduler.step()
        if cfg.keep_tied_best:
            improved = score >= best_score if maximise else score <= best_score
        else:
            improved = score > best_score if maximise else score < best_score
        if improved or best_state is None:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs, record)
        if epoch + 1 >= cfg.min_epochs and epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        last = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if k.split(".", 1)[0] in model.last_epoch_modules()
        }
        model.load_state_dict({**best_state, **last})
    model.eval()
    return TrainResult(model, best_epoch, epoch + 1, float(best_score), history)


def _step(model: MILMethod, optimizer: torch.optim.Optimizer, cfg: MethodCfg) -> None:
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_step()

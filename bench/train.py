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
from typing import Any

import numpy as np
import torch

from methods import MILMethod, create_method
from methods.base import Bag, MethodCfg
from methods.packing import chunk_bags

from .device import resolve_precision
from .evaluate import patient_auc, predict, predict_patches, slide_predictions

__all__ = [
    "MONITORS",
    "TrainResult",
    "epoch_order",
    "fit",
    "mean_model_auc",
    "seed_everything",
]

#: ``cfg.monitor`` -> the validation record's key it selects on
MONITORS = {"auc": "val_auc", "loss": "val_loss", "mean-auc": "val_mean_auc"}


@dataclass
class TrainResult:
    """The trained model (best validation epoch's weights) and how training went.

    ``stopped`` is ``plateau`` when the last epoch met the early-stopping rule (``patience`` epochs without a
    better validation score, ``min_epochs`` done) and ``cap`` when the epoch budget ended training while the
    validation score was still improving: that fold may not have converged.
    """

    model: MILMethod
    best_epoch: int
    epochs_run: int
    best_score: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "cap"


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
    return patient_auc(slide_predictions(bags, probs, "val"), aggregation)


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


@dataclass
class _Selection:
    """The best validation epoch so far (score, epoch, weights) and the early-stopping rule around it."""

    cfg: MethodCfg
    score: float = math.nan
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.maximise = self.cfg.monitor != "loss"
        self.score = -math.inf if self.maximise else math.inf

    def offer(self, model: MILMethod, score: float, epoch: int) -> None:
        """Keep ``model``'s weights when ``score`` beats (or, with ``keep_tied_best``, ties) the best one."""
        if self.cfg.keep_tied_best:
            improved = score >= self.score if self.maximise else score <= self.score
        else:
            improved = score > self.score if self.maximise else score < self.score
        if improved or self.state is None:
            self.score, self.epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def should_stop(self, epoch: int) -> bool:
        return epoch + 1 >= self.cfg.min_epochs and epoch - self.epoch >= self.cfg.patience

    def restore(self, model: MILMethod) -> None:
        """Load the best epoch's weights, except the submodules that keep their last epoch's."""
        if self.state is None:
            return
        last = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if k.split(".", 1)[0] in model.last_epoch_modules()
        }
        model.load_state_dict({**self.state, **last})


def _train_epoch(
    model: MILMethod,
    optimizer: torch.optim.Optimizer,
    bags: Sequence[Bag],
    order: list[int],
    device: torch.device,
    autocast: bool,
    pending: bool,
) -> tuple[torch.Tensor, bool, int]:
    """One epoch over ``bags`` in ``order``: forward, summed loss terms, backward, a step every
    ``accumulation_steps`` bags; returns the loss sum (on the device), whether gradients are pending, and
    the number of optimiser updates made."""
    cfg = model.cfg
    accumulation = max(1, cfg.accumulation_steps)
    backward_scale = 1.0 / accumulation if cfg.accumulation_mean else None
    loss_sum, updates = torch.zeros((), device=device), 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)  # entered once per bag
    if not cfg.carry_partial_window:
        pending = False
        optimizer.zero_grad(set_to_none=True)
    for i, idx in enumerate(order):
        bag = bags[idx]
        with amp:
            out = model(bag)
            terms = model.loss(bag, out)
        if terms:
            total = _sum_terms(terms)
            (total if backward_scale is None else total * backward_scale).backward()
            loss_sum += total.detach()
            pending = True
        if pending and (i + 1) % accumulation == 0:
            _step(model, optimizer, cfg)
            pending, updates = False, updates + 1
    if pending and not cfg.carry_partial_window:
        _step(model, optimizer, cfg)
        pending, updates = False, updates + 1
    return loss_sum, pending, updates


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
    so (:func:`bench.device.resolve_precision`)."""
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
    best = _Selection(cfg)
    history: list[dict[str, Any]] = []
    epoch, pending, updates = 0, False, 0
    optimizer.zero_grad(set_to_none=True)
    for epoch in range(cfg.epochs):
        model.train()
        model.on_epoch_start(epoch)
        order = epoch_order(labels, cfg.balanced_sampling, generator).tolist()
        loss_sum, pending, steps = _train_epoch(
            model, optimizer, train_bags, order, device, autocast, pending
        )
        updates += steps
        record = {"epoch": epoch, "updates": updates, "train_loss": float(loss_sum) / max(1, len(labels))}
        record.update(model.on_epoch_end(epoch))
        record.update(_validate(model, val_bags, device, autocast, aggregation))
        history.append(record)
        score = record[MONITORS[cfg.monitor]]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score)
        elif scheduler is not None:
            scheduler.step()
        best.offer(model, score, epoch)
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs, record)
        if best.should_stop(epoch):
            break
    best.restore(model)
    model.eval()
    stopped = "plateau" if history and best.should_stop(epoch) else "cap"
    return TrainResult(model, best.epoch, epoch + 1, float(best.score), history, stopped)


def _sum_terms(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss terms' sum in fp32; one term is itself (no stack and sum in the step's graph)."""
    values = list(terms.values())
    if len(values) == 1:
        return values[0].float()
    return torch.stack([t.float() for t in values]).sum()


def _step(model: MILMethod, optimizer: torch.optim.Optimizer, cfg: MethodCfg) -> None:
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_step()

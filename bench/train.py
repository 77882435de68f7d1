"""The trainer: one bag per step, as every method's reference code; knows nothing about any method.

Per epoch: ``on_epoch_start``; for each bag (class-balanced sampling with replacement when the method's
config says so): forward, the method's named loss terms summed, backward; an optimiser step every
``accumulation_steps`` bags, gradient clipping, then ``after_step``. A method that ``batches_windows``
(MILMethod's opt-in hook) instead gets each window of ``accumulation_steps`` bags of the epoch order in one
``window_loss`` call: one forward and one backward per window, the same gradient as its bags one by one (the
same windows, steps, carried windows and loss bookkeeping; only the order of dropout draws differs). A partial last window is stepped at
the epoch's end, or, with ``carry_partial_window``, its gradients are carried into the next epoch's first
window (G-HANet's code, which never zeroes them between epochs); with ``accumulation_mean`` each bag's loss
is divided by ``accumulation_steps`` before its backward (G-HANet's ``loss / gc``: the window's gradient is
the mean of its bags', not their sum). After each epoch: ``on_epoch_end`` (its facts join the next
history record) and the scheduler's step (the plateau scheduler on the epoch's last selection score).

The validation patients are scored at each check (``cfg.monitor``: AUC, loss, or the mean AUC of the models
a method exposes through ``validation_logits``, e.g. MKD's student and teachers): at each epoch's end under
a method's published epoch rule, every ``val_every`` optimiser updates under the update rule of the
built-in tasks (bench/convergence.py says when training stops and which check is kept). The best check's
weights are kept (with ``keep_tied_best`` a later check that ties the best score replaces it, as the
``EarlyStopping`` classes of CLAM and MoMKD and WiKG's ``train.py`` do; the submodules
``last_epoch_modules`` names keep their last epoch's weights instead).

The hot loop has no host synchronisation: losses are accumulated on the device and read once per epoch and
per check.
"""

from __future__ import annotations

import itertools
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

from .convergence import Selection, resolve_epochs, update_cap
from .device import resolve_precision
from .evaluate import (
    patient_auc,
    predict,
    predict_patches,
    scores_from_logits,
    slide_predictions,
    validation_loss,
)

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
    """The trained model (best validation check's weights) and how training went.

    ``stopped`` is ``plateau`` when the last check met the early-stopping rule (bench/convergence.py: its
    patience without a better selection score, its minimum done) and ``cap`` when the budget (epochs or
    updates) ended training while the score was still improving: that fold may not have converged.
    ``history`` has one record per check; ``best_updates`` and ``updates`` count optimiser updates.
    """

    model: MILMethod
    best_epoch: int
    epochs_run: int
    best_score: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "cap"
    best_updates: int = 0
    updates: int = 0


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
            scores = scores_from_logits(z, model.cfg.head)
            scored.setdefault(name, []).append(([chunk[i] for i in rows], scores))
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
    events = np.array([int(b.event) for b in bags]) if bags and bags[0].event is not None else None
    record = {
        "val_auc": _patient_auc(bags, probs, aggregation),
        "val_loss": validation_loss(labels, probs, events),
    }
    if model.cfg.monitor == "mean-auc":
        record["val_mean_auc"] = mean_model_auc(model, bags, device, autocast, aggregation)
    return record


def _train_epoch(
    model: MILMethod,
    optimizer: torch.optim.Optimizer,
    bags: Sequence[Bag],
    order: list[int],
    device: torch.device,
    autocast: bool,
    pending: bool,
    after_update: Callable[[torch.Tensor, int], bool],
) -> tuple[torch.Tensor, bool, int]:
    """One epoch over ``bags`` in ``order``: forward, summed loss terms, backward, a step every
    ``accumulation_steps`` bags, each followed by ``after_update(loss sum so far, bags done)``, which ends
    the epoch early by returning True; returns the loss sum (on the device), whether gradients are pending,
    and the number of bags trained on. A method that ``batches_windows`` gets each window of the order
    (``order[0:W]``, ``order[W:2W]``, ..., the last one possibly shorter) in one ``window_loss`` call and one
    backward; any other, one bag per forward and backward."""
    cfg = model.cfg
    accumulation = max(1, cfg.accumulation_steps)
    unit = accumulation if model.batches_windows else 1  # bags per forward and backward
    backward_scale = 1.0 / accumulation if cfg.accumulation_mean else None
    loss_sum = torch.zeros((), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)  # entered once per unit
    if not cfg.carry_partial_window:
        pending = False
        optimizer.zero_grad(set_to_none=True)
    for start in range(0, len(order), unit):
        with amp:
            terms = _unit_loss(model, [bags[i] for i in order[start : start + unit]])
        if terms:
            total = _sum_terms(terms)
            (total if backward_scale is None else total * backward_scale).backward()
            loss_sum += total.detach()
            pending = True
        done = min(start + unit, len(order))
        if pending and done % accumulation == 0:
            _step(model, optimizer, cfg)
            pending = False
            if after_update(loss_sum, done):
                return loss_sum, False, done
    if pending and not cfg.carry_partial_window:
        _step(model, optimizer, cfg)
        pending = False
        after_update(loss_sum, len(order))
    return loss_sum, pending, len(order)


def _unit_loss(model: MILMethod, bags: list[Bag]) -> dict[str, torch.Tensor]:
    """The loss terms of one bag (``forward`` + ``loss``) or of one window (``window_loss``)."""
    if model.batches_windows:
        return model.window_loss(bags)
    out = model(bags[0])
    return model.loss(bags[0], out)


class _Checks:
    """The validation checks of one :func:`fit` and their bookkeeping: optimiser updates counted, a check
    where the rule puts one (bench/convergence.py), its history record (the mean training loss of the bags
    since the previous check, the facts of the epochs ended since, the validation scores), the plateau
    scheduler stepped once per epoch on the epoch's last selection score, and whether training stops."""

    def __init__(
        self,
        model: MILMethod,
        scheduler: Any,
        validate: Callable[[], dict[str, float]],
        on_check: Callable[[int, int, dict[str, Any]], Any] | None,
        cap: int,
    ) -> None:
        self.model, self.scheduler, self.validate = model, scheduler, validate
        self.on_check, self.cap = on_check, cap
        self.best = Selection(model.cfg)
        self.history: list[dict[str, Any]] = []
        self.epoch = self.updates = self.checked = 0
        self.stop = self.plateau = False
        self._ended = (0.0, 0)  # loss sum and bags of the epochs ended
        self._at_check = (0.0, 0)  # the same, up to the last check
        self._facts: dict[str, Any] = {}
        self._epoch_score: float | None = None

    def after_update(self, loss_sum: torch.Tensor, bags: int) -> bool:
        """Count an update; check when one is due (reads ``loss_sum``: one host sync per check)."""
        self.updates += 1
        if self.best.due(self.updates, self.checked):
            self.check((self._ended[0] + float(loss_sum), self._ended[1] + bags))
        return self.stop

    def end_epoch(self, loss_sum: torch.Tensor, bags: int) -> None:
        """The epoch's facts kept for the next record, its check under the epoch rule, the scheduler's step."""
        self._ended = (self._ended[0] + float(loss_sum), self._ended[1] + bags)
        self._facts.update(self.model.on_epoch_end(self.epoch))
        if not self.best.in_updates:
            self.check(self._ended)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if self._epoch_score is not None:
                self.scheduler.step(self._epoch_score)
        elif self.scheduler is not None:
            self.scheduler.step()
        self._epoch_score = None

    def finish(self) -> None:
        """A last check when the epoch cap ended training between two checks of the update rule (or before
        the first)."""
        if (self.updates > self.checked or not self.history) and not self.stop:
            self.check(self._ended)

    def check(self, trained: tuple[float, int]) -> None:
        loss, bags = trained[0] - self._at_check[0], trained[1] - self._at_check[1]
        record = {"epoch": self.epoch, "updates": self.updates, "train_loss": loss / max(1, bags)}
        record.update(self._facts)
        record.update(self.validate())
        cfg = self.model.cfg
        score = self.best.offer(self.model, record[MONITORS[cfg.monitor]], self.epoch, self.updates)
        if cfg.val_smoothing > 1:
            record["val_score"] = score
        self.history.append(record)
        self._facts, self._at_check, self.checked, self._epoch_score = {}, trained, self.updates, score
        if self.on_check is not None:
            self.on_check(len(self.history) - 1, self.cap, record)
        self.plateau = self.best.should_stop(self.epoch, self.updates)
        self.stop = self.plateau or self.best.at_budget(self.updates)


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
    on_check: Callable[[int, int, dict[str, Any]], Any] | None = None,
    precision: str = "auto",
) -> TrainResult:
    """Build ``method`` with ``cfg`` (seeded; its ``epochs`` resolved by the convergence rule), prepare it on
    the training bags, train, and return it holding the weights of its best validation check; forward and
    loss under bf16 autocast when ``precision`` says so (:func:`bench.device.resolve_precision`).
    ``on_check(check, cap, record)`` sees each check's history record (``cap``: the most updates the fold
    can make)."""
    if cfg.monitor not in MONITORS:
        raise ValueError(f"unknown monitor {cfg.monitor!r}; use one of {', '.join(MONITORS)}")
    seed_everything(seed)
    autocast = resolve_precision(precision, device)
    epoch_cap = cfg.epochs  # None: the update budget alone ends training
    cfg = resolve_epochs(cfg, len(train_bags))
    model = create_method(method, in_dim=in_dim, omics_dim=omics_dim, cfg=cfg).to(device)
    train_bags = [b.to(device, non_blocking=True) for b in train_bags]
    model.prepare(train_bags)
    optimizer, scheduler = model.configure_optimizer()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([int(b.label) for b in train_bags])
    checks = _Checks(
        model,
        scheduler,
        lambda: _validate(model, val_bags, device, autocast, aggregation),
        on_check,
        update_cap(cfg, len(train_bags)),
    )
    pending = False
    optimizer.zero_grad(set_to_none=True)
    for epoch in range(epoch_cap) if epoch_cap is not None else itertools.count():
        checks.epoch, before = epoch, checks.updates
        model.train()
        model.on_epoch_start(epoch)
        order = epoch_order(labels, cfg.balanced_sampling, generator).tolist()
        loss_sum, pending, bags = _train_epoch(
            model, optimizer, train_bags, order, device, autocast, pending, checks.after_update
        )
        if checks.stop:  # the update rule ended training at a check, within or at the end of the epoch
            break
        checks.end_epoch(loss_sum, bags)
        if checks.stop or (epoch_cap is None and checks.updates == before):
            break  # (the latter: a window larger than the training set never completes, no update ever)
    checks.finish()
    best = checks.best
    best.restore(model)
    model.eval()
    return TrainResult(
        model,
        best_epoch=best.epoch,
        epochs_run=checks.epoch + 1,
        best_score=float(best.score) if math.isfinite(best.score) else math.nan,  # nan: no check could count
        history=checks.history,
        stopped="plateau" if checks.plateau else "cap",
        best_updates=best.updates,
        updates=checks.updates,
    )


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

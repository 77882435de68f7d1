"""When a fold's training is validated, which check it keeps and when it stops (docs/protocol.md, "Convergence").

Two rules, chosen by ``cfg.max_updates``:

- **Epochs** (``max_updates`` None; each method's published settings, users' real tasks): one validation
  check per epoch; training stops after ``patience`` epochs without a better score, never before
  ``min_epochs``, and ends at ``epochs``.
- **Updates** (the built-in tasks' ``train:`` block): a check every ``val_every`` optimiser updates (mid-epoch
  too) and at the end of training; training stops once ``min_updates`` updates are done and
  ``patience_updates`` updates have passed since the best check, and ends at ``max_updates``. Counted in
  updates, a method that steps once per window of bags (MKD's 16, G-HANet's 32) gets as many steps as one
  that steps per bag, where a shared epoch cap gives it 16-32 times fewer.

In both, a check's selection score is the mean monitor value of the last ``val_smoothing`` checks (1: the
check's own value), a tie replaces the best check when ``keep_tied_best`` says so, and the kept weights are
those of the best check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from methods import MILMethod
from methods.base import MethodCfg

__all__ = [
    "UPDATE_RULE_FIELDS",
    "Selection",
    "resolve_epochs",
    "rule_problems",
    "update_cap",
    "updates_per_epoch",
]

#: the ``MethodCfg`` settings of the update rule (and of smoothing), beside the epoch rule's
UPDATE_RULE_FIELDS = ("max_updates", "val_every", "patience_updates", "min_updates", "val_smoothing")


def updates_per_epoch(cfg: MethodCfg, n_bags: int) -> int:
    """Optimiser updates an epoch of ``n_bags`` bags makes: one per window and one for a partial last
    window (a carried one adds an update every few epochs instead; at least one, for the estimate)."""
    window = max(1, cfg.accumulation_steps)
    if cfg.carry_partial_window:
        return max(1, n_bags // window)
    return max(1, math.ceil(n_bags / window))


def rule_problems(cfg: MethodCfg) -> list[str]:
    """What is wrong with ``cfg``'s convergence settings (empty: nothing)."""
    if cfg.max_updates is None:
        return [] if cfg.epochs is not None else ["epochs: null needs max_updates (a budget in updates)"]
    problems = [
        f"{name} must be at least 1 with max_updates"
        for name in ("max_updates", "val_every", "patience_updates")
        if getattr(cfg, name) < 1
    ]
    if cfg.min_updates > cfg.max_updates:
        problems.append("min_updates must not exceed max_updates")
    if cfg.val_smoothing < 1:
        problems.append("val_smoothing must be at least 1")
    return problems


def resolve_epochs(cfg: MethodCfg, n_bags: int) -> MethodCfg:
    """``cfg`` with ``epochs`` the number the fold trains: under the update rule, the epochs ``max_updates``
    takes on ``n_bags`` training bags (capped by ``epochs`` when that is set), so an epoch-based schedule
    (a linear decay to zero) spans the budget. With ``epochs`` None it is an estimate the trainer does not
    stop at (a method whose partial window makes no step, MKD's, needs a few more epochs): the budget
    ends training."""
    problems = rule_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.max_updates is None:
        return cfg
    needed = math.ceil(cfg.max_updates / updates_per_epoch(cfg, n_bags))
    return cfg.replace(epochs=needed if cfg.epochs is None else min(cfg.epochs, needed))


def update_cap(cfg: MethodCfg, n_bags: int) -> int:
    """The most optimiser updates the fold can make (for a progress bar's total and ETA), ``cfg`` resolved."""
    cap = cfg.epochs * updates_per_epoch(cfg, n_bags)
    return cap if cfg.max_updates is None else min(cap, cfg.max_updates)


@dataclass
class Selection:
    """The best validation check so far (score, epoch, updates, weights) and the stopping rule around it."""

    cfg: MethodCfg
    score: float = math.nan
    epoch: int = -1
    updates: int = 0
    state: dict[str, torch.Tensor] | None = None
    values: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.maximise = self.cfg.monitor != "loss"
        self.score = -math.inf if self.maximise else math.inf

    @property
    def in_updates(self) -> bool:
        return self.cfg.max_updates is not None

    def due(self, updates: int, last_check: int) -> bool:
        """Under the update rule, whether a check falls at ``updates`` (the last one was at ``last_check``)."""
        return self.in_updates and (
            updates - last_check >= self.cfg.val_every or updates >= self.cfg.max_updates
        )

    def offer(self, model: MILMethod, value: float, epoch: int, updates: int) -> float:
        """Record a check's monitor ``value``; keep ``model``'s weights when its selection score beats (or,
        with ``keep_tied_best``, ties) the best one. Returns the selection score.

        With smoothing over k checks, the first k - 1 checks (a mean of fewer values, which one lucky check
        would dominate) cannot be the best: the first one is kept only until the k-th."""
        k = self.cfg.val_smoothing
        self.values.append(value)
        window = self.values[-k:]
        score = float(sum(window) / len(window))
        if len(window) < k:
            improved = False
        elif self.cfg.keep_tied_best:
            improved = score >= self.score if self.maximise else score <= self.score
        else:
            improved = score > self.score if self.maximise else score < self.score
        if improved or self.state is None:
            if improved:
                self.score = score
            self.epoch, self.updates = epoch, updates
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return score

    def should_stop(self, epoch: int, updates: int) -> bool:
        """Whether the check just offered (at ``epoch``, after ``updates`` updates) ends training early."""
        cfg = self.cfg
        if self.in_updates:
            return updates >= cfg.min_updates and updates - self.updates >= cfg.patience_updates
        return epoch + 1 >= cfg.min_epochs and epoch - self.epoch >= cfg.patience

    def at_budget(self, updates: int) -> bool:
        return self.in_updates and updates >= self.cfg.max_updates

    def restore(self, model: MILMethod) -> None:
        """Load the best check's weights, except the submodules that keep their last epoch's."""
        if self.state is None:
            return
        last = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if k.split(".", 1)[0] in model.last_epoch_modules()
        }
        model.load_state_dict({**self.state, **last})

"""The tracking interface (:class:`Tracker`, :class:`TrackedFold`, the no-op default), the guard that turns
a backend's failure into a warning, and what each fold logs, named alike for both backends."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Protocol

from ..errors import TrackingWarning
from ..fsio import plain
from ..store import FOLD_FILES

__all__ = [
    "MAX_PARAMS",
    "NULL_TRACKER",
    "Guarded",
    "TrackedFold",
    "Tracker",
    "Trial",
    "final_metrics",
    "flatten",
    "fold_files",
    "metric_key",
    "numeric",
    "run_tags",
]

FIGURES = ("*.png", "*.svg")  # a fold folder's figures, logged when present
MAX_KEY, MAX_VALUE, MAX_PARAMS = 250, 6000, 100  # MLflow's param key and value lengths, params per request


# ------------------------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class Trial:
    """A finished trial of a sweep: its number, Optuna state, the overrides it tried, and its scores."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: dict[str, Any]
    value: float | None  # mean validation AUC over its inner folds (None: pruned or failed)
    inner_val_auc: tuple[float, ...] = ()

    def metrics(self) -> dict[str, float]:
        scores = {f"inner_val_auc/{j}": float(v) for j, v in enumerate(self.inner_val_auc)}
        return scores if self.value is None else {"mean_val_auc": float(self.value), **scores}


class TrackedFold(Protocol):
    """One fold's run in the tracking store; none of its methods raises."""

    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """Log one epoch's history record at step ``epoch``."""

    def finish(self, config: Mapping[str, Any], hash_: str, metrics: Mapping[str, Any], folder: Path) -> None:
        """Log the resolved configuration, its hash, the final metrics and the fold folder's files."""

    def close(self, ok: bool) -> None:
        """End the run (``ok`` False: the fold failed)."""


class Tracker(Protocol):
    """Where a task's folds are logged (:func:`open_tracker`)."""

    def start(self, task: str, methods: Sequence[str], level: str = "method") -> bool:
        """Prepare the store for these methods' folds (``level`` sweep: their trials), once, before any job;
        False (warned) when it fails."""

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        """Open fold ``fold``'s run of ``method``."""

    def summary(self, task: str, summary: Any) -> None:
        """Log summary.csv's rows (mean and SD over folds) on each method's run."""

    def trial(self, task: str, method: str, fold: int, trial: Trial) -> None:
        """Log one finished trial of outer fold ``fold``'s search (``bench sweep``)."""


class _NullFold:
    def epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        pass

    def finish(self, config: Mapping[str, Any], hash_: str, metrics: Mapping[str, Any], folder: Path) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class _NullTracker:
    """No tracking: every call does nothing."""

    def start(self, task: str, methods: Sequence[str], level: str = "method") -> bool:
        return True

    def fold(self, task: str, method: str, fold: int) -> TrackedFold:
        return _NullFold()

    def summary(self, task: str, summary: Any) -> None:
        pass

    def trial(self, task: str, method: str, fold: int, trial: Trial) -> None:
        pass


NULL_TRACKER: Tracker = _NullTracker()


def _warn(where: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split())
    warnings.warn(
        f"tracking to {where} failed ({type(exc).__name__}: {text[:240]}{'…' if len(text) > 240 else ''}); "
        "the run goes on, not tracked there.",
        TrackingWarning,
        stacklevel=3,
    )


class Guarded:
    """Calls into a tracking backend: the first failure warns and turns the rest off."""

    where = "tracking"
    dead = False

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self.dead:
            return None
        try:
            return fn()
        except Exception as exc:
            self.dead = True
            _warn(self.where, exc)
            return None


# -------------------------------------------------------------------------------------------- what is logged


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested configuration -> ``{dotted.key: text}``; lists and tuples as JSON, values cut to MLflow's 6000
    characters (the full configuration is the config.yaml artefact)."""
    flat: dict[str, str] = {}
    for key, value in plain(dict(config)).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        flat[metric_key(name)[:MAX_KEY]] = text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"
    return flat


def metric_key(name: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, ``_-. /``): ``acc@0.5`` -> ``acc_at_0.5``."""
    return re.sub(r"[^\w\-. /]", "_", name.replace("@", "_at_"))


def numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a history record (NumPy scalars too; booleans and text left out), ``epoch``
    excluded."""
    return {
        metric_key(k): float(v)
        for k, v in record.items()
        if k != "epoch" and isinstance(v, Real) and not isinstance(v, bool)
    }


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``<cohort>/<metric>`` of each cohort in metrics.json (``n`` included), and the fold's epoch facts."""
    flat = {
        metric_key(f"{cohort}/{name}"): float(value)
        for cohort, values in metrics.get("cohorts", {}).items()
        for name, value in values.items()
        if isinstance(value, Real) and not isinstance(value, bool)
    }
    for name in ("best_epoch", "epochs_run", "train_seconds"):
        if isinstance(metrics.get(name), Real):
            flat[name] = float(metrics[name])
    return flat


def fold_files(folder: Path) -> list[Path]:
    """The files of a fold folder that are logged as artefacts: its three files and any figure."""
    files = [folder / f for f in FOLD_FILES if (folder / f).is_file()]
    return files + sorted(p for pattern in FIGURES for p in folder.glob(pattern))


def run_tags(out: str, task: str, method: str, level: str, fold: int | None = None) -> dict[str, str]:
    """The tags of a run: ``bench.level`` is method or fold (``bench run``), sweep or trial (``bench sweep``)."""
    tags = {"bench.task": task, "bench.method": method, "bench.level": level, "bench.out": out}
    if fold is not None:
        tags["bench.fold"] = str(fold)
    return tags

"""What a task's ``type`` means, in one place: how its labels are encoded, how many outputs a model has, how
its predictions are stored, what the splits stratify on, which metrics it has and which one model selection
and sweeps maximise.

- ``binary`` (the default, today's tasks): label 1 for the ``positive`` values, 0 otherwise; two logits;
  ``predictions.csv`` has one ``prob`` column (the positive class's probability); selection on the
  patient-level ROC AUC.
- ``multiclass``: label = the position of the value in ``classes`` (their order is kept); C logits;
  ``predictions.csv`` has ``prob_0`` … ``prob_{C-1}``; selection on the macro one-vs-rest ROC AUC (the
  mean over classes of each class's AUC against the rest), which is also the ``auc`` of its metrics.
- ``survival``: ``time_col`` ≥ 0 and ``event_col`` 0/1; the discrete-time model of Patch-GCN / MCAT /
  G-HANet: ``time_bins`` (4) bins cut at the quantiles of the event times of each fold's training patients
  (:func:`time_bin_edges`; the authors cut once on the whole cohort), one hazard logit per bin, the NLL of
  ``methods.base.discrete_time_nll``; ``predictions.csv`` has ``time``, ``event``, ``risk`` (−Σ S) and
  ``surv_0`` … (S at the end of each bin); the label column holds each slide's bin; splits are stratified by
  event and time (:func:`survival_strata`); selection on the validation patients' Harrell's c-index.

Everything above this module asks it (or the shape of a probability array: one column is binary, several
are multiclass) instead of branching on the YAML itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .config import TaskConfig

__all__ = [
    "MULTICLASS_METRICS",
    "SURVIVAL_METRICS",
    "TaskType",
    "prob_columns",
    "probabilities",
    "score_columns",
    "survival_columns",
    "survival_strata",
    "task_type",
    "time_bin_edges",
    "time_bin_index",
    "type_identity",
]

#: the per-cohort metrics of a survival task (bench.evaluate.survival_metrics): Harrell's and Uno's c-index,
#: the time-dependent AUC at the quartile times of the training patients' events and the integrated Brier score
SURVIVAL_METRICS = ("c_index", "c_index_uno", "auc_q1", "auc_q2", "auc_q3", "ibs")

#: the per-cohort metrics of a multiclass task (bench.evaluate.multiclass_metrics): macro one-vs-rest AUC,
#: accuracy, balanced accuracy (mean per-class recall), macro F1; ``confusion`` holds the matrix
MULTICLASS_METRICS = ("auc", "acc", "balanced_acc", "f1")


@dataclass(frozen=True)
class TaskType:
    """A task's type and its classes (binary: negative, positive; multiclass: ``classes`` in order)."""

    name: str
    classes: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        """Logits a model of this task has (a method's ``num_classes``)."""
        return len(self.classes)

    @property
    def objective(self) -> str:
        """The metric model selection and sweeps maximise (``auc``: macro one-vs-rest for multiclass;
        ``c_index``: Harrell's, for survival)."""
        return "c_index" if self.name == "survival" else "auc"

    @property
    def head(self) -> str:
        """The methods' head (``MethodCfg.head``): ``survival`` or ``classification``."""
        return "survival" if self.name == "survival" else "classification"

    def encode(self, task: TaskConfig, raw: pd.Series) -> tuple[pd.Series, list[str]]:
        """Class index of each raw label value, and the values that belong to no class (sorted)."""
        values = set(raw)
        if self.name == "multiclass":
            index = {v: i for i, v in enumerate(self.classes)}
            return raw.map(index).fillna(-1).astype(int), sorted(values - set(index))
        pos = set(task.positive or [])
        if task.negative is not None:
            unknown = sorted(values - pos - set(task.negative))
        else:
            others = values - pos
            unknown = sorted(others) if len(others) > 1 or "" in others else []
        return raw.isin(pos).astype(int), unknown

    def describe(self, task: TaskConfig) -> str:
        """The classes as an error message names them."""
        if self.name == "multiclass":
            return f"classes: {list(self.classes)}"
        return f"positive: {task.positive}, negative: {task.negative or 'the one other value'}"

    def class_name(self, index: int) -> str:
        return self.classes[index]


def task_type(task: TaskConfig) -> TaskType:
    """The :class:`TaskType` of a task."""
    if task.type == "multiclass":
        return TaskType("multiclass", tuple(task.classes or ()))
    if task.type == "survival":
        return TaskType("survival", tuple(f"bin_{k}" for k in range(task.time_bins)))
    return TaskType("binary", ("negative", "positive"))


def type_identity(task: TaskConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` (a task's result-changing settings) without the fields of the other types: a binary
    task keeps the configuration hash it had before task types existed."""
    keep = {
        "binary": ("label_col", "positive", "negative"),
        "multiclass": ("type", "label_col", "classes"),
        "survival": ("type", "time_col", "event_col", "time_bins"),
    }[task.type]
    typed = ("type", "label_col", "positive", "negative", "classes", "time_col", "event_col", "time_unit")
    typed += ("time_bins",)
    return {k: v for k, v in identity.items() if k not in typed or k in keep}


def prob_columns(num_classes: int) -> list[str]:
    """The probability columns of ``predictions.csv``: ``prob`` (binary), ``prob_0`` … (multiclass)."""
    return ["prob"] if num_classes == 2 else [f"prob_{k}" for k in range(num_classes)]


def probabilities(columns: Iterable[str]) -> list[str]:
    """The probability columns among a predictions table's ``columns`` (``prob``, or ``prob_0`` … in class
    order; none: not a predictions table)."""
    columns = list(columns)
    if "prob" in columns:
        return ["prob"]
    cols = [c for c in columns if c.startswith("prob_") and c[5:].isdigit()]
    return sorted(cols, key=lambda c: int(c[5:]))


def survival_columns(bins: int) -> list[str]:
    """The score columns of a survival task's ``predictions.csv``: ``risk`` then ``surv_0`` … ``surv_{K-1}``."""
    return ["risk", *(f"surv_{k}" for k in range(bins))]


def score_columns(columns: Iterable[str]) -> list[str]:
    """The score columns among a predictions table's ``columns``: its probabilities, or ``risk`` and the
    survival function (``surv_k``) of a survival task; none: not a predictions table."""
    columns = list(columns)
    if "risk" in columns:
        surv = sorted(
            (c for c in columns if c.startswith("surv_") and c[5:].isdigit()), key=lambda c: int(c[5:])
        )
        return ["risk", *surv]
    return probabilities(columns)


def time_bin_edges(time: np.ndarray, event: np.ndarray, bins: int, eps: float = 1e-6) -> np.ndarray:
    """Edges ``(bins + 1,)`` of the discrete time bins, as Patch-GCN / MCAT / G-HANet cut them: quantiles of the
    event times of the patients who had the event (``pd.qcut(q=bins)``), the outer edges widened to the
    smallest and largest time of all patients (± ``eps``). bench fits them on a fold's training patients."""
    observed = np.asarray(time, dtype=np.float64)[np.asarray(event) == 1]
    if observed.size < bins:
        raise ValueError(f"{observed.size} events cannot cut {bins} time bins; use fewer time_bins")
    edges = np.quantile(observed, np.linspace(0, 1, bins + 1))
    edges[0], edges[-1] = min(float(np.min(time)), edges[0]) - eps, max(float(np.max(time)), edges[-1]) + eps
    return edges


def time_bin_index(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each time (``pd.cut(right=False)``: bin k is [e_k, e_{k+1})), times outside the training
    patients' range put in the first or last bin."""
    return np.clip(
        np.searchsorted(edges, np.asarray(time, dtype=np.float64), side="right") - 1, 0, len(edges) - 2
    )


def survival_strata(time: np.ndarray, event: np.ndarray, bins: int = 2) -> np.ndarray:
    """What a survival task's splits stratify on: the censored patients (0), and the patients with an event by
    time bin (1 … ``bins``), the bins cut on the whole cohort's event times (used for nothing but balancing the
    folds). Two bins by default (the median event time), so that every stratum keeps patients for every
    fold's parts."""
    edges = time_bin_edges(time, event, bins)
    return np.where(np.asarray(event) == 1, 1 + time_bin_index(time, edges), 0)

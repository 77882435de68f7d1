"""What a task's ``type`` means, in one place: how its labels are encoded, how many outputs a model has, how
its predictions are stored, what the splits stratify on, which metrics it has and which one model selection
and sweeps maximise.

- ``binary`` (the default, today's tasks): label 1 for the ``positive`` values, 0 otherwise; two logits;
  ``predictions.csv`` has one ``prob`` column (the positive class's probability); selection on the
  patient-level ROC AUC.
- ``multiclass``: label = the position of the value in ``classes`` (their order is kept); C logits;
  ``predictions.csv`` has ``prob_0`` … ``prob_{C-1}``; selection on the macro one-vs-rest ROC AUC (the
  mean over classes of each class's AUC against the rest), which is also the ``auc`` of its metrics.
- ``survival``: read and checked (``time_col`` ≥ 0, ``event_col`` 0/1); training is not implemented yet.

Everything above this module asks it (or the shape of a probability array: one column is binary, several
are multiclass) instead of branching on the YAML itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .config import TaskConfig

__all__ = [
    "MULTICLASS_METRICS",
    "TaskType",
    "prob_columns",
    "probabilities",
    "task_type",
    "type_identity",
]

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
        """The metric model selection and sweeps maximise (``auc``: macro one-vs-rest for multiclass)."""
        return "auc"

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
        return TaskType("survival", ())
    return TaskType("binary", ("negative", "positive"))


def type_identity(task: TaskConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` (a task's result-changing settings) without the fields of the other types: a binary
    task keeps the configuration hash it had before task types existed."""
    keep = {
        "binary": ("label_col", "positive", "negative"),
        "multiclass": ("type", "label_col", "classes"),
        "survival": ("type", "time_col", "event_col"),
    }[task.type]
    typed = ("type", "label_col", "positive", "negative", "classes", "time_col", "event_col", "time_unit")
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

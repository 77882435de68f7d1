"""``<out>/<task>/sweeps/<M>/best.yaml``: the configuration each outer fold's nested search chose, and the
checks that keep ``M[best]`` from running a configuration tuned on another split of the patients.

The sweep writes it (bench/sweep.py); the runner reads it for ``M[best]`` (bench/jobs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .data.splits import membership_digest
from .errors import BenchError
from .fsio import atomic_write_text, plain
from .redact import redact

__all__ = ["best_path", "load_best", "tuned_by", "write_best_record"]


def best_path(out: Path, task: str, method: str) -> Path:
    return Path(out) / task / "sweeps" / method / "best.yaml"


def write_best_record(out: Path, task: str, method: str, record: dict[str, Any]) -> Path:
    """Write ``record`` (``folds:`` one entry per outer fold) as ``best.yaml``; returns its path."""
    path = best_path(out, task, method)
    atomic_write_text(path, yaml.safe_dump(plain(record), sort_keys=False))
    return path


def _entry(
    out: Path, task: str, splits: pd.DataFrame, folds: int, method: str, fold: int
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``best.yaml``'s path, record and entry for outer fold ``fold``, checked against this run's split."""
    path = best_path(out, task, method)
    rerun = f"`bench sweep {method} --task <task> --out {out}` with this run's --folds and --seed"
    if not path.is_file():
        raise BenchError(
            f"{path}: no sweep result for {method!r} on task {task!r}, so '{method}[best]' is undefined. "
            f"Run `bench sweep {method} --task <task> --out {out}` first."
        )
    record = yaml.safe_load(path.read_text()) or {}
    entries = record.get("folds")
    if not isinstance(entries, dict):
        raise BenchError(
            f"{path}: written by a former sweep that tuned one configuration on every fold's validation "
            f"patients, who are other folds' test patients, so '{method}[best]' would be tested on patients "
            f"it was tuned on. Rerun {rerun}: it tunes one configuration per outer fold, blind to its test "
            "patients."
        )
    entry = entries.get(fold)
    if entry is None:
        raise BenchError(
            f"{path}: no configuration tuned for fold {fold} (the sweep had {record.get('outer_folds')} "
            f"outer folds, this run has {folds}). Rerun {rerun}."
        )
    if entry.get("split") != membership_digest(splits, fold):
        raise BenchError(
            f"{path}: fold {fold}'s configuration was tuned on another split of the patients (other "
            "--folds, --seed or splits file), so its search may have seen this fold's test patients. "
            f"Rerun {rerun}."
        )
    return path, record, entry


def load_best(
    out: Path, task: str, splits: pd.DataFrame, folds: int, method: str, fold: int
) -> dict[str, Any]:
    """The config overrides ``method[best]`` runs on outer fold ``fold``: those of the best trial of that
    fold's own search, which never saw the fold's test patients."""
    return dict(_entry(out, task, splits, folds, method, fold)[2].get("overrides") or {})


def tuned_by(
    out: Path, task: str, splits: pd.DataFrame, folds: int, method: str, fold: int
) -> dict[str, Any]:
    """Where ``method[best]``'s configuration on ``fold`` comes from, for its ``config.yaml``."""
    path, record, entry = _entry(out, task, splits, folds, method, fold)
    return {
        "best_yaml": str(path),
        "study": entry.get("study"),
        "trial": entry.get("trial"),
        "mean_val_auc": entry.get("mean_val_auc"),
        "inner_folds": record.get("inner_folds"),
        "storage": None if record.get("storage") is None else redact(record["storage"]),
    }

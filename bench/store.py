"""Results on disk, as the contract lays them out, written atomically.

```
<out>/<task>/<method>/fold_<k>/predictions.csv   slide_id, case_id, label, prob, cohort
<out>/<task>/<method>/fold_<k>/metrics.json      per cohort: auc, acc, balanced_acc, f1, threshold,
                                                 acc@0.5, balanced_acc@0.5, f1@0.5, n
<out>/<task>/<method>/fold_<k>/config.yaml       the fully resolved configuration (+ its hash)
<out>/<task>/<method>/fold_<k>/model.pt          the kept weights (state_dict; optional, for `bench explain`)
<out>/<task>/summary.csv                         task, method, cohort, metric, mean, std, n
```
A fold folder is complete when its three files exist; it is reused when its configuration hash matches.
A fold whose configuration changed is moved aside (``fold_<k>.replaced-<old hash>``), never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

__all__ = [
    "FOLD_FILES",
    "MODEL_FILE",
    "atomic_write_text",
    "collect_metrics",
    "config_hash",
    "fold_dir",
    "fold_status",
    "read_fold_metrics",
    "write_fold",
    "write_summary",
]

FOLD_FILES = ("predictions.csv", "metrics.json", "config.yaml")
MODEL_FILE = "model.pt"  # optional: the kept weights (state_dict), read by `bench explain`
# the per-cohort results of bench.evaluate.cohort_metrics: at the validation-chosen threshold, then at the argmax
METRICS = ("auc", "acc", "balanced_acc", "f1", "acc@0.5", "balanced_acc@0.5", "f1@0.5")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path | str):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of the parts of a configuration that change results."""
    blob = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fold_dir(out: Path, task: str, method: str, fold: int) -> Path:
    return Path(out) / task / method / f"fold_{fold}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def fold_status(path: Path, expected_hash: str) -> str:
    """``done`` (complete, same hash), ``changed`` (complete, other hash), or ``missing``."""
    if not all((path / f).is_file() for f in FOLD_FILES):
        return "missing"
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        return "changed"
    return "done" if saved.get("hash") == expected_hash else "changed"


def write_fold(
    path: Path,
    predictions: pd.DataFrame,
    metrics: dict[str, Any],
    config: dict[str, Any],
    hash_: str,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write a fold's three files (and ``model.pt``, the kept weights, when ``state_dict`` is given) into a
    temporary folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        if state_dict is not None:
            import torch

            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp / MODEL_FILE)
        predictions.to_csv(tmp / "predictions.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2, allow_nan=True))
        (tmp / "config.yaml").write_text(
            yaml.safe_dump(_jsonable({"hash": hash_, **config}), sort_keys=False)
        )
        if path.exists():
            old = fold_status(path, hash_)
            if old == "done":  # another worker finished the same job meanwhile: keep theirs
                shutil.rmtree(tmp)
                return
            saved = (yaml.safe_load((path / "config.yaml").read_text()) or {}) if old == "changed" else {}
            aside = path.with_name(f"{path.name}.replaced-{saved.get('hash', 'incomplete')}")
            if aside.exists():
                shutil.rmtree(aside)
            path.rename(aside)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_fold_metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text())


def collect_metrics(out: Path, task: str, names: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Long table of every complete fold of ``task``: method, fold, cohort, metric, value (of the metrics
    ``names``; ``threshold`` may be asked for too)."""
    rows = []
    task_dir = Path(out) / task
    if not task_dir.is_dir():
        return pd.DataFrame(columns=["method", "fold", "cohort", "metric", "value"])
    for method_dir in sorted(p for p in task_dir.iterdir() if p.is_dir() and p.name != "report"):
        for fd in sorted(method_dir.glob("fold_*")):
            if not fd.name.split("_")[1].isdigit() or not (fd / "metrics.json").is_file():
                continue
            metrics = read_fold_metrics(fd)
            for cohort, values in metrics.get("cohorts", {}).items():
                if cohort == "val":  # selection data, not a result
                    continue
                for metric in names:
                    if metric in values:
                        rows.append(
                            (method_dir.name, int(fd.name.split("_")[1]), cohort, metric, values[metric])
                        )
    return pd.DataFrame(rows, columns=["method", "fold", "cohort", "metric", "value"])


def write_summary(out: Path, task: str) -> pd.DataFrame:
    """Rebuild ``summary.csv`` (mean, SD over folds, n folds) from the fold files on disk."""
    long = collect_metrics(out, task)
    summary = (
        long.groupby(["method", "cohort", "metric"], sort=False)["value"]
        .agg(mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), n="count")
        .reset_index()
    )
    summary.insert(0, "task", task)
    atomic_write_text(Path(out) / task / "summary.csv", summary.to_csv(index=False))
    return summary

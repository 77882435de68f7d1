"""Results on disk, as the contract lays them out, written atomically.

```
<out>/<task>/<method>/fold_<k>/predictions.csv   slide_id, case_id, label, prob, cohort
<out>/<task>/<method>/fold_<k>/metrics.json      per cohort: auc, acc, balanced_acc, f1, threshold,
                                                 acc@0.5, balanced_acc@0.5, f1@0.5, n, brier, ece, ece_bins
<out>/<task>/<method>/fold_<k>/config.yaml       the fully resolved configuration (+ its hash)
<out>/<task>/<method>/fold_<k>/model.pt          the kept weights (state_dict; optional, for `bench explain`)
<out>/<task>/summary.csv                         task, method, cohort, metric, mean, std, n
```
A task with several feature sets (backbones) puts each one's folds under ``<method>/<features>/fold_<k>``,
and repeat r >= 1 of the CV design (``--repeats``) under ``[...]/repeat_<r>/fold_<k>``: one feature set and
the first repeat keep the paths above, so ``summary.csv`` has a ``features`` / ``repeat`` column only when
they vary.
A fold folder is complete when its three files exist; it is reused when its configuration hash matches.
A fold whose configuration changed is moved aside (``fold_<k>.replaced-<old hash>``), never overwritten.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import yaml

from .csvio import read_table
from .fsio import atomic_write_text, fsync, plain, umask

__all__ = [
    "FOLD_FILES",
    "METRICS",
    "MODEL_FILE",
    "FoldLocation",
    "FoldRun",
    "TaskResults",
    "collect_metrics",
    "config_hash",
    "fold_dir",
    "fold_status",
    "iter_fold_dirs",
    "load_results",
    "read_saved_splits",
    "remove_stale_temporaries",
    "splits_path",
    "write_fold",
    "write_splits",
    "write_summary",
]

FOLD_FILES = ("predictions.csv", "metrics.json", "config.yaml")
MODEL_FILE = "model.pt"  # optional: the kept weights (state_dict), read by `bench explain`
# the per-cohort results of bench.evaluate.cohort_metrics: at the validation-chosen threshold, then at the argmax,
# then calibration (Brier score, ECE; absent from folds written before they existed)
METRICS = ("auc", "acc", "balanced_acc", "f1", "acc@0.5", "balanced_acc@0.5", "f1@0.5", "brier", "ece")
PREDICTION_COLUMNS = ("slide_id", "case_id", "label", "prob", "cohort")
NOT_METHODS = {"report", "sweeps", "logs", "slurm"}  # folders under <out>/<task> that hold no method


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of the parts of a configuration that change results."""
    blob = json.dumps(plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fold_dir(
    out: Path, task: str, method: str, fold: int, features: str | None = None, repeat: int = 0
) -> Path:
    """A fold's folder; ``features``: the feature set's name on a task with several (None: the only one);
    ``repeat``: which repeat of the CV design (0: the first, at today's path)."""
    folder = Path(out) / task / method
    if features is not None:
        folder = folder / features
    if repeat:
        folder = folder / f"repeat_{repeat}"
    return folder / f"fold_{fold}"


class FoldLocation(NamedTuple):
    method: str
    fold: int
    path: Path
    features: str | None  # the feature set, on a task with several
    repeat: int = 0  # the repeat of the CV design


def _folds_in(folder: Path) -> list[tuple[int, Path]]:
    """``(k, path)`` of the ``fold_<k>`` folders in ``folder`` (asides and temporaries excluded), by k."""
    return sorted((int(p.name[5:]), p) for p in folder.glob("fold_*") if p.name[5:].isdigit() and p.is_dir())


def _repeats_in(folder: Path) -> list[tuple[int, Path]]:
    """``(r, folder)``: the first repeat (``folder`` itself), then each ``repeat_<r>`` in it, by r."""
    more = [(int(p.name[7:]), p) for p in folder.glob("repeat_*") if p.name[7:].isdigit() and p.is_dir()]
    return [(0, folder), *sorted(more)]


def iter_fold_dirs(out: Path, task: str) -> Iterator[FoldLocation]:
    """Every fold folder of ``task`` (``<method>[/<features>][/repeat_<r>]/fold_<k>``: a feature set on a task
    with several, a repeat after the first), in a stable order: the one walker of the results tree."""
    task_dir = Path(out) / task
    if not task_dir.is_dir():
        return
    for method_dir in sorted(p for p in task_dir.iterdir() if p.is_dir() and p.name not in NOT_METHODS):
        feature_dirs = sorted(
            p for p in method_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "fold_", "repeat_"))
        )
        for features, folder in [(None, method_dir), *((p.name, p) for p in feature_dirs)]:
            for r, repeat_dir in _repeats_in(folder):
                for k, path in _folds_in(repeat_dir):
                    yield FoldLocation(method_dir.name, k, path, features, r)


def _read_fold(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A complete fold folder's config and metrics, or None when a file is missing or cannot be read as the
    contract defines it (a crash can leave an empty or truncated file that exists)."""
    if not all((path / f).is_file() for f in FOLD_FILES):
        return None
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
        metrics = json.loads((path / "metrics.json").read_text())
        with (path / "predictions.csv").open() as f:
            header = f.readline().strip().split(",")
    except (OSError, ValueError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if isinstance(config, dict) and isinstance(metrics, dict) and set(PREDICTION_COLUMNS) <= set(header):
        return config, metrics
    return None


def fold_readable(path: Path) -> bool:
    """Whether a fold folder is complete and its files can be read as the contract defines them."""
    return _read_fold(path) is not None


def fold_status(path: Path, expected_hash: str) -> str:
    """``done`` (complete, same hash), ``changed`` (complete, other hash), ``corrupt`` (complete but a file
    cannot be read), or ``missing``."""
    if not all((path / f).is_file() for f in FOLD_FILES):
        return "missing"
    read = _read_fold(path)
    if read is None:
        return "corrupt"
    return "done" if read[0].get("hash") == expected_hash else "changed"


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary folders a killed writer of fold folder ``path`` left behind. Call it only while
    holding the fold's claim: no live process is writing that fold then."""
    stale = [p for p in path.parent.glob(f".{path.name}.tmp-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _aside(path: Path, status: str) -> Path:
    """A free name to move an old fold folder to: ``.replaced-<hash>`` for another configuration,
    ``.corrupt-<time>`` / ``.incomplete-<time>`` otherwise; never an existing folder (nothing is deleted)."""
    if status == "changed":
        tag = f"replaced-{(yaml.safe_load((path / 'config.yaml').read_text()) or {}).get('hash', 'unknown')}"
    else:
        tag = f"{'corrupt' if status == 'corrupt' else 'incomplete'}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = path.with_name(f"{path.name}.{tag}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{tag}-{n}")
    return aside


def write_fold(
    path: Path,
    predictions: pd.DataFrame,
    metrics: dict[str, Any],
    config: dict[str, Any],
    hash_: str,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write a fold's three files (and ``model.pt``, the kept weights, when ``state_dict`` is given) into a
    temporary folder, flush them to disk, then rename the folder into place; an older folder there is moved
    aside, never deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        if state_dict is not None:
            import torch

            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp / MODEL_FILE)
        predictions.to_csv(tmp / "predictions.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(plain(metrics), indent=2, allow_nan=True))
        (tmp / "config.yaml").write_text(yaml.safe_dump(plain({"hash": hash_, **config}), sort_keys=False))
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)
        if path.exists():
            old = fold_status(path, hash_)
            if old == "done":  # another worker finished the same job meanwhile: keep theirs
                shutil.rmtree(tmp)
                return
            path.rename(_aside(path, old))
        tmp.rename(path)
        fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def splits_path(out: Path, task: str, repeat: int = 0) -> Path:
    """``<out>/<task>/splits.tsv``: the patient-level splits a run used (written by ``bench run``); repeat
    r >= 1 of the design: ``splits_repeat_<r>.tsv``."""
    return Path(out) / task / ("splits.tsv" if not repeat else f"splits_repeat_{repeat}.tsv")


def write_splits(out: Path, task: str, splits: pd.DataFrame, repeat: int = 0) -> None:
    atomic_write_text(splits_path(out, task, repeat), splits.to_csv(sep="\t", index=False))


def read_saved_splits(out: Path, task: str, repeat: int = 0) -> pd.DataFrame | None:
    """The splits ``bench run`` saved for ``task`` (IDs read literally), or None when there are none."""
    path = splits_path(out, task, repeat)
    return read_table(path, sep="\t", ids=None) if path.is_file() else None


@dataclass
class FoldRun:
    """One complete fold folder as saved: its resolved configuration and metrics; its predictions are read
    when first asked for."""

    method: str
    fold: int
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    features: str | None = None  # the feature set, on a task with several
    repeat: int = 0  # the repeat of the CV design (``--repeats``)

    @property
    def unit(self) -> int:
        """The fold's position in the whole design, ``repeat · k + fold``: each (repeat, fold) is one pairing
        unit of the paired tests, so they run over all repeats' folds."""
        return self.repeat * int(self.config.get("folds") or 0) + self.fold

    @cached_property
    def predictions(self) -> pd.DataFrame:
        return read_table(self.path / "predictions.csv")

    @property
    def design(self) -> tuple[Any, Any]:
        """The CV design the fold belongs to: (number of folds, split seed)."""
        return self.config.get("folds"), self.config.get("seed")


def _choose_design(designs: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """The design most folds share (ties: the smallest), the one summaries and reports show."""
    counts = pd.Series(designs, dtype=object).value_counts()
    return min(counts.index[counts == counts.max()])


@dataclass
class TaskResults:
    """The fold results of one task that summaries, statistics and every table of the report read: the
    complete, readable folds of one CV design, and a note for each fold left out (another design)."""

    out: Path
    task: str
    runs: list[FoldRun]
    notes: list[str]
    features: str | None = None  # a view of one feature set (:meth:`by_features`)

    @property
    def label(self) -> str:
        """How tables name these results: the task, and the feature set of a view of one."""
        return self.task if self.features is None else f"{self.task} · {self.features}"

    @property
    def stem(self) -> str:
        """The results in file names and LaTeX labels: ``<task>`` or ``<task>_<features>``."""
        return self.task if self.features is None else f"{self.task}_{self.features}"

    @property
    def feature_sets(self) -> list[str]:
        """The feature sets the folds ran on, in the task's order (empty on a task with one)."""
        found = {r.features for r in self.runs if r.features is not None}
        order = next((r.config.get("feature_sets", []) for r in self.runs if r.features is not None), [])
        return [f for f in order if f in found] + sorted(found - set(order))

    def only(self, methods: Collection[str] | None) -> TaskResults:
        """The same results restricted to ``methods`` (None: all)."""
        if methods is None:
            return self
        return dataclasses.replace(self, runs=[r for r in self.runs if r.method in methods])

    def by_features(self) -> list[TaskResults]:
        """One view per feature set (each with the folds of that set only), or ``[self]`` with one set: every
        per-task table and test reads one view, so methods are never pooled across backbones."""
        sets = self.feature_sets
        if not sets:
            return [self]
        return [
            dataclasses.replace(self, runs=[r for r in self.runs if r.features == f], features=f)
            for f in sets
        ]

    @property
    def repeats(self) -> list[int]:
        """The repeats of the CV design on disk (``[0]`` without ``--repeats``)."""
        return sorted({r.repeat for r in self.runs}) or [0]

    def metrics(self, names: tuple[str, ...] = METRICS) -> pd.DataFrame:
        """Long table method, fold, cohort, metric, value (and features, on a task with several feature sets;
        repeat, with several repeats) of the metrics ``names`` (``threshold`` may be asked for too) from each
        fold's metrics.json; the validation cohort (selection data) is left out. ``fold`` is
        :attr:`FoldRun.unit`, the fold's position in the whole design (its fold number without repeats)."""
        rows = [
            (r.method, r.unit, cohort, m, values[m], r.features, r.repeat)
            for r in self.runs
            for cohort, values in r.metrics.get("cohorts", {}).items()
            if cohort != "val"
            for m in names
            if m in values
        ]
        columns = ["method", "fold", "cohort", "metric", "value", "features", "repeat"]
        long = pd.DataFrame(rows, columns=columns)
        drop = [
            c
            for c, varies in (("features", self.feature_sets), ("repeat", len(self.repeats) > 1))
            if not varies
        ]
        return long.drop(columns=drop)


def load_results(out: Path, task: str, design: tuple[Any, Any] | None = None) -> TaskResults:
    """Every complete, readable fold of ``task`` of one CV ``design`` (default: the one most folds share).

    Folds of another design (an earlier ``--folds 2`` run left ``fold_2`` … beside a 5-fold run, say) come
    from other splits: pooling them would count patients twice and pair folds that do not match.
    """
    runs = [
        FoldRun(loc.method, loc.fold, loc.path, *read, features=loc.features, repeat=loc.repeat)
        for loc in iter_fold_dirs(out, task)
        if (read := _read_fold(loc.path)) is not None
    ]
    if not runs:
        return TaskResults(Path(out), task, [], [])
    keep = design or _choose_design([r.design for r in runs])
    notes = [
        f"ignored {r.path.relative_to(Path(out) / task)}: from a {r.config.get('folds')}-fold run with seed "
        f"{r.config.get('seed')}, not the {keep[0]}-fold, seed {keep[1]} design of the other folds"
        for r in runs
        if r.design != keep
    ]
    return TaskResults(Path(out), task, [r for r in runs if r.design == keep], notes)


def collect_metrics(
    out: Path, task: str, design: tuple[Any, Any] | None = None, names: tuple[str, ...] = METRICS
) -> pd.DataFrame:
    """:meth:`TaskResults.metrics` of :func:`load_results`."""
    return load_results(out, task, design).metrics(names)


def _mean_sd(long: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean, SD (ddof 1) and count of ``value`` per ``keys``."""
    return (
        long.groupby(keys, sort=False)["value"]
        .agg(mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), n="count")
        .reset_index()
    )


def write_summary(out: Path, task: str, design: tuple[Any, Any] | None = None) -> pd.DataFrame:
    """Rebuild ``summary.csv`` (mean, SD over folds, n folds; per feature set on a task with several; per
    repeat and over all repeats' folds, ``repeat`` = ``all``, with several repeats) from the fold files of one CV design on disk
    (``design`` = (folds, seed); default: the most common one, as the report does).

    Writers of one task's summary take a lock and collect inside it, so a slower process never replaces a
    newer summary with an older view of the disk.
    """
    task_dir = Path(out) / task
    task_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(task_dir / ".summary.lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        long = collect_metrics(out, task, design)
        keys = ["features"] * ("features" in long) + ["method", "cohort", "metric"]
        summary = _mean_sd(long, keys)
        if "repeat" in long:  # each repeat's own summary, then every repeat's folds pooled ("all")
            per_repeat = _mean_sd(long, ["repeat", *keys])
            pooled = summary.assign(repeat="all")
            summary = pd.concat([per_repeat.astype({"repeat": str}), pooled], ignore_index=True)
            summary = summary[[*keys[:-3], "repeat", *keys[-3:], "mean", "std", "n"]]
        summary.insert(0, "task", task)
        atomic_write_text(task_dir / "summary.csv", summary.to_csv(index=False))
    finally:
        os.close(fd)
    return summary

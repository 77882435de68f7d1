"""The reference rows of a task's report, beside the methods: a floor on every task and ground-truth ceilings on
synthetic ones, each evaluated on the task's own folds, cohorts and metrics.

- ``floor-probe`` (every task): a linear probe (scikit-learn ``LogisticRegression`` after ``StandardScaler``)
  on each slide's mean patch feature, Patho-Bench's standard baseline (Zhang et al., arXiv 2502.06750). Its
  regularisation ``C`` (:data:`C_GRID`) is chosen by a stratified, patient-grouped :data:`INNER_FOLDS`-fold CV
  of the AUC on the fold's training patients only; scaler and probe are then fit on those patients. The
  fold's validation patients play the part they play for the methods (the F1 threshold), and its test
  patients and every external cohort are predicted, so the row enters every table and paired test.
- Synthetic tasks only (they use ground truth no real cohort has):
  ``ceiling-bayes`` the Bayes-optimal prediction from the true latent programs (nothing is fit);
  ``ceiling-omics`` the same tuned probe on the omics (log2(x + 1) when the task says so), internal cohort only
  (omics are the internal cohort's; patients without omics are not predicted);
  ``ceiling-oracle`` the same tuned probe on the mean of each slide's truly informative patches
  (``relevance`` > 0), the pooling an attention model would need to find.
  The privileged-information student is a method (``DataNeeds.privileged``), trained by ``bench run``.

Each row's folds are written as fold folders (``<out>/<task>/<row>/fold_<k>/``, ``kind`` floor or ceiling in
``config.yaml``) with a configuration hash, so they are computed once (seconds: the features are read once
and every fit is a small logistic regression, BLAS on one thread) and recomputed only when the task, its splits or
:data:`VERSION` change. Computed by ``bench run`` after its jobs and by ``bench report`` where missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from .data.cohort import Cohort, read_slide_cached
from .data.groundtruth import bayes_probability
from .data.omics import OmicsScaler
from .data.splits import fold_parts, membership_digest, split_grouping
from .evaluate import fold_metrics, patient_auc
from .jobs import task_identity
from .provenance import versions
from .store import config_hash, fold_dir, fold_status, write_fold
from .taskdata import TaskData
from .tasktypes import task_type

__all__ = [
    "C_GRID",
    "FLOOR",
    "INNER_FOLDS",
    "REFERENCES",
    "VERSION",
    "Reference",
    "ensure_references",
    "fit_probe",
]

#: the probe's candidate inverse regularisation strengths, and the inner CV that chooses among them
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
INNER_FOLDS = 5
#: bump when a row's computation changes: every reference fold on disk is then recomputed
VERSION = 1


@dataclass(frozen=True)
class Reference:
    """One reference row: its name on disk, ``floor`` or ``ceiling``, and what it is (a line of the report)."""

    name: str
    kind: str
    what: str


#: the floor row, on every task
FLOOR = "floor-probe"

REFERENCES = {
    r.name: r
    for r in (
        Reference(FLOOR, "floor", "linear probe on each slide's mean patch feature (C by inner CV)"),
        Reference("ceiling-bayes", "ceiling", "Bayes-optimal prediction from the true latent programs"),
        Reference("ceiling-omics", "ceiling", "linear probe on the omics (internal cohort, C by inner CV)"),
        Reference("ceiling-oracle", "ceiling", "linear probe on the mean of the truly informative patches"),
    )
}

#: per cohort, the slides a row can predict: a feature table (index slide_id) for a probe, or a column
#: ``prob`` (nothing to fit)
Inputs = dict[str, pd.DataFrame]


def fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    """Scaler + logistic regression on ``x`` (rows: training slides), ``C`` chosen from :data:`C_GRID` by a
    stratified CV grouped by patient (``groups``) of the AUC; refit on every row. Nothing but these rows is
    read, so the caller decides what "training" is. Returns the fitted pipeline and what was chosen.

    BLAS runs on one thread: these matrices are small (hundreds of rows), and a multi-threaded BLAS beside
    busy training workers spends most of its time waiting for a core."""
    with threadpool_limits(limits=1):
        return _fit_probe(x, y, groups, seed)


def _fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    per_class = pd.Series(groups).groupby(y).nunique()
    k = int(min(INNER_FOLDS, per_class.min())) if len(per_class) == 2 else 0
    if k < 2:  # too few patients of a class to tune: the default C, said so
        return probe.fit(x, y), {"C": 1.0, "C_by": "default (too few training patients for an inner CV)"}
    search = GridSearchCV(
        probe,
        {"logisticregression__C": list(C_GRID)},
        scoring="roc_auc",
        cv=StratifiedGroupKFold(k, shuffle=True, random_state=seed),
    )
    search.fit(x, y, groups=groups)
    chosen = {
        "C": float(search.best_params_["logisticregression__C"]),
        "inner_auc": float(search.best_score_),
    }
    return search.best_estimator_, {**chosen, "C_by": f"{k}-fold inner CV on the training patients"}


def _slide_means(cohort: Cohort, informative: bool) -> pd.DataFrame | None:
    """Mean patch feature of each slide (of its ``relevance`` > 0 patches when ``informative``; a slide with
    none keeps the mean of all); None when ``informative`` and the files store no relevance."""
    rows = {}
    for slide_id, path in zip(cohort.slides.slide_id, cohort.slides.path, strict=True):
        sf = read_slide_cached(path)
        keep = slice(None)
        if informative:
            relevance = sf.extras.get("relevance")
            if relevance is None:
                return None
            keep = np.asarray(relevance) > 0 if (np.asarray(relevance) > 0).any() else slice(None)
        rows[slide_id] = sf.features[keep].mean(axis=0, dtype=np.float64)
    return pd.DataFrame.from_dict(rows, orient="index")


def _per_slide(cohort: Cohort, table: pd.DataFrame) -> pd.DataFrame:
    """A per-patient table (index case_id) as one row per slide of ``cohort`` whose patient it has."""
    slides = cohort.slides[cohort.slides.case_id.isin(table.index)]
    return table.loc[slides.case_id].set_axis(slides.slide_id.to_numpy())


def _floor_inputs(data: TaskData) -> Inputs | None:
    cohorts = {"internal": data.internal, **data.externals}
    return {name: _slide_means(c, informative=False) for name, c in cohorts.items()}


def _oracle_inputs(data: TaskData) -> Inputs | None:
    if data.privileged is None:
        return None
    means = {name: _slide_means(c, True) for name, c in {"internal": data.internal, **data.externals}.items()}
    return None if any(m is None for m in means.values()) else means  # type: ignore[return-value]


def _omics_inputs(data: TaskData) -> Inputs | None:
    if data.privileged is None or data.internal.omics is None:
        return None
    return {
        "internal": _per_slide(
            data.internal, OmicsScaler(data.task.omics_log1p).log_expression(data.internal.omics)
        )
    }


def _bayes_inputs(data: TaskData) -> Inputs | None:
    if data.privileged is None:
        return None
    task, out = data.task, {}
    labels = {"internal": task.labels, **{e.name: e.labels for e in task.external}}
    for name, cohort in {"internal": data.internal, **data.externals}.items():
        p = bayes_probability(labels[name], task.label_col, task.positive)
        if p is None:
            return None
        out[name] = _per_slide(cohort, p.to_frame())
    return out


_INPUTS: dict[str, Callable[[TaskData], Inputs | None]] = {
    FLOOR: _floor_inputs,
    "ceiling-bayes": _bayes_inputs,
    "ceiling-omics": _omics_inputs,
    "ceiling-oracle": _oracle_inputs,
}


def _predictions(cohort: Cohort, slide_ids: list[str], prob: pd.Series, name: str) -> pd.DataFrame:
    """The contract's prediction rows of the slides of ``slide_ids`` that ``prob`` (index slide_id) has."""
    rows = cohort.slides.set_index("slide_id").loc[[s for s in slide_ids if s in prob.index]]
    return pd.DataFrame(
        {
            "slide_id": rows.index.to_numpy(),
            "case_id": rows.case_id.to_numpy(),
            "label": rows.label.to_numpy().astype(int),
            "prob": prob.loc[rows.index].to_numpy(np.float64),
            "cohort": name,
        }
    )


def _fold(data: TaskData, inputs: Inputs, fold: int) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Fit (on the fold's training slides) and predict one fold of a row: the slide predictions of every
    part and cohort (``train`` and ``val`` among them) and what the fit chose."""
    parts, internal = fold_parts(data.splits, fold), inputs["internal"]
    chosen: dict[str, Any] = {}
    if list(internal.columns) == ["prob"]:
        scored = {name: table["prob"] for name, table in inputs.items()}
    else:
        train = [s for s in parts["train"] if s in internal.index]
        slides = data.internal.slides.set_index("slide_id").loc[train]
        probe, chosen = fit_probe(
            internal.loc[train].to_numpy(),
            slides.label.to_numpy(),
            slides.case_id.to_numpy(),
            data.split_seed,
        )
        scored = {
            name: pd.Series(probe.predict_proba(table.to_numpy())[:, 1], index=table.index)
            for name, table in inputs.items()
        }
    cohorts = {
        part: _predictions(data.internal, parts[part], scored["internal"], part)
        for part in ("train", "val", "test")
    }
    for name, cohort in data.externals.items():
        if name in scored:
            cohorts[name] = _predictions(cohort, cohort.slides.slide_id.tolist(), scored[name], name)
    return cohorts, chosen


def _config(data: TaskData, ref: Reference, fold: int) -> tuple[dict[str, Any], str]:
    """A reference fold's recorded configuration and the hash of its result-changing part."""
    hashed = {
        "kind": ref.kind,
        "method": ref.name,
        "reference_version": VERSION,
        "task": task_identity(data.task),
        "fold": fold,
        "folds": data.folds,
        "seed": data.seed,
        "split": membership_digest(data.splits, fold),
        "in_dim": data.internal.dim,
        "probe": {"C_grid": list(C_GRID), "inner_folds": INNER_FOLDS},
    }
    if data.repeat:
        hashed["repeat"] = data.repeat
    recorded = {
        **hashed,
        "what": ref.what,
        "split_grouping": split_grouping(data.task),
        **({"features": data.features, "feature_sets": list(data.feature_sets)} if data.features else {}),
        "task_file": str(data.task.path),
        "synthetic": data.task.synthetic,
        "versions": versions(),
    }
    return recorded, config_hash(hashed)


def _path(data: TaskData, out: Path, name: str, fold: int) -> Path:
    """Where a reference row's fold goes: beside the methods' folds of the same feature set and repeat."""
    return fold_dir(out, data.task.name, name, fold, data.features, data.repeat)


def ensure_references(data: TaskData, out: Path, log: Callable[[str], Any] = lambda _: None) -> list[str]:
    """Compute and write every reference row that applies to the task (the floor; the ceilings when it is
    synthetic) on each fold not yet on disk with the same configuration; returns the rows that apply. The
    rows are binary probes, so a multiclass or survival task has none yet."""
    if task_type(data.task).name != "binary":
        return []
    agg = data.task.patient_aggregation
    applied = []
    for name, ref in REFERENCES.items():
        todo = [
            (k, *_config(data, ref, k))
            for k in range(data.folds)
            if fold_status(_path(data, out, name, k), _config(data, ref, k)[1]) != "done"
        ]
        inputs = _INPUTS[name](data) if todo else {}
        if inputs is None:
            continue
        applied.append(name)
        for k, config, hash_ in todo:
            cohorts, chosen = _fold(data, inputs, k)
            train = cohorts.pop("train")
            metrics = {"cohorts": fold_metrics(cohorts, agg), "train_auc": patient_auc(train, agg), **chosen}
            predictions = pd.concat([p for c, p in cohorts.items() if c != "val"], ignore_index=True)
            write_fold(_path(data, out, name, k), predictions, metrics, config, hash_)
        if todo:
            log(f"{data.task.name}: {name} ({ref.kind}) computed on {len(todo)} fold(s)")
    return applied

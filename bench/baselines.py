"""The reference rows of a task's report, beside the methods: a floor on every task and ground-truth ceilings on
synthetic ones, each evaluated on the task's own folds, cohorts and metrics, whatever the task's type.

- ``floor-probe`` (every task): a linear probe on each slide's mean patch feature, Patho-Bench's standard
  baseline (Zhang et al., arXiv 2502.06750), of the task's type (bench/probes.py): a standardised logistic
  regression (binary), a multinomial one (multiclass), an L2-penalised linear Cox model with the Breslow
  baseline hazard (survival). Its regularisation ``C`` (:data:`C_GRID`) is chosen by a stratified,
  patient-grouped :data:`INNER_FOLDS`-fold CV of the task's objective (AUC, macro one-vs-rest AUC, Harrell's
  c-index) on the fold's training patients only; scaler and probe are then fit on those patients. The fold's
  validation patients play the part they play for the methods (the F1 threshold, the risk cut), and its test
  patients and every external cohort are predicted, in the contract's score columns, so the row enters every
  table, figure and paired test.
- Synthetic tasks only (they use ground truth no real cohort has):
  ``ceiling-bayes`` the Bayes-optimal prediction from the truth (nothing is fit): P(label | true programs),
  the true class probabilities of the subtype, or the true log-hazard with the true survival function;
  ``ceiling-omics`` the same tuned probe on the omics (log2(x + 1) when the task says so), internal cohort only
  (omics are the internal cohort's; patients without omics are not predicted); not on survival tasks, where
  the Cox fit on every gene is not cheap (:func:`_omics_inputs`);
  ``ceiling-oracle`` the same tuned probe on the mean of each slide's truly informative patches
  (``relevance`` > 0), the pooling an attention model would need to find.
  The privileged-information student is a method (``DataNeeds.privileged``), trained by ``bench run``.

Each row's folds are written as fold folders (``<out>/<task>/<row>/fold_<k>/``, ``kind`` floor or ceiling in
``config.yaml``) with a configuration hash, so they are computed once (seconds: the features are read once
and every fit is a small linear model, BLAS on one thread) and recomputed only when the task, its splits or
:data:`VERSION` change. Computed by ``bench run`` after its jobs and by ``bench report`` where missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data.cohort import Cohort, read_slide_cached
from .data.groundtruth import (
    bayes_class_probabilities,
    bayes_probability,
    true_cumulative_hazard,
    true_log_hazard,
)
from .data.omics import OmicsScaler
from .data.splits import fold_parts, membership_digest, split_grouping
from .evaluate import fold_metrics, patient_auc
from .jobs import task_identity
from .probes import Outcomes, Scorer, TruthScorer, fit_probe
from .provenance import versions
from .store import config_hash, fold_dir, fold_status, write_fold
from .taskdata import TaskData, fold_time_edges
from .tasktypes import task_type, time_bin_index

__all__ = [
    "C_GRID",
    "FLOOR",
    "INNER_FOLDS",
    "REFERENCES",
    "VERSION",
    "Reference",
    "RowInputs",
    "ensure_references",
]

#: the probe's candidate inverse regularisation strengths, and the inner CV that chooses among them
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
INNER_FOLDS = 5
#: bump when a row's computation changes: every reference fold on disk is then recomputed
VERSION = 1


@dataclass(frozen=True)
class Reference:
    """One reference row: its name on disk, ``floor`` or ``ceiling``, and what it is (a line of the report;
    ``{probe}`` is the task type's probe)."""

    name: str
    kind: str
    what: str


#: the floor row, on every task
FLOOR = "floor-probe"

REFERENCES = {
    r.name: r
    for r in (
        Reference(FLOOR, "floor", "{probe} on each slide's mean patch feature (C by inner CV)"),
        Reference("ceiling-bayes", "ceiling", "Bayes-optimal prediction from the true latent programs"),
        Reference("ceiling-omics", "ceiling", "{probe} on the omics (internal cohort, C by inner CV)"),
        Reference("ceiling-oracle", "ceiling", "{probe} on the mean of the truly informative patches"),
    )
}

#: each task type's probe (bench/probes.py), as the rows' descriptions name it
PROBES = {
    "binary": "linear probe",
    "multiclass": "multinomial linear probe",
    "survival": "L2-penalised linear Cox model (Breslow)",
}


#: the Bayes ceiling's description beyond binary tasks
BAYES = {
    "multiclass": "the true class probabilities of the generator's subtype model",
    "survival": "the true log-hazard and survival function of the generator's survival model",
}


@dataclass(frozen=True)
class RowInputs:
    """What a row reads, per cohort: a table (index slide_id) of features to fit a probe on, or, with
    ``truth``, of the scores themselves (nothing is fit)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    truth: TruthScorer | None = None


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


def _floor_inputs(data: TaskData) -> RowInputs | None:
    cohorts = {"internal": data.internal, **data.externals}
    return RowInputs({name: _slide_means(c, informative=False) for name, c in cohorts.items()})


def _oracle_inputs(data: TaskData) -> RowInputs | None:
    if data.privileged is None:
        return None
    means = {name: _slide_means(c, True) for name, c in {"internal": data.internal, **data.externals}.items()}
    return None if any(m is None for m in means.values()) else RowInputs(means)  # type: ignore[arg-type]


def _omics_inputs(data: TaskData) -> RowInputs | None:
    """None on a survival task too: a Cox model on hundreds of genes under the inner CV costs minutes per
    fold (the built-in os: 768 genes, over 15 min for its five folds on two cores), not seconds."""
    if data.privileged is None or data.internal.omics is None or task_type(data.task).name == "survival":
        return None
    log = OmicsScaler(data.task.omics_log1p).log_expression(data.internal.omics)
    return RowInputs({"internal": _per_slide(data.internal, log)})


def _truth(data: TaskData, labels: Path) -> pd.DataFrame | None:
    """The true scores (index case_id) of the patients of the cohort whose labels file is ``labels``, in the
    task type's score columns (survival: ``risk``, the true log-hazard), or None."""
    task, kind = data.task, task_type(data.task).name
    if kind == "multiclass":
        return bayes_class_probabilities(labels, task.label_col, task.classes or [])
    if kind == "survival":
        eta = true_log_hazard(labels, task.time_col or "", task.event_col or "")
        return None if eta is None else eta.to_frame()
    p = bayes_probability(labels, task.label_col, task.positive or [])
    return None if p is None else p.to_frame()


def _bayes_inputs(data: TaskData) -> RowInputs | None:
    if data.privileged is None:
        return None
    task, out = data.task, {}
    labels = {"internal": task.labels, **{e.name: e.labels for e in task.external}}
    for name, cohort in {"internal": data.internal, **data.externals}.items():
        truth = _truth(data, labels[name])
        if truth is None:
            return None
        out[name] = _per_slide(cohort, truth)
    survival = task_type(task).name == "survival"
    return RowInputs(out, TruthScorer(true_cumulative_hazard if survival else None))


_INPUTS: dict[str, Callable[[TaskData], RowInputs | None]] = {
    FLOOR: _floor_inputs,
    "ceiling-bayes": _bayes_inputs,
    "ceiling-omics": _omics_inputs,
    "ceiling-oracle": _oracle_inputs,
}


def _predictions(
    cohort: Cohort, slide_ids: list[str], scores: pd.DataFrame, name: str, edges: np.ndarray | None
) -> pd.DataFrame:
    """The contract's prediction rows of the slides of ``slide_ids`` that ``scores`` (index slide_id, the
    score columns) has: a survival slide's label is its time bin under the fold's ``edges``, then its time
    and event, as a method's fold writes them (:func:`bench.evaluate.slide_predictions`)."""
    rows = cohort.slides.set_index("slide_id").loc[[s for s in slide_ids if s in scores.index]]
    if edges is None:
        outcome = {"label": rows.label.to_numpy().astype(int)}
    else:
        time = rows.time.to_numpy(np.float64)
        outcome = {"label": time_bin_index(time, edges), "time": time, "event": rows.event.to_numpy()}
    values = scores.loc[rows.index]
    return pd.DataFrame(
        {
            "slide_id": rows.index.to_numpy(),
            "case_id": rows.case_id.to_numpy(),
            **outcome,
            **{c: values[c].to_numpy(np.float64) for c in values.columns},
            "cohort": name,
        }
    )


def _fit(data: TaskData, table: pd.DataFrame, fold: int) -> tuple[Scorer, dict[str, Any]]:
    """The task type's probe fit on the fold's training slides of ``table`` (and nothing else)."""
    kind = task_type(data.task)
    train = [s for s in fold_parts(data.splits, fold)["train"] if s in table.index]
    slides = data.internal.slides.set_index("slide_id").loc[train]
    survival = kind.name == "survival"
    outcomes = Outcomes(
        slides.label.to_numpy(),
        slides.case_id.to_numpy(),
        slides.time.to_numpy(np.float64) if survival else None,
        slides.event.to_numpy().astype(int) if survival else None,
    )
    x = table.loc[train].to_numpy()
    return fit_probe(kind.name, x, outcomes, kind.num_outputs, data.split_seed, C_GRID, INNER_FOLDS)


def _fold(data: TaskData, inputs: RowInputs, fold: int) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Fit (on the fold's training slides) and predict one fold of a row: the slide predictions of every
    part and cohort (``train`` and ``val`` among them) and what the fit chose."""
    parts, edges = fold_parts(data.splits, fold), fold_time_edges(data, fold)
    scorer, chosen = (inputs.truth, {}) if inputs.truth else _fit(data, inputs.tables["internal"], fold)
    scored = {name: scorer.scores(table, edges) for name, table in inputs.tables.items()}
    cohorts = {
        part: _predictions(data.internal, parts[part], scored["internal"], part, edges)
        for part in ("train", "val", "test")
    }
    for name, cohort in data.externals.items():
        if name in scored:
            cohorts[name] = _predictions(cohort, cohort.slides.slide_id.tolist(), scored[name], name, edges)
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
    edges = fold_time_edges(data, fold)
    recorded = {
        **hashed,
        "what": _what(data, ref),
        "split_grouping": split_grouping(data.task),
        **({"features": data.features, "feature_sets": list(data.feature_sets)} if data.features else {}),
        "task_file": str(data.task.path),
        "synthetic": data.task.synthetic,
        "versions": versions(),
        **({} if edges is None else {"time_bins": [float(e) for e in edges]}),
    }
    return recorded, config_hash(hashed)


def _what(data: TaskData, ref: Reference) -> str:
    """The row's description on the task's type."""
    kind = task_type(data.task).name
    if ref.name == "ceiling-bayes" and kind != "binary":
        return BAYES[kind]
    return ref.what.format(probe=PROBES[kind])


def _path(data: TaskData, out: Path, name: str, fold: int) -> Path:
    """Where a reference row's fold goes: beside the methods' folds of the same feature set and repeat."""
    return fold_dir(out, data.task.name, name, fold, data.features, data.repeat)


def ensure_references(data: TaskData, out: Path, log: Callable[[str], Any] = lambda _: None) -> list[str]:
    """Compute and write every reference row that applies to the task (the floor; the ceilings when it is
    synthetic) on each fold not yet on disk with the same configuration; returns the rows that apply."""
    agg = data.task.patient_aggregation
    applied = []
    for name, ref in REFERENCES.items():
        todo = [
            (k, *_config(data, ref, k))
            for k in range(data.folds)
            if fold_status(_path(data, out, name, k), _config(data, ref, k)[1]) != "done"
        ]
        inputs = _INPUTS[name](data) if todo else RowInputs()
        if inputs is None:
            continue
        applied.append(name)
        for k, config, hash_ in todo:
            cohorts, chosen = _fold(data, inputs, k)
            train, edges = cohorts.pop("train"), fold_time_edges(data, k)
            metrics = {
                "cohorts": fold_metrics(cohorts, agg, edges),
                "train_auc": patient_auc(train, agg),
                **chosen,
            }
            predictions = pd.concat([p for c, p in cohorts.items() if c != "val"], ignore_index=True)
            write_fold(_path(data, out, name, k), predictions, metrics, config, hash_)
        if todo:
            log(f"{data.task.name}: {name} ({ref.kind}) computed on {len(todo)} fold(s)")
    return applied

"""The linear probes of the report's reference rows (bench/baselines.py), one per task type, each with its
regularisation chosen by an inner CV on the training rows it is given and nothing else, and the scorers that
turn a row's inputs into the contract's score columns (bench/tasktypes.py).

- binary: ``StandardScaler`` + scikit-learn ``LogisticRegression``; ``C`` by a stratified CV grouped by
  patient of the ROC AUC (scikit-learn's ``roc_auc`` scorer); ``prob``.
- multiclass: the same pipeline, multinomial (the ``lbfgs`` solver's softmax over the classes); ``C`` by the
  same CV, stratified by class, of the macro one-vs-rest AUC (:func:`bench.evaluate.auc`, the task's own
  metric); ``prob_0`` … ``prob_{C-1}``.
- survival: ``StandardScaler`` + the L2-penalised linear Cox model of bench/coxph.py (Breslow ties); ``C`` by
  the same CV, stratified by event, of Harrell's c-index (:func:`bench.evaluate.c_index`); ``risk`` the
  linear predictor ``x·β`` and ``surv_k`` the Breslow survival function ``S(e_{k+1} | x)`` at the end of each
  of the fold's time bins, so the c-index, time-dependent AUC and integrated Brier score all read it.

Every fit runs with BLAS on one thread: these matrices are small (hundreds of rows), and a multi-threaded BLAS
beside busy training workers spends most of its time waiting for a core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from .coxph import CoxModel, fit_cox
from .evaluate import auc, c_index
from .tasktypes import prob_columns, survival_columns

__all__ = ["CoxProbe", "LogisticProbe", "Outcomes", "Scorer", "TruthScorer", "fit_probe"]


@dataclass(frozen=True)
class Outcomes:
    """What a probe is fit to, one entry per training row (slide): the class index (classification), the
    patient (the inner CV's groups), and a survival task's time and event."""

    label: np.ndarray
    groups: np.ndarray
    time: np.ndarray | None = None
    event: np.ndarray | None = None


class Scorer(Protocol):
    """What a reference row predicts with: the score columns (contract names, index slide_id) of a table of
    inputs (index slide_id); ``edges``: a survival task's time bins of the fold."""

    def scores(self, table: pd.DataFrame, edges: np.ndarray | None) -> pd.DataFrame: ...


@dataclass(frozen=True)
class LogisticProbe:
    """A fitted scaler + logistic regression of ``classes`` classes."""

    pipeline: Pipeline
    classes: int

    def scores(self, table: pd.DataFrame, edges: np.ndarray | None) -> pd.DataFrame:
        fitted = self.pipeline.predict_proba(table.to_numpy())
        probs = np.zeros((len(table), self.classes))
        probs[:, self.pipeline.classes_] = fitted  # a class absent from training keeps probability 0
        values = probs[:, 1:] if self.classes == 2 else probs
        return pd.DataFrame(values, index=table.index, columns=prob_columns(self.classes))


def _survival_table(eta: np.ndarray, cumhaz: np.ndarray, index: pd.Index) -> pd.DataFrame:
    """``risk`` = η and ``surv_k`` = exp(−H₀(e_{k+1}) exp(η)) of log-hazards ``eta`` given the baseline
    cumulative hazard ``cumhaz`` at the end of each time bin."""
    with np.errstate(over="ignore"):  # an extreme log-hazard: S = 0, its limit
        surv = np.exp(-np.outer(np.exp(eta), cumhaz))
    return pd.DataFrame(np.column_stack([eta, surv]), index=index, columns=survival_columns(len(cumhaz)))


@dataclass(frozen=True)
class CoxProbe:
    """A fitted scaler + Cox model (bench/coxph.py)."""

    scaler: StandardScaler
    model: CoxModel

    def scores(self, table: pd.DataFrame, edges: np.ndarray | None) -> pd.DataFrame:
        eta = self.model.log_hazard(self.scaler.transform(table.to_numpy()))
        return _survival_table(eta, self.model.cumulative_hazard(edges[1:]), table.index)


@dataclass(frozen=True)
class TruthScorer:
    """Nothing fit: the inputs are the scores (``prob`` / ``prob_k``), or a survival task's true log-hazard
    ``risk`` with the true baseline cumulative hazard ``cumulative_hazard(t)``."""

    cumulative_hazard: Callable[[np.ndarray], np.ndarray] | None = None

    def scores(self, table: pd.DataFrame, edges: np.ndarray | None) -> pd.DataFrame:
        if self.cumulative_hazard is None:
            return table
        eta = table["risk"].to_numpy(np.float64)
        return _survival_table(eta, self.cumulative_hazard(edges[1:]), table.index)


def fit_probe(
    kind: str, x: np.ndarray, y: Outcomes, classes: int, seed: int, grid: Sequence[float], inner_folds: int
) -> tuple[Scorer, dict[str, Any]]:
    """The probe of task type ``kind`` on rows ``x`` (training slides), its ``C`` chosen from ``grid`` by an
    ``inner_folds``-fold CV grouped by patient (fewer when a stratum has fewer patients; none, ``C`` = 1,
    below two) and refit on every row. Nothing but these rows is read, so the caller decides what "training"
    is. Returns the fitted scorer and what was chosen (``C``, the inner CV's mean score ``inner_auc`` or
    ``inner_c_index``, how ``C`` was chosen)."""
    strata = y.event if kind == "survival" else y.label
    per_stratum = pd.Series(y.groups).groupby(strata).nunique()
    wanted = 2 if kind == "survival" else classes
    k = int(min(inner_folds, per_stratum.min())) if len(per_stratum) == wanted else 0
    with threadpool_limits(limits=1):
        if k < 2:  # too few patients of a stratum to tune: the default C, said so
            scorer = _fit(kind, x, y, classes, 1.0)
            return scorer, {"C": 1.0, "C_by": "default (too few training patients for an inner CV)"}
        cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
        if kind == "survival":
            c, score = _cox_search(x, y, grid, cv)
            scorer = _fit(kind, x, y, classes, c)
        else:
            scorer, c, score = _logistic_search(x, y, classes, grid, cv)
    inner = "inner_c_index" if kind == "survival" else "inner_auc"
    return scorer, {"C": c, inner: score, "C_by": f"{k}-fold inner CV on the training patients"}


def _logistic(c: float = 1.0) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def _fit(kind: str, x: np.ndarray, y: Outcomes, classes: int, c: float) -> Scorer:
    if kind == "survival":
        scaler = StandardScaler().fit(x)
        return CoxProbe(scaler, fit_cox(scaler.transform(x), y.time, y.event, c))
    return LogisticProbe(_logistic(c).fit(x, y.label), classes)


def _logistic_search(
    x: np.ndarray, y: Outcomes, classes: int, grid: Sequence[float], cv: StratifiedGroupKFold
) -> tuple[Scorer, float, float]:
    """scikit-learn's grid search of ``C`` (binary: its ``roc_auc``; multiclass: the macro one-vs-rest AUC)."""
    scoring = "roc_auc" if classes == 2 else make_scorer(auc, response_method="predict_proba")
    search = GridSearchCV(_logistic(), {"logisticregression__C": list(grid)}, scoring=scoring, cv=cv)
    search.fit(x, y.label, groups=y.groups)
    c = float(search.best_params_["logisticregression__C"])
    return LogisticProbe(search.best_estimator_, classes), c, float(search.best_score_)


def _cox_search(
    x: np.ndarray, y: Outcomes, grid: Sequence[float], cv: StratifiedGroupKFold
) -> tuple[float, float]:
    """The ``C`` of ``grid`` with the best mean inner-validation Harrell's c-index (the first on a tie, as
    scikit-learn's grid search), each inner fit scaled on its own training rows; and that c-index. Along the
    grid (ascending) each fit starts from the previous one's coefficients: the objective is strictly convex,
    so the start moves the solution only within the solver's tolerance."""
    order = np.argsort(grid)
    scores = np.full((len(grid), cv.get_n_splits()), np.nan)
    for j, (tr, va) in enumerate(cv.split(x, y.event, y.groups)):
        scaler = StandardScaler().fit(x[tr])
        xt, xv = scaler.transform(x[tr]), scaler.transform(x[va])
        start = None
        for i in order:
            model = fit_cox(xt, y.time[tr], y.event[tr], grid[i], start)
            start = model.coef
            scores[i, j] = c_index(y.time[va], y.event[va], model.log_hazard(xv))
    mean = np.nanmean(scores, axis=1)
    best = int(np.nanargmax(mean))
    return float(grid[best]), float(mean[best])

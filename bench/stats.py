"""Statistics from saved predictions (nothing is retrained): bootstrap CIs and paired tests of AUCs.

Every quantity is patient-level: slides are first aggregated to patients with the task's aggregation
(``patient_aggregation``: mean or max of the slide probabilities), then patients are resampled or ranked.

- **Spread over folds**: mean ± SD (ddof 1) of the fold AUCs, the paper's form.
- **Internal CI**: the test parts of the k folds partition the patients, so their out-of-fold predictions are
  pooled into one prediction per patient; the CI is a seeded percentile bootstrap of that pooled AUC.
- **External CI**: every fold's model predicts the whole external cohort. We bootstrap per fold and average:
  one resample of external patients is applied to every fold's predictions, the k AUCs are averaged, and
  the percentiles of that average make the CI. It is the CI of the same number the table reports (the mean
  of the fold AUCs), and the averaging keeps the fold models separate (no ensemble is formed).
- The bootstrap is stratified by class (as pROC's default): positives and negatives are resampled
  separately, so every resample has both classes and the AUC is always defined.
- **Corrected resampled t-test** (Nadeau & Bengio 2003, Machine Learning 52:239): paired differences of
  fold AUCs ``d_j``, :math:`t = \\bar d / \\sqrt{(1/k + n_{test}/n_{train})\\, s_d^2}` with k − 1 degrees
  of freedom; ``n_train`` counts every patient outside the fold's test part (training + validation).
- **DeLong's test** (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837), computed with the midrank
  algorithm of Sun & Xu (2014, IEEE SPL 21:1389), for any linear contrast of AUCs measured on the same
  patients: a difference of two pooled AUCs, or a difference of two means of fold AUCs (external cohort).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from .csvio import read_table
from .data.splits import membership_digest
from .errors import BenchError
from .evaluate import patient_level
from .store import FOLD_FILES, choose_design, fold_design, fold_readable, iter_fold_dirs

__all__ = [
    "DeLong",
    "FoldRun",
    "PairedTest",
    "TaskStats",
    "analyse_task",
    "bootstrap_auc_ci",
    "collect_runs",
    "corrected_resampled_ttest",
    "delong",
    "delong_contrast",
    "delong_test",
    "midranks",
    "resampled_aucs",
    "stratified_counts",
]


# ---------------------------------------------------------------- DeLong (fast algorithm of Sun & Xu)


@dataclass(frozen=True)
class DeLong:
    """AUCs of several score rows on the same patients, and their DeLong covariance.

    Attributes:
        aucs: shape ``(k,)``.
        cov: shape ``(k, k)``.
    """

    aucs: np.ndarray
    cov: np.ndarray


@dataclass(frozen=True)
class PairedTest:
    """A two-sided test of a difference: estimate, its statistic and p-value (NaN when undefined)."""

    estimate: float
    statistic: float
    p_value: float


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` along the last axis, ties sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    return np.apply_along_axis(sps.rankdata, -1, x) if x.ndim > 1 else sps.rankdata(x)


def delong(y: np.ndarray, scores: np.ndarray) -> DeLong:
    """AUC of each row of ``scores`` and the DeLong covariance matrix, in O(k N log N).

    With m positives and n negatives, the structural components are
    ``V10_i = (1/n) Σ_j ψ(X_i, Y_j)`` (per positive) and ``V01_j = (1/m) Σ_i ψ(X_i, Y_j)`` (per negative),
    ψ = 1 if X > Y, ½ if equal; they come from midranks (Sun & Xu 2014): ``V10_i = (T_Z,i − T_X,i) / n``,
    ``V01_j = 1 − (T_Z,j − T_Y,j) / m``. Then ``cov = S10 / m + S01 / n`` with S the sample covariances
    (ddof 1) of the components across positives and across negatives.

    Args:
        y: labels of shape ``(N,)`` in {0, 1}, both classes present.
        scores: shape ``(k, N)`` or ``(N,)``.
    """
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(
            f"DeLong needs at least two patients of each class, got {m} positive and {n} negative"
        )
    tz = midranks(np.concatenate([pos, neg], axis=1))  # (k, m + n)
    tx, ty = midranks(pos), midranks(neg)  # (k, m), (k, n)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n  # (k, m)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # (k, n)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return DeLong(aucs, cov)


def delong_contrast(y: np.ndarray, scores: np.ndarray, contrast: Sequence[float]) -> PairedTest:
    """Two-sided z-test of ``Σ c_i AUC_i = 0`` for AUCs measured on the same patients.

    Two methods' fold-mean AUCs are compared with ``c = (1/k, …, 1/k, −1/k, …, −1/k)``.
    """
    c = np.asarray(contrast, dtype=np.float64)
    d = delong(y, scores)
    estimate = float(c @ d.aucs)
    var = float(c @ d.cov @ c)
    if var <= 1e-15:  # every structural component agrees (e.g. identical rankings): nothing to test
        return PairedTest(estimate, float("nan"), float("nan"))
    z = estimate / np.sqrt(var)
    return PairedTest(estimate, float(z), float(2 * sps.norm.sf(abs(z))))


def delong_test(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> PairedTest:
    """DeLong's test of AUC(a) − AUC(b) on the same patients."""
    return delong_contrast(y, np.stack([scores_a, scores_b]), [1.0, -1.0])


# ---------------------------------------------------------------- corrected resampled t-test


def corrected_resampled_ttest(diffs: Sequence[float], test_train_ratio: float) -> PairedTest:
    """Nadeau & Bengio's corrected resampled t-test of paired fold differences (two-sided, k − 1 df).

    Args:
        diffs: per-fold differences of a score (here AUC of a method minus the reference), length k.
        test_train_ratio: n_test / n_train (mean over the folds); 0 gives the ordinary paired t-test.
    """
    d = np.asarray(diffs, dtype=np.float64)
    k = d.size
    if k < 2:
        return PairedTest(float(d.mean()) if k else float("nan"), float("nan"), float("nan"))
    mean, var = float(d.mean()), float(d.var(ddof=1))
    if var <= 1e-15:  # every fold gives the same difference: no spread, so no test (not p = 0 or 1)
        return PairedTest(mean, float("nan"), float("nan"))
    t = mean / np.sqrt((1.0 / k + test_train_ratio) * var)
    return PairedTest(mean, float(t), float(2 * sps.t.sf(abs(t), df=k - 1)))


# ---------------------------------------------------------------- stratified percentile bootstrap


def stratified_counts(m: int, n: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each positive (``(B, m)``) and each negative (``(B, n)``) is drawn in B resamples with
    replacement, positives and negatives drawn separately (class sizes fixed)."""
    rng = np.random.default_rng(seed)
    return (
        rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(np.float64),
        rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64),
    )


def resampled_aucs(
    y: np.ndarray, scores: np.ndarray, counts_pos: np.ndarray, counts_neg: np.ndarray
) -> np.ndarray:
    """AUC of every resample, averaged over the score rows (one resample applies to every row).

    A resample drawing positive i ``a_i`` times and negative j ``b_j`` times has
    ``AUC = Σ_ij a_i b_j ψ(X_i, Y_j) / (m n)``: one matrix product per row instead of a loop.

    Args:
        y: labels ``(N,)``; scores: ``(k, N)`` or ``(N,)``; counts: from :func:`stratified_counts`.

    Returns:
        shape ``(B,)``.
    """
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = counts_pos.shape[1], counts_neg.shape[1]
    total = np.zeros(counts_pos.shape[0])
    for row in scores:
        pos, neg = row[y == 1], row[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (m, n)
        total += np.einsum("bn,bn->b", counts_pos @ psi, counts_neg) / (m * n)
    return total / scores.shape[0]


def bootstrap_auc_ci(
    y: np.ndarray, scores: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC (of the mean AUC over the rows of ``scores``), class-stratified;
    NaN for a single class or ``n_boot`` 0 (no CI wanted)."""
    y = np.asarray(y).astype(int)
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    cp, cn = stratified_counts(m, n, n_boot, seed)
    boots = resampled_aucs(y, scores, cp, cn)
    tail = (1 - level) / 2
    lo, hi = np.quantile(boots, [tail, 1 - tail])
    return float(lo), float(hi)


# ---------------------------------------------------------------- predictions on disk


@dataclass
class FoldRun:
    """One fold of one method as saved: its predictions and resolved configuration."""

    method: str
    fold: int
    predictions: pd.DataFrame
    config: dict[str, Any]


def collect_runs(out: Path, task: str) -> list[FoldRun]:
    """Every complete, readable fold folder of ``task`` under ``out``."""
    return [
        FoldRun(
            method, fold, read_table(fd / "predictions.csv"), yaml.safe_load((fd / "config.yaml").read_text())
        )
        for method, fold, fd in iter_fold_dirs(out, task)
        if all((fd / f).is_file() for f in FOLD_FILES) and fold_readable(fd)
    ]


# ---------------------------------------------------------------- one task's analysis


@dataclass
class TaskStats:
    """Everything the report needs about one task.

    Attributes:
        task: task name.
        reference: the method every other one is compared with.
        cohorts: ``test`` then the external cohorts' names.
        summary: one row per (method, cohort): mean, sd, folds (fold AUCs), auc (the CI's point: pooled AUC
            for ``test``, mean of fold AUCs for an external cohort), ci_lo, ci_hi, patients, positives.
        tests: one row per (method ≠ reference, cohort, test): test, diff (method − reference), statistic,
            p, folds.
        fold_auc: long table method, fold, cohort, auc.
        patients: patient-level predictions: method, fold, cohort, case_id, label, prob.
        aggregation: the slide-to-patient aggregation used.
        test_train_ratio: n_test / n_train of the corrected t-test, and where it came from.
        runs: the fold folders used; notes: the ones left out, and why.
    """

    task: str
    reference: str
    cohorts: list[str]
    summary: pd.DataFrame
    tests: pd.DataFrame
    fold_auc: pd.DataFrame
    patients: pd.DataFrame
    aggregation: str
    test_train_ratio: tuple[float, str]
    n_boot: int
    seed: int
    runs: list[FoldRun]
    notes: list[str]
    internal_patients: int | None = None


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """AUC as ``bench run`` computes it (sklearn), NaN with one class."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _patients(runs: list[FoldRun], aggregation: str) -> pd.DataFrame:
    frames = []
    for r in runs:
        for cohort, pred in r.predictions.groupby("cohort", sort=False):
            pat = patient_level(pred, aggregation)
            frames.append(pat.assign(method=r.method, fold=r.fold, cohort=cohort))
    cols = ["method", "fold", "cohort", "case_id", "label", "prob"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def _splits(out: Path, task: str, runs: list[FoldRun]) -> pd.DataFrame | None:
    """``splits.tsv`` of the task when it is the one every fold on disk was run on, else None."""
    path = Path(out) / task / "splits.tsv"
    if not path.is_file():
        return None
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    digests = {(r.fold, r.config.get("split")) for r in runs}
    if all(f"fold_{f}" in table.columns and membership_digest(table, f) == d for f, d in digests):
        return table
    return None


def _test_train_ratio(table: pd.DataFrame | None, runs: list[FoldRun]) -> tuple[float, str]:
    """Mean n_test / n_train over the folds, from the splits when they are known."""
    folds = sorted({r.fold for r in runs})
    if table is not None:
        ratios = []
        for f in folds:
            parts = table.groupby(f"fold_{f}").case_id.nunique()
            ratios.append(parts.get("test", 0) / max(1, parts.get("train", 0) + parts.get("val", 0)))
        return float(
            np.mean(ratios)
        ), "splits.tsv (patients in each fold's test vs training + validation parts)"
    k = max(int(r.config.get("folds", len(folds))) for r in runs)
    return 1.0 / (k - 1), f"1/(k − 1) with k = {k} (splits.tsv absent or from another run)"


def _reference(fold_auc: pd.DataFrame, wanted: str | None, task: str) -> str:
    internal = fold_auc[fold_auc.cohort == "test"].groupby("method").auc.mean()
    if wanted is None:
        if internal.dropna().empty:
            raise BenchError(
                f"task {task!r}: no internal test AUC on disk to choose a reference method from."
            )
        return str(internal.idxmax())
    if wanted not in internal.index:
        raise BenchError(
            f"--vs {wanted}: method {wanted!r} has no results for task {task!r} "
            f"(it has: {', '.join(internal.index)}). Run it first, or choose another reference."
        )
    return wanted


def analyse_task(
    out: Path,
    task: str,
    reference: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    methods: Collection[str] | None = None,
) -> TaskStats:
    """Summaries, bootstrap CIs and paired tests of every method of ``task`` found under ``out`` (or of
    ``methods`` only)."""
    runs = [r for r in collect_runs(out, task) if methods is None or r.method in methods]
    if not runs:
        raise BenchError(f"no fold results for task {task!r} under {out}. Run `bench run --task ...` first.")
    runs, notes = _one_design(runs)
    aggregations = {r.config.get("task", {}).get("patient_aggregation", "mean") for r in runs}
    if len(aggregations) > 1:
        raise BenchError(
            f"task {task!r}: fold results disagree on patient_aggregation ({sorted(aggregations)})."
        )
    aggregation = aggregations.pop()
    patients = _patients(runs, aggregation)
    fold_auc = pd.DataFrame(
        [
            (m, f, c, _auc(g.label.to_numpy(), g.prob.to_numpy()))
            for (m, f, c), g in patients.groupby(["method", "fold", "cohort"], sort=True)
        ],
        columns=["method", "fold", "cohort", "auc"],
    )
    cohorts = ["test", *sorted(set(patients.cohort) - {"test"})]
    ref = _reference(fold_auc, reference, task)
    splits = _splits(out, task, runs)
    ratio = _test_train_ratio(splits, runs)
    split_of = {(r.method, r.fold): r.config.get("split") for r in runs}

    rows = []
    for (method, cohort), pat in patients.groupby(["method", "cohort"], sort=True):
        aucs = fold_auc[(fold_auc.method == method) & (fold_auc.cohort == cohort)].auc.to_numpy()
        y, scores = _scores(pat, cohort)
        point = _auc(y, scores[0]) if cohort == "test" else float(np.nanmean(aucs))
        lo, hi = bootstrap_auc_ci(y, scores, n_boot, seed)
        rows.append(
            {
                "method": method,
                "cohort": cohort,
                "mean": float(np.nanmean(aucs)),
                "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan"),
                "folds": len(aucs),
                "auc": point,
                "ci_lo": lo,
                "ci_hi": hi,
                "patients": len(y),
                "positives": int(np.sum(y)),
            }
        )
    summary = pd.DataFrame(rows)

    tests = []
    for method in sorted(set(patients.method) - {ref}):
        folds = sorted(
            f
            for f in set(patients.fold[patients.method == method])
            & set(patients.fold[patients.method == ref])
            if split_of.get((method, f)) == split_of.get((ref, f))
        )
        if not folds:
            continue
        for cohort in cohorts:
            pair = patients[
                patients.method.isin([method, ref]) & patients.fold.isin(folds) & (patients.cohort == cohort)
            ]
            if pair.empty:
                continue
            if cohort == "test":
                fa = fold_auc[(fold_auc.cohort == "test") & fold_auc.fold.isin(folds)].pivot(
                    index="fold", columns="method", values="auc"
                )
                diffs = (fa[method] - fa[ref]).dropna().to_numpy()
                t = corrected_resampled_ttest(diffs, ratio[0])
                tests.append(_test_row(method, cohort, "corrected t", t, len(diffs)))
            y, scores = _paired_scores(pair, cohort, method, ref, folds)
            if y is None:
                continue
            kk = scores.shape[0] // 2
            contrast = np.r_[np.full(kk, 1.0 / kk), np.full(kk, -1.0 / kk)]
            tests.append(
                _test_row(method, cohort, "DeLong", delong_contrast(y, scores, contrast), len(folds))
            )
    test_cols = ["method", "cohort", "test", "diff", "statistic", "p", "folds"]
    return TaskStats(
        task=task,
        reference=ref,
        cohorts=cohorts,
        summary=summary,
        tests=pd.DataFrame(tests, columns=test_cols),
        fold_auc=fold_auc,
        patients=patients,
        aggregation=aggregation,
        test_train_ratio=ratio,
        n_boot=n_boot,
        seed=seed,
        runs=runs,
        notes=notes,
        internal_patients=None if splits is None else splits.case_id.nunique(),
    )


def _one_design(runs: list[FoldRun]) -> tuple[list[FoldRun], list[str]]:
    """Keep the folds of the most common (number of folds, seed) design; say what was left out and why.

    Folds of another design (an earlier ``--folds 2`` run left ``fold_2`` … of a 5-fold run, say) come from
    other splits: pooling them would count patients twice and pair folds that do not match.
    """
    designs = [fold_design(r.config) for r in runs]
    keep = choose_design(designs)
    kept = [r for r, d in zip(runs, designs, strict=True) if d == keep]
    notes = [
        f"ignored {r.method}/fold_{r.fold}: from a {r.config.get('folds')}-fold run with seed "
        f"{r.config.get('seed')}, not the {keep[0]}-fold, seed {keep[1]} design of the other folds"
        for r, d in zip(runs, designs, strict=True)
        if d != keep
    ]
    return kept, notes


def _test_row(method: str, cohort: str, name: str, t: PairedTest, folds: int) -> dict[str, Any]:
    return {
        "method": method,
        "cohort": cohort,
        "test": name,
        "diff": t.estimate,
        "statistic": t.statistic,
        "p": t.p_value,
        "folds": folds,
    }


def _scores(pat: pd.DataFrame, cohort: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(N,)`` and score rows: one pooled row for ``test``; one row per fold for an external cohort."""
    if cohort == "test":
        pooled = pat.sort_values("case_id")
        if pooled.case_id.duplicated().any():
            raise BenchError(
                f"patient(s) {pooled.case_id[pooled.case_id.duplicated()].unique()[:3].tolist()} are in the test "
                "part of several folds of one method; the folds on disk do not come from one split."
            )
        return pooled.label.to_numpy(), pooled.prob.to_numpy()[None, :]
    wide = pat.pivot(index="case_id", columns="fold", values="prob").dropna()
    labels = pat.drop_duplicates("case_id").set_index("case_id").label.loc[wide.index]
    return labels.to_numpy(), wide.to_numpy().T


def _paired_scores(
    pair: pd.DataFrame, cohort: str, method: str, ref: str, folds: list[int]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Labels and the score rows of ``method`` then ``ref`` on their common patients (pooled, or per fold)."""
    if cohort == "test":
        wide = pair.pivot(index="case_id", columns="method", values="prob").dropna()
        cols = [method, ref]
    else:
        wide = pair.pivot(index="case_id", columns=["method", "fold"], values="prob").dropna()
        cols = [(method, f) for f in folds] + [(ref, f) for f in folds]
    labels = pair.drop_duplicates("case_id").set_index("case_id").label.loc[wide.index].to_numpy()
    if min(labels.sum(), (1 - labels).sum()) < 2:
        return None, np.zeros((0, 0))
    return labels, wide[cols].to_numpy().T

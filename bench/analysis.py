"""One task's results analysed (nothing is retrained): fold AUCs, patient-level bootstrap CIs and paired tests
against a reference method, from the predictions each fold saved (bench/stats.py has the statistics and
says how each CI and test is formed).

Every quantity is patient-level: slides are first aggregated to patients with the task's aggregation
(``patient_aggregation``: mean or max of the slide probabilities), then patients are resampled or ranked.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data.splits import membership_digest
from .errors import BenchError
from .evaluate import auc, patient_level
from .stats import PairedTest, bootstrap_auc_ci, corrected_resampled_ttest, delong_contrast
from .store import FoldRun, TaskResults, load_results, read_saved_splits

__all__ = ["TaskStats", "analyse", "analyse_task", "backbone_tests"]


@dataclass
class TaskStats:
    """Everything the report needs about one task.

    Attributes:
        task: the task's name in tables (its name, and its feature set on a task with several).
        name, features, stem: the task's name, the feature set (None: the task's only one), and both as
            file names use them.
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
    name: str = ""
    features: str | None = None
    stem: str = ""  # the results in file names (:attr:`bench.store.TaskResults.stem`)


def analyse(
    results: TaskResults, reference: str | None = None, n_boot: int = 2000, seed: int = 0
) -> TaskStats:
    """Summaries, bootstrap CIs and paired tests of every method of a task's results."""
    task, runs = results.label, results.runs
    if not runs:
        raise BenchError(
            f"no fold results for task {task!r} under {results.out}. Run `bench run --task ...` first."
        )
    aggregations = {r.config.get("task", {}).get("patient_aggregation", "mean") for r in runs}
    if len(aggregations) > 1:
        raise BenchError(
            f"task {task!r}: fold results disagree on patient_aggregation ({sorted(aggregations)})."
        )
    aggregation = aggregations.pop()
    patients = _patients(runs, aggregation)
    fold_auc = pd.DataFrame(
        [
            (m, f, c, auc(g.label.to_numpy(), g.prob.to_numpy()))
            for (m, f, c), g in patients.groupby(["method", "fold", "cohort"], sort=True)
        ],
        columns=["method", "fold", "cohort", "auc"],
    )
    cohorts = ["test", *sorted(set(patients.cohort) - {"test"})]
    ref = _reference(fold_auc, reference, task)
    splits = _splits(results)
    ratio = _test_train_ratio(splits, runs)
    split_of = {(r.method, r.unit): r.config.get("split") for r in runs}
    return TaskStats(
        task=task,
        reference=ref,
        cohorts=cohorts,
        summary=_summary(patients, fold_auc, n_boot, seed),
        tests=_paired_tests(patients, fold_auc, cohorts, ref, split_of, ratio[0]),
        fold_auc=fold_auc,
        patients=patients,
        aggregation=aggregation,
        test_train_ratio=ratio,
        n_boot=n_boot,
        seed=seed,
        runs=runs,
        notes=results.notes,
        internal_patients=None if splits is None else splits[0].case_id.nunique(),
        name=results.task,
        features=results.features,
        stem=results.stem,
    )


def analyse_task(
    out: Path,
    task: str,
    reference: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    methods: Collection[str] | None = None,
) -> TaskStats:
    """:func:`analyse` of the results of ``task`` under ``out`` (of ``methods`` only)."""
    return analyse(load_results(out, task).only(methods), reference, n_boot, seed)


def _summary(patients: pd.DataFrame, fold_auc: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per (method, cohort): fold AUCs' mean and SD, the CI's point and bootstrap CI, patients."""
    rows = []
    for (method, cohort), pat in patients.groupby(["method", "cohort"], sort=True):
        aucs = fold_auc[(fold_auc.method == method) & (fold_auc.cohort == cohort)].auc.to_numpy()
        y, scores = _scores(pat, cohort)
        # internal: the pooled out-of-fold AUC (its mean over repeats); external: the mean fold AUC
        point = (
            float(np.mean([auc(y, row) for row in scores])) if cohort == "test" else float(np.nanmean(aucs))
        )
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
    return pd.DataFrame(rows)


def _paired_tests(
    patients: pd.DataFrame,
    fold_auc: pd.DataFrame,
    cohorts: Sequence[str],
    ref: str,
    split_of: dict[tuple[str, int], Any],
    ratio: float,
) -> pd.DataFrame:
    """Each method against ``ref`` on the folds both ran on the same split: the corrected t-test (internal)
    and DeLong's test (every cohort)."""
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
                t = corrected_resampled_ttest(diffs, ratio)
                tests.append(_test_row(method, cohort, "corrected t", t, len(diffs)))
            y, scores = _paired_scores(pair, cohort, method, ref, folds)
            if y is None:
                continue
            kk = scores.shape[0] // 2
            contrast = np.r_[np.full(kk, 1.0 / kk), np.full(kk, -1.0 / kk)]
            tests.append(
                _test_row(method, cohort, "DeLong", delong_contrast(y, scores, contrast), len(folds))
            )
    return pd.DataFrame(tests, columns=["method", "cohort", "test", "diff", "statistic", "p", "folds"])


def backbone_tests(views: Sequence[TaskStats]) -> pd.DataFrame:
    """Each method's feature sets of one task against its first (``views[0]``, one :class:`TaskStats` per
    feature set): the paired tests of method comparisons (corrected t internally, DeLong on every cohort),
    paired because every feature set runs on the same splits. Rows: method, features, cohort, test, diff
    (set − first), statistic, p, folds."""
    ref = views[0]
    frames = []
    for method in sorted({m for st in views for m in st.summary.method}):
        patients, fold_auc = [
            pd.concat(
                [df[df.method == method].assign(method=st.features) for st, df in pairs], ignore_index=True
            )
            for pairs in ([(st, st.patients) for st in views], [(st, st.fold_auc) for st in views])
        ]
        split_of = {
            (st.features, r.fold): r.config.get("split")
            for st in views
            for r in st.runs
            if r.method == method
        }
        tests = _paired_tests(
            patients, fold_auc, ref.cohorts, ref.features, split_of, ref.test_train_ratio[0]
        )
        frames.append(tests.rename(columns={"method": "features"}).assign(method=method))
    columns = ["method", "features", "cohort", "test", "diff", "statistic", "p", "folds"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _patients(runs: Sequence[FoldRun], aggregation: str) -> pd.DataFrame:
    frames = []
    for r in runs:
        for cohort, pred in r.predictions.groupby("cohort", sort=False):
            pat = patient_level(pred, aggregation)
            frames.append(pat.assign(method=r.method, fold=r.unit, repeat=r.repeat, cohort=cohort))
    cols = ["method", "fold", "repeat", "cohort", "case_id", "label", "prob"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def _splits(results: TaskResults) -> dict[int, pd.DataFrame] | None:
    """Each repeat's saved splits (``splits.tsv``, ``splits_repeat_<r>.tsv``) when they are the ones every
    fold on disk was run on, else None."""
    tables = {r: read_saved_splits(results.out, results.task, r) for r in results.repeats}
    if any(t is None for t in tables.values()):
        return None
    for run in results.runs:
        table = tables[run.repeat]
        if f"fold_{run.fold}" not in table.columns or membership_digest(table, run.fold) != run.config.get(
            "split"
        ):
            return None
    return tables


def _test_train_ratio(tables: dict[int, pd.DataFrame] | None, runs: Sequence[FoldRun]) -> tuple[float, str]:
    """Mean n_test / n_train over the folds (of every repeat), from the splits when they are known."""
    units = sorted({(r.repeat, r.fold) for r in runs})
    if tables is not None:
        ratios = []
        for repeat, f in units:
            parts = tables[repeat].groupby(f"fold_{f}").case_id.nunique()
            ratios.append(parts.get("test", 0) / max(1, parts.get("train", 0) + parts.get("val", 0)))
        return float(
            np.mean(ratios)
        ), "splits.tsv (patients in each fold's test vs training + validation parts)"
    k = max(int(r.config.get("folds", len(units))) for r in runs)
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
    """Labels ``(N,)`` and score rows: for ``test``, one pooled row of out-of-fold predictions per repeat of
    the design; one row per fold (of every repeat) for an external cohort."""
    if cohort == "test":
        twice = pat.duplicated(["repeat", "case_id"])
        if twice.any():
            raise BenchError(
                f"patient(s) {pat.case_id[twice].unique()[:3].tolist()} are in the test part of several folds "
                "of one method and repeat; the folds on disk do not come from one split."
            )
        wide = pat.pivot(index="case_id", columns="repeat", values="prob").dropna()
    else:
        wide = pat.pivot(index="case_id", columns="fold", values="prob").dropna()
    labels = pat.drop_duplicates("case_id").set_index("case_id").label.loc[wide.index]
    return labels.to_numpy(), wide.to_numpy().T


def _paired_scores(
    pair: pd.DataFrame, cohort: str, method: str, ref: str, folds: list[int]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Labels and the score rows of ``method`` then ``ref`` on their common patients (pooled per repeat, or
    per fold)."""
    if cohort == "test":
        wide = pair.pivot(index="case_id", columns=["method", "repeat"], values="prob").dropna()
        repeats = sorted(set(pair.repeat))
        cols = [(method, r) for r in repeats] + [(ref, r) for r in repeats]
    else:
        wide = pair.pivot(index="case_id", columns=["method", "fold"], values="prob").dropna()
        cols = [(method, f) for f in folds] + [(ref, f) for f in folds]
    labels = pair.drop_duplicates("case_id").set_index("case_id").label.loc[wide.index].to_numpy()
    if min(labels.sum(), (1 - labels).sum()) < 2:
        return None, np.zeros((0, 0))
    return labels, wide[cols].to_numpy().T

"""How much of what perfect genomics could teach each distillation method learns (synthetic tasks): the share
of the AUC gap between the privileged-information student's label-only twin and the student itself that the
method closes, per cohort, with a paired bootstrap CI (:func:`bench.stats.gap_share`).

The student (a method whose ``DataNeeds.privileged`` gives it the true latent programs as an auxiliary target;
``MILMethod.label_only_twin`` names the method it extends) and the twin are found through the method
interface; the distillation methods are the task's methods whose configuration reads omics.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from methods import get_method_class

from .analysis import TaskStats
from .stats import gap_share, resampled_aucs

__all__ = ["GAP_COLUMNS", "gap_shares", "privileged_pairs"]

GAP_COLUMNS = [
    "method",
    "baseline",
    "student",
    "cohort",
    "baseline_auc",
    "method_auc",
    "student_auc",
    "share",
    "ci_lo",
    "ci_hi",
    "patients",
]


def privileged_pairs(st: TaskStats) -> list[tuple[str, str]]:
    """``(label-only twin, privileged student)`` of every student on disk whose twin is on disk too."""
    on_disk = {r.method for r in st.runs}
    students = {r.method for r in st.runs if r.kind == "ceiling" and "method_config" in r.config}
    pairs = [(get_method_class(s).label_only_twin, s) for s in sorted(students)]
    return [(twin, s) for twin, s in pairs if twin in on_disk]


def _distilling(st: TaskStats) -> list[str]:
    return sorted(
        {
            r.method
            for r in st.runs
            if r.kind == "method" and r.config.get("method_config", {}).get("uses_omics")
        }
    )


def _rows(st: TaskStats, cohort: str, names: list[str]) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Labels and, per name, its score rows on the patients (and, externally, the folds) all names share:
    one pooled row internally, one row per fold externally."""
    pat = st.patients[(st.patients.cohort == cohort) & st.patients.method.isin(names)]
    if cohort == "test":
        wide = pat.pivot_table(index="case_id", columns="method", values="prob").dropna()
        if not set(names) <= set(wide.columns):
            return None
        rows = [wide[n].to_numpy()[None, :] for n in names]
    else:
        wide = pat.pivot_table(index="case_id", columns=["method", "fold"], values="prob")
        folds = sorted(set.intersection(*(set(pat.fold[pat.method == n]) for n in names)))
        if not folds:
            return None
        wide = wide[[(n, f) for n in names for f in folds]].dropna()
        rows = [wide[n].to_numpy().T for n in names]
    labels = pat.drop_duplicates("case_id").set_index("case_id").label.loc[wide.index].to_numpy()
    return labels, rows


def gap_shares(st: TaskStats) -> pd.DataFrame:
    """One row per (distillation method, student, cohort): the three AUCs (the twin's, the method's, the
    student's; pooled internally, mean over folds externally, on the patients all three have), the share of
    the gap closed and its 95 % CI (``st.n_boot`` resamples, ``st.seed``). Empty without a student."""
    rows = []
    for twin, student in privileged_pairs(st):
        for method in _distilling(st):
            for cohort in st.cohorts:
                scored = _rows(st, cohort, [twin, method, student])
                if scored is None:
                    continue
                y, (base, kd, top) = scored
                share, lo, hi = gap_share(y, base, kd, top, st.n_boot, st.seed)
                rows.append([method, twin, student, cohort, *_aucs(y, base, kd, top), share, lo, hi, len(y)])
    return pd.DataFrame(rows, columns=GAP_COLUMNS)


def _aucs(y: np.ndarray, *scores: np.ndarray) -> list[float]:
    """The (mean) AUC of each score-row array, as :func:`bench.stats.gap_share` computes them."""
    y = np.asarray(y).astype(int)
    once = np.ones((1, int(y.sum()))), np.ones((1, int((1 - y).sum())))
    return [float(resampled_aucs(y, s, *once)[0]) for s in scores]

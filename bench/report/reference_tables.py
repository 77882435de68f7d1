"""Tables of the report's reference rows (bench/baselines.py, the privileged-information student): the floor
and ceilings beside the methods, and the share of the privileged gap each distillation method closes."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from methods import get_method_class

from ..analysis import TaskStats
from ..ceilings import gap_shares
from ..tables import Table, cohort_label, fmt_ci

__all__ = ["GROUND_TRUTH", "KIND_ORDER", "gap_table", "references_table", "row_order"]

#: methods first, then floors, then ceilings
KIND_ORDER = {"method": 0, "floor": 1, "ceiling": 2}

GROUND_TRUTH = (
    "The ceilings use ground truth that no real cohort has (the generator's latent programs, its label rule "
    "and which patches carry the signal): they say how much signal the synthetic cohort holds, not what a model "
    "could reach on patients."
)


def row_order(analyses: Sequence[TaskStats]) -> list[str]:
    """Every row of the tasks: methods (sorted), then floors, then ceilings."""
    kinds = {m: k for st in analyses for m, k in st.kinds.items()}
    return sorted(kinds, key=lambda m: (KIND_ORDER.get(kinds[m], 0), m))


def _what(st: TaskStats, name: str) -> str:
    run = next(r for r in st.runs if r.method == name)
    if "method_config" in run.config:  # a registered model (the privileged student, a twin)
        return get_method_class(name).summary
    return str(run.config.get("what", ""))


def references_table(st: TaskStats) -> Table | None:
    """The task's floor and ceiling rows, with the privileged student's label-only twin for orientation:
    AUC (%; macro AUC, a survival task's Harrell's c-index) mean ± SD over folds [95 % CI] on every cohort;
    None when the task has none."""
    refs = [m for m in row_order([st]) if st.kinds.get(m) != "method"]
    if not refs:
        return None
    twins = sorted({get_method_class(m).label_only_twin for m in refs if "method_config" in _config(st, m)})
    rows_names = [m for m in twins if m in st.kinds] + refs
    s = st.summary.set_index(["method", "cohort"])
    word = {"multiclass": "macro AUC", "survival": "c-index"}.get(st.kind, "AUC")
    header = ["Row", "Kind", "What"] + [f"{cohort_label(c)} {word}" for c in st.cohorts]
    rows = []
    for m in rows_names:
        cells = []
        for c in st.cohorts:
            if (m, c) in s.index:
                r = s.loc[(m, c)]
                cells.append(fmt_ci(r["mean"], r["sd"], r["ci_lo"], r["ci_hi"]))
            else:
                cells.append("–")
        rows.append([m, st.kinds.get(m, "method"), _what(st, m), *cells])
    caption = (
        f"{st.task.upper()}: reference rows beside the methods, evaluated on the same folds and cohorts ({word} %, "
        "mean ± SD over folds [95 % bootstrap CI], as the headline table). Floor: a linear probe on each slide's "
        "mean patch feature (a survival task's: a linear Cox model), its C chosen by an inner CV on each fold's "
        "training patients (Patho-Bench's baseline); a method below it has not learnt more than the mean feature "
        "holds. " + (GROUND_TRUTH if any(st.kinds[m] == "ceiling" for m in refs) else "")
    )
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, f"tab:references-{st.task}")


def _config(st: TaskStats, name: str) -> dict:
    return next(r.config for r in st.runs if r.method == name)


def gap_table(st: TaskStats) -> Table | None:
    """Each distillation method's share (%) of the AUC gap between label-only training and the privileged
    student, per cohort, with its 95 % bootstrap CI; None without a privileged student and its twin."""
    gaps = gap_shares(st)
    if gaps.empty:
        return None
    header = [
        "Method",
        "Cohort",
        "Label-only AUC",
        "Method AUC",
        "Privileged AUC",
        "Gap closed (%) [95 % CI]",
    ]
    rows = [
        [
            g.method,
            cohort_label(g.cohort),
            f"{g.baseline_auc * 100:.1f}",
            f"{g.method_auc * 100:.1f}",
            f"{g.student_auc * 100:.1f}",
            _share(g),
        ]
        for g in gaps.itertuples(index=False)
    ]
    pairs = "; ".join(sorted({f"{g.baseline} → {g.student}" for g in gaps.itertuples(index=False)}))
    caption = (
        f"{st.task.upper()}: the share of the gap between label-only training and the privileged-information "
        f"student ({pairs}: the same model trained with the true latent programs as an auxiliary target, the most "
        "distillation from perfect genomics could add) that each distillation method closes: (AUC_method − "
        "AUC_label-only) / (AUC_privileged − AUC_label-only), on the patients all three have (pooled out-of-fold "
        "internally, mean of the fold AUCs externally); 0 % is no gain, 100 % the whole gap, negative a loss. "
        f"CI: {st.n_boot} class-stratified bootstrap resamples of patients applied to all three (seed {st.seed}); "
        f"with a small gap it is wide. {GROUND_TRUTH}"
    )
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, f"tab:gap-{st.task}")


def _share(g: pd.Series) -> str:
    if pd.isna(g.share):
        return "– (no gap)"
    ci = "" if pd.isna(g.ci_lo) else f" [{g.ci_lo * 100:.0f}, {g.ci_hi * 100:.0f}]"
    return f"{g.share * 100:.0f}{ci}"

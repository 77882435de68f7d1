"""Tables of the fold metrics each job wrote (``metrics.json``), all from one loaded result set per task:

- Table 1 (``table1``): methods × tasks, internal test AUC (%) mean ± SD over folds, best per task in bold.
- Table 2 (``table2``): methods × external cohorts, AUC / ACC / F1 (%) mean ± SD over the folds' models;
  ACC and F1 at the threshold of best F1 on the validation patients.
- Operating points (``operating_points_table``): per task, ACC / BACC / F1 at that threshold and at the argmax
  (probability > 0.5), with the threshold's spread over folds.
- Calibration (``calibration_table``): per task, Brier score and ECE (equal-mass bins) of each fold's patients.
- Variant tables (``variant_table``): a method's ablation or memory-mode variants, internal and external AUC.
- The terminal table of ``bench run`` (``summary_rich_table``), from ``summary.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from rich.markup import escape
from rich.table import Table as RichTable

from ..analysis import analyse
from ..evaluate import ARGMAX
from ..stats import corrected_resampled_ttest
from ..store import TaskResults
from ..tables import Table, bold_best, cohort_label, fmt, method_order
from . import prose
from .stats_tables import ALPHA, MARK_T, marks, marks_caption

__all__ = [
    "CALIBRATION_NAMES",
    "METRIC_NAMES",
    "SURVIVAL_NAMES",
    "calibration_table",
    "operating_points_table",
    "summary_rich_table",
    "table1",
    "table2",
    "variant_table",
]


METRIC_NAMES = {
    "auc": "AUC",
    "acc": "ACC",
    "balanced_acc": "BACC",
    "f1": "F1",
    "acc@0.5": "ACC@0.5",
    "balanced_acc@0.5": "BACC@0.5",
    "f1@0.5": "F1@0.5",
}

CALIBRATION_NAMES = {"brier": "Brier", "ece": "ECE"}

#: a survival task's columns (bench.evaluate.survival_metrics)
SURVIVAL_NAMES = {
    "c_index": "C (Harrell)",
    "c_index_uno": "C (Uno)",
    "auc_q1": "AUC(q1)",
    "auc_q2": "AUC(q2)",
    "auc_q3": "AUC(q3)",
    "ibs": "IBS",
}


def _stats(long: pd.DataFrame) -> pd.DataFrame:
    return long.groupby(["method", "cohort", "metric"])["value"].agg(["mean", "std", "count"])


def summary_rich_table(summary: pd.DataFrame, title: str) -> RichTable:
    """Rows method × cohort, columns AUC, then ACC/BACC/F1 at the validation-chosen threshold and at the
    argmax, mean ± SD (the terminal table of ``bench run``); ``method · features`` on several feature sets; a
    multiclass task's (no ``@0.5`` metrics): macro AUC, ACC, BACC, macro F1 at the argmax; a survival task's
    c-indices, time-dependent AUCs and IBS."""
    if "repeat" in summary:  # with repeats: the rows over every repeat's folds
        summary = summary[summary.repeat == "all"]
    if "features" in summary:
        summary = summary.assign(method=summary.method + " · " + summary.features)
    metrics = set(summary.metric)
    binary, survival = "acc@0.5" in metrics, "c_index" in metrics
    shown = {m: n for m, n in METRIC_NAMES.items() if binary or ARGMAX not in m}
    caption = prose.OPERATING_POINTS if binary else prose.MULTICLASS_METRICS
    if survival:
        shown, caption = SURVIVAL_NAMES, prose.SURVIVAL_METRICS
    table = RichTable(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("method", no_wrap=True)
    table.add_column("cohort", no_wrap=True)
    for name in shown.values():
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("folds", justify="right")
    s = summary.set_index(["method", "cohort", "metric"])
    for method in dict.fromkeys(summary.method):
        cohorts = sorted(set(summary.cohort[summary.method == method]), key=lambda c: (c != "test", c))
        for cohort in cohorts:
            cells = [
                fmt(s.loc[(method, cohort, m), "mean"], s.loc[(method, cohort, m), "std"])
                if (method, cohort, m) in s.index
                else "–"
                for m in shown
            ]
            key = (method, cohort, next(iter(shown)))
            n = int(s.loc[key, "n"]) if key in s.index else 0
            table.add_row(  # escaped: a variant's brackets are not rich markup
                escape(method),
                "internal (test)" if cohort == "test" else f"external: {escape(cohort)}",
                *cells,
                str(n),
            )
    return table


def table1(results: Mapping[str, TaskResults], methods: Sequence[str] | None = None) -> Table:
    """Methods × tasks, internal AUC (%) mean ± SD over folds; the best per task in bold."""
    tasks = list(results)
    stats = {t: _stats(r.metrics()) for t, r in results.items()}
    all_methods = sorted({m for s in stats.values() for m in s.index.get_level_values("method")})
    rows_methods = method_order(all_methods, methods)
    key = {t: _headline(stats[t]) for t in tasks}
    means = {
        t: _methods_only(
            results[t], rows_methods, [_get(stats[t], m, "test", key[t])[0] for m in rows_methods]
        )
        for t in tasks
    }
    bold_cols = {t: bold_best(means[t]) for t in tasks}
    rows, bold = [], []
    for i, m in enumerate(rows_methods):
        rows.append([m] + [fmt(*_get(stats[t], m, "test", key[t])) for t in tasks])
        bold.append([False] + [bold_cols[t][i] for t in tasks])
    survival = [t.upper() for t in tasks if key[t] == "c_index"]
    caption = (
        "Internal patient-level stratified cross-validation: test AUC (%; threshold-free), mean ± SD over "
        "folds; best per task in bold (among the methods; floor-* and ceiling-* rows are references)."
        + (f" Survival tasks ({', '.join(survival)}): Harrell's c-index (%)." if survival else "")
    )
    return Table(["Method"] + [t.upper() for t in tasks], rows, bold, caption, "tab:internal")


def table2(results: Mapping[str, TaskResults], methods: Sequence[str] | None = None) -> Table:
    """Methods × (task, external cohort) × (AUC, ACC, F1) in %, mean ± SD over the folds' models."""
    tasks = list(results)
    stats = {t: _stats(r.metrics()) for t, r in results.items()}
    columns = [
        (t, c)
        for t in tasks
        for c in sorted(set(stats[t].index.get_level_values("cohort")) - {"test", "val"})
    ]
    all_methods = sorted({m for s in stats.values() for m in s.index.get_level_values("method")})
    rows_methods = method_order(all_methods, methods)
    shown = {t: _external_metrics(stats[t]) for t in tasks}
    names = {**METRIC_NAMES, **SURVIVAL_NAMES}
    header = ["Method"] + [f"{t.upper()} {c} {names[k]}" for t, c in columns for k in shown[t]]
    rows, bold = [[m] for m in rows_methods], [[False] for _ in rows_methods]
    for t, c in columns:
        for k in shown[t]:
            values = [_get(stats[t], m, c, k) for m in rows_methods]
            flags = bold_best(  # IBS: lower is better
                _methods_only(results[t], rows_methods, [-v[0] if k == "ibs" else v[0] for v in values])
            )
            for i, v in enumerate(values):
                rows[i].append(fmt(*v))
                bold[i].append(flags[i])
    caption = (
        "External validation: each fold's model tested on the external cohort; % mean ± SD over folds. ACC and "
        "F1 at the threshold of best F1 on each fold's validation patients (at the argmax: the operating-points "
        "tables)."
        + (
            " Survival tasks: Harrell's and Uno's c-index and the integrated Brier score (lower is better, the "
            "lowest in bold)."
            if any("ibs" in v for v in shown.values())
            else ""
        )
    )
    return Table(header, rows, bold, caption, "tab:external")


def _headline(stats: pd.DataFrame) -> str:
    """The metric Table 1 shows of a task: ``c_index`` for a survival task, else ``auc``."""
    return "c_index" if "c_index" in set(stats.index.get_level_values("metric")) else "auc"


def _external_metrics(stats: pd.DataFrame) -> tuple[str, ...]:
    """The metrics Table 2 shows of a task: AUC, ACC, F1; a survival task's C (Harrell, Uno) and IBS."""
    return ("c_index", "c_index_uno", "ibs") if _headline(stats) == "c_index" else ("auc", "acc", "f1")


def operating_points_table(results: TaskResults, methods: Sequence[str] | None = None) -> Table:
    """Rows method × cohort: the validation-chosen threshold, then ACC / BACC / F1 (%) at it and at the
    argmax, mean ± SD over folds. The authors' ``test.py`` reports both operating points."""
    task = results.label
    long = results.metrics(names=(*METRIC_NAMES, "threshold"))
    stats = _stats(long)
    rows_methods = method_order(sorted(set(long.method)), methods)
    cohorts = sorted(set(long.cohort), key=lambda c: (c != "test", c))
    metrics = [k for k in METRIC_NAMES if k != "auc"]
    header = ["Method", "Cohort", "Threshold (val.)"] + [METRIC_NAMES[k] for k in metrics]
    rows = []
    for m in rows_methods:
        for c in cohorts:
            if (m, c, "threshold") not in stats.index:
                continue
            thr, thr_sd = _get(stats, m, c, "threshold")
            rows.append(
                [m, cohort_label(c), fmt(thr, thr_sd, scale=1.0, digits=2)]
                + [fmt(*_get(stats, m, c, k)) for k in metrics]
            )
    caption = (
        f"{task.upper()}: threshold-dependent metrics (%) at two operating points, mean ± SD over folds. "
        f"{prose.OPERATING_POINTS} Threshold (val.): that threshold (a probability), mean ± SD over folds; a "
        "large SD means the validation split is too small to place it reliably. The @0.5 columns do not depend "
        "on it, but on calibration instead (with imbalanced classes the argmax may call most patients "
        "negative). F1 is the positive class's. Table 2 and the terminal table of `bench run` show the "
        "validation-threshold ones as ACC and F1."
    )
    return Table(
        header, rows, [[False] * len(header) for _ in rows], caption, f"tab:operating-points-{results.stem}"
    )


def calibration_table(results: TaskResults, methods: Sequence[str] | None = None) -> Table | None:
    """Rows method × cohort: Brier score and ECE of each fold's patients, mean ± SD over folds, and the number
    of ECE bins; None when no fold on disk has them (folds written before they existed)."""
    task = results.label
    long = results.metrics(names=(*CALIBRATION_NAMES, "ece_bins"))
    if long.empty:
        return None
    stats = _stats(long)
    bins = long[long.metric == "ece_bins"].groupby(["method", "cohort"])["value"].agg(["min", "max"])
    cohorts = sorted(set(long.cohort), key=lambda c: (c != "test", c))
    header = ["Method", "Cohort", *CALIBRATION_NAMES.values(), "ECE bins"]
    rows = []
    for m in method_order(sorted(set(long.method)), methods):
        for c in cohorts:
            if (m, c, "brier") not in stats.index:
                continue
            lo, hi = (int(v) for v in bins.loc[(m, c)]) if (m, c) in bins.index else (0, 0)
            rows.append(
                [m, cohort_label(c)]
                + [fmt(*_get(stats, m, c, k), scale=1.0, digits=3) for k in CALIBRATION_NAMES]
                + [str(lo) if lo == hi else f"{lo}–{hi}"]
            )
    caption = f"{task.upper()}: {prose.CALIBRATION}"
    return Table(
        header, rows, [[False] * len(header) for _ in rows], caption, f"tab:calibration-{results.stem}"
    )


def variant_table(
    results: TaskResults,
    variants: Sequence[tuple[str, str]],
    caption: str,
    label: str,
    reference: str | None = None,
) -> Table:
    """Rows = (display name, method name on disk); columns internal AUC, AUC on each external cohort and the
    internal→external drop (points of AUC) on each; a survival task's Harrell's c-index in place of the AUC.

    The drop is each fold model's internal test AUC minus its AUC on the cohort, mean ± SD over folds. With
    ``reference`` (a method name among the variants, e.g. the full model), each other row is marked where the
    paired tests of the report (on the folds both have) reject equality with it at p < 0.05, and its drop
    where the corrected resampled t-test of the per-fold drop differences does.
    """
    long = results.metrics()
    stats = _stats(long)
    externals = sorted(set(stats.index.get_level_values("cohort")) - {"test", "val"}) if len(stats) else []
    cohorts = ["test", *externals]
    metric = _headline(stats) if len(stats) else "auc"
    word = "c-index" if metric == "c_index" else "AUC"
    header = (
        ["Configuration", f"Internal {word}"]
        + [f"External ({c}) {word}" for c in externals]
        + [f"Drop int→ext ({c})" for c in externals]
    )
    cols = {c: [_get(stats, m, c, metric) for _, m in variants] for c in cohorts}
    drops = {c: [_fold_drops(long, m, c, metric) for _, m in variants] for c in externals}
    flags = {c: bold_best([v[0] for v in cols[c]]) for c in cohorts}
    rows = [
        [name] + [fmt(*cols[c][i]) for c in cohorts] + [_fmt_drop(drops[c][i]) for c in externals]
        for i, (name, _) in enumerate(variants)
    ]
    if externals:
        caption += (
            f" Drop int→ext: each fold model's internal test {word} minus its {word} on the external cohort, "
            f"points of {word}, mean ± SD over folds."
        )
    if reference is not None and len(stats) and (reference, "test", metric) in stats.index:
        on_disk = {m for _, m in variants if (m, "test", metric) in stats.index}
        st = analyse(results.only(on_disk), reference, n_boot=0)
        ref_i = next(i for i, (_, m) in enumerate(variants) if m == reference)
        for i, (_, m) in enumerate(variants):
            for j, c in enumerate(cohorts, 1):
                if rows[i][j] != "–":
                    rows[i][j] += marks(st, m, c)
            for j, c in enumerate(externals, 1 + len(cohorts)):
                if rows[i][j] == "–" or i == ref_i:
                    continue
                paired = pd.concat([drops[c][i], drops[c][ref_i]], axis=1, join="inner")
                p = corrected_resampled_ttest(
                    paired.iloc[:, 0] - paired.iloc[:, 1], st.test_train_ratio[0]
                ).p_value
                rows[i][j] += MARK_T if p < ALPHA else ""
        caption += " " + marks_caption("the row marked (ref), on the folds both have")
        if externals:
            caption += (
                f" On a drop, {MARK_T}: p < 0.05 in the corrected resampled t-test of the per-fold drop "
                "differences against the (ref) row."
            )
    bold = [[False] + [flags[c][i] for c in cohorts] + [False] * len(externals) for i in range(len(variants))]
    return Table(header, rows, bold, caption, label)


def _fold_drops(long: pd.DataFrame, method: str, cohort: str, metric: str = "auc") -> pd.Series:
    """Per fold of ``method``: internal test ``metric`` (the task's headline: AUC, or a survival task's
    c-index) minus the same fold model's on ``cohort``."""
    auc = long[(long.method == method) & (long.metric == metric)].pivot(
        index="fold", columns="cohort", values="value"
    )
    if "test" not in auc or cohort not in auc:
        return pd.Series(dtype=float)
    return (auc["test"] - auc[cohort]).dropna()


def _fmt_drop(drops: pd.Series) -> str:
    """``8.4 ± 2.1`` (points of AUC, mean ± SD over folds); ``–`` without folds."""
    if drops.empty:
        return "–"
    return fmt(float(drops.mean()), float(drops.std(ddof=1)) if len(drops) > 1 else float("nan"))


def _methods_only(results: TaskResults, names: Sequence[str], values: list[float]) -> list[float]:
    """``values`` (one per name) with the floor and ceiling rows' set to NaN, so they are never bold."""
    kinds = {r.method: r.kind for r in results.runs}
    return [
        v if kinds.get(m, "method") == "method" else float("nan") for m, v in zip(names, values, strict=True)
    ]


def _get(stats: pd.DataFrame, method: str, cohort: str, metric: str) -> tuple[float, float]:
    key = (method, cohort, metric)
    if key not in stats.index:
        return float("nan"), float("nan")
    return float(stats.loc[key, "mean"]), float(stats.loc[key, "std"])

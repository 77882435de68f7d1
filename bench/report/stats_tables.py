"""Tables of the statistics of bench/analysis.py (CIs, paired tests), of localisation, of class memories, and of
what was run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from methods import get_method_class

from ..analysis import TaskStats
from ..store import FoldRun
from ..tables import Table, bold_best, cohort_label, fmt, fmt_ci, fmt_diff, fmt_p, method_order

__all__ = [
    "ALPHA",
    "MARK_DELONG",
    "MARK_T",
    "backbone_tests_table",
    "backbones_table",
    "headline_table",
    "localisation_md_table",
    "marks",
    "marks_caption",
    "method_reports_table",
    "runs_table",
    "tests_table",
]

MARK_T, MARK_DELONG, ALPHA = "†", "‡", 0.05


def marks_caption(against: str) -> str:
    """What † and ‡ of :func:`_marks` mean, for a caption; ``against`` names the reference."""
    return (
        f"{MARK_T}: p < 0.05 in the corrected resampled t-test (Nadeau & Bengio 2003) over fold AUCs; "
        f"{MARK_DELONG}: p < 0.05 in DeLong's test (pooled out-of-fold predictions internally; mean of fold "
        "AUCs externally, the trained models held fixed: patient sampling only); both two-sided against "
        f"{against}, uncorrected for multiple comparisons."
    )


def marks(st: TaskStats, method: str, cohort: str) -> str:
    """† where the corrected t-test and ‡ where DeLong's test give p < 0.05 against the task's reference."""
    if method == st.reference:
        return " (ref)"
    tests = st.tests[(st.tests.method == method) & (st.tests.cohort == cohort)].set_index("test").p
    marks = MARK_T if tests.get("corrected t", 1.0) < ALPHA else ""
    return marks + (MARK_DELONG if tests.get("DeLong", 1.0) < ALPHA else "")


def headline_table(analyses: Sequence[TaskStats], methods: Sequence[str] | None = None) -> Table:
    """Methods × (task, cohort): AUC (%) mean ± SD over folds [95 % bootstrap CI], markers vs the reference."""
    columns = [(st, c) for st in analyses for c in st.cohorts]
    all_methods = sorted({m for st in analyses for m in st.summary.method})
    rows_methods = method_order(all_methods, methods)
    header = ["Method"] + [f"{st.task.upper()} {cohort_label(c)}" for st, c in columns]
    rows, bold = [[m] for m in rows_methods], [[False] for _ in rows_methods]
    for st, c in columns:
        s = st.summary[st.summary.cohort == c].set_index("method")
        means = [float(s.loc[m, "mean"]) if m in s.index else float("nan") for m in rows_methods]
        for i, (m, flag) in enumerate(zip(rows_methods, bold_best(means), strict=True)):
            if m not in s.index:
                rows[i].append("–")
            else:
                r = s.loc[m]
                rows[i].append(fmt_ci(r["mean"], r["sd"], r["ci_lo"], r["ci_hi"]) + marks(st, m, c))
            bold[i].append(flag)
    refs = "; ".join(f"{st.task.upper()}: {st.reference}" for st in analyses)
    n_boot = analyses[0].n_boot if analyses else 0
    caption = (
        "Patient-level AUC (%; threshold-free, so no operating point is involved): mean ± SD over the "
        "cross-validation folds; in brackets a 95 % percentile "
        f"bootstrap CI ({n_boot} class-stratified resamples of patients, seeded). Internal: CI of the AUC of the "
        "pooled out-of-fold test predictions. External: each fold's model predicts the whole cohort; the CI is "
        "of the mean of the fold AUCs (one resample applied to every fold, AUCs averaged). "
        f"{marks_caption(f'the reference method (ref) of each task ({refs})')} Best mean per column in bold."
    )
    return Table(header, rows, bold, caption, "tab:headline")


def _test_rows(
    tests: pd.DataFrame, keys: list[str], cohorts: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """The columns and rows of a tests table: per row of ``keys`` (method, or method and feature set), the
    internal ΔAUC (fold mean) and corrected-t p, the pooled ΔAUC and DeLong p, then each external cohort's."""
    t = tests.set_index([*keys, "cohort", "test"])
    header = ["Internal ΔAUC (fold mean)", "corrected t p", "Internal ΔAUC (pooled)", "DeLong p"]
    for c in cohorts[1:]:
        header += [f"{cohort_label(c)} ΔAUC", f"{cohort_label(c)} DeLong p"]

    def get(key: tuple, c: str, test: str, col: str) -> float:
        return float(t.loc[(*key, c, test), col]) if (*key, c, test) in t.index else float("nan")

    rows = []
    for key in sorted(set(map(tuple, tests[keys].to_numpy()))):
        row = [" · ".join(key)]
        row += [
            fmt_diff(get(key, "test", "corrected t", "diff")),
            fmt_p(get(key, "test", "corrected t", "p")),
        ]
        row += [fmt_diff(get(key, "test", "DeLong", "diff")), fmt_p(get(key, "test", "DeLong", "p"))]
        for c in cohorts[1:]:
            row += [fmt_diff(get(key, c, "DeLong", "diff")), fmt_p(get(key, c, "DeLong", "p"))]
        rows.append(row)
    return header, rows


def _tests_how(st: TaskStats) -> str:
    ratio, source = st.test_train_ratio
    return (
        f"Corrected resampled t-test (Nadeau & Bengio 2003) over fold AUCs, variance factor "
        f"1/n + n_test/n_train with n_test/n_train = {ratio:.3f} ({source}), n − 1 degrees of freedom, n the "
        "folds both have (with repeats of the CV design: the folds of every repeat, Bouckaert & Frank 2004's "
        "corrected repeated k-fold test). "
        "DeLong's test (fast algorithm of Sun & Xu 2014): on the pooled out-of-fold predictions internally, on "
        "the difference of the mean fold AUCs externally (all folds' predictions of the same patients). "
        "Two-sided, uncorrected for multiple comparisons."
    )


def tests_table(st: TaskStats) -> Table:
    """Each method against the task's reference: AUC differences (points of %) and the tests' p-values."""
    header, rows = _test_rows(st.tests, ["method"], st.cohorts)
    caption = (
        f"{st.task.upper()}: each method minus the reference {st.reference} (ΔAUC in points of %), on the folds "
        f"both have. {_tests_how(st)}"
    )
    return Table(
        ["Method", *header],
        rows,
        [[False] * (len(header) + 1) for _ in rows],
        caption,
        f"tab:tests-{st.stem}",
    )


def backbones_table(
    views: Sequence[TaskStats], tests: pd.DataFrame, methods: Sequence[str] | None = None
) -> Table:
    """Methods × (feature set, cohort) of one task: AUC (%) mean ± SD over folds, with † / ‡ where a feature
    set differs from the first one (``views[0]``) for the same method (:func:`bench.analysis.backbone_tests`)."""
    ref = views[0]
    rows_methods = method_order(sorted({m for st in views for m in st.summary.method}), methods)
    columns = [(st, c) for st in views for c in ref.cohorts]
    header = ["Method"] + [f"{st.features} {cohort_label(c)}" for st, c in columns]
    rows, bold = [[m] for m in rows_methods], [[False] for _ in rows_methods]
    p = tests.set_index(["method", "features", "cohort", "test"]).p
    for i, m in enumerate(rows_methods):
        cells = []
        for st, c in columns:
            s = st.summary[(st.summary.method == m) & (st.summary.cohort == c)]
            if s.empty:
                cells.append((float("nan"), "–"))
                continue
            mark = ""
            if st is not ref:
                mark += MARK_T if p.get((m, st.features, c, "corrected t"), 1.0) < ALPHA else ""
                mark += MARK_DELONG if p.get((m, st.features, c, "DeLong"), 1.0) < ALPHA else ""
            cells.append((float(s["mean"].iloc[0]), fmt(s["mean"].iloc[0], s["sd"].iloc[0]) + mark))
        for c in ref.cohorts:  # bold: the best feature set of this method, per cohort
            idx = [j for j, (_, cc) in enumerate(columns) if cc == c]
            flags = bold_best([cells[j][0] for j in idx])
            for j, flag in zip(idx, flags, strict=True):
                cells[j] = (cells[j][0], cells[j][1], flag)
        rows[i] += [cell[1] for cell in cells]
        bold[i] += [cell[2] for cell in cells]
    caption = (
        f"{ref.name.upper()}: every method on each feature set (backbone), patient-level AUC (%), mean ± SD over "
        "folds. The feature sets share their splits, so each comparison is paired by fold and patient. "
        f"{marks_caption(f'the same method on {ref.features}')} Bold: the best feature set of each method, per "
        "cohort."
    )
    return Table(header, rows, bold, caption, f"tab:backbones-{ref.name}")


def backbone_tests_table(views: Sequence[TaskStats], tests: pd.DataFrame) -> Table:
    """Each method on each feature set minus the same method on the first: ΔAUC (points of %) and p-values."""
    header, rows = _test_rows(tests, ["method", "features"], views[0].cohorts)
    caption = (
        f"{views[0].name.upper()}: each method on each feature set minus the same method on "
        f"{views[0].features} (ΔAUC in points of %), on the folds both have. {_tests_how(views[0])}"
    )
    return Table(
        ["Method · features", *header],
        rows,
        [[False] * (len(header) + 1) for _ in rows],
        caption,
        f"tab:backbone-tests-{views[0].name}",
    )


def localisation_md_table(results: dict[str, pd.DataFrame], methods: Sequence[str] | None = None) -> Table:
    """Methods × tasks: localisation AUC (%) of the trained models and of the same architectures untrained."""
    tasks = [t for t, df in results.items() if len(df)]
    all_methods = sorted({m for t in tasks for m in results[t].method})
    rows_methods = method_order(all_methods, methods)
    rows, bold = [[m] for m in rows_methods], [[False] for _ in rows_methods]
    header = ["Method"]
    for t in tasks:
        header += [f"{t.upper()} trained", f"{t.upper()} untrained"]
        g = results[t].groupby("method")[["auc", "auc_untrained"]].agg(["mean", "std"])
        means = [float(g.loc[m, ("auc", "mean")]) if m in g.index else float("nan") for m in rows_methods]
        for i, (m, flag) in enumerate(zip(rows_methods, bold_best(means), strict=True)):
            for col in ("auc", "auc_untrained"):
                rows[i].append(fmt(g.loc[m, (col, "mean")], g.loc[m, (col, "std")]) if m in g.index else "–")
            bold[i] += [flag, False]
    slides = int(max(int(results[t].slides.max()) for t in tasks)) if tasks else 0
    caption = (
        "Localisation AUC (%) on synthetic slides: AUC of each patch's attention against its ground-truth "
        "relevance > 0 (the tumour and tumour-stroma interface patches that carry the label signal), averaged "
        f"over up to {slides} seeded test slides per fold, then mean ± SD over folds; 50 is chance. Untrained: "
        "the same architecture at a random initialisation (seeded per fold), the level that tissue structure "
        "alone gives; the gap to it is what training earned."
    )
    return Table(header, rows, bold, caption, "tab:localisation")


def runs_table(st: TaskStats) -> Table:
    """What was run for one task: per method, folds, seeds, epoch cap, epochs run, folds converged, device,
    versions."""
    rows = []
    for method in sorted({r.method for r in st.runs}):
        runs = sorted((r for r in st.runs if r.method == method), key=lambda r: r.unit)
        repeats = sorted({r.repeat for r in runs})
        epochs_run = [r.metrics.get("epochs_run") for r in runs]
        stopped = [r.metrics.get("stopped") for r in runs]
        versions = {
            f"torch {r.config.get('versions', {}).get('torch', '?')}, numpy {r.config.get('versions', {}).get('numpy', '?')}"
            for r in runs
        }
        cfg = runs[0].config.get("method_config", {})
        rows.append(
            [
                method,
                _folds_done(runs, repeats),
                ", ".join(sorted({str(r.config.get("seed")) for r in runs}))
                + (" (repeat r: split seed + r)" if len(repeats) > 1 else ""),
                str(cfg.get("epochs", "?")),
                f"{np.mean([e for e in epochs_run if e is not None]):.1f}" if epochs_run else "–",
                f"{stopped.count('plateau')} of {len(runs)}" if any(stopped) else "–",
                ", ".join(sorted({str(r.config.get("device")) for r in runs})),
                "; ".join(sorted(versions)),
            ]
        )
    header = [
        "Method",
        "Folds done",
        "Seed",
        "Epoch cap",
        "Epochs run (mean)",
        "Converged",
        "Device",
        "Versions",
    ]
    caption = (
        f"{st.task.upper()}: runs found on disk (from each fold's config.yaml and metrics.json). Converged: folds "
        "whose training ended on a validation plateau (the method's early-stopping rule met), not on the epoch "
        "cap; – for folds written before bench recorded it."
    )
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, f"tab:runs-{st.stem}")


def _folds_done(runs: Sequence[FoldRun], repeats: list[int]) -> str:
    """``n of k (folds)``, per repeat when there are several (``repeat r: ...``)."""
    k = runs[0].config.get("folds", "?")
    parts = []
    for rep in repeats:
        mine = [r for r in runs if r.repeat == rep]
        text = f"{len(mine)} of {k} ({', '.join(str(r.fold) for r in mine)})"
        parts.append(text if len(repeats) == 1 else f"repeat {rep}: {text}")
    return "; ".join(parts)


def method_reports_table(analyses: Sequence[TaskStats]) -> Table | None:
    """Methods × tasks: what each method says about its trained models (``MILMethod.summarise_reports`` of
    the ``method_report`` of its folds' metrics.json, e.g. MoMKD's class memories), or None if none does."""
    cells: dict[str, dict[tuple[str, str], str]] = {}
    captions: dict[str, str] = {}
    columns: dict[tuple[str, str], None] = {}
    for st in analyses:
        for method in sorted({r.method for r in st.runs}):
            cls = get_method_class(method)
            reports = [r.metrics.get("method_report", {}) for r in st.runs if r.method == method]
            for column, text in cls.summarise_reports(reports).items():
                cells.setdefault(method, {})[(st.task, column)] = text
                columns[(st.task, column)] = None
                captions[cls.name] = cls.reports_caption
    if not cells:
        return None
    header = ["Method"] + [f"{t.upper()} {column}" for t, column in columns]
    rows = [[m] + [cells[m].get(col, "–") for col in columns] for m in sorted(cells)]
    caption = (
        "What the methods report about their trained models: "
        + "; ".join(f"{name}: {text}" for name, text in sorted(captions.items()))
        + "."
    )
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, "tab:method-reports")

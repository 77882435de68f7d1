"""Tables of the statistics of bench/analysis.py (CIs, paired tests), of localisation, of class memories, and of
what was run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from methods import get_method_class

from ..analysis import TaskStats
from ..tables import Table, bold_best, cohort_label, fmt, fmt_ci, fmt_diff, fmt_p, method_order

__all__ = [
    "ALPHA",
    "MARK_DELONG",
    "MARK_T",
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
        means = [  # floors and ceilings are never the best of a column
            float(s.loc[m, "mean"])
            if m in s.index and st.kinds.get(m, "method") == "method"
            else float("nan")
            for m in rows_methods
        ]
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
        f"{marks_caption(f'the reference method (ref) of each task ({refs})')} Best mean per column in bold "
        "(among the methods: the floor-* and ceiling-* rows are references, see their table)."
    )
    return Table(header, rows, bold, caption, "tab:headline")


def tests_table(st: TaskStats) -> Table:
    """Each method against the task's reference: AUC differences (points of %) and the tests' p-values."""
    t = st.tests.set_index(["method", "cohort", "test"])
    methods = sorted(set(st.tests.method))
    header = ["Method", "Internal ΔAUC (fold mean)", "corrected t p", "Internal ΔAUC (pooled)", "DeLong p"]
    for c in st.cohorts[1:]:
        header += [f"{cohort_label(c)} ΔAUC", f"{cohort_label(c)} DeLong p"]
    rows = []

    def get(m: str, c: str, test: str, col: str) -> float:
        return float(t.loc[(m, c, test), col]) if (m, c, test) in t.index else float("nan")

    for m in methods:
        row = [
            m,
            fmt_diff(get(m, "test", "corrected t", "diff")),
            fmt_p(get(m, "test", "corrected t", "p")),
            fmt_diff(get(m, "test", "DeLong", "diff")),
            fmt_p(get(m, "test", "DeLong", "p")),
        ]
        for c in st.cohorts[1:]:
            row += [fmt_diff(get(m, c, "DeLong", "diff")), fmt_p(get(m, c, "DeLong", "p"))]
        rows.append(row)
    bold = [[False] * len(header) for _ in rows]
    ratio, source = st.test_train_ratio
    caption = (
        f"{st.task.upper()}: each method minus the reference {st.reference} (ΔAUC in points of %), on the folds "
        f"both have. Corrected resampled t-test (Nadeau & Bengio 2003) over fold AUCs, variance factor "
        f"1/k + n_test/n_train with n_test/n_train = {ratio:.3f} ({source}), k − 1 degrees of freedom. "
        "DeLong's test (fast algorithm of Sun & Xu 2014): on the pooled out-of-fold predictions internally, on "
        "the difference of the mean fold AUCs externally (all folds' predictions of the same patients). "
        "Two-sided, uncorrected for multiple comparisons."
    )
    return Table(header, rows, bold, caption, f"tab:tests-{st.task}")


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


def _mean_auc(values: list[float | None]) -> str:
    """Mean of the fold AUCs that were recorded (%), ``–`` when none was."""
    known = [v for v in values if v is not None and not np.isnan(v)]
    return f"{np.mean(known) * 100:.1f}" if known else "–"


def runs_table(st: TaskStats) -> Table:
    """What was run for one task: per method, folds, seeds, epoch cap, epochs run, folds converged, training /
    validation / test AUC, device, versions."""
    rows = []
    for method in sorted({r.method for r in st.runs}):
        runs = sorted((r for r in st.runs if r.method == method), key=lambda r: r.fold)
        epochs_run = [r.metrics.get("epochs_run") for r in runs if r.metrics.get("epochs_run") is not None]
        cohort_auc = {
            c: _mean_auc([r.metrics.get("cohorts", {}).get(c, {}).get("auc") for r in runs])
            for c in ("val", "test")
        }
        stopped = [r.metrics.get("stopped") for r in runs]
        versions = {
            f"torch {r.config.get('versions', {}).get('torch', '?')}, numpy {r.config.get('versions', {}).get('numpy', '?')}"
            for r in runs
        }
        cfg = runs[0].config.get("method_config", {})
        rows.append(
            [
                method,
                f"{len(runs)} of {runs[0].config.get('folds', '?')} ({', '.join(str(r.fold) for r in runs)})",
                ", ".join(sorted({str(r.config.get("seed")) for r in runs})),
                str(cfg.get("epochs", "?")) if cfg else "–",  # a floor or ceiling row trains no epochs
                f"{np.mean(epochs_run):.1f}" if epochs_run else "–",
                f"{stopped.count('plateau')} of {len(runs)}" if any(stopped) else "–",
                _mean_auc([r.metrics.get("train_auc") for r in runs]),
                cohort_auc["val"],
                cohort_auc["test"],
                ", ".join(sorted({str(r.config.get("device", "–")) for r in runs})),
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
        "Train AUC",
        "Val AUC",
        "Test AUC",
        "Device",
        "Versions",
    ]
    caption = (
        f"{st.task.upper()}: runs found on disk (from each fold's config.yaml and metrics.json). Converged: folds "
        "whose training ended on a validation plateau (the method's early-stopping rule met), not on the epoch "
        "cap; – for folds written before bench recorded it. Train / Val / Test AUC (%, mean over folds, "
        "patient-level): the kept model on its own training patients, on the validation patients it was "
        "selected on, and on the test part; a high training AUC with a low validation AUC reads as fitted but "
        "not generalising, a low one as not trained (– : folds written before bench recorded the training AUC)."
    )
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, f"tab:runs-{st.task}")


def method_reports_table(analyses: Sequence[TaskStats]) -> Table | None:
    """Methods × tasks: what each method says about its trained models (``MILMethod.summarise_reports`` of
    the ``method_report`` of its folds' metrics.json, e.g. MoMKD's class memories), or None if none does."""
    cells: dict[str, dict[tuple[str, str], str]] = {}
    captions: dict[str, str] = {}
    columns: dict[tuple[str, str], None] = {}
    for st in analyses:
        for method in sorted({r.method for r in st.runs if "method_config" in r.config}):  # trained models
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

"""Tables from what is on disk (never retrains): the terminal table, and the paper's tables as .md and .tex.

- Table 1 (``table1``): methods × tasks, internal test AUC (%) mean ± SD over folds, best per task in bold.
- Table 2 (``table2``): methods × external cohorts, AUC / ACC / F1 (%) mean ± SD over the folds' models;
  ACC and F1 at the threshold of best F1 on the validation patients.
- Operating points (``operating_points_table``): per task, ACC / BACC / F1 at that threshold and at the argmax
  (probability > 0.5), with the threshold's spread over folds.
- Variant tables (``variant_table``): a method's ablation or memory-mode variants, internal and external AUC.
LaTeX uses ``booktabs`` rules and needs only ``\\usepackage{booktabs}``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table as RichTable

from . import provenance
from .stats import TaskStats
from .store import atomic_write_text, collect_metrics, read_fold_metrics

__all__ = [
    "Table",
    "fmt",
    "fmt_ci",
    "fmt_p",
    "headline_table",
    "localisation_md_table",
    "memory_table",
    "operating_points_table",
    "summary_rich_table",
    "table1",
    "table2",
    "tests_table",
    "variant_table",
    "write_report",
    "write_table",
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
OPERATING_POINTS_NOTE = (
    "ACC, BACC, F1: at the threshold of best F1 on each fold's validation patients, applied unchanged to the "
    "test part and every external cohort; @0.5: at the argmax (probability > 0.5), no fitted threshold."
)


@dataclass
class Table:
    """A small results table: header, rows of cells, which cells are bold, and a caption."""

    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    caption: str
    label: str

    def markdown(self) -> str:
        def cell(text: str, b: bool) -> str:
            return f"**{text}**" if b and text else text

        lines = [
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join([" --- "] + [" ---: "] * (len(self.header) - 1)) + "|",
        ]
        lines += [
            "| " + " | ".join(cell(t, b) for t, b in zip(r, bl, strict=True)) + " |"
            for r, bl in zip(self.rows, self.bold, strict=True)
        ]
        return f"{self.caption}\n\n" + "\n".join(lines) + "\n"

    def latex(self) -> str:
        def esc(text: str) -> str:
            for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
                text = text.replace(a, b)
            for a, b in (
                ("†", r"\textsuperscript{\dag}"),
                ("‡", r"\textsuperscript{\ddag}"),
                ("Δ", r"$\Delta$"),
                ("ρ", r"$\rho$"),
                ("<", r"$<$"),
                (">", r"$>$"),
                ("−", "-"),
            ):
                text = text.replace(a, b)
            return text.replace(" ± ", r" $\pm$ ").replace("[", "{[}").replace("]", "{]}")

        def cell(text: str, b: bool) -> str:
            return rf"\textbf{{{esc(text)}}}" if b and text else esc(text)

        body = [
            " & ".join(cell(t, b) for t, b in zip(r, bl, strict=True)) + r" \\"
            for r, bl in zip(self.rows, self.bold, strict=True)
        ]
        return "\n".join(
            [
                r"\begin{table}[t]",
                r"\centering",
                rf"\caption{{{esc(self.caption)}}}",
                rf"\label{{{self.label}}}",
                r"\begin{tabular}{l" + "c" * (len(self.header) - 1) + "}",
                r"\toprule",
                " & ".join(esc(h) for h in self.header) + r" \\",
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
                r"\end{table}",
                "",
            ]
        )


def fmt(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """``79.6 ± 0.7`` (percent, one decimal); ``–`` when missing; no ``± nan`` for a single fold."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _stats(long: pd.DataFrame) -> pd.DataFrame:
    return long.groupby(["method", "cohort", "metric"])["value"].agg(["mean", "std", "count"])


def _bold_best(values: list[float]) -> list[bool]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    best = max(finite) if finite else None
    return [best is not None and v == best for v in values]


def _method_order(methods: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    order = list(preferred or [])
    return [m for m in order if m in methods] + sorted(m for m in methods if m not in order)


def summary_rich_table(summary: pd.DataFrame, title: str) -> RichTable:
    """Rows method × cohort, columns AUC, then ACC/BACC/F1 at the validation-chosen threshold and at the
    argmax, mean ± SD (the terminal table of ``bench run``)."""
    table = RichTable(
        title=title, title_justify="left", caption=OPERATING_POINTS_NOTE, caption_justify="left"
    )
    table.add_column("method", no_wrap=True)
    table.add_column("cohort", no_wrap=True)
    for name in METRIC_NAMES.values():
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
                for m in METRIC_NAMES
            ]
            n = int(s.loc[(method, cohort, "auc"), "n"]) if (method, cohort, "auc") in s.index else 0
            table.add_row(  # escaped: a variant's brackets are not rich markup
                escape(method),
                "internal (test)" if cohort == "test" else f"external: {escape(cohort)}",
                *cells,
                str(n),
            )
    return table


def table1(out: Path, tasks: Sequence[str], methods: Sequence[str] | None = None) -> Table:
    """Methods × tasks, internal AUC (%) mean ± SD over folds; the best per task in bold."""
    stats = {t: _stats(collect_metrics(out, t)) for t in tasks}
    all_methods = sorted({m for s in stats.values() for m in s.index.get_level_values("method")})
    rows_methods = _method_order(all_methods, methods)
    means = {t: [_get(stats[t], m, "test", "auc")[0] for m in rows_methods] for t in tasks}
    bold_cols = {t: _bold_best(means[t]) for t in tasks}
    rows, bold = [], []
    for i, m in enumerate(rows_methods):
        rows.append([m] + [fmt(*_get(stats[t], m, "test", "auc")) for t in tasks])
        bold.append([False] + [bold_cols[t][i] for t in tasks])
    caption = (
        "Internal patient-level stratified cross-validation: test AUC (%; threshold-free), mean ± SD over "
        "folds; best per task in bold."
    )
    return Table(["Method"] + [t.upper() for t in tasks], rows, bold, caption, "tab:internal")


def table2(out: Path, tasks: Sequence[str], methods: Sequence[str] | None = None) -> Table:
    """Methods × (task, external cohort) × (AUC, ACC, F1) in %, mean ± SD over the folds' models."""
    stats = {t: _stats(collect_metrics(out, t)) for t in tasks}
    columns = [
        (t, c)
        for t in tasks
        for c in sorted(set(stats[t].index.get_level_values("cohort")) - {"test", "val"})
    ]
    all_methods = sorted({m for s in stats.values() for m in s.index.get_level_values("method")})
    rows_methods = _method_order(all_methods, methods)
    header = ["Method"] + [
        f"{t.upper()} {c} {METRIC_NAMES[k]}" for t, c in columns for k in ("auc", "acc", "f1")
    ]
    rows, bold = [[m] for m in rows_methods], [[False] for _ in rows_methods]
    for t, c in columns:
        for k in ("auc", "acc", "f1"):
            values = [_get(stats[t], m, c, k) for m in rows_methods]
            flags = _bold_best([v[0] for v in values])
            for i, v in enumerate(values):
                rows[i].append(fmt(*v))
                bold[i].append(flags[i])
    caption = (
        "External validation: each fold's model tested on the external cohort; % mean ± SD over folds. ACC and "
        "F1 at the threshold of best F1 on each fold's validation patients (at the argmax: the operating-points "
        "tables)."
    )
    return Table(header, rows, bold, caption, "tab:external")


def operating_points_table(out: Path, task: str, methods: Sequence[str] | None = None) -> Table:
    """Rows method × cohort: the validation-chosen threshold, then ACC / BACC / F1 (%) at it and at the
    argmax, mean ± SD over folds. The authors' ``test.py`` reports both operating points."""
    long = collect_metrics(out, task, names=(*METRIC_NAMES, "threshold"))
    stats = _stats(long)
    rows_methods = _method_order(sorted(set(long.method)), methods)
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
                [m, _cohort_label(c), fmt(thr, thr_sd, scale=1.0, digits=2)]
                + [fmt(*_get(stats, m, c, k)) for k in metrics]
            )
    caption = (
        f"{task.upper()}: threshold-dependent metrics (%) at two operating points, mean ± SD over folds. "
        f"{OPERATING_POINTS_NOTE} Threshold (val.): that threshold (a probability), mean ± SD over folds; a "
        "large SD means the validation split is too small to place it reliably. The @0.5 columns do not depend "
        "on it, but on calibration instead (with imbalanced classes the argmax may call most patients "
        "negative). F1 is the positive class's. Table 2 and the terminal table of `bench run` show the "
        "validation-threshold ones as ACC and F1."
    )
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, f"tab:operating-points-{task}")


def variant_table(
    out: Path,
    task: str,
    variants: Sequence[tuple[str, str]],
    caption: str,
    label: str,
    reference: str | None = None,
) -> Table:
    """Rows = (display name, method name on disk); columns internal AUC, AUC on each external cohort and the
    internal→external drop (points of AUC) on each.

    The drop is each fold model's internal test AUC minus its AUC on the cohort, mean ± SD over folds. With
    ``reference`` (a method name among the variants, e.g. the full model), each other row is marked where the
    paired tests of the report (on the folds both have) reject equality with it at p < 0.05, and its drop
    where the corrected resampled t-test of the per-fold drop differences does.
    """
    long = collect_metrics(out, task)
    stats = _stats(long)
    externals = sorted(set(stats.index.get_level_values("cohort")) - {"test", "val"}) if len(stats) else []
    cohorts = ["test", *externals]
    header = (
        ["Configuration", "Internal AUC"]
        + [f"External ({c}) AUC" for c in externals]
        + [f"Drop int→ext ({c})" for c in externals]
    )
    cols = {c: [_get(stats, m, c, "auc") for _, m in variants] for c in cohorts}
    drops = {c: [_fold_drops(long, m, c) for _, m in variants] for c in externals}
    flags = {c: _bold_best([v[0] for v in cols[c]]) for c in cohorts}
    rows = [
        [name] + [fmt(*cols[c][i]) for c in cohorts] + [_fmt_drop(drops[c][i]) for c in externals]
        for i, (name, _) in enumerate(variants)
    ]
    if externals:
        caption += (
            " Drop int→ext: each fold model's internal test AUC minus its AUC on the external cohort, points of "
            "AUC, mean ± SD over folds."
        )
    if reference is not None and len(stats) and (reference, "test", "auc") in stats.index:
        from .stats import analyse_task, corrected_resampled_ttest

        on_disk = {m for _, m in variants if (m, "test", "auc") in stats.index}
        st = analyse_task(out, task, reference, n_boot=0, methods=on_disk)
        ref_i = next(i for i, (_, m) in enumerate(variants) if m == reference)
        for i, (_, m) in enumerate(variants):
            for j, c in enumerate(cohorts, 1):
                if rows[i][j] != "–":
                    rows[i][j] += _marks(st, m, c)
            for j, c in enumerate(externals, 1 + len(cohorts)):
                if rows[i][j] == "–" or i == ref_i:
                    continue
                paired = pd.concat([drops[c][i], drops[c][ref_i]], axis=1, join="inner")
                p = corrected_resampled_ttest(
                    paired.iloc[:, 0] - paired.iloc[:, 1], st.test_train_ratio[0]
                ).p_value
                rows[i][j] += MARK_T if p < ALPHA else ""
        caption += " " + _marks_caption("the row marked (ref), on the folds both have")
        if externals:
            caption += (
                f" On a drop, {MARK_T}: p < 0.05 in the corrected resampled t-test of the per-fold drop "
                "differences against the (ref) row."
            )
    bold = [[False] + [flags[c][i] for c in cohorts] + [False] * len(externals) for i in range(len(variants))]
    return Table(header, rows, bold, caption, label)


def _fold_drops(long: pd.DataFrame, method: str, cohort: str) -> pd.Series:
    """Per fold of ``method``: internal test AUC minus the AUC of the same fold model on ``cohort``."""
    auc = long[(long.method == method) & (long.metric == "auc")].pivot(
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


def _get(stats: pd.DataFrame, method: str, cohort: str, metric: str) -> tuple[float, float]:
    key = (method, cohort, metric)
    if key not in stats.index:
        return float("nan"), float("nan")
    return float(stats.loc[key, "mean"]), float(stats.loc[key, "std"])


def write_table(table: Table, folder: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """Write ``stem.md`` and/or ``stem.tex`` into ``folder``; returns the paths written."""
    written = []
    for f in formats:
        path = Path(folder) / f"{stem}.{'md' if f == 'markdown' else 'tex'}"
        atomic_write_text(path, table.markdown() if f == "markdown" else table.latex())
        written.append(path)
    return written


# ---------------------------------------------------------------- statistics tables and the full report

MARK_T, MARK_DELONG, ALPHA = "†", "‡", 0.05


def fmt_ci(mean: float, sd: float, lo: float, hi: float) -> str:
    """``79.6 ± 0.7 [75.2, 84.0]`` (percent); the bracket is omitted when there is no CI."""
    base = fmt(mean, sd)
    if lo is None or math.isnan(lo) or base == "–":
        return base
    return f"{base} [{lo * 100:.1f}, {hi * 100:.1f}]"


def fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cohort_label(cohort: str) -> str:
    return "internal" if cohort == "test" else f"ext. {cohort}"


def _marks_caption(against: str) -> str:
    """What † and ‡ of :func:`_marks` mean, for a caption; ``against`` names the reference."""
    return (
        f"{MARK_T}: p < 0.05 in the corrected resampled t-test (Nadeau & Bengio 2003) over fold AUCs; "
        f"{MARK_DELONG}: p < 0.05 in DeLong's test (pooled out-of-fold predictions internally; mean of fold "
        "AUCs externally, the trained models held fixed: patient sampling only); both two-sided against "
        f"{against}, uncorrected for multiple comparisons."
    )


def _marks(st: TaskStats, method: str, cohort: str) -> str:
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
    rows_methods = _method_order(all_methods, methods)
    header = ["Method"] + [f"{st.task.upper()} {_cohort_label(c)}" for st, c in columns]
    rows, bold = [[m] for m in rows_methods], [[False] for _ in rows_methods]
    for st, c in columns:
        s = st.summary[st.summary.cohort == c].set_index("method")
        means = [float(s.loc[m, "mean"]) if m in s.index else float("nan") for m in rows_methods]
        for i, (m, flag) in enumerate(zip(rows_methods, _bold_best(means), strict=True)):
            if m not in s.index:
                rows[i].append("–")
            else:
                r = s.loc[m]
                rows[i].append(fmt_ci(r["mean"], r["sd"], r["ci_lo"], r["ci_hi"]) + _marks(st, m, c))
            bold[i].append(flag)
    refs = "; ".join(f"{st.task.upper()}: {st.reference}" for st in analyses)
    n_boot = analyses[0].n_boot if analyses else 0
    caption = (
        "Patient-level AUC (%; threshold-free, so no operating point is involved): mean ± SD over the "
        "cross-validation folds; in brackets a 95 % percentile "
        f"bootstrap CI ({n_boot} class-stratified resamples of patients, seeded). Internal: CI of the AUC of the "
        "pooled out-of-fold test predictions. External: each fold's model predicts the whole cohort; the CI is "
        "of the mean of the fold AUCs (one resample applied to every fold, AUCs averaged). "
        f"{_marks_caption(f'the reference method (ref) of each task ({refs})')} Best mean per column in bold."
    )
    return Table(header, rows, bold, caption, "tab:headline")


def tests_table(st: TaskStats) -> Table:
    """Each method against the task's reference: AUC differences (points of %) and the tests' p-values."""
    t = st.tests.set_index(["method", "cohort", "test"])
    methods = sorted(set(st.tests.method))
    header = ["Method", "Internal ΔAUC (fold mean)", "corrected t p", "Internal ΔAUC (pooled)", "DeLong p"]
    for c in st.cohorts[1:]:
        header += [f"{_cohort_label(c)} ΔAUC", f"{_cohort_label(c)} DeLong p"]
    rows = []

    def get(m: str, c: str, test: str, col: str) -> float:
        return float(t.loc[(m, c, test), col]) if (m, c, test) in t.index else float("nan")

    for m in methods:
        row = [
            m,
            _fmt_diff(get(m, "test", "corrected t", "diff")),
            fmt_p(get(m, "test", "corrected t", "p")),
            _fmt_diff(get(m, "test", "DeLong", "diff")),
            fmt_p(get(m, "test", "DeLong", "p")),
        ]
        for c in st.cohorts[1:]:
            row += [_fmt_diff(get(m, c, "DeLong", "diff")), fmt_p(get(m, c, "DeLong", "p"))]
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


def _fmt_diff(d: float) -> str:
    return "–" if math.isnan(d) else f"{d * 100:+.1f}"


def localisation_md_table(results: dict[str, pd.DataFrame], methods: Sequence[str] | None = None) -> Table:
    """Methods × tasks: localisation AUC (%) of the trained models and of the same architectures untrained."""
    tasks = [t for t, df in results.items() if len(df)]
    all_methods = sorted({m for t in tasks for m in results[t].method})
    rows_methods = _method_order(all_methods, methods)
    rows, bold = [[m] for m in rows_methods], [[False] for _ in rows_methods]
    header = ["Method"]
    for t in tasks:
        header += [f"{t.upper()} trained", f"{t.upper()} untrained"]
        g = results[t].groupby("method")[["auc", "auc_untrained"]].agg(["mean", "std"])
        means = [float(g.loc[m, ("auc", "mean")]) if m in g.index else float("nan") for m in rows_methods]
        for i, (m, flag) in enumerate(zip(rows_methods, _bold_best(means), strict=True)):
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


# ---------------------------------------------------------------- report.md


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def _synthetic_spec(config: dict) -> dict | None:
    """The generator settings of a synthetic task (``spec.json`` of its cached cohort), or None."""
    task = config.get("task", {})
    if task.get("source") != "synthetic" or not task.get("labels"):
        return None
    spec = Path(task["labels"]).parent.parent / "spec.json"
    return json.loads(spec.read_text()) if spec.is_file() else {}


def _runs_table(out: Path, st: TaskStats) -> Table:
    """What was run for one task: per method, folds, seeds, epoch cap and epochs run, device, versions."""
    rows = []
    for method in sorted({r.method for r in st.runs}):
        runs = sorted((r for r in st.runs if r.method == method), key=lambda r: r.fold)
        epochs_run = []
        for r in runs:
            path = Path(out) / st.task / method / f"fold_{r.fold}" / "metrics.json"
            if path.is_file():
                epochs_run.append(json.loads(path.read_text()).get("epochs_run"))
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
                str(cfg.get("epochs", "?")),
                f"{np.mean([e for e in epochs_run if e is not None]):.1f}" if epochs_run else "–",
                ", ".join(sorted({str(r.config.get("device")) for r in runs})),
                "; ".join(sorted(versions)),
            ]
        )
    header = ["Method", "Folds done", "Seed", "Epoch cap", "Epochs run (mean)", "Device", "Versions"]
    caption = f"{st.task.upper()}: runs found on disk (from each fold's config.yaml and metrics.json)."
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, f"tab:runs-{st.task}")


def memory_table(out: Path, analyses: Sequence[TaskStats]) -> Table | None:
    """Methods with class memories × tasks: memory components in use and kept per class, or None if no
    method on disk reports them (``method_report`` of each fold's metrics.json, e.g. MoMKD's)."""
    cells: dict[str, dict[tuple[str, str], str]] = {}
    for st in analyses:
        for method in sorted({r.method for r in st.runs}):
            folds = [Path(out) / st.task / method / f"fold_{r.fold}" for r in st.runs if r.method == method]
            reports = [read_fold_metrics(fd).get("method_report", {}) for fd in folds]
            reports = [m for m in reports if "memory_positive_num_active" in m]
            if not reports:
                continue
            size = max(int(m.get("memory_size", 0)) for m in reports)
            for name, sign in (("positive", "+"), ("negative", "−")):
                used = np.array([m[f"memory_{name}_num_active"] for m in reports], dtype=float)
                kept = np.array([m.get(f"memory_{name}_kept", size) for m in reports], dtype=float)
                sd = float(used.std(ddof=1)) if len(used) > 1 else float("nan")
                cell = fmt(float(used.mean()), sd, scale=1.0)
                cells.setdefault(method, {})[(st.task, sign)] = f"{cell} / {kept.mean():.1f} of {size}"
    if not cells:
        return None
    columns = [(st.task, sign) for st in analyses for sign in ("+", "−")]
    header = ["Method"] + [f"{t.upper()} C{sign}" for t, sign in columns]
    rows = [[m] + [cells[m].get(col, "–") for col in columns] for m in sorted(cells)]
    caption = (
        "Class memories: components in use (share of the class's training patches whose nearest own-class "
        "code it is, in the last training epoch of the kept weights, at least the method's active_threshold, "
        "1 % by default), mean ± SD over folds / components kept (fewer than K where adaptive memory pruned "
        "them), mean over folds, of K."
    )
    return Table(header, rows, [[False] * len(header) for _ in rows], caption, "tab:memory")


def _data_lines(st: TaskStats) -> list[str]:
    """Markdown lines describing a task's cohorts: source, patients, positives, synthetic settings."""
    config = st.runs[0].config
    task = config.get("task", {})
    spec = _synthetic_spec(config)
    s = st.summary
    lines = []
    if spec is not None:
        settings = spec.get("spec", {})
        keys = (
            "seed",
            "n_patients",
            "feature_dim",
            "signal_strength",
            "max_informative_fraction",
            "label_noise",
        )
        shown = ", ".join(f"{k} = {settings[k]}" for k in keys if k in settings)
        lines.append(
            f"- **SYNTHETIC data** (not patients): generated by `bench.data.synthetic` "
            f"(generator version {spec.get('generator_version', '?')}, spec hash {spec.get('hash', '?')}; {shown}). "
            "Patch features carry a planted signal in known patches (`relevance`), so localisation can be scored."
        )
    else:
        lines.append(f"- Data from files: labels `{task.get('labels')}`, features `{task.get('features')}`.")
    lines.append(
        f"- Label `{task.get('label_col')}`, positive class {task.get('positive')}; slides aggregated to patients "
        f"by the **{st.aggregation}** of their probabilities; every metric is patient-level."
    )
    for c in st.cohorts:
        rows = s[s.cohort == c]
        if rows.empty:
            continue
        n, pos = int(rows.patients.max()), int(rows.positives.max())
        if c == "test":
            total = st.internal_patients
            where = f" (of {total}; the other folds' results are missing)" if total and total > n else ""
            lines.append(
                f"- internal cohort, cross-validated: {n} patients in the test parts of the folds on disk{where}, "
                f"{pos} positive ({pos / max(n, 1):.0%})."
            )
        else:
            lines.append(f"- external cohort `{c}`: {n} patients, {pos} positive ({pos / max(n, 1):.0%}).")
    return lines


def write_report(
    out: Path,
    tasks: Sequence[str],
    formats: Sequence[str],
    reference: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    loc_slides: int = 12,
    device: str = "cpu",
    command: str = "bench report",
    log: Callable[[str], Any] = print,
) -> Path:
    """Tables, figures and ``<out>/report.md`` for ``tasks`` from what is on disk; returns report.md's path.

    Tables and figures go to ``<out>/<task>/report/`` (one task) or ``<out>/report/`` (several).
    """
    from datetime import UTC, datetime

    from .explain import explain_slide, figure_for, localisation_table
    from .figures import calibration_figure, fold_auc_figure, method_colors, roc_figure, save_figure
    from .stats import analyse_task

    out = Path(out)
    folder = out / "report" if len(tasks) > 1 else out / tasks[0] / "report"
    analyses = [analyse_task(out, t, reference, n_boot, seed) for t in tasks]
    all_methods = sorted({m for st in analyses for m in st.summary.method})
    colors = method_colors(all_methods)
    rel = folder.relative_to(out)
    md: list[str] = []

    def table_block(table: Table, stem: str) -> None:
        for path in write_table(table, folder, stem, formats):
            log(f"wrote {path}")
        md.extend([table.markdown(), ""])

    def figure_block(fig: Any, stem: str, caption: str) -> None:
        paths = save_figure(fig, folder, stem)
        log(f"wrote {paths[0]} (+ .svg)")
        md.extend(
            [f"![{caption}]({rel / paths[0].name})", "", f"*{caption}* ([SVG]({rel / paths[1].name}))", ""]
        )

    versions = provenance.versions()
    md += [
        f"# Benchmark report: {', '.join(t.upper() for t in tasks)}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `{command}` from the fold "
        f"results under `{out}`; nothing was retrained. Report made with "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".",
        "",
        "## What was run",
        "",
    ]
    for st in analyses:
        md += [f"### {st.task.upper()}", "", *_data_lines(st), ""]
        table_block(_runs_table(out, st), f"runs_{st.task}")
        md += [f"- Left out: {note}." for note in st.notes] + ([""] if st.notes else [])

    md += ["## Headline: AUC with 95 % confidence intervals and paired tests", ""]
    table_block(headline_table(analyses, all_methods), "table_headline")
    md += ["## Paired comparisons with the reference method", ""]
    for st in analyses:
        if len(st.tests):
            table_block(tests_table(st), f"tests_{st.task}")
        else:
            md += [
                f"{st.task.upper()}: no other method shares folds with {st.reference}; nothing to compare.",
                "",
            ]

    memory = memory_table(out, analyses)
    if memory is not None:
        md += ["## Memory use (methods with class memories)", ""]
        table_block(memory, "table_memory")

    md += ["## Figures", ""]
    for st in analyses:
        md += [f"### {st.task.upper()}", ""]
        order = [m for m in all_methods if m in set(st.summary.method)]
        figure_block(
            fold_auc_figure(st.fold_auc, f"{st.task.upper()}: AUC of each fold", order, st.reference),
            f"fold_auc_{st.task}",
            f"{st.task.upper()}: patient-level AUC of every fold, per method and cohort (reference {st.reference} in bold).",
        )
        for cohort in st.cohorts:
            curves, calib = _curves(st, cohort)
            where = "pooled out-of-fold test predictions" if cohort == "test" else f"external cohort {cohort}"
            how = "" if cohort == "test" else " (mean of the folds' ROC curves; legend: mean fold AUC)"
            stem = f"{st.task}_{'internal' if cohort == 'test' else _safe(cohort)}"
            figure_block(
                roc_figure(curves, f"{st.task.upper()}: {where}", colors),
                f"roc_{stem}",
                f"{st.task.upper()}: ROC curves on the {where}{how}.",
            )
            figure_block(
                calibration_figure(calib, f"{st.task.upper()}: calibration, {where}", colors),
                f"calibration_{stem}",
                f"{st.task.upper()}: calibration on the {where} (quantile bins"
                + ("" if cohort == "test" else "; every fold model's predictions pooled")
                + ").",
            )

    if loc_slides > 0:
        loc = {t: localisation_table(out, t, loc_slides, seed, device) for t in tasks}
        if any(len(df) for df in loc.values()):
            md += ["## Does the model look where the signal is? (synthetic tasks)", ""]
            table_block(localisation_md_table(loc, all_methods), "table_localisation")
            for st in analyses:
                if not len(loc[st.task]):
                    continue
                slide, fold = _example_slide(st, loc[st.task])
                for method in sorted(set(loc[st.task].method[loc[st.task].fold == fold])):
                    ex = explain_slide(out, st.task, method, slide, fold, device)
                    figure_block(
                        figure_for(ex),
                        f"explain_{st.task}_{_safe(method)}",
                        f"{st.task.upper()}, {method}: patches of test slide {slide} (fold {fold}) coloured by "
                        "attention percentile"
                        + (", nearest memory bank and component" if ex.memory_size else "")
                        + f", beside the ground-truth relevance; localisation AUC {ex.localisation_auc:.2f}.",
                    )

    md += ["## Tables in the paper's form", ""]
    table_block(table1(out, tasks), "table1_internal")
    table_block(table2(out, tasks), "table2_external")
    md += ["## Accuracy and F1 at two operating points", ""]
    for t in tasks:
        table_block(operating_points_table(out, t, all_methods), f"operating_points_{t}")
    md += [
        "## How the numbers were computed",
        "",
        "- Every number comes from the saved per-slide predictions (`predictions.csv` of each fold); slides are "
        "aggregated to patients first, and patients are what is resampled and ranked.",
        "- Internal cohort: the test parts of the folds partition the patients; their out-of-fold predictions are "
        "pooled (one prediction per patient) for the ROC curve, the bootstrap CI and DeLong's test. Mean ± SD is over "
        "the fold AUCs.",
        "- External cohorts: every fold's model predicts the whole cohort. The table reports the mean ± SD of the "
        "fold AUCs; its CI applies each bootstrap resample of patients to every fold and averages the fold AUCs; "
        "DeLong's test compares the two methods' mean fold AUCs (a linear contrast of correlated AUCs).",
        f"- Bootstrap: {n_boot} resamples, stratified by class, percentile interval, seed {seed}.",
        "- Accuracy, balanced accuracy and F1 (each fold's `metrics.json`) need an operating point and are given "
        "at two, as the MoMKD authors' `test.py` does: at the threshold of best F1 on the fold's validation "
        "patients (never the test part; Table 2 and `bench run`'s table) and at the argmax (probability > 0.5). "
        "AUC, the headline, needs none.",
        "- Reference method per task: "
        + ("given by `--vs`" if reference else "the best mean internal AUC")
        + f" ({'; '.join(f'{st.task.upper()}: {st.reference}' for st in analyses)}).",
        "- The corrected resampled t-test (Nadeau & Bengio 2003) widens the paired t-test's variance by "
        "1/k + n_test/n_train for the overlap of the folds' training sets, so it reflects training variability; "
        "DeLong's test treats the trained models as fixed and reflects only which patients were sampled. "
        "p-values are not corrected for multiple comparisons.",
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    log(f"wrote {path}")
    return path


def _curves(st: TaskStats, cohort: str) -> tuple[dict, dict]:
    """Per method: (labels, score rows) for the ROC figure and (labels, probabilities) for calibration."""
    curves, calib = {}, {}
    pat = st.patients[st.patients.cohort == cohort]
    for method, g in pat.groupby("method", sort=True):
        wide = g.pivot(index="case_id", columns="fold", values="prob")
        labels = g.drop_duplicates("case_id").set_index("case_id").label
        if cohort == "test":
            y = labels.loc[wide.index].to_numpy()
            pooled = wide.mean(axis=1).to_numpy()  # one fold per patient: the mean is that fold's value
            curves[method] = (y, pooled[None, :])
            calib[method] = (y, pooled)
        else:
            wide = wide.dropna()
            y = labels.loc[wide.index].to_numpy()
            curves[method] = (y, wide.to_numpy().T)
            calib[method] = (np.tile(y, wide.shape[1]), wide.to_numpy().T.ravel())
        if len(np.unique(y)) < 2:
            curves.pop(method)
            calib.pop(method)
    return curves, calib


def _example_slide(st: TaskStats, loc: pd.DataFrame) -> tuple[str, int]:
    """A positive test slide of the first fold with weights (reference method's predictions), sorted by id."""
    fold = int(loc.fold.min())
    runs = [r for r in st.runs if r.fold == fold and r.method in set(loc.method)]
    run = next((r for r in runs if r.method == st.reference), runs[0])
    test = run.predictions[run.predictions.cohort == "test"].sort_values("slide_id")
    positive = test[test.label == 1]
    return str((positive if len(positive) else test).slide_id.iloc[0]), fold

"""Tables from what is on disk (never retrains): the terminal table, and the paper's tables as .md and .tex.

- Table 1 (``table1``): methods × tasks, internal test AUC (%) mean ± SD over folds, best per task in bold.
- Table 2 (``table2``): methods × external cohorts, AUC / ACC / F1 (%) mean ± SD over the folds' models.
- Variant tables (``variant_table``): a method's ablation or memory-mode variants, internal and external AUC.
LaTeX uses ``booktabs`` rules and needs only ``\\usepackage{booktabs}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.table import Table as RichTable

from .store import atomic_write_text, collect_metrics

__all__ = ["Table", "fmt", "summary_rich_table", "table1", "table2", "variant_table", "write_table"]

METRIC_NAMES = {"auc": "AUC", "acc": "ACC", "balanced_acc": "BACC", "f1": "F1"}


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


def fmt(mean: float, std: float, scale: float = 100.0) -> str:
    """``79.6 ± 0.7`` (percent, one decimal); ``–`` when missing; no ``± nan`` for a single fold."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean * scale:.1f}"
    return f"{mean * scale:.1f} ± {std * scale:.1f}"


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
    """Rows method × cohort, columns AUC/ACC/BACC/F1 mean ± SD (the terminal table of ``bench run``)."""
    table = RichTable(title=title, title_justify="left")
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
            table.add_row(
                method, "internal (test)" if cohort == "test" else f"external: {cohort}", *cells, str(n)
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
        "Internal patient-level stratified cross-validation: test AUC (%), mean ± SD over folds; "
        "best per task in bold."
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
    caption = "External validation: each fold's model tested on the external cohort; % mean ± SD over folds."
    return Table(header, rows, bold, caption, "tab:external")


def variant_table(
    out: Path, task: str, variants: Sequence[tuple[str, str]], caption: str, label: str
) -> Table:
    """Rows = (display name, method name on disk); columns internal AUC and AUC on each external cohort."""
    stats = _stats(collect_metrics(out, task))
    externals = sorted(set(stats.index.get_level_values("cohort")) - {"test", "val"}) if len(stats) else []
    cohorts = ["test", *externals]
    header = ["Configuration", "Internal AUC"] + [f"External ({c}) AUC" for c in externals]
    cols = {c: [_get(stats, m, c, "auc") for _, m in variants] for c in cohorts}
    flags = {c: _bold_best([v[0] for v in cols[c]]) for c in cohorts}
    rows = [[name] + [fmt(*cols[c][i]) for c in cohorts] for i, (name, _) in enumerate(variants)]
    bold = [[False] + [flags[c][i] for c in cohorts] for i in range(len(variants))]
    return Table(header, rows, bold, caption, label)


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

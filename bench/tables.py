"""Small results tables rendered as markdown and LaTeX (``booktabs``; needs only ``\\usepackage{booktabs}``),
and the number formats every table of bench shares."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .fsio import atomic_write_text

__all__ = [
    "Table",
    "bold_best",
    "cohort_label",
    "fmt",
    "fmt_ci",
    "fmt_diff",
    "fmt_p",
    "method_order",
    "safe_stem",
    "write_table",
]


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


def fmt_diff(d: float) -> str:
    return "–" if math.isnan(d) else f"{d * 100:+.1f}"


def bold_best(values: list[float]) -> list[bool]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    best = max(finite) if finite else None
    return [best is not None and v == best for v in values]


def method_order(methods: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    order = list(preferred or [])
    return [m for m in order if m in methods] + sorted(m for m in methods if m not in order)


def cohort_label(cohort: str) -> str:
    return "internal" if cohort == "test" else f"ext. {cohort}"


def safe_stem(name: str) -> str:
    """``name`` (a method with a variant, a cohort) as a file name stem."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def write_table(table: Table, folder: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """Write ``stem.md`` and/or ``stem.tex`` into ``folder``; returns the paths written."""
    written = []
    for f in formats:
        path = Path(folder) / f"{stem}.{'md' if f == 'markdown' else 'tex'}"
        atomic_write_text(path, table.markdown() if f == "markdown" else table.latex())
        written.append(path)
    return written

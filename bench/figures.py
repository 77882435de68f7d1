"""Figures of the report, in one style sized for a paper column (3.5 in wide), saved as PNG and SVG.

Figures are built with matplotlib's object API (``Figure``, no ``pyplot``), so no window and no global figure
state is involved; rendering is Agg (PNG) and SVG. Every figure function returns a ``Figure``;
:func:`save_figure` writes it.

- :func:`roc_figure`: ROC curves per method (pooled out-of-fold, or the folds' mean curve on an external cohort);
- :func:`fold_auc_figure`: box + strip plot of the fold AUCs per method and cohort;
- :func:`calibration_figure`: reliability curves (``sklearn.calibration.calibration_curve``, quantile bins);
- :func:`explain_figure`: a slide's patches at their coordinates, one panel per patch map.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from .stats import calibration_bins

__all__ = [
    "COLUMN_WIDTH",
    "PatchPanel",
    "calibration_figure",
    "confusion_figure",
    "explain_figure",
    "fold_auc_figure",
    "km_figure",
    "learning_curves_figure",
    "method_colors",
    "paper_style",
    "roc_figure",
    "save_figure",
]

COLUMN_WIDTH = 3.5  # inches: one column of a two-column paper
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 5.5,
    "legend.frameon": False,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "lines.linewidth": 1.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "svg.fonttype": "none",  # text stays text in the SVG (editable, searchable)
}


@contextmanager
def paper_style() -> Iterator[None]:
    """The report's matplotlib settings, active inside the block only."""
    with mpl.rc_context(STYLE):
        yield


def method_colors(methods: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One fixed colour per method, in the given order (colour-blind-safe palette, then tab20)."""
    palette = sns.color_palette("colorblind", 10) + sns.color_palette("tab20", 20)
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def save_figure(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` (300 dpi) and ``stem.svg`` into ``folder``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    with paper_style():
        for path in paths:
            fig.savefig(path)
    return paths


def _mean_roc(y: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR on ``grid`` (FPR values) averaged over the score rows (vertical averaging)."""
    tprs = []
    for row in scores:
        fpr, tpr, _ = roc_curve(y, row)
        tprs.append(np.interp(grid, fpr, tpr))
    mean = np.mean(tprs, axis=0)
    mean[0] = 0.0
    return mean


def roc_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, colors: dict[str, tuple] | None = None
) -> Figure:
    """ROC curve per method.

    Args:
        curves: method -> (labels ``(N,)``, scores ``(k, N)``): one row = one curve (pooled out-of-fold);
            several rows = folds, drawn as their mean curve (TPR averaged at each FPR), legend AUC = mean of
            the fold AUCs.
        title: axes title.
    """
    colors = colors or method_colors(list(curves))
    grid = np.linspace(0, 1, 201)
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH * 0.75, COLUMN_WIDTH * 0.75))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.6)
        for method, (y, scores) in curves.items():
            scores = np.atleast_2d(scores)
            auc = np.mean([roc_auc_score(y, row) for row in scores])
            if scores.shape[0] == 1:
                fpr, tpr, _ = roc_curve(y, scores[0])
            else:
                fpr, tpr = grid, _mean_roc(y, scores, grid)
            ax.plot(fpr, tpr, color=colors[method], label=f"{method} ({auc:.3f})")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.01),
            xlabel="False positive rate",
            ylabel="True positive rate",
            title=title,
        )
        ax.set_aspect("equal")
        ax.legend(loc="lower right", title="method (AUC)", title_fontsize=5.5, handlelength=1.2)
        fig.tight_layout()
    return fig


def fold_auc_figure(
    fold_auc: pd.DataFrame, title: str, order: Sequence[str], reference: str | None = None
) -> Figure:
    """Fold AUCs per method (rows) and cohort (hue): box plot without outlier markers, each fold a dot.

    Args:
        fold_auc: long table with columns method, fold, cohort, auc.
        order: methods top to bottom.
        reference: drawn with its name in bold.
    """
    data = fold_auc.dropna(subset=["auc"]).copy()
    data["cohort"] = data.cohort.map(lambda c: "internal (test)" if c == "test" else f"external: {c}")
    hue_order = sorted(data.cohort.unique(), key=lambda c: (not c.startswith("internal"), c))
    with paper_style():
        height = 1.0 + 0.28 * len(order) * max(1, len(hue_order)) ** 0.5
        fig = Figure(figsize=(COLUMN_WIDTH, height), layout="constrained")
        ax = fig.add_subplot()
        ax.axvline(0.5, ls="--", color="0.6", lw=0.6)
        common = {
            "data": data,
            "x": "auc",
            "y": "method",
            "hue": "cohort",
            "order": order,
            "hue_order": hue_order,
        }
        with warnings.catch_warnings():  # seaborn 0.13 still passes matplotlib's deprecated ``vert``
            warnings.simplefilter("ignore", mpl.MatplotlibDeprecationWarning)
            sns.boxplot(
                **common, ax=ax, linewidth=0.6, width=0.7, palette="pastel", showfliers=False, legend=False
            )
        sns.stripplot(
            **common, ax=ax, dodge=True, size=2.5, palette="dark", jitter=0.15, linewidth=0, legend=False
        )
        ax.set(xlabel="AUC (one dot per fold)", ylabel="", title=title)
        if reference in order:
            ax.get_yticklabels()[list(order).index(reference)].set_fontweight("bold")
        colors = sns.color_palette("dark", len(hue_order))
        handles = [mpl.lines.Line2D([], [], ls="", marker="o", ms=3, color=c) for c in colors]
        fig.legend(handles, hue_order, loc="outside lower center", ncol=len(hue_order))
    return fig


def km_figure(
    groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    title: str,
    time_unit: str = "days",
    max_cols: int = 3,
) -> Figure:
    """Kaplan-Meier curves (SciPy's ``stats.ecdf`` of right-censored times) of the predicted low- and
    high-risk patients, one panel per method, the log-rank p in the panel's title.

    Args:
        groups: method -> (time ``(N,)``, event ``(N,)``, high risk ``(N,)`` bool, log-rank p).
    """
    from scipy.stats import ecdf

    from .stats import right_censored

    methods = list(groups)
    cols = max(1, min(max_cols, len(methods)))
    rows = max(1, -(-len(methods) // cols))
    with paper_style():
        fig = Figure(
            figsize=(COLUMN_WIDTH * 0.7 * cols, COLUMN_WIDTH * 0.55 * rows + 0.3), layout="constrained"
        )
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, method in zip(axes, methods, strict=False):
            time, event, high, p = groups[method]
            for mask, name, color in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
                if mask.any():
                    km = ecdf(right_censored(time[mask], event[mask])).sf
                    ax.step(
                        np.r_[0.0, km.quantiles],
                        np.r_[1.0, km.probabilities],
                        where="post",
                        color=color,
                        lw=0.8,
                        label=f"{name} ({int(mask.sum())})",
                    )
            ax.set(
                title=f"{method} (log-rank p = {p:.3g})", xlabel=time_unit, ylabel="survival", ylim=(0, 1.02)
            )
            ax.legend(loc="lower left", fontsize=5)
        for ax in axes[len(methods) :]:
            ax.set_axis_off()
        fig.suptitle(title)
    return fig


def confusion_figure(
    matrices: dict[str, np.ndarray], classes: Sequence[str], title: str, max_cols: int = 3
) -> Figure:
    """Confusion matrix per method (rows true class, columns predicted), each row as the share of its class's
    patients (the diagonal: per-class recall), with the patient counts written in the cells.

    Args:
        matrices: method -> counts ``(C, C)``.
        classes: class names, in index order.
    """
    methods = list(matrices)
    cols = max(1, min(max_cols, len(methods)))
    rows = max(1, -(-len(methods) // cols))
    side = COLUMN_WIDTH * 0.62
    with paper_style():
        fig = Figure(figsize=(side * cols, side * rows + 0.3), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, method in zip(axes, methods, strict=False):
            counts = np.asarray(matrices[method], dtype=float)
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
            for (i, j), n in np.ndenumerate(counts):
                ax.text(
                    j,
                    i,
                    f"{int(n)}",
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white" if share[i, j] > 0.6 else "black",
                )
            ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
            ax.set_yticks(range(len(classes)), classes)
            ax.set(title=method, xlabel="predicted", ylabel="true")
        for ax in axes[len(methods) :]:
            ax.set_axis_off()
        fig.suptitle(title)
    return fig


def learning_curves_figure(curves: pd.DataFrame, title: str, order: Sequence[str]) -> Figure:
    """Validation score against optimiser updates, one panel per method, one line per fold; a fold's kept
    (best) epoch is a dot, and a fold that ended on its epoch cap rather than a plateau is drawn dashed.

    Args:
        curves: long table with columns method, fold, updates, score, kept (bool), capped (bool), metric.
        order: methods, one panel each, in reading order.
    """
    ncols = min(3, max(1, len(order)))
    nrows = int(np.ceil(len(order) / ncols))
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH * 2, 1.5 * nrows + 0.5), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()  # own y axis: monitors differ
        for ax, method in zip(axes, order, strict=False):
            mine = curves[curves.method == method]
            for k, (fold, g) in enumerate(mine.groupby("fold", sort=True)):
                color = sns.color_palette("colorblind")[k % 10]
                ls = "--" if g.capped.iloc[0] else "-"
                ax.plot(g.updates, g.score, ls=ls, lw=0.8, color=color, label=f"fold {fold}")
                ax.plot(g.updates[g.kept], g.score[g.kept], "o", ms=2.5, color=color)
            metric = mine.metric.iloc[0] if len(mine) else ""
            ax.set(title=method, xlabel="optimiser updates", ylabel=f"validation {metric}")
        for ax in axes[len(order) :]:
            ax.set_visible(False)
        axes[0].legend(fontsize=5, handlelength=1.2)
        fig.suptitle(title)
    return fig


def calibration_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, colors: dict[str, tuple] | None = None
) -> Figure:
    """Reliability curve per method: observed positive fraction against mean predicted probability.

    Args:
        curves: method -> (labels ``(N,)``, probabilities ``(N,)``); quantile bins, as many as
            :func:`bench.stats.calibration_bins` gives (about 15 patients each, 3 to 10: the bins of the ECE),
            so sparse probability ranges do not make empty bins.
    """
    colors = colors or method_colors(list(curves))
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH * 0.75, COLUMN_WIDTH * 0.75))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.6, label="perfectly calibrated")
        for method, (y, p) in curves.items():
            bins = calibration_bins(len(y))
            frac, mean_p = calibration_curve(y, np.clip(p, 0, 1), n_bins=bins, strategy="quantile")
            ax.plot(mean_p, frac, marker="o", ms=2.5, color=colors[method], label=method)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="Mean predicted probability",
            ylabel="Observed positive fraction",
            title=title,
        )
        ax.set_aspect("equal")
        ax.legend(loc="upper left", handlelength=1.2)
        fig.tight_layout()
    return fig


@dataclass
class PatchPanel:
    """One map of a slide's patches.

    Attributes:
        title: panel title.
        values: one value per patch ``(N,)`` (float, or integer codes when ``categories`` is given).
        cmap: colormap name (continuous values).
        categories: labels of the integer codes 0..C−1, with ``colors``; None for continuous values.
        vmin, vmax: colour range of continuous values.
    """

    title: str
    values: np.ndarray
    cmap: str = "viridis"
    categories: list[str] | None = None
    colors: list[tuple] | None = None
    vmin: float = 0.0
    vmax: float = 1.0


def _grid_image(coords: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Patch values on the slide's grid (row = y, column = x); NaN where there is no patch."""
    xy = np.rint(coords - coords.min(axis=0)).astype(int)
    image = np.full((xy[:, 1].max() + 1, xy[:, 0].max() + 1), np.nan)
    image[xy[:, 1], xy[:, 0]] = values
    return image


def explain_figure(coords: np.ndarray, panels: Sequence[PatchPanel], title: str) -> Figure:
    """The slide's patches drawn at their grid coordinates, one panel per map, two panels per row.

    Args:
        coords: grid coordinates ``(N, 2)`` (x, y), one patch = 1.
        panels: the maps to draw, each with N values.
        title: figure title (method, slide, fold, prediction).
    """
    ncols = 1 if len(panels) == 1 else 2
    nrows = int(np.ceil(len(panels) / ncols))
    extent = np.ptp(coords, axis=0) + 1
    panel_w = COLUMN_WIDTH / ncols
    panel_h = panel_w * min(1.6, max(0.5, extent[1] / extent[0])) + 0.45
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH, panel_h * nrows + 0.3), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, panel in zip(axes, panels, strict=False):
            image = _grid_image(coords, panel.values)
            if panel.categories is None:
                cmap = mpl.colormaps[panel.cmap].copy()
                norm = mpl.colors.Normalize(panel.vmin, panel.vmax)
            else:
                cmap = ListedColormap(panel.colors)
                norm = BoundaryNorm(np.arange(len(panel.categories) + 1) - 0.5, len(panel.categories))
            cmap = cmap.with_extremes(bad="white")
            im = ax.imshow(image, cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(panel.title, fontsize=6.5)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("0.8")
            if panel.categories is None:
                bar = fig.colorbar(im, ax=ax, location="bottom", shrink=0.8, aspect=25, pad=0.02)
                bar.ax.tick_params(labelsize=5, width=0.4, length=2)
                bar.outline.set_linewidth(0.4)
            else:
                handles = [mpl.patches.Patch(color=c) for c in panel.colors]
                ax.legend(
                    handles,
                    panel.categories,
                    loc="upper center",
                    bbox_to_anchor=(0.5, 0.0),
                    ncol=min(4, len(handles)),
                    fontsize=5,
                    handlelength=0.8,
                    handleheight=0.8,
                    columnspacing=0.6,
                    handletextpad=0.3,
                    borderaxespad=0.2,
                )
        for ax in axes[len(panels) :]:
            ax.set_axis_off()
        fig.suptitle(title, fontsize=6.5)
    return fig

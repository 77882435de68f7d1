"""The tables and figures of a sweep, in ``<out>/<task>/report/``: each outer fold's best trial, the
sensitivity of the validation AUC to each searched parameter, the optimisation history, and AUC against each
parameter (bench/sweep.py says what the searches are)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .figures import COLUMN_WIDTH, paper_style, save_figure
from .studies import complete_by_fold, complete_trials
from .tables import Table, fmt, write_table

__all__ = ["write_sweep_report"]


def _inner_sd(trial: Any) -> float:
    """SD over inner folds of a trial's validation AUCs (NaN with fewer than two)."""
    aucs = [a for a in trial.user_attrs.get("inner_val_auc", []) if a is not None and not math.isnan(a)]
    return float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan")


def _value_text(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pooled(studies: Mapping[int, Any]) -> Any:
    """An in-memory study of every finished trial of every outer fold, each with user attributes
    ``outer_fold`` and ``trial`` (its number in its own study): what the sensitivity analysis reads."""
    import optuna

    pooled = optuna.create_study(direction="maximize")
    for k, study in sorted(studies.items()):
        for t in study.trials:
            if not t.state.is_finished():
                continue
            pooled.add_trial(
                optuna.trial.create_trial(
                    state=t.state,
                    values=None if t.state == optuna.trial.TrialState.FAIL else t.values,
                    params=t.params,
                    distributions=t.distributions,
                    user_attrs={**t.user_attrs, "outer_fold": k, "trial": t.number},
                    intermediate_values=t.intermediate_values,
                )
            )
    return pooled


def write_sweep_report(
    studies: Mapping[int, Any], out: Path, task: str, method: str, formats: Sequence[str]
) -> list[Path]:
    """``sweep_<M>.{md,tex}`` (each outer fold's best trial: what ``M[best]`` runs there),
    ``sweep_<M>_sensitivity.{md,tex}`` and the figures (over every outer fold's trials pooled), in
    ``<out>/<task>/report/``."""
    import optuna

    folder = Path(out) / task / "report"
    best_by_fold = complete_by_fold(studies, method)
    pooled = _pooled(studies)
    params = sorted({p for t in pooled.trials for p in t.params})
    state = optuna.trial.TrialState
    rows = []
    for k, trials in best_by_fold.items():
        best, states = trials[0], [t.state for t in studies[k].trials]
        counts = f"{states.count(state.COMPLETE)}/{states.count(state.PRUNED)}/{states.count(state.FAIL)}"
        rows.append(
            [str(k), str(best.number), counts, fmt(best.value, _inner_sd(best))]
            + [_value_text(best.params.get(p, "–")) for p in params]
        )
    inner = _inner_folds(studies)
    caption = (
        f"Nested Optuna sweep of {method} on {task}: one search per outer fold, on that fold's training and "
        "validation patients only ("
        + ("scored on the fold's validation patients" if inner == 1 else f"scored by a {inner}-fold inner CV")
        + f"); each row is that search's best trial, whose configuration {method}[best] runs on that fold. "
        "The outer test folds and the external cohorts were not used. Trials: complete/pruned/failed. "
        "Val AUC (%): the best trial's validation AUC"
        + ("" if inner == 1 else ", mean ± SD over the inner folds")
        + "."
    )
    header = ["Fold", "Trial", "Trials", "Val AUC", *params]
    table = Table(header, rows, [[False] * len(header) for _ in rows], caption, f"tab:sweep-{method}")
    written = write_table(table, folder, f"sweep_{method}", formats)
    complete = sorted(complete_trials(pooled), key=lambda t: -t.value)
    scored, folds = _common_fold_scores(pooled, complete)
    sensitivity = _sensitivity_table(pooled, complete, scored, folds, method, params, len(studies))
    if sensitivity is not None:
        written += write_table(sensitivity, folder, f"sweep_{method}_sensitivity", formats)
    return written + _figures(pooled, scored, folds, folder, method, params)


def _inner_folds(studies: Mapping[int, Any]) -> int:
    return max(study.user_attrs.get("search", {}).get("inner_folds", 1) for study in studies.values())


def _common_fold_scores(study: Any, complete: Sequence[Any]) -> tuple[list[tuple[Any, float]], int | None]:
    """``(trial, running mean AUC)`` of every complete and pruned trial on the first folds that all of them
    finished, and how many folds that is; the complete trials' means (and None) when none was pruned.
    Pruning ends weak trials early, so ranking the complete trials alone would hide the weak settings."""
    import optuna

    pruned = optuna.trial.TrialState.PRUNED
    reported = [t for t in study.trials if t.state == pruned and t.intermediate_values]
    if not reported:
        return [(t, t.value) for t in complete], None
    reported += [t for t in complete if t.intermediate_values]
    step = min(max(t.intermediate_values) for t in reported)
    return [(t, t.intermediate_values[step]) for t in sorted(reported, key=lambda t: t.number)], step + 1


def _sensitivity_table(
    study: Any,
    complete: Sequence[Any],
    scored: Sequence[tuple[Any, float]],
    folds: int | None,
    method: str,
    params: Sequence[str],
    outer_folds: int,
) -> Any:
    """Per searched parameter, over the trials of every outer fold's search pooled (``study``, from
    :func:`_pooled`): its fANOVA importance (Optuna, seeded, complete trials) and the Spearman correlation of
    its value with the validation AUC over all trials on their common inner folds
    (:func:`_common_fold_scores`); the caption sets the spread between trials against the inner-fold noise of
    one trial's mean (with inner CV), so a reader sees whether the search found more than noise. None with
    fewer than three complete trials."""
    import optuna
    from scipy.stats import spearmanr

    if len(complete) < 3 or not params:
        return None
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=list(params)
        )
    except RuntimeError:  # fANOVA's "zero total variance": every trial scored the same, nothing to share out
        importance = {}
    rows = []
    for p in params:
        pairs = [(t.params[p], y) for t, y in scored if p in t.params]
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        defined = all(isinstance(x, int | float) for x in xs) and len(set(xs)) > 1 and len(set(ys)) > 1
        rho, pval = spearmanr(xs, ys) if defined else (math.nan, math.nan)
        rows.append(
            [
                p,
                f"{importance[p]:.2f}" if p in importance else "–",
                "–" if math.isnan(rho) else f"{rho:+.2f}",
                "–" if math.isnan(pval) else f"{pval:.2g}",
                str(len(pairs)),
            ]
        )
    caption = _sensitivity_caption(complete, scored, folds, method, outer_folds)
    bold = [[False] * 5 for _ in rows]
    return Table(
        ["Parameter", "Importance", "Spearman ρ", "p", "Trials"],
        rows,
        bold,
        caption,
        f"tab:sweep-{method}-sensitivity",
    )


def _sensitivity_caption(
    complete: Sequence[Any],
    scored: Sequence[tuple[Any, float]],
    folds: int | None,
    method: str,
    outer_folds: int,
) -> str:
    """The sensitivity table's caption: what was pooled, and the spread between trials against one trial's
    inner-fold noise."""
    means = np.array([t.value for t in complete])
    fold_sd = [sd for t in complete if not math.isnan(sd := _inner_sd(t))]
    noise = ""
    if fold_sd:
        k = int(np.median([len(t.user_attrs.get("inner_val_auc", [])) for t in complete]))
        noise = (
            f"; the standard error of one trial's mean from its inner-fold noise is about "
            f"{np.median(fold_sd) / math.sqrt(max(k, 1)) * 100:.1f} (median inner-fold SD "
            f"{np.median(fold_sd) * 100:.1f}, {k} inner folds)"
        )
    rho_over = (
        f"over the {len(complete)} complete trials"
        if folds is None
        else f"over all {len(scored)} trials, complete and pruned, on the first {folds} inner fold(s) that all of "
        "them finished (pruning stops weak settings early, so the complete trials alone would hide them)"
    )
    caption = (
        f"Sensitivity of {method}'s validation AUC to each searched parameter, over the trials of the "
        f"{outer_folds} outer folds' searches pooled (each scores its own validation patients, so differences "
        "between folds add to the spread): fANOVA importance (share of the "
        f"explained variance, {len(complete)} complete trials) and Spearman's rho with its p-value {rho_over}. "
        f"Mean validation AUC of the complete trials: {means.mean() * 100:.1f} ± {means.std(ddof=1) * 100:.1f} "
        f"(range {means.min() * 100:.1f}–{means.max() * 100:.1f}){noise}. Importances over few, noisy trials "
        "are themselves noisy."
    )
    return caption


_SIZE = (COLUMN_WIDTH, COLUMN_WIDTH * 0.7)


def _figures(
    study: Any,
    scored: Sequence[tuple[Any, float]],
    folds: int | None,
    folder: Path,
    method: str,
    params: Sequence[str],
) -> list[Path]:
    """From the pooled trials of every outer fold (:func:`_pooled`): the optimisation history of each outer
    fold's search, and the validation AUC against each numeric searched parameter. PNG and SVG, in the
    report's figure style."""
    written = save_figure(_history_figure(study, method), folder, f"sweep_{method}_history")
    for p in params:
        fig = _parameter_figure(study, scored, folds, method, p)
        if fig is not None:
            written += save_figure(fig, folder, f"sweep_{method}_{p}")
    return written


def _history_figure(study: Any, method: str) -> Any:
    """Each outer fold's trials and best so far; pruned trials as grey crosses at their last running mean."""
    import optuna
    from matplotlib.figure import Figure

    complete = sorted(complete_trials(study), key=lambda t: t.number)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    with paper_style():
        fig = Figure(figsize=_SIZE)
        ax = fig.add_subplot()
        for k in sorted({t.user_attrs["outer_fold"] for t in complete}):
            mine = [t for t in complete if t.user_attrs["outer_fold"] == k]
            number, value = [t.user_attrs["trial"] for t in mine], [t.value for t in mine]
            (points,) = ax.plot(number, value, "o", ms=3, alpha=0.6)
            best = np.maximum.accumulate(value)
            ax.step(number, best, where="post", color=points.get_color(), label=f"fold {k}: best so far")
        if pruned:
            ax.plot(
                [t.user_attrs["trial"] for t in pruned],
                [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                "x",
                ms=3,
                color="grey",
                label="pruned (last running mean)",
            )
        ax.set(
            xlabel="trial of the fold's search",
            ylabel="validation AUC",
            title=f"{method}: optimisation history",
        )
        ax.legend()
        fig.tight_layout()
    return fig


def _parameter_figure(
    study: Any, scored: Sequence[tuple[Any, float]], folds: int | None, method: str, p: str
) -> Any:
    """Validation AUC against parameter ``p`` on the inner folds every trial finished when some were pruned
    (:func:`_common_fold_scores`), with the mean per value for a discrete parameter, on a log axis for a
    parameter searched on a log scale (or powers of two); None for a non-numeric parameter."""
    import optuna
    from matplotlib.figure import Figure

    complete_state = optuna.trial.TrialState.COMPLETE
    points = [(t.params[p], y, t.state == complete_state) for t, y in scored if p in t.params]
    if not points or not all(isinstance(x, int | float) for x, _, _ in points):
        return None
    xs, ys = np.array([x for x, _, _ in points], dtype=float), np.array([y for _, y, _ in points])
    done = np.array([c for _, _, c in points])
    dist = next(t.distributions[p] for t in complete_trials(study) if p in t.params)
    ylabel = "validation AUC" if folds is None else f"validation AUC, first {folds} inner fold(s)"
    with paper_style():
        fig = Figure(figsize=_SIZE)
        ax = fig.add_subplot()
        ax.plot(xs[done], ys[done], "o", ms=3, alpha=0.7, label="complete trial")
        if (~done).any():
            ax.plot(xs[~done], ys[~done], "x", ms=3, color="grey", label="pruned trial")
        levels = np.unique(xs)
        if not isinstance(dist, optuna.distributions.FloatDistribution):
            ax.plot(levels, [ys[xs == v].mean() for v in levels], "-", label="mean per value")
        powers_of_two = xs.min() > 0 and np.allclose(np.log2(levels), np.round(np.log2(levels)))
        if getattr(dist, "log", False) or (powers_of_two and xs.max() / xs.min() >= 8):
            ax.set_xscale("log", base=2 if powers_of_two else 10)
        ax.set(xlabel=p, ylabel=ylabel, title=f"{method}: validation AUC against {p}")
        ax.legend()
        fig.tight_layout()
    return fig

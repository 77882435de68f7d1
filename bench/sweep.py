"""``bench sweep M --task T``: Optuna search of a method's hyper-parameters on the validation folds; the best
configuration is then run as method ``M[best]`` on the usual folds and reported like any method.

- Objective: the mean validation AUC (patient level) over the CV folds. A trial trains each fold's model on
  the fold's training patients and selects it on its validation patients (``runner.train_fold``), which
  reads and predicts nothing else: no test part and no external cohort is seen while searching. Trial
  results live in the study's storage only; no fold folder is written.
- Search space: the method's ``search_space(trial)`` (names = config fields). ``params`` restricts it: a
  name left out is never suggested, so it keeps its default and is neither sampled nor recorded.
- Sampler: TPE, seeded from the task seed (or ``sampler_seed``), the trials already in the study and the
  worker index; its first ``min(10, max(2, trials // 2))`` trials are random. Pruning: MedianPruner (after
  five finished trials) on the running mean of the folds' AUCs, reported after each fold, from the second
  fold on.
- Storage: ``<out>/<task>/sweeps/<M>.db`` (SQLite) by default; ``storage`` takes any Optuna RDB URL, e.g.
  ``postgresql://user:pw@host/db`` for workers on many machines (heartbeats mark a dead worker's trial
  failed and retry it), or an Optuna journal file, ``journal:<path>`` or any path ending in ``.journal``
  (for a shared file system, where SQLite's locking breaks). ``postgresql://`` URLs use psycopg 3 (the
  ``postgres`` extra). Workers share a study through its storage and name: ``--workers N`` here (the trials
  are split among them), or separate processes on any machines given the same ``--storage`` and
  ``--study-name`` (each runs its own ``--trials``; give each its own ``--sampler-seed``).
- Output: ``<out>/<task>/sweeps/<M>/best.yaml`` (read by the runner for ``M[best]``), and in
  ``<out>/<task>/report/``: ``sweep_<M>.{md,tex}`` (best trial, top trials),
  ``sweep_<M>_sensitivity.{md,tex}`` (per parameter: fANOVA importance, Spearman's rho, and the spread
  between trials against one trial's fold noise) and the figures
  ``sweep_<M>_history.png|.svg`` (optimisation history) and ``sweep_<M>_<param>.png`` (AUC against each
  searched parameter: the sensitivity analysis, e.g. margin and memory size for MoMKD).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from methods import get_method_class
from methods.registry import UnknownMethodError, parse_method_name

from .errors import BenchError
from .locks import HOST
from .runner import RunOptions, TaskData, method_config, prepare_task, resolve_device, train_fold
from .store import atomic_write_text

__all__ = [
    "SweepOptions",
    "best_path",
    "load_best",
    "make_storage",
    "restricted_overrides",
    "search",
    "space_names",
    "storage_url",
    "write_best",
    "write_sweep_report",
]

TOP_TRIALS = 10


@dataclass(frozen=True)
class SweepOptions:
    """What ``bench sweep`` searches and where the study lives (``--workers`` etc. are in RunOptions)."""

    method: str
    params: tuple[str, ...] | None = None  # None: the method's whole search space
    trials: int = 20
    timeout: float | None = None  # seconds, per worker
    storage: str | None = None  # None: SQLite file in the output folder
    study_name: str | None = None  # None: "<task>-<method>"
    sampler_seed: int | None = None  # None: the task seed
    pruning: bool = True


def best_path(out: Path, task: str, method: str) -> Path:
    return Path(out) / task / "sweeps" / method / "best.yaml"


def load_best(out: Path, task: str, method: str) -> dict[str, Any]:
    """The config overrides of ``method``'s best sweep trial on ``task`` (what ``method[best]`` runs)."""
    path = best_path(out, task, method)
    if not path.is_file():
        raise BenchError(
            f"{path}: no sweep result for {method!r} on task {task!r}, so '{method}[best]' is undefined. "
            f"Run `bench sweep {method} --task <task> --out {out}` first."
        )
    return dict((yaml.safe_load(path.read_text()) or {}).get("overrides") or {})


# ----------------------------------------------------------------------------------------------- search space


class _Restricted:
    """A trial whose ``suggest_*`` answers None for parameter names outside ``allowed`` (None: all names)."""

    def __init__(self, trial: Any, allowed: set[str] | None) -> None:
        self._trial, self._allowed = trial, allowed

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._trial, name)
        if not name.startswith("suggest_") or self._allowed is None:
            return attr

        def suggest(param: str, *args: Any, **kwargs: Any) -> Any:
            return attr(param, *args, **kwargs) if param in self._allowed else None

        return suggest


def restricted_overrides(cls: type, trial: Any, allowed: Sequence[str] | None) -> dict[str, Any]:
    """The config overrides ``cls.search_space`` draws from ``trial``, only for names in ``allowed``."""
    space = cls.search_space(_Restricted(trial, None if allowed is None else set(allowed)))
    return {k: v for k, v in space.items() if v is not None}


def space_names(cls: type) -> list[str]:
    """The names a method's search space declares (each must be the config field its suggestion sets)."""
    import optuna

    trial = optuna.create_study().ask()
    keys = set(cls.search_space(trial))
    if keys != set(trial.params):
        raise ValueError(
            f"{cls.__name__}.search_space must name each suggestion after the config field it sets "
            f"(keys {sorted(keys)}, suggested {sorted(trial.params)})."
        )
    return sorted(keys)


# ------------------------------------------------------------------------------------------------- storage


def storage_url(spec: str | None, out: Path, task: str, method: str) -> str:
    """The study's storage as a string workers can rebuild it from (paths made absolute)."""
    if spec is None:
        path = (Path(out) / task / "sweeps" / f"{method}.db").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if spec.startswith("journal:") or spec.endswith(".journal"):
        return "journal:" + str(Path(spec.removeprefix("journal:")).expanduser().resolve())
    if spec.startswith(("postgresql://", "postgres://")):  # psycopg 3 whatever SQLAlchemy's default driver
        return "postgresql+psycopg://" + spec.split("://", 1)[1]
    if "://" not in spec:
        raise BenchError(
            f"--storage {spec!r}: give an Optuna storage URL (sqlite:///path.db, postgresql://user:pw@host/db, "
            "mysql://...) or a journal file (journal:<path> or a path ending in .journal)."
        )
    return spec


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def make_storage(url: str) -> Any:
    """An Optuna storage for ``url``: a journal file, or an RDB with heartbeats (a dead worker's trial is
    marked failed after two missed minutes and retried up to twice)."""
    import optuna

    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    # Workers started together on a fresh database race to create Optuna's schema; the losers' attempt
    # fails on a duplicate object and succeeds when retried, so a few attempts are made before giving up.
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=60,
                    grace_period=120,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=2
                    ),
                )
        except ImportError as exc:
            raise BenchError(
                f"--storage {_redact(url)}: its database driver is not installed ({exc}). For PostgreSQL: "
                "pip install -e '.[postgres]'."
            ) from exc
        except Exception as exc:  # sqlalchemy's connection, URL and schema-creation errors
            if attempt == 2:
                raise BenchError(f"--storage {_redact(url)}: cannot open the study storage ({exc}).") from exc
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _study(url: str, name: str, seed: int, trials: int, pruning: bool) -> Any:
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 2)))
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if pruning else optuna.pruners.NopPruner()
    return optuna.create_study(
        study_name=name,
        storage=make_storage(url),
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )


# -------------------------------------------------------------------------------------------------- search


def _objective(data: TaskData, sw: SweepOptions, opts: RunOptions, device: Any) -> Any:
    import optuna

    cls = get_method_class(sw.method)
    aggregation = data.task.patient_aggregation

    def objective(trial: optuna.Trial) -> float:
        overrides = restricted_overrides(cls, trial, sw.params)
        cfg = method_config(data, sw.method, opts, overrides)
        trial.set_user_attr("worker", f"{HOST}:{os.getpid()}")
        aucs: list[float] = []
        for fold in range(data.folds):
            fitted = train_fold(data, fold, sw.method, cfg, device, precision=opts.precision)
            aucs.append(fitted.val_auc(aggregation))
            trial.set_user_attr("fold_val_auc", aucs)
            trial.report(float(np.nanmean(aucs)), fold)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.nanmean(aucs))

    return objective


def _seed(base: int, existing: int, worker: int) -> int:
    return int(np.random.SeedSequence([base, existing, worker]).generate_state(1)[0])


def _optimize(
    data: TaskData,
    sw: SweepOptions,
    opts: RunOptions,
    url: str,
    name: str,
    n_trials: int,
    seed: int,
    device: Any,
    callbacks: Sequence[Any] = (),
) -> None:
    study = _study(url, name, seed, sw.trials, sw.pruning)
    study.optimize(
        _objective(data, sw, opts, device), n_trials=n_trials, timeout=sw.timeout, callbacks=list(callbacks)
    )


def _worker(
    data: TaskData,
    sw: SweepOptions,
    opts: RunOptions,
    url: str,
    name: str,
    n_trials: int,
    seed: int,
    slot: int,
    workers: int,
) -> None:
    """One sweep worker process: its own device and thread share, the study rebuilt from its URL."""
    import optuna

    from .executors import bind_worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = bind_worker(opts.device, slot, workers)
    _optimize(data, sw, opts, url, name, n_trials, seed, device)


def search(task_ref: str, sw: SweepOptions, opts: RunOptions, progress: Any | None = None) -> Any:
    """Run ``sw.trials`` more trials of the study (split over ``opts.workers`` processes); returns the study.

    Separate processes given the same storage and study name each run their own ``sw.trials``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        _, variant = parse_method_name(sw.method)
        cls = get_method_class(sw.method)
    except UnknownMethodError as exc:
        raise BenchError(str(exc)) from exc
    if variant:
        raise BenchError(f"bench sweep takes a method name without a variant, not {sw.method!r}.")
    names = space_names(cls)
    unknown = sorted(set(sw.params or ()) - set(names))
    if unknown:
        raise BenchError(
            f"--params {','.join(unknown)}: not in the search space of {sw.method!r}, which declares "
            f"{', '.join(names)} (see its search_space)."
        )
    data = prepare_task(task_ref, opts)
    method_config(data, sw.method, opts)  # a bad task/method combination fails before any trial
    url = storage_url(sw.storage, opts.out, data.task.name, sw.method)
    name = sw.study_name or f"{data.task.name}-{sw.method}"
    base_seed = data.seed if sw.sampler_seed is None else sw.sampler_seed
    monitor = _study(url, name, 0, sw.trials, sw.pruning)
    existing = len(monitor.trials)
    bar = None
    if progress is not None:
        bar = progress.add_task(f"{data.task.name} · sweep {sw.method}", total=sw.trials)

    def advance(study: Any, trial: Any = None) -> None:
        if bar is None:
            return
        done = len([t for t in study.trials if t.state.is_finished()]) - existing
        best = _best_value(study)
        text = f"{data.task.name} · sweep {sw.method} · best val AUC {best:.3f}" if best is not None else None
        progress.update(bar, completed=min(done, sw.trials), description=text)

    workers = min(opts.workers, sw.trials)
    if workers <= 1:
        seed = _seed(base_seed, existing, 0)
        _optimize(data, sw, opts, url, name, sw.trials, seed, resolve_device(opts.device), [advance])
        return monitor
    shares = [sw.trials // workers + (i < sw.trials % workers) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [
            pool.submit(_worker, data, sw, opts, url, name, n, _seed(base_seed, existing, i), i, workers)
            for i, n in enumerate(shares)
        ]
        while True:
            finished, running = wait(futures, timeout=2.0, return_when=FIRST_EXCEPTION)
            advance(monitor)
            for future in finished:
                future.result()
            if not running:
                break
    return monitor


def _best_value(study: Any) -> float | None:
    complete = _complete(study)
    return max(t.value for t in complete) if complete else None


def _complete(study: Any) -> list[Any]:
    import optuna

    return [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None and not math.isnan(t.value)
    ]


# ------------------------------------------------------------------------------------------------- results


def write_best(study: Any, out: Path, task: str, method: str, url: str | None = None) -> Path:
    """Write the best complete trial's overrides to ``<out>/<task>/sweeps/<M>/best.yaml``."""
    import optuna

    complete = _complete(study)
    if not complete:
        raise BenchError(
            f"study {study.study_name!r} has no complete trial of {method!r} yet (all pruned or failed?); "
            "run more trials."
        )
    best = max(complete, key=lambda t: t.value)
    overrides = restricted_overrides(
        get_method_class(method), optuna.trial.FixedTrial(best.params, best.number), list(best.params)
    )
    record = {
        "method": method,
        "task": task,
        "study": study.study_name,
        "storage": None if url is None else _redact(url),
        "trial": best.number,
        "mean_val_auc": best.value,
        "fold_val_auc": best.user_attrs.get("fold_val_auc"),
        "trials_complete": len(complete),
        "overrides": overrides,
    }
    path = best_path(out, task, method)
    atomic_write_text(path, yaml.safe_dump(_plain(record), sort_keys=False))
    return path


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _fold_sd(trial: Any) -> float:
    """SD over folds of a trial's validation AUCs (NaN with fewer than two)."""
    folds = [a for a in trial.user_attrs.get("fold_val_auc", []) if a is not None and not math.isnan(a)]
    return float(np.std(folds, ddof=1)) if len(folds) > 1 else float("nan")


def _value_text(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_sweep_report(study: Any, out: Path, task: str, method: str, formats: Sequence[str]) -> list[Path]:
    """``sweep_<M>.{md,tex}`` (best trial, top trials), ``sweep_<M>_sensitivity.{md,tex}`` and the figures,
    in ``<out>/<task>/report/``."""
    import optuna

    from .report import Table, fmt, write_table

    folder = Path(out) / task / "report"
    complete = sorted(_complete(study), key=lambda t: -t.value)
    if not complete:
        raise BenchError(f"study {study.study_name!r} has no complete trial to report.")
    states = [t.state for t in study.trials]
    params = sorted({p for t in study.trials for p in t.params})
    top = complete[:TOP_TRIALS]
    rows, bold = [], []
    for rank, t in enumerate(top, 1):
        rows.append(
            [
                str(rank),
                str(t.number),
                fmt(t.value, _fold_sd(t)),
                *(_value_text(t.params.get(p, "–")) for p in params),
            ]
        )
        bold.append([False, False, rank == 1, *([False] * len(params))])
    best = complete[0]
    caption = (
        f"Optuna sweep of {method} on {task} (study {study.study_name}): "
        f"{states.count(optuna.trial.TrialState.COMPLETE)} complete, "
        f"{states.count(optuna.trial.TrialState.PRUNED)} pruned, "
        f"{states.count(optuna.trial.TrialState.FAIL)} failed trials. Best: trial {best.number}, "
        f"mean validation AUC {best.value * 100:.1f} % with "
        f"{', '.join(f'{k} = {_value_text(v)}' for k, v in sorted(best.params.items())) or 'the defaults'}. "
        f"Top {len(top)} trials by validation AUC (%), mean ± SD over folds; test and external cohorts "
        "were not used."
    )
    table = Table(["Rank", "Trial", "Val AUC", *params], rows, bold, caption, f"tab:sweep-{method}")
    written = write_table(table, folder, f"sweep_{method}", formats)
    scored, folds = _common_fold_scores(study, complete)
    sensitivity = _sensitivity_table(study, complete, scored, folds, method, params)
    if sensitivity is not None:
        written += write_table(sensitivity, folder, f"sweep_{method}_sensitivity", formats)
    return written + _figures(study, scored, folds, folder, method, params)


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
) -> Any:
    """Per searched parameter: its fANOVA importance (Optuna, seeded, complete trials) and the Spearman
    correlation of its value with the validation AUC over all trials on their common folds
    (:func:`_common_fold_scores`); the caption sets the spread between trials against the fold noise of one
    trial's mean, so a reader sees whether the search found more than noise. None with fewer than three
    complete trials."""
    import optuna
    from scipy.stats import spearmanr

    from .report import Table

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
    means = np.array([t.value for t in complete])
    fold_sd = [sd for t in complete if not math.isnan(sd := _fold_sd(t))]
    noise = ""
    if fold_sd:
        k = int(np.median([len(t.user_attrs.get("fold_val_auc", [])) for t in complete]))
        noise = (
            f"; the standard error of one trial's mean from its fold noise is about "
            f"{np.median(fold_sd) / math.sqrt(max(k, 1)) * 100:.1f} (median fold SD {np.median(fold_sd) * 100:.1f}, "
            f"{k} folds)"
        )
    rho_over = (
        f"over the {len(complete)} complete trials"
        if folds is None
        else f"over all {len(scored)} trials, complete and pruned, on the first {folds} fold(s) that all of them "
        "finished (pruning stops weak settings early, so the complete trials alone would hide them)"
    )
    caption = (
        f"Sensitivity of {method}'s validation AUC to each searched parameter: fANOVA importance (share of the "
        f"explained variance, {len(complete)} complete trials) and Spearman's rho with its p-value {rho_over}. "
        f"Mean validation AUC of the complete trials: {means.mean() * 100:.1f} ± {means.std(ddof=1) * 100:.1f} "
        f"(range {means.min() * 100:.1f}–{means.max() * 100:.1f}){noise}. Importances over few, noisy trials "
        "are themselves noisy."
    )
    bold = [[False] * 5 for _ in rows]
    return Table(
        ["Parameter", "Importance", "Spearman ρ", "p", "Trials"],
        rows,
        bold,
        caption,
        f"tab:sweep-{method}-sensitivity",
    )


def _figures(
    study: Any,
    scored: Sequence[tuple[Any, float]],
    folds: int | None,
    folder: Path,
    method: str,
    params: Sequence[str],
) -> list[Path]:
    """The optimisation history (pruned trials as grey crosses at their last running mean), and the validation
    AUC against each numeric searched parameter, on the folds every trial finished when some were pruned
    (:func:`_common_fold_scores`), with the mean per value for a discrete parameter; a parameter searched on
    a log scale (or powers of two) is drawn on one. PNG and SVG, in the report's figure style."""
    import optuna
    from matplotlib.figure import Figure

    from .figures import COLUMN_WIDTH, paper_style, save_figure

    complete = sorted(_complete(study), key=lambda t: t.number)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    pruned_values = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
    size = (COLUMN_WIDTH, COLUMN_WIDTH * 0.7)
    written = []

    with paper_style():
        fig = Figure(figsize=size)
        ax = fig.add_subplot()
        ax.plot([t.number for t in complete], [t.value for t in complete], "o", ms=3, label="complete trial")
        if pruned:
            ax.plot(
                [t.number for t in pruned],
                pruned_values,
                "x",
                ms=3,
                color="grey",
                label="pruned (last running mean)",
            )
        ax.step(
            [t.number for t in complete],
            np.maximum.accumulate([t.value for t in complete]),
            where="post",
            label="best so far",
        )
        ax.set(xlabel="trial", ylabel="mean validation AUC", title=f"{method}: optimisation history")
        ax.legend()
        fig.tight_layout()
    written += save_figure(fig, folder, f"sweep_{method}_history")

    complete_state = optuna.trial.TrialState.COMPLETE
    ylabel = "mean validation AUC" if folds is None else f"validation AUC, first {folds} fold(s)"
    for p in params:
        points = [(t.params[p], y, t.state == complete_state) for t, y in scored if p in t.params]
        if not points or not all(isinstance(x, int | float) for x, _, _ in points):
            continue
        xs, ys = np.array([x for x, _, _ in points], dtype=float), np.array([y for _, y, _ in points])
        done = np.array([c for _, _, c in points])
        dist = next(t.distributions[p] for t in complete if p in t.params)
        with paper_style():
            fig = Figure(figsize=size)
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
        written += save_figure(fig, folder, f"sweep_{method}_{p}")
    return written

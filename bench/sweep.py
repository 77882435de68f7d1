"""``bench sweep M --task T``: a nested Optuna search of a method's hyper-parameters, one search per outer
fold, each blind to that fold's test patients; ``M[best]`` then runs each outer fold with the configuration
its own search chose, and is reported like any method.

Why nested: fold k's validation patients are test patients of other folds. A single search scored on every
fold's validation patients picks a configuration that has seen every fold's test patients, so ``M[best]``'s
test results would be optimistically biased. Here the search for outer fold k reads fold k's training and
validation patients only, and ``M[best]`` on fold k uses that search's best configuration.

- Objective of outer fold k's search (``inner_folds``): with 1 (the default), train on fold k's training
  patients and score the patient-level AUC on fold k's validation patients (the split that fold's model is
  already early-stopped and thresholded on); with J >= 2, the mean over a stratified J-fold CV of fold k's
  training and validation patients together (each inner model trained on J-1 parts, selected and scored on
  the held-out one). ``jobs.train_fold`` reads and predicts nothing else: no outer test patient and no
  external cohort is seen while searching. Trial results live in the study's storage only; no fold folder is
  written.
- Cost: ``trials`` trials per outer fold, each training ``inner_folds`` models. The default (1) costs
  ``trials x folds`` trainings, what the former single search over every fold cost for the same
  ``--trials``; inner CV multiplies that by J and scores a less noisy mean.
- Search space: the method's ``search_space(trial)`` (names = config fields). ``params`` restricts it: a
  name left out is never suggested, so it keeps its default and is neither sampled nor recorded.
- Studies: one per outer fold, ``<study name>-fold<k>``, all in one storage; each records the patients it
  searched (outer fold, digest of its membership, inner folds) and refuses to take trials of another design.
  Sampler: TPE, seeded from the task seed (or ``sampler_seed``), the trials already in the study, the worker
  index and the fold; its first ``min(10, max(2, trials // 2))`` trials are random. Pruning (inner CV only):
  MedianPruner (after five finished trials) on the running mean of the inner folds' AUCs, from the second
  inner fold on.
- Storage: ``<out>/<task>/sweeps/<M>.db`` (SQLite) by default; ``storage`` takes any Optuna RDB URL, e.g.
  ``postgresql://user:pw@host/db`` for workers on many machines (heartbeats mark a dead worker's trial
  failed and retry it), or an Optuna journal file, ``journal:<path>`` or any path ending in ``.journal``
  (for a shared file system, where SQLite's locking breaks). ``postgresql://`` URLs use psycopg 3 (the
  ``postgres`` extra). A URL's password is never shown or written (bench/redact.py). Workers share the
  studies through their storage and names: ``--workers N`` here (each outer fold's trials are split among
  them), or separate processes on any machines given the same ``--storage`` and ``--study-name`` (each runs
  its own ``--trials`` per outer fold; give each its own ``--sampler-seed``).
- Output: ``<out>/<task>/sweeps/<M>/best.yaml`` with one entry per outer fold (read by the runner for
  ``M[best]``, which refuses an entry tuned on another split of the patients), and in
  ``<out>/<task>/report/``: ``sweep_<M>.{md,tex}`` (each outer fold's best trial),
  ``sweep_<M>_sensitivity.{md,tex}`` (per parameter, over the trials of every outer fold pooled: fANOVA
  importance, Spearman's rho, and the spread between trials against one trial's inner-fold noise) and the
  figures ``sweep_<M>_history.png|.svg`` (optimisation history per outer fold) and ``sweep_<M>_<param>.png``
  (AUC against each searched parameter: the sensitivity analysis, e.g. margin and memory size for MoMKD).

Length (~420 lines): a fifth of it is this design note; the code is the search alone (storages in
bench/studies.py, best.yaml in bench/best.py, tables and figures in bench/sweep_report.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from methods import get_method_class

from .best import write_best_record
from .data.splits import check_splits, membership_digest
from .device import bind_worker, resolve_device
from .errors import BenchError
from .executors import process_pool
from .jobs import check_method, method_config, train_fold
from .locks import HOST
from .redact import redact
from .studies import complete_by_fold, make_storage, open_study, storage_url, study_name
from .taskdata import RunOptions, TaskData, prepare_task
from .tracking import Tracker, open_tracker, resolve_tracking
from .tracking.base import Trial

__all__ = [
    "SweepOptions",
    "restricted_overrides",
    "search",
    "search_folds",
    "space_names",
    "write_best",
]


@dataclass(frozen=True)
class SweepOptions:
    """What ``bench sweep`` searches and where the studies live (``--workers`` etc. are in RunOptions)."""

    method: str
    params: tuple[str, ...] | None = None  # None: the method's whole search space
    trials: int = 20  # per outer fold
    timeout: float | None = None  # seconds, per worker
    storage: str | None = None  # None: SQLite file in the output folder
    study_name: str | None = None  # None: "<task>-<method>"; outer fold k's study is "<name>-fold<k>"
    sampler_seed: int | None = None  # None: the task seed
    pruning: bool = True
    inner_folds: int = 1  # 1: each outer fold's own validation split; J >= 2: J-fold CV of its train + val


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


# -------------------------------------------------------------------------------------------------- search


def search_folds(data: TaskData, fold: int, inner_folds: int) -> list[tuple[TaskData, int]]:
    """Where outer fold ``fold``'s search trains and scores, as ``(task data, fold)`` pairs for train_fold.

    ``inner_folds`` 1: the outer fold itself (trained on its training patients, scored on its validation
    patients). J >= 2: a stratified J-fold CV of the fold's training and validation patients, seeded by the
    task seed and the fold; inner fold j trains on the other parts and is selected and scored on part j.
    The outer fold's test patients are ``test`` in every inner fold, a part train_fold never reads. Splits
    by site (``split_by: site``) get inner folds by site (stratified group J-fold).
    """
    if inner_folds == 1:
        return [(data, fold)]
    part = data.splits[f"fold_{fold}"]
    patients = data.splits[part != "test"].groupby("case_id", sort=True)["label"].first()
    counts = patients.value_counts()
    if len(counts) < 2 or counts.min() < inner_folds:
        raise BenchError(
            f"--inner-folds {inner_folds}: fold {fold}'s training and validation patients hold "
            f"{counts.to_dict()} per class, too few for a stratified {inner_folds}-fold CV. Use fewer inner "
            "folds (1: the fold's own validation split)."
        )
    by_site = "site" in data.splits.columns  # split_by: site: the inner folds keep sites apart too
    table = data.splits[["case_id", "slide_id", "label", *(["site"] if by_site else [])]].copy()
    sites = data.splits.groupby("case_id", sort=True)["site"].first()[patients.index] if by_site else None
    cv = (StratifiedGroupKFold if by_site else StratifiedKFold)(
        n_splits=inner_folds, shuffle=True, random_state=data.seed * 1000 + fold
    )
    for j, (_, held_out) in enumerate(cv.split(patients.index, patients.to_numpy(), sites)):
        inner = pd.Series("train", index=patients.index)
        inner.iloc[held_out] = "val"
        table[f"fold_{j}"] = table.case_id.map(inner).fillna("test").to_numpy()
    check_splits(table, source=f"inner CV of fold {fold}")
    inner_data = dataclasses.replace(data, splits=table, folds=inner_folds)
    return [(inner_data, j) for j in range(inner_folds)]


def _design(data: TaskData, fold: int, inner_folds: int) -> dict[str, Any]:
    return {
        "outer_fold": fold,
        "outer_folds": data.folds,
        "split": membership_digest(data.splits, fold),
        "inner_folds": inner_folds,
    }


def _objective(data: TaskData, fold: int, sw: SweepOptions, opts: RunOptions, device: Any) -> Any:
    """Outer fold ``fold``'s objective: the mean validation AUC over its search folds (:func:`search_folds`)."""
    import optuna

    cls = get_method_class(sw.method)
    aggregation = data.task.patient_aggregation
    where = search_folds(data, fold, sw.inner_folds)

    def objective(trial: optuna.Trial) -> float:
        overrides = restricted_overrides(cls, trial, sw.params)
        cfg = method_config(data, sw.method, opts, overrides)
        trial.set_user_attr("worker", f"{HOST}:{os.getpid()}")
        aucs: list[float] = []
        for step, (inner_data, inner_fold) in enumerate(where):
            fitted = train_fold(inner_data, inner_fold, sw.method, cfg, device, precision=opts.precision)
            aucs.append(fitted.val_auc(aggregation))
            trial.set_user_attr("inner_val_auc", aucs)
            trial.report(float(np.nanmean(aucs)), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.nanmean(aucs))

    return objective


def _seed(base: int, existing: int, worker: int, fold: int) -> int:
    return int(np.random.SeedSequence([base, existing, worker, fold]).generate_state(1)[0])


@dataclass(frozen=True)
class _Share:
    """A worker's part of one outer fold's search."""

    fold: int
    trials: int
    seed: int


def _optimize(
    data: TaskData,
    sw: SweepOptions,
    opts: RunOptions,
    url: str,
    shares: Sequence[_Share],
    device: Any,
    callbacks: Sequence[Any] = (),
) -> None:
    """Run this worker's shares, one outer fold after another; ``sw.timeout`` bounds them all together."""
    storage = make_storage(url)
    deadline = None if sw.timeout is None else time.monotonic() + sw.timeout
    tracker = open_tracker(opts.track, opts.out)
    for share in shares:
        left = None if deadline is None else deadline - time.monotonic()
        if share.trials == 0 or (left is not None and left <= 0):
            continue
        name = study_name(sw.study_name, data.task.name, sw.method, share.fold)
        study = open_study(
            storage, name, share.seed, sw.trials, sw.pruning, _design(data, share.fold, sw.inner_folds)
        )
        study.optimize(
            _objective(data, share.fold, sw, opts, device),
            n_trials=share.trials,
            timeout=left,
            callbacks=[*callbacks, _track_trials(tracker, data.task.name, sw.method, share.fold)],
        )


def _track_trials(tracker: Tracker, task: str, method: str, fold: int) -> Callable[[Any, Any], None]:
    """An Optuna callback logging each finished trial of outer fold ``fold`` to ``tracker``."""

    def log(study: Any, trial: Any) -> None:
        inner = tuple(trial.user_attrs.get("inner_val_auc", ()))
        record = Trial(trial.number, trial.state.name, dict(trial.params), trial.value, inner)
        tracker.trial(task, method, fold, record)

    return log


def _worker(
    data: TaskData,
    sw: SweepOptions,
    opts: RunOptions,
    url: str,
    shares: Sequence[_Share],
    slot: int,
    workers: int,
) -> None:
    """One sweep worker process: its own device and thread share, the studies rebuilt from their URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = bind_worker(opts.device, slot, workers)
    _optimize(data, sw, opts, url, shares, device)


def _shares(
    sw: SweepOptions, folds: int, workers: int, base_seed: int, existing: Mapping[int, int]
) -> list[list[_Share]]:
    """Each worker's trials of each outer fold: ``sw.trials`` per fold split evenly, the remainders spread
    over the workers, and each worker starting at another fold, so that they search different studies."""
    plan = []
    for i in range(workers):
        order = [(i + j) % folds for j in range(folds)]
        plan.append(
            [
                _Share(
                    k,
                    sw.trials // workers + ((i - k) % workers < sw.trials % workers),
                    _seed(base_seed, existing[k], i, k),
                )
                for k in order
            ]
        )
    return plan


def _run_workers(
    data: TaskData, sw: SweepOptions, opts: RunOptions, url: str, plan: list[list[_Share]], advance: Any
) -> None:
    """Each worker's shares in its own process (forked from the forkserver as ``bench run``'s pool workers,
    bench/executors.py); ``advance`` updates the progress every two seconds."""
    workers = len(plan)
    with process_pool(workers, preload=[__name__]) as pool:
        futures = [
            pool.submit(_worker, data, sw, opts, url, shares, i, workers) for i, shares in enumerate(plan)
        ]
        while True:
            finished, running = wait(futures, timeout=2.0, return_when=FIRST_EXCEPTION)
            advance()
            for future in finished:
                future.result()
            if not running:
                break


def _check_sweep(sw: SweepOptions) -> None:
    """A method without a variant, at least one inner fold, and only parameters of its search space."""
    _, variant = check_method(sw.method)
    if variant:
        raise BenchError(f"bench sweep takes a method name without a variant, not {sw.method!r}.")
    if sw.inner_folds < 1:
        raise BenchError(f"--inner-folds {sw.inner_folds}: give 1 (each fold's validation split) or more.")
    names = space_names(get_method_class(sw.method))
    unknown = sorted(set(sw.params or ()) - set(names))
    if unknown:
        raise BenchError(
            f"--params {','.join(unknown)}: not in the search space of {sw.method!r}, which declares "
            f"{', '.join(names)} (see its search_space)."
        )


def search(task_ref: str, sw: SweepOptions, opts: RunOptions, progress: Any | None = None) -> dict[int, Any]:
    """Run ``sw.trials`` more trials of each outer fold's study (split over ``opts.workers`` processes);
    returns the studies by outer fold.

    Separate processes given the same storage and study name each run their own ``sw.trials`` per fold.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _check_sweep(sw)
    if opts.features is not None and len(opts.features) > 1:
        raise BenchError("bench sweep tunes on one feature set: give one name to --features.")
    data = prepare_task(task_ref, opts, opts.features[0] if opts.features else None)
    method_config(data, sw.method, opts)  # a bad task/method combination fails before any trial
    track = resolve_tracking(opts.track, data.task.tracking, opts.out)
    if not open_tracker(track, opts.out).start(data.task.name, [sw.method], "sweep"):
        track = None
    opts = dataclasses.replace(opts, track=track)
    for k in range(data.folds):  # too few patients for the inner CV fails before any trial too
        search_folds(data, k, sw.inner_folds)
    url = storage_url(sw.storage, opts.out, data.task.name, sw.method)
    base_seed = data.seed if sw.sampler_seed is None else sw.sampler_seed
    storage = make_storage(url)
    studies = {
        k: open_study(
            storage,
            study_name(sw.study_name, data.task.name, sw.method, k),
            0,
            sw.trials,
            sw.pruning,
            _design(data, k, sw.inner_folds),
        )
        for k in range(data.folds)
    }
    existing = {k: len(study.trials) for k, study in studies.items()}
    total = sw.trials * data.folds
    title = f"{data.task.name} · sweep {sw.method} ({data.folds} outer folds)"
    bar = None if progress is None else progress.add_task(title, total=total)

    def advance(*_: Any) -> None:
        if bar is None:
            return
        trials = {k: study.trials for k, study in studies.items()}
        done = sum(len([t for t in ts if t.state.is_finished()]) - existing[k] for k, ts in trials.items())
        progress.update(bar, completed=min(done, total))

    workers = min(opts.workers, total)
    plan = _shares(sw, data.folds, max(workers, 1), base_seed, existing)
    if workers <= 1:
        _optimize(data, sw, opts, url, plan[0], resolve_device(opts.device), [advance])
    else:
        _run_workers(data, sw, opts, url, plan, advance)
    return studies


# ------------------------------------------------------------------------------------------------- results


def write_best(studies: Mapping[int, Any], out: Path, task: str, method: str, url: str | None = None) -> Path:
    """Write each outer fold's best complete trial to ``<out>/<task>/sweeps/<M>/best.yaml`` (``folds:`` one
    entry per outer fold, with the digest of the split it was searched on); the storage URL without its
    password."""
    import optuna

    complete = complete_by_fold(studies, method)
    entries, design = {}, {}
    for k, trials in complete.items():
        best = trials[0]
        design = studies[k].user_attrs.get("search", {})
        entries[k] = {
            "study": studies[k].study_name,
            "split": design.get("split"),
            "trial": best.number,
            "mean_val_auc": best.value,
            "inner_val_auc": best.user_attrs.get("inner_val_auc"),
            "trials_complete": len(trials),
            "overrides": restricted_overrides(
                get_method_class(method), optuna.trial.FixedTrial(best.params, best.number), list(best.params)
            ),
        }
    record = {
        "method": method,
        "task": task,
        "design": "nested",
        "outer_folds": design.get("outer_folds", len(entries)),
        "inner_folds": design.get("inner_folds"),
        "storage": None if url is None else redact(url),
        "folds": entries,
    }
    return write_best_record(out, task, method, record)

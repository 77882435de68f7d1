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
  the held-out one). ``runner.train_fold`` reads and predicts nothing else: no outer test patient and no
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
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sklearn.model_selection import StratifiedKFold

from methods import get_method_class
from methods.registry import UnknownMethodError, parse_method_name

from .data.splits import check_splits, membership_digest
from .errors import BenchError
from .locks import HOST
from .redact import redact, remember
from .runner import RunOptions, TaskData, method_config, prepare_task, resolve_device, train_fold
from .store import atomic_write_text

__all__ = [
    "SweepOptions",
    "best_path",
    "load_best",
    "make_storage",
    "restricted_overrides",
    "search",
    "search_folds",
    "space_names",
    "storage_url",
    "study_name",
    "tuned_by",
    "write_best",
    "write_sweep_report",
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


def best_path(out: Path, task: str, method: str) -> Path:
    return Path(out) / task / "sweeps" / method / "best.yaml"


def study_name(sw: SweepOptions, task: str, fold: int) -> str:
    """The study of outer fold ``fold``'s search."""
    return f"{sw.study_name or f'{task}-{sw.method}'}-fold{fold}"


def _best_entry(
    out: Path, data: TaskData, method: str, fold: int
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``best.yaml``'s path, record and entry for outer fold ``fold``, checked against this run's split."""
    task = data.task.name
    path = best_path(out, task, method)
    rerun = f"`bench sweep {method} --task <task> --out {out}` with this run's --folds and --seed"
    if not path.is_file():
        raise BenchError(
            f"{path}: no sweep result for {method!r} on task {task!r}, so '{method}[best]' is undefined. "
            f"Run `bench sweep {method} --task <task> --out {out}` first."
        )
    record = yaml.safe_load(path.read_text()) or {}
    entries = record.get("folds")
    if not isinstance(entries, dict):
        raise BenchError(
            f"{path}: written by a former sweep that tuned one configuration on every fold's validation "
            f"patients, who are other folds' test patients, so '{method}[best]' would be tested on patients "
            f"it was tuned on. Rerun {rerun}: it tunes one configuration per outer fold, blind to its test "
            "patients."
        )
    entry = entries.get(fold)
    if entry is None:
        raise BenchError(
            f"{path}: no configuration tuned for fold {fold} (the sweep had {record.get('outer_folds')} "
            f"outer folds, this run has {data.folds}). Rerun {rerun}."
        )
    if entry.get("split") != membership_digest(data.splits, fold):
        raise BenchError(
            f"{path}: fold {fold}'s configuration was tuned on another split of the patients (other "
            "--folds, --seed or splits file), so its search may have seen this fold's test patients. "
            f"Rerun {rerun}."
        )
    return path, record, entry


def load_best(out: Path, data: TaskData, method: str, fold: int) -> dict[str, Any]:
    """The config overrides ``method[best]`` runs on outer fold ``fold``: those of the best trial of that
    fold's own search, which never saw the fold's test patients."""
    return dict(_best_entry(out, data, method, fold)[2].get("overrides") or {})


def tuned_by(out: Path, data: TaskData, method: str, fold: int) -> dict[str, Any]:
    """Where ``method[best]``'s configuration on ``fold`` comes from, for its ``config.yaml``."""
    path, record, entry = _best_entry(out, data, method, fold)
    return {
        "best_yaml": str(path),
        "study": entry.get("study"),
        "trial": entry.get("trial"),
        "mean_val_auc": entry.get("mean_val_auc"),
        "inner_folds": record.get("inner_folds"),
        "storage": None if record.get("storage") is None else redact(record["storage"]),
    }


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
    """The studies' storage as a string workers can rebuild it from (paths made absolute); its password, if
    any, is remembered so that no later message of this process shows it."""
    remember(spec)
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
            f"--storage {redact(spec)!r}: give an Optuna storage URL (sqlite:///path.db, postgresql://user:pw@host/db, "
            "mysql://...) or a journal file (journal:<path> or a path ending in .journal)."
        )
    return spec


def make_storage(url: str) -> Any:
    """An Optuna storage for ``url``: a journal file, or an RDB with heartbeats (a dead worker's trial is
    marked failed after two missed minutes and retried up to twice)."""
    import optuna

    remember(url)
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
                f"--storage {redact(url)}: its database driver is not installed ({redact(str(exc))}). For "
                "PostgreSQL: pip install -e '.[postgres]'."
            ) from None
        except Exception as exc:  # sqlalchemy's connection, URL and schema-creation errors
            if attempt == 2:
                raise BenchError(
                    f"--storage {redact(url)}: cannot open the study storage ({redact(str(exc))})."
                ) from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _study(storage: Any, name: str, seed: int, trials: int, pruning: bool, design: dict[str, Any]) -> Any:
    """Open (or create) one outer fold's study; ``design`` (which patients it searches, how) is recorded on
    the study, and a study recorded with another design is refused: its trials scored other patients."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 2)))
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if pruning else optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", design)
    elif recorded != design:
        raise BenchError(
            f"study {name!r} was searched with {recorded}, not {design} (another --folds, --seed, splits "
            "file or --inner-folds), so its trials scored other patients. Give another --study-name, or the "
            "settings it was run with."
        )
    return study


# -------------------------------------------------------------------------------------------------- search


def search_folds(data: TaskData, fold: int, inner_folds: int) -> list[tuple[TaskData, int]]:
    """Where outer fold ``fold``'s search trains and scores, as ``(task data, fold)`` pairs for train_fold.

    ``inner_folds`` 1: the outer fold itself (trained on its training patients, scored on its validation
    patients). J >= 2: a stratified J-fold CV of the fold's training and validation patients, seeded by the
    task seed and the fold; inner fold j trains on the other parts and is selected and scored on part j.
    The outer fold's test patients are ``test`` in every inner fold, a part train_fold never reads.
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
    table = data.splits[["case_id", "slide_id", "label"]].copy()
    cv = StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=data.seed * 1000 + fold)
    for j, (_, held_out) in enumerate(cv.split(patients.index, patients.to_numpy())):
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
            fitted = train_fold(inner_data, inner_fold, sw.method, cfg, device)
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
    for share in shares:
        left = None if deadline is None else deadline - time.monotonic()
        if share.trials == 0 or (left is not None and left <= 0):
            continue
        name = study_name(sw, data.task.name, share.fold)
        study = _study(
            storage, name, share.seed, sw.trials, sw.pruning, _design(data, share.fold, sw.inner_folds)
        )
        study.optimize(
            _objective(data, share.fold, sw, opts, device),
            n_trials=share.trials,
            timeout=left,
            callbacks=list(callbacks),
        )


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

    from .executors import bind_worker

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


def search(task_ref: str, sw: SweepOptions, opts: RunOptions, progress: Any | None = None) -> dict[int, Any]:
    """Run ``sw.trials`` more trials of each outer fold's study (split over ``opts.workers`` processes);
    returns the studies by outer fold.

    Separate processes given the same storage and study name each run their own ``sw.trials`` per fold.
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
    if sw.inner_folds < 1:
        raise BenchError(f"--inner-folds {sw.inner_folds}: give 1 (each fold's validation split) or more.")
    names = space_names(cls)
    unknown = sorted(set(sw.params or ()) - set(names))
    if unknown:
        raise BenchError(
            f"--params {','.join(unknown)}: not in the search space of {sw.method!r}, which declares "
            f"{', '.join(names)} (see its search_space)."
        )
    data = prepare_task(task_ref, opts)
    method_config(data, sw.method, opts)  # a bad task/method combination fails before any trial
    for k in range(data.folds):  # too few patients for the inner CV fails before any trial too
        search_folds(data, k, sw.inner_folds)
    url = storage_url(sw.storage, opts.out, data.task.name, sw.method)
    base_seed = data.seed if sw.sampler_seed is None else sw.sampler_seed
    storage = make_storage(url)
    monitor = {
        k: _study(
            storage,
            study_name(sw, data.task.name, k),
            0,
            sw.trials,
            sw.pruning,
            _design(data, k, sw.inner_folds),
        )
        for k in range(data.folds)
    }
    existing = {k: len(study.trials) for k, study in monitor.items()}
    total = sw.trials * data.folds
    title = f"{data.task.name} · sweep {sw.method} ({data.folds} outer folds)"
    bar = None if progress is None else progress.add_task(title, total=total)

    def advance(*_: Any) -> None:
        if bar is None:
            return
        trials = {k: study.trials for k, study in monitor.items()}
        done = sum(len([t for t in ts if t.state.is_finished()]) - existing[k] for k, ts in trials.items())
        progress.update(bar, completed=min(done, total))

    workers = min(opts.workers, total)
    plan = _shares(sw, data.folds, max(workers, 1), base_seed, existing)
    if workers <= 1:
        _optimize(data, sw, opts, url, plan[0], resolve_device(opts.device), [advance])
        return monitor
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
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
    return monitor


def _complete(study: Any) -> list[Any]:
    import optuna

    return [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None and not math.isnan(t.value)
    ]


def _complete_by_fold(studies: Mapping[int, Any], method: str) -> dict[int, list[Any]]:
    """Each outer fold's complete trials, best first; an error naming the folds that have none."""
    complete = {k: sorted(_complete(study), key=lambda t: -t.value) for k, study in sorted(studies.items())}
    missing = [k for k, trials in complete.items() if not trials]
    if not complete or missing:
        raise BenchError(
            f"the sweep of {method!r} has no complete trial on outer fold(s) {missing or 'any'} yet (all pruned "
            "or failed?); run more trials."
        )
    return complete


# ------------------------------------------------------------------------------------------------- results


def write_best(studies: Mapping[int, Any], out: Path, task: str, method: str, url: str | None = None) -> Path:
    """Write each outer fold's best complete trial to ``<out>/<task>/sweeps/<M>/best.yaml`` (``folds:`` one
    entry per outer fold, with the digest of the split it was searched on); the storage URL without its
    password."""
    import optuna

    complete = _complete_by_fold(studies, method)
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
    path = best_path(out, task, method)
    atomic_write_text(path, yaml.safe_dump(_plain(record), sort_keys=False))
    return path


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k if isinstance(k, int) else str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


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

    from .report import Table, fmt, write_table

    folder = Path(out) / task / "report"
    complete_by_fold = _complete_by_fold(studies, method)
    pooled = _pooled(studies)
    params = sorted({p for t in pooled.trials for p in t.params})
    state = optuna.trial.TrialState
    rows = []
    for k, trials in complete_by_fold.items():
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
    complete = sorted(_complete(pooled), key=lambda t: -t.value)
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
    """From the pooled trials of every outer fold (:func:`_pooled`): the optimisation history of each outer
    fold's search (its trials and best so far; pruned trials as grey crosses at their last running mean), and
    the validation AUC against each numeric searched parameter, on the inner folds every trial finished when
    some were pruned (:func:`_common_fold_scores`), with the mean per value for a discrete parameter; a
    parameter searched on a log scale (or powers of two) is drawn on one. PNG and SVG, in the report's figure
    style."""
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
        for k in sorted({t.user_attrs["outer_fold"] for t in complete}):
            mine = [t for t in complete if t.user_attrs["outer_fold"] == k]
            number, value = [t.user_attrs["trial"] for t in mine], [t.value for t in mine]
            (points,) = ax.plot(number, value, "o", ms=3, alpha=0.6)
            best = np.maximum.accumulate(value)
            ax.step(number, best, where="post", color=points.get_color(), label=f"fold {k}: best so far")
        if pruned:
            ax.plot(
                [t.user_attrs["trial"] for t in pruned],
                pruned_values,
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
    written += save_figure(fig, folder, f"sweep_{method}_history")

    complete_state = optuna.trial.TrialState.COMPLETE
    ylabel = "validation AUC" if folds is None else f"validation AUC, first {folds} inner fold(s)"
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

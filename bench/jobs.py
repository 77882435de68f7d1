"""One job of ``bench run``: (task, method, fold) planned, trained on the fold's training patients, selected and
thresholded on its validation patients, and predicted on its test patients and every external cohort.

Jobs are idempotent: a job whose fold folder is complete with the same configuration hash is skipped, so a
killed run resumes where it stopped. Where jobs execute (this process, a process pool, Slurm) and how
processes sharing an output folder avoid running one job twice is bench/executors.py's and bench/locks.py's
business; ``bench run`` as a whole is bench/commands.py's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from methods import get_method_class, list_methods, resolve_config
from methods.base import Bag, MethodCfg
from methods.registry import UnknownMethodError, parse_method_name

from .best import load_best, tuned_by
from .config import TaskConfig
from .convergence import UPDATE_RULE_FIELDS, rule_problems
from .data.cohort import Cohort, graph_settings
from .data.genes import GeneSelection
from .data.omics import OmicsScaler
from .data.splits import fold_parts, membership_digest, split_grouping
from .device import resolve_device, resolve_precision
from .errors import BenchError
from .evaluate import fold_metrics, patient_auc, predict, slide_predictions
from .provenance import versions
from .store import config_hash, fold_dir, fold_status, write_fold
from .taskdata import RunOptions, TaskData, fold_genes, fold_time_edges, train_cases
from .tasktypes import task_type, type_identity
from .tracking import TrackedFold, open_tracker
from .train import TrainResult, fit

__all__ = [
    "FoldFit",
    "Job",
    "JobPlan",
    "check_method",
    "expand_jobs",
    "method_config",
    "plan_job",
    "privileged_models",
    "run_job",
    "stage_bags",
    "task_identity",
    "train_fold",
    "with_ceiling_models",
]


@dataclass(frozen=True)
class Job:
    task: str  # task name or YAML path, as given
    method: str  # method name, possibly with a [variant]
    fold: int


def method_config(
    data: TaskData,
    method: str,
    opts: RunOptions,
    overrides: dict[str, Any] | None = None,
    fold: int | None = None,
) -> MethodCfg:
    """The method's config with the task's training overrides (none under ``--protocol paper``: each method's
    published settings), the --epochs cap and data-given settings.

    ``M[best]`` on outer fold ``fold`` is method ``M`` with the overrides of the best trial of that fold's own
    nested search (``<out>/<task>/sweeps/M/best.yaml``, refused if tuned on another split); with ``fold``
    None every fold's entry is checked and fold 0's is resolved.
    """
    base_fields = {f.name for f in dataclasses.fields(MethodCfg)}
    unknown = sorted(set(data.task.train) - base_fields)
    if unknown:
        raise BenchError(
            f"{data.task.path}: 'train' sets {unknown}, which are not common training settings "
            f"({', '.join(sorted(base_fields))})."
        )
    train = {} if opts.protocol == "paper" else data.task.train
    base, variant = check_method(method)
    if variant == "best":
        tuned = [_best(data, opts, base, k) for k in (range(data.folds) if fold is None else [fold])]
        cfg = resolve_config(base, {**train, **tuned[0], **(overrides or {})})
    else:
        cfg = resolve_config(method, {**train, **(overrides or {})})
    if "epochs" in train and train["epochs"] is None:  # no epoch cap; resolve_config drops None as "not set"
        cfg = cfg.replace(epochs=None)
    problems = rule_problems(cfg)
    if problems:
        raise BenchError(
            f"{data.task.path}: 'train' sets an invalid convergence rule ({'; '.join(problems)}). "
            "See docs/protocol.md, 'Convergence'."
        )
    if opts.epochs is not None:
        epochs = opts.epochs if cfg.epochs is None else min(cfg.epochs, opts.epochs)
        cfg = cfg.replace(epochs=epochs, min_epochs=min(cfg.min_epochs, opts.epochs))
    if data.gene_groups is not None and cfg.needs().gene_groups:
        cfg = cfg.replace(gene_groups=data.gene_groups)
    kind = task_type(data.task)
    if cfg.num_classes != kind.num_outputs or cfg.head != kind.head:
        cfg = cfg.replace(num_classes=kind.num_outputs, head=kind.head)
    if cfg.needs().privileged and data.privileged is None:
        raise BenchError(
            f"{method} trains with the patients' true latent programs as an auxiliary target (the report's "
            f"privileged-information ceiling), which only a synthetic task has; task {data.task.name!r} has "
            "none. Drop it from --methods."
        )
    return cfg


def _best(data: TaskData, opts: RunOptions, method: str, fold: int) -> dict[str, Any]:
    return load_best(opts.out, data.task.name, data.splits, data.folds, method, fold)


def _selects_genes(data: TaskData, cfg: MethodCfg) -> bool:
    """Whether the task's ``omics_select`` applies to this method (it reads omics, and there are some)."""
    return data.task.omics_select is not None and cfg.needs().omics and data.internal.omics is not None


def task_identity(task: TaskConfig, selects_genes: bool = False) -> dict[str, Any]:
    """The task settings that change results; ``omics_select`` only where it applies, ``split_by`` and
    ``site_col`` only when the split is by site (so a task without them, or a method without omics, keeps
    the hash it had before the keys existed); never ``tracking``."""
    identity = task.model_dump(
        exclude={"path", "train", "synthetic", "folds", "seed", "tracking"}, mode="json"
    )
    if not selects_genes:
        identity.pop("omics_select", None)
    if task.split_by == "patient":
        identity.pop("split_by", None)
        identity.pop("site_col", None)
    return type_identity(task, identity)


def _hashed_method_config(cfg: MethodCfg) -> dict[str, Any]:
    """``cfg`` as hashed: the update rule's settings only when they differ from the defaults (so a config
    under the epoch rule keeps the hash it had before they existed), and a classification head without the
    survival head's settings (so binary and multiclass folds keep the hashes they had before survival)."""
    defaults = {f.name: f.default for f in dataclasses.fields(MethodCfg) if f.name in UPDATE_RULE_FIELDS}
    settings = {k: v for k, v in cfg.to_dict().items() if k not in defaults or v != defaults[k]}
    if settings.get("head") == "classification":
        settings.pop("head")
        settings.pop("surv_alpha")
    return settings


def job_config(
    data: TaskData,
    job: Job,
    cfg: MethodCfg,
    device: torch.device,
    precision: str = "auto",
    protocol: str = "task",
) -> tuple[dict[str, Any], str]:
    """The resolved configuration of a job and the hash of its result-changing part (a precision other than
    ``auto`` and the ``paper`` protocol are part of it; ``auto`` and ``task`` keep the hashes of runs made
    before the options existed)."""
    selects = _selects_genes(data, cfg)
    omics_dim = None if data.internal.omics is None else data.internal.omics.shape[1]
    if cfg.needs().privileged and data.privileged is not None:
        omics_dim = data.privileged.shape[1]
    hashed = {
        "task": task_identity(data.task, selects),
        "method": job.method,
        "method_config": _hashed_method_config(cfg),
        "fold": job.fold,
        "folds": data.folds,
        "seed": data.seed,
        "split": membership_digest(data.splits, job.fold),
        "in_dim": data.internal.dim,
        "omics_dim": data.task.omics_select.k if selects else omics_dim,
    }
    if precision != "auto":
        hashed["precision"] = precision
    if data.repeat:
        hashed["repeat"] = data.repeat
    if protocol != "task":
        hashed["protocol"] = protocol
    recorded = {
        **hashed,
        "method_config": cfg.to_dict(),
        "protocol": protocol,
        "split_grouping": split_grouping(data.task),
        **({"features": data.features, "feature_sets": list(data.feature_sets)} if data.features else {}),
        "task_file": str(data.task.path),
        "synthetic": data.task.synthetic,
        "device": str(device),
        "bf16_autocast": resolve_precision(precision, device),
        "versions": versions(),
    }
    if cfg.needs().privileged:  # recorded, not hashed: a reference row of the report, not a method
        recorded["kind"] = "ceiling"
    return recorded, config_hash(hashed)


def _bags(
    cohort: Cohort,
    slide_ids: Sequence[str],
    cfg: MethodCfg,
    omics: pd.DataFrame | None,
    edges: np.ndarray | None = None,
) -> list[Bag]:
    return cohort.bags(slide_ids, omics=omics, graph=graph_settings(cfg), time_edges=edges)


def stage_bags(groups: Sequence[Sequence[Bag]], device: torch.device) -> list[list[Bag]]:
    """Put the bags a job reads every epoch where the device reads them fast.

    On a GPU: all of them are copied there once when they fit in half its free memory, else their features
    are pinned in host memory so the per-step copies are asynchronous. On the CPU: unchanged.
    """
    if device.type != "cuda":
        return [list(g) for g in groups]
    tensors = [
        t for g in groups for b in g for t in (b.features, b.coords, b.edge_index, b.omics) if t is not None
    ]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes < free // 2:
        return [[b.to(device, non_blocking=True) for b in g] for g in groups]
    return [[dataclasses.replace(b, features=b.features.pin_memory()) for b in g] for g in groups]


@dataclass(frozen=True)
class JobPlan:
    """A job resolved: its config, where its results go, and the hash that says whether they are current."""

    cfg: MethodCfg
    device: torch.device
    config: dict[str, Any]
    hash: str
    path: Path


def plan_job(data: TaskData, job: Job, opts: RunOptions, overrides: dict[str, Any] | None = None) -> JobPlan:
    """Resolve a job without running it (cheap: no data is read)."""
    device = resolve_device(opts.device)
    cfg = method_config(data, job.method, opts, overrides, fold=job.fold)
    config, hash_ = job_config(data, job, cfg, device, opts.precision, opts.protocol)
    base, variant = parse_method_name(job.method)
    if variant == "best":  # recorded, not hashed: the configuration itself is in the hash
        config["tuned_by"] = tuned_by(opts.out, data.task.name, data.splits, data.folds, base, job.fold)
    path = fold_dir(opts.out, data.task.name, job.method, job.fold, data.features, data.repeat)
    return JobPlan(cfg, device, config, hash_, path)


@dataclass
class FoldFit:
    """A model trained on one fold and selected on its validation patients, with its validation predictions,
    the configuration it was built with (gene groups restricted to the selected genes) and its genes."""

    result: TrainResult
    val: pd.DataFrame  # slide_id, case_id, label, prob, cohort="val"
    cfg: MethodCfg
    genes: GeneSelection | None = None
    time_edges: np.ndarray | None = None  # survival: the fold's time bins (fit on its training patients)

    def val_auc(self, aggregation: str) -> float:
        return patient_auc(self.val, aggregation)


def train_fold(
    data: TaskData,
    fold: int,
    method: str,
    cfg: MethodCfg,
    device: torch.device,
    on_check: Callable[[int, int, dict[str, Any]], Any] | None = None,
    precision: str = "auto",
) -> FoldFit:
    """Train ``method`` on fold ``fold``'s training patients and select it on the fold's validation patients
    (``precision``: :func:`bench.train.resolve_precision`).

    Reads and predicts the training and validation slides only, never the fold's test part or an external
    cohort: a sweep's objective is built on this.
    """
    parts = fold_parts(data.splits, fold)
    internal = data.internal
    omics, genes = None, None
    omics_dim = None if internal.omics is None else internal.omics.shape[1]
    if internal.omics is not None and cfg.needs().omics:
        table = internal.omics
        genes = fold_genes(data, fold)
        if genes is not None:
            table = genes.apply(table)
            omics_dim = table.shape[1]
            if data.gene_groups is not None and cfg.needs().gene_groups:
                where = internal.omics.columns.get_indexer(genes.genes)
                cfg = cfg.replace(gene_groups=tuple(data.gene_groups[i] for i in where))
        omics = OmicsScaler(data.task.omics_log1p).fit(table, train_cases(data, fold)).transform(table)
    if cfg.needs().privileged and data.privileged is not None:  # the true programs, z-scored on training
        omics_dim = data.privileged.shape[1]
        omics = OmicsScaler(False).fit(data.privileged, train_cases(data, fold)).transform(data.privileged)
    val_omics = omics if cfg.monitor == "mean-auc" else None  # model selection on teachers that read omics
    edges = fold_time_edges(data, fold)
    train_bags, val_bags = stage_bags(
        [
            _bags(internal, parts["train"], cfg, omics, edges),
            _bags(internal, parts["val"], cfg, val_omics, edges),
        ],
        device,
    )
    result = fit(
        method,
        cfg,
        internal.dim,
        omics_dim,
        train_bags,
        val_bags,
        device,
        seed=data.split_seed * 1000 + fold,
        aggregation=data.task.patient_aggregation,
        on_check=on_check,
        precision=precision,
    )
    autocast = resolve_precision(precision, device)
    val = slide_predictions(val_bags, predict(result.model, val_bags, device, autocast), "val")
    return FoldFit(result, val, result.model.cfg, genes, edges)


def run_job(
    data: TaskData,
    job: Job,
    opts: RunOptions,
    overrides: dict[str, Any] | None = None,
    on_check: Callable[[int, int, dict[str, Any]], Any] | None = None,
) -> str:
    """Run one job unless its results are already on disk; returns ``skipped`` or ``trained``.

    A trained job is logged to ``opts.track``'s store (bench/tracking.py), which never changes its results.
    """
    plan = plan_job(data, job, opts, overrides)
    if fold_status(plan.path, plan.hash) == "done":
        return "skipped"
    tracked = open_tracker(opts.track, opts.out).fold(data.task.name, data.tracked_name(job.method), job.fold)
    ok = False
    try:
        _train_and_write(data, job, opts, plan, _with_tracking(tracked, on_check), tracked)
        ok = True
    finally:
        tracked.close(ok)
    return "trained"


def _with_tracking(
    tracked: TrackedFold, on_check: Callable[[int, int, dict[str, Any]], Any] | None
) -> Callable[[int, int, dict[str, Any]], None]:
    """The trainer's hook at each validation check: the record to the tracking store (at step ``check``, the
    epoch under the epoch rule), then to ``on_check`` (a progress display)."""

    def hook(check: int, cap: int, record: dict[str, Any]) -> None:
        tracked.epoch(check, record)
        if on_check is not None:
            on_check(check, cap, record)

    return hook


def _train_and_write(
    data: TaskData,
    job: Job,
    opts: RunOptions,
    plan: JobPlan,
    on_check: Callable[[int, int, dict[str, Any]], Any],
    tracked: TrackedFold,
) -> None:
    """Train, select, threshold and predict the job, write its fold folder, and log it to ``tracked``."""
    started = time.time()
    cfg, device = plan.cfg, plan.device
    fitted = train_fold(data, job.fold, job.method, cfg, device, on_check, opts.precision)
    autocast = resolve_precision(opts.precision, device)
    agg = data.task.patient_aggregation
    model = fitted.result.model
    edges = fitted.time_edges
    parts = fold_parts(data.splits, job.fold)

    def predicted(cohort: Cohort, slide_ids: Sequence[str], name: str) -> pd.DataFrame:
        bags = _bags(cohort, slide_ids, cfg, None, edges)
        return slide_predictions(bags, predict(model, bags, device, autocast), name)

    cohorts = {"val": fitted.val, "test": predicted(data.internal, parts["test"], "test")}
    for name, cohort in data.externals.items():
        cohorts[name] = predicted(cohort, cohort.slides.slide_id.tolist(), name)
    metrics = {
        "cohorts": fold_metrics(cohorts, agg, edges),
        # the kept model on its own training slides: "fitted but not generalising" vs "not trained"
        "train_auc": patient_auc(predicted(data.internal, parts["train"], "train"), agg),
        "best_epoch": fitted.result.best_epoch,
        "best_updates": fitted.result.best_updates,
        "epochs_run": fitted.result.epochs_run,
        "updates": fitted.result.updates,
        "stopped": fitted.result.stopped,
        "monitor": cfg.monitor,
        "history": fitted.result.history,
        "train_seconds": round(time.time() - started, 2),
        "method_report": model.training_report(),
    }
    predictions = pd.concat([cohorts[k] for k in cohorts if k != "val"], ignore_index=True)
    config = {**plan.config, "method_config": fitted.cfg.to_dict()}
    if fitted.genes is not None:
        config["omics_selection"] = fitted.genes.record()
    if edges is not None:
        config["time_bins"] = [float(e) for e in edges]
    write_fold(plan.path, predictions, metrics, config, plan.hash, model.state_dict())
    tracked.finish(config, plan.hash, metrics, plan.path)


def expand_jobs(task: str, methods: Iterable[str], folds: int) -> list[Job]:
    return [Job(task, m, k) for m in methods for k in range(folds)]


def check_method(name: str) -> tuple[str, str]:
    """``(base, variant)`` of a method name on the command line, every part checked (``best`` is the variant
    a sweep defines); an unknown name is a ``BenchError`` suggesting the nearest ones."""
    try:
        base, variant = parse_method_name(name)
        if variant and variant != "best" and variant not in get_method_class(base).variants:
            resolve_config(name)
    except UnknownMethodError as exc:
        raise BenchError(str(exc)) from exc
    return base, variant


def privileged_models() -> list[str]:
    """The registered models that train with a synthetic task's true latent programs (the report's
    privileged-information ceilings; ``DataNeeds.privileged``)."""
    return [m for m in list_methods() if resolve_config(m).needs().privileged]


def with_ceiling_models(data: TaskData, methods: Sequence[str]) -> list[str]:
    """``methods``, plus each privileged-information model whose label-only twin is among them when the task
    has ground truth (synthetic) and a method of ``methods`` distils from omics: the gap each distillation
    method closes is measured between the two. Binary tasks only, as the report's gap shares are AUCs."""

    def distils(name: str) -> bool:
        base, variant = check_method(name)
        return resolve_config(base if variant == "best" else name).needs().omics

    if (
        data.privileged is None
        or task_type(data.task).name != "binary"
        or not any(distils(m) for m in methods)
    ):
        return list(methods)
    students = [m for m in privileged_models() if get_method_class(m).label_only_twin in methods]
    return list(dict.fromkeys([*methods, *students]))


def parse_methods(spec: str) -> list[str]:
    """``all`` (every registered method but the privileged-information models, which are ceilings) or a
    comma-separated list of (possibly bracketed) method names, each checked."""
    if spec.strip() == "all":
        return [m for m in list_methods() if m not in privileged_models()]
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        check_method(name)
    return names

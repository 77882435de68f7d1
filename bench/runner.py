"""`bench run`: expand (task, method, fold) into independent jobs and run the ones not already on disk.

Each job trains one method on one fold's training patients, selects its checkpoint and threshold on the
fold's validation patients, and predicts the fold's test patients and every external cohort. Jobs are
idempotent: a job whose fold folder is complete with the same configuration hash is skipped, so a killed
run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from methods import get_method_class, resolve_config
from methods.base import MethodCfg
from methods.registry import UnknownMethodError, parse_method_name

from .config import TaskConfig, cache_root, load_task
from .data.cohort import Cohort, OmicsScaler, load_cohort, raise_problems
from .data.splits import check_splits, fold_parts, make_splits, membership_digest, read_splits
from .errors import BenchError, DataError
from .evaluate import best_f1_threshold, binary_metrics, patient_level, predict, slide_predictions
from .store import atomic_write_text, config_hash, fold_dir, fold_status, write_fold, write_summary
from .train import fit

__all__ = ["Job", "RunOptions", "TaskData", "expand_jobs", "prepare_task", "resolve_device", "run", "run_job"]


@dataclass(frozen=True)
class RunOptions:
    """Options common to every command (the contract's common options)."""

    out: Path = Path("results")
    folds: int | None = None
    seed: int | None = None
    epochs: int | None = None
    device: str = "auto"
    workers: int = 1
    quiet: bool = False


@dataclass(frozen=True)
class Job:
    task: str  # task name or YAML path, as given
    method: str  # method name, possibly with a [variant]
    fold: int


@dataclass
class TaskData:
    """Everything a job of one task needs, loaded and checked once per process."""

    task: TaskConfig
    internal: Cohort
    externals: dict[str, Cohort]
    splits: pd.DataFrame
    folds: int
    seed: int
    gene_groups: tuple[int, ...] | None = None


def resolve_device(spec: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {spec}: no CUDA device is available here. Use --device cpu or auto.")
    return device


def prepare_task(task_ref: str | Path, opts: RunOptions) -> TaskData:
    """Load and check a task's cohorts, then make (or import) and save its patient-level splits."""
    task = load_task(task_ref)
    internal = load_cohort(task, "internal")
    problems = list(internal.problems)
    externals = {}
    for ext in task.external:
        cohort = load_cohort(task, ext.name)
        problems += cohort.problems
        if internal.dim and cohort.dim and cohort.dim != internal.dim:
            problems.append(
                f"{ext.features}: external cohort {ext.name!r} has D={cohort.dim} features but the internal cohort "
                f"has D={internal.dim}. Fix: extract both cohorts with the same encoder."
            )
        externals[ext.name] = cohort
    raise_problems(problems)
    folds = opts.folds or task.folds
    seed = task.seed if opts.seed is None else opts.seed
    if task.splits is not None:
        splits = read_splits(task.splits, internal.slides)
        folds = len([c for c in splits.columns if c.startswith("fold_")])
    else:
        splits = make_splits(internal.slides, folds, seed, task.val_fraction)
        check_splits(splits)
    atomic_write_text(Path(opts.out) / task.name / "splits.tsv", splits.to_csv(sep="\t", index=False))
    return TaskData(task, internal, externals, splits, folds, seed, _read_gene_groups(task, internal))


def _read_gene_groups(task: TaskConfig, internal: Cohort) -> tuple[int, ...] | None:
    """Group index per omics gene from the task's ``omics_groups`` CSV (columns gene, group)."""
    if task.omics_groups is None or internal.omics is None:
        return None
    path = task.omics_groups
    if not path.is_file():
        raise DataError("omics_groups file not found", path, "correct 'omics_groups' in the task YAML.")
    df = pd.read_csv(path, dtype=str)
    if not {"gene", "group"} <= set(df.columns):
        raise DataError("expected columns gene, group", path)
    names = {g: i for i, g in enumerate(sorted(df.group.unique()))}
    mapping = dict(zip(df.gene, df.group.map(names), strict=True))
    missing = [g for g in internal.omics.columns if g not in mapping]
    if missing:
        raise DataError(f"{len(missing)} omics gene(s) have no group (e.g. {missing[:3]})", path)
    return tuple(int(mapping[g]) for g in internal.omics.columns)


def method_config(
    data: TaskData, method: str, opts: RunOptions, overrides: dict[str, Any] | None = None
) -> MethodCfg:
    """The method's config with the task's training overrides, the --epochs cap and data-given settings."""
    base_fields = {f.name for f in dataclasses.fields(MethodCfg)}
    unknown = sorted(set(data.task.train) - base_fields)
    if unknown:
        raise BenchError(
            f"{data.task.path}: 'train' sets {unknown}, which are not common training settings "
            f"({', '.join(sorted(base_fields))})."
        )
    try:
        cfg = resolve_config(method, {**data.task.train, **(overrides or {})})
    except UnknownMethodError as exc:
        raise BenchError(str(exc)) from exc
    if opts.epochs is not None:
        cfg = cfg.replace(epochs=min(cfg.epochs, opts.epochs), min_epochs=min(cfg.min_epochs, opts.epochs))
    if data.gene_groups is not None and hasattr(cfg, "gene_groups"):
        cfg = cfg.replace(gene_groups=data.gene_groups)
    return cfg


def _task_identity(task: TaskConfig) -> dict[str, Any]:
    return task.model_dump(exclude={"path", "train", "synthetic", "folds", "seed"}, mode="json")


def job_config(data: TaskData, job: Job, cfg: MethodCfg, device: torch.device) -> tuple[dict[str, Any], str]:
    """The resolved configuration of a job and the hash of its result-changing part."""
    hashed = {
        "task": _task_identity(data.task),
        "method": job.method,
        "method_config": cfg.to_dict(),
        "fold": job.fold,
        "folds": data.folds,
        "seed": data.seed,
        "split": membership_digest(data.splits, job.fold),
        "in_dim": data.internal.dim,
        "omics_dim": None if data.internal.omics is None else data.internal.omics.shape[1],
    }
    recorded = {
        **hashed,
        "task_file": str(data.task.path),
        "synthetic": data.task.synthetic,
        "device": str(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
    }
    return recorded, config_hash(hashed)


def _bags(cohort: Cohort, slide_ids: Sequence[str], cfg: MethodCfg, omics: pd.DataFrame | None):
    graph = (cfg.graph_k, cfg.graph_symmetric, cache_root() / "graphs") if cfg.needs_graph else None
    return cohort.bags(slide_ids, omics=omics, graph=graph)


def run_job(
    data: TaskData,
    job: Job,
    opts: RunOptions,
    overrides: dict[str, Any] | None = None,
    on_epoch: Callable[[int, int, dict[str, float]], Any] | None = None,
) -> str:
    """Run one job unless its results are already on disk; returns ``skipped`` or ``trained``."""
    device = resolve_device(opts.device)
    cfg = method_config(data, job.method, opts, overrides)
    config, hash_ = job_config(data, job, cfg, device)
    path = fold_dir(opts.out, data.task.name, job.method, job.fold)
    if fold_status(path, hash_) == "done":
        return "skipped"
    started = time.time()
    parts = fold_parts(data.splits, job.fold)
    internal = data.internal
    omics = None
    if internal.omics is not None and cfg.uses_omics:
        train_cases = internal.slides.case_id[internal.slides.slide_id.isin(parts["train"])].unique()
        omics = OmicsScaler(data.task.omics_log1p).fit(internal.omics, train_cases).transform(internal.omics)
    train_bags = _bags(internal, parts["train"], cfg, omics)
    val_bags = _bags(internal, parts["val"], cfg, None)
    omics_dim = None if internal.omics is None else internal.omics.shape[1]
    result = fit(
        job.method,
        cfg,
        internal.dim,
        omics_dim,
        train_bags,
        val_bags,
        device,
        seed=data.seed * 1000 + job.fold,
        aggregation=data.task.patient_aggregation,
        on_epoch=on_epoch,
    )
    agg = data.task.patient_aggregation
    val_pred = slide_predictions(val_bags, predict(result.model, val_bags, device), "val")
    val_pat = patient_level(val_pred, agg)
    threshold = best_f1_threshold(val_pat.label.to_numpy(), val_pat.prob.to_numpy())
    test_bags = _bags(internal, parts["test"], cfg, None)
    cohorts = {
        "val": val_pred,
        "test": slide_predictions(test_bags, predict(result.model, test_bags, device), "test"),
    }
    for name, cohort in data.externals.items():
        bags = _bags(cohort, cohort.slides.slide_id.tolist(), cfg, None)
        cohorts[name] = slide_predictions(bags, predict(result.model, bags, device), name)
    metrics = {
        "cohorts": {
            name: binary_metrics(p.label.to_numpy(), p.prob.to_numpy(), threshold)
            for name, pred in cohorts.items()
            for p in [patient_level(pred, agg)]
        },
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "monitor": cfg.monitor,
        "history": result.history,
        "train_seconds": round(time.time() - started, 2),
        "method_report": result.model.training_report(),
    }
    predictions = pd.concat([cohorts[k] for k in cohorts if k != "val"], ignore_index=True)
    write_fold(path, predictions, metrics, config, hash_, result.model.state_dict())
    return "trained"


def expand_jobs(task: str, methods: Iterable[str], folds: int) -> list[Job]:
    return [Job(task, m, k) for m in methods for k in range(folds)]


def parse_methods(spec: str) -> list[str]:
    """``all`` or a comma-separated list of (possibly bracketed) method names, each checked."""
    from methods import list_methods

    names = list_methods() if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        try:
            base, variant = parse_method_name(name)
            if variant and variant != "best" and variant not in get_method_class(base).variants:
                resolve_config(name)
        except UnknownMethodError as exc:
            raise BenchError(str(exc)) from exc
    return names


def _epoch_reporter(progress: Any, handle: Any, label: str) -> Callable[[int, int, dict[str, float]], None]:
    def on_epoch(epoch: int, total: int, record: dict[str, float]) -> None:
        progress.update(
            handle, total=total, completed=epoch + 1, description=f"{label} · val AUC {record['val_auc']:.3f}"
        )

    return on_epoch


def run(
    task_ref: str,
    methods: Sequence[str],
    opts: RunOptions,
    progress: Any | None = None,
) -> pd.DataFrame:
    """Run every (method, fold) job of a task in this process, then rebuild and return ``summary.csv``."""
    data = prepare_task(task_ref, opts)
    jobs = expand_jobs(task_ref, methods, data.folds)
    for job in jobs:
        label = f"{data.task.name} · {job.method} · fold {job.fold}"
        if progress is None:
            run_job(data, job, opts)
            continue
        handle = progress.add_task(label, total=None)
        status = run_job(data, job, opts, on_epoch=_epoch_reporter(progress, handle, label))
        progress.update(handle, total=1, completed=1, description=f"{label} · {status}")
    summary = write_summary(opts.out, data.task.name)
    return summary[summary.method.isin(methods)]

"""A task's data as every job of one process reads it: its cohorts loaded and checked once, its patient-level
splits made (or imported) and saved, its gene groups, and each fold's gene selection fit on that fold's
training patients only. Also the options common to every command (:class:`RunOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .config import TaskConfig, Tracking, cache_root
from .csvio import read_table
from .data.cohort import Cohort, load_cohorts, raise_problems
from .data.genes import GeneSelection, select_genes
from .data.omics import OmicsScaler
from .data.splits import fold_columns, fold_parts, make_splits, membership_digest, read_splits
from .data.task import load_task
from .errors import DataError
from .store import write_splits
from .tasktypes import time_bin_edges

__all__ = ["RunOptions", "TaskData", "fold_genes", "fold_time_edges", "prepare_task", "train_cases"]


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
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16
    # where folds are logged (bench/tracking.py; never part of a fold's configuration hash): as given on
    # the command line (None: not given, the task's block applies), then resolved by the command
    track: Tracking | None = None


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
    # fit once per process, keyed by the fold's split membership (a sweep's inner folds reuse fold numbers)
    gene_selections: dict[str, GeneSelection] = field(default_factory=dict)


def prepare_task(task_ref: str | Path, opts: RunOptions) -> TaskData:
    """Load and check a task's cohorts, then make (or import) and save its patient-level splits."""
    task = load_task(task_ref)
    internal, externals, problems = load_cohorts(task)
    raise_problems(problems)
    folds = opts.folds or task.folds
    seed = task.seed if opts.seed is None else opts.seed
    if task.splits is not None:
        splits = read_splits(task.splits, internal.slides)
        folds = len(fold_columns(splits))
    else:
        splits = make_splits(internal.slides, folds, seed, task.val_fraction, task.split_by)
    write_splits(opts.out, task.name, splits)
    return TaskData(task, internal, externals, splits, folds, seed, _read_gene_groups(task, internal))


def _read_gene_groups(task: TaskConfig, internal: Cohort) -> tuple[int, ...] | None:
    """Group index per omics gene from the task's ``omics_groups`` CSV (columns gene, group)."""
    if task.omics_groups is None or internal.omics is None:
        return None
    path = task.omics_groups
    if not path.is_file():
        raise DataError("omics_groups file not found", path, "correct 'omics_groups' in the task YAML.")
    df = read_table(path, ids=("gene", "group"))
    if not {"gene", "group"} <= set(df.columns):
        raise DataError("expected columns gene, group", path)
    names = {g: i for i, g in enumerate(sorted(df.group.unique()))}
    mapping = dict(zip(df.gene, df.group.map(names), strict=True))
    missing = [g for g in internal.omics.columns if g not in mapping]
    if missing:
        raise DataError(f"{len(missing)} omics gene(s) have no group (e.g. {missing[:3]})", path)
    return tuple(int(mapping[g]) for g in internal.omics.columns)


def train_cases(data: TaskData, fold: int) -> list[str]:
    """The patients of fold ``fold``'s training part (not its validation or test part)."""
    slides = data.internal.slides
    return slides.case_id[slides.slide_id.isin(fold_parts(data.splits, fold)["train"])].unique().tolist()


def fold_genes(data: TaskData, fold: int) -> GeneSelection | None:
    """The task's ``omics_select`` fit on fold ``fold``'s training patients (once per process), or None.

    It reads the omics and labels of the training patients only; validation, test and external patients
    get the genes it chose (bench/data/genes.py says why this differs from the MoMKD authors).
    """
    spec = data.task.omics_select
    if spec is None or data.internal.omics is None:
        return None
    key = membership_digest(data.splits, fold)
    if key not in data.gene_selections:
        log = OmicsScaler(data.task.omics_log1p).log_expression(data.internal.omics)
        labels = data.internal.patients.set_index("case_id").label
        data.gene_selections[key] = select_genes(
            log, labels, train_cases(data, fold), spec.method, spec.k, data.seed, cache_root() / "genes"
        )
    return data.gene_selections[key]


def fold_time_edges(data: TaskData, fold: int) -> np.ndarray | None:
    """A survival task's time bins of fold ``fold``, cut at the quantiles of its training patients' event times
    (bench/tasktypes.py; one row per patient), or None for a classification task."""
    if data.task.type != "survival":
        return None
    slides = data.internal.slides
    patients = slides[slides.case_id.isin(train_cases(data, fold))].drop_duplicates("case_id")
    return time_bin_edges(patients.time.to_numpy(), patients.event.to_numpy(), data.task.time_bins)

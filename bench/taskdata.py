"""A task's data as every job of one process reads it: its cohorts loaded and checked once, its patient-level
splits made (or imported) and saved, its gene groups, and each fold's gene selection fit on that fold's
training patients only. Also the options common to every command (:class:`RunOptions`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .config import TaskConfig, Tracking, cache_root
from .csvio import read_table
from .data.cohort import Cohort, load_cohorts, raise_problems
from .data.genes import GeneSelection, select_genes
from .data.groundtruth import latent_programs
from .data.omics import OmicsScaler
from .data.splits import fold_columns, fold_parts, make_splits, membership_digest, read_splits
from .data.task import load_task
from .errors import BenchError, DataError
from .store import read_saved_splits, write_splits
from .tasktypes import time_bin_edges

__all__ = [
    "RunOptions",
    "TaskData",
    "feature_sets",
    "fold_genes",
    "fold_time_edges",
    "prepare_task",
    "saved_task_data",
    "train_cases",
]


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
    # task: the task's ``train:`` block applies (the built-in tasks: the update rule, docs/protocol.md);
    # paper: it does not, each method trains with its published settings
    protocol: str = "task"
    # where folds are logged (bench/tracking.py; never part of a fold's configuration hash): as given on
    # the command line (None: not given, the task's block applies), then resolved by the command
    track: Tracking | None = None
    # the task's feature sets to run (``--features``; None: every one the task gives)
    features: tuple[str, ...] | None = None
    # how many times the whole CV design runs, repeat r with split seed ``seed + r`` (``--repeats``)
    repeats: int = 1


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
    # the feature set, on a task with several (its folds go to <method>/<features>/fold_<k>), and all of
    # them in the task's order (the first is the one the others are compared with)
    features: str | None = None
    feature_sets: tuple[str, ...] = ()
    # the repeat of the CV design (``--repeats``): its splits and training draws use seed + repeat
    repeat: int = 0
    # synthetic tasks: the true latent programs per patient (bench/data/groundtruth.py), else None
    privileged: pd.DataFrame | None = None
    # fit once per process, keyed by the fold's split membership (a sweep's inner folds reuse fold numbers)
    gene_selections: dict[str, GeneSelection] = field(default_factory=dict)

    @property
    def split_seed(self) -> int:
        """The seed of this repeat's splits and training (``seed`` itself for the first repeat)."""
        return self.seed + self.repeat

    def tracked_name(self, method: str) -> str:
        """``method`` as the tracking store names its runs: ``<method>@<features>`` on a task with several
        feature sets and ``<method>/repeat_<r>`` for a repeat after the first, so each has runs of its own."""
        name = method if self.features is None else f"{method}@{self.features}"
        return name if not self.repeat else f"{name}/repeat_{self.repeat}"


def feature_sets(task: TaskConfig, chosen: Sequence[str] | None) -> list[str | None]:
    """The feature sets of ``task`` to run: ``chosen`` (each checked), else all; ``[None]`` with one."""
    sets = task.feature_sets
    if not chosen:
        return list(sets) if len(sets) > 1 else [None]
    for name in chosen:
        task.with_features(name)  # an unknown name is a BenchError listing the task's feature sets
    return list(dict.fromkeys(chosen)) if len(sets) > 1 else [None]


def prepare_task(
    task_ref: str | Path, opts: RunOptions, features: str | None = None, repeat: int = 0
) -> TaskData:
    """Load and check a task's cohorts on one feature set (None: the only one; on a task with several, the
    first), then make (or import) and save the patient-level splits of repeat ``repeat`` of the CV design
    (seed + repeat), the same for every feature set."""
    full = load_task(task_ref)
    if features is None and len(full.feature_sets) > 1:
        features = full.feature_sets[0]
    task = full.with_features(features)
    internal, externals, problems = load_cohorts(task)
    raise_problems(problems)
    folds = opts.folds or task.folds
    seed = task.seed if opts.seed is None else opts.seed
    if task.splits is not None:
        if repeat:
            raise BenchError(
                f"{task.path}: --repeats draws new splits for each repeat, but the task imports its splits "
                f"from {task.splits}. Run it with --repeats 1, or drop 'splits' to let bench draw them."
            )
        splits = read_splits(task.splits, internal.slides)
        folds = len(fold_columns(splits))
    else:
        splits = make_splits(internal.slides, folds, seed + repeat, task.val_fraction, task.split_by)
    write_splits(opts.out, task.name, splits, repeat)
    return _task_data(full, task, internal, externals, splits, folds, seed, features, repeat)


def saved_task_data(
    task_ref: str | Path, out: Path, folds: int, seed: int, features: str | None = None, repeat: int = 0
) -> TaskData | None:
    """A task's data on one feature set and repeat, on the splits ``bench run`` saved under ``out`` (None
    when there are none, or when they do not have ``folds`` folds), never making or writing splits: what
    ``bench report`` computes the reference rows on; ``seed`` is the design's, as its folds record it."""
    full = load_task(task_ref)
    task = full.with_features(features)
    splits = read_saved_splits(out, task.name, repeat)
    if splits is None or len(fold_columns(splits)) != folds:
        return None
    internal, externals, problems = load_cohorts(task)
    raise_problems(problems)
    return _task_data(full, task, internal, externals, splits, folds, seed, features, repeat)


def _task_data(
    full: TaskConfig,
    task: TaskConfig,
    internal: Cohort,
    externals: dict[str, Cohort],
    splits: pd.DataFrame,
    folds: int,
    seed: int,
    features: str | None,
    repeat: int,
) -> TaskData:
    """The :class:`TaskData` of ``task`` (``full`` on feature set ``features``), its gene groups and, when
    synthetic, its patients' true latent programs (bench/data/groundtruth.py) read from its files."""
    several = len(full.feature_sets) > 1
    return TaskData(
        task,
        internal,
        externals,
        splits,
        folds,
        seed,
        _read_gene_groups(task, internal),
        features if several else None,
        tuple(full.feature_sets) if several else (),
        repeat=repeat,
        privileged=None if task.labels is None else latent_programs(task.labels),
    )


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

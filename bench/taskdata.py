"""A task's data as every job of one process reads it: its cohorts loaded and checked once, its patient-level
splits made (or imported) and saved, its gene groups, and each fold's gene selection fit on that fold's
training patients only. Also the options common to every command (:class:`RunOptions`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import TaskConfig, Tracking, cache_root
from .csvio import read_table
from .data.cohort import Cohort, load_cohorts, raise_problems
from .data.genes import GeneSelection, select_genes
from .data.omics import OmicsScaler
from .data.splits import fold_columns, fold_parts, make_splits, membership_digest, read_splits
from .data.task import load_task
from .errors import BenchError, DataError
from .store import write_splits

__all__ = ["RunOptions", "TaskData", "feature_sets", "fold_genes", "prepare_task", "train_cases"]


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
    return TaskData(
        task,
        internal,
        externals,
        splits,
        folds,
        seed,
        _read_gene_groups(task, internal),
        features if len(full.feature_sets) > 1 else None,
        tuple(full.feature_sets) if len(full.feature_sets) > 1 else (),
        repeat=repeat,
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

"""What each ``bench`` command does, given its options already parsed (bench/cli.py parses them): run a task,
submit it to Slurm, tune a method (``bench sweep``), ablate, report, explain, check a task's data. Each returns what it made; messages
about files written go through ``log``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from methods import get_method_class

from . import executors, sweep
from .baselines import FLOOR, ensure_references
from .config import TaskConfig, read_task
from .data.cohort import load_cohorts
from .data.splits import make_splits, membership_digest, read_splits
from .data.task import load_task
from .errors import BenchError
from .executors import SlurmOptions, run_jobs
from .explain import SlideExplanation, explain_slide, figure_for
from .figures import save_figure
from .jobs import expand_jobs, method_config, parse_methods, with_ceiling_models
from .report.document import write_report
from .report.results_tables import variant_table
from .store import fold_dir, fold_readable, load_results, write_summary
from .studies import storage_url
from .sweep import SweepOptions
from .sweep_report import write_sweep_report
from .tables import Table, write_table
from .taskdata import RunOptions, TaskData, prepare_task, saved_task_data
from .tracking import open_tracker, resolve_tracking

__all__ = [
    "ReportOptions",
    "ablate",
    "ablation_methods",
    "check_data",
    "explain",
    "report",
    "run",
    "start_tracking",
    "submit",
    "tune",
]

Log = Callable[[str], Any]


def run(task_ref: str, methods: Sequence[str], opts: RunOptions, progress: Any | None = None) -> pd.DataFrame:
    """Run every (method, fold) job of a task not yet on disk (in this process, or ``opts.workers``
    processes), then rebuild and return ``summary.csv``'s rows of ``methods``.

    Each job runs under a claim (bench/locks.py), so several ``bench run`` processes can share ``opts.out``.
    """
    data = prepare_task(task_ref, opts)
    methods = with_ceiling_models(data, methods)
    for method in methods:  # bad configurations (e.g. a missing sweep result) fail before any training
        method_config(data, method, opts)
    opts = start_tracking(data, methods, opts)
    run_jobs(data, expand_jobs(task_ref, methods, data.folds), opts, progress)
    references = ensure_references(data, opts.out)
    summary = write_summary(opts.out, data.task.name, (data.folds, data.seed))
    summary = summary[summary.method.isin([*methods, *references])]
    open_tracker(opts.track, opts.out).summary(data.task.name, summary)
    return summary


def start_tracking(data: TaskData, methods: Sequence[str], opts: RunOptions) -> RunOptions:
    """``opts`` with its tracking resolved (the command line's, else the task's; bench/tracking.py) and the
    store prepared for ``methods`` before any job starts; tracking off when the store fails (warned)."""
    track = resolve_tracking(opts.track, data.task.tracking, opts.out)
    if not open_tracker(track, opts.out).start(data.task.name, methods):
        track = None
    return dataclasses.replace(opts, track=track)


def submit(
    task_ref: str, methods: Sequence[str], opts: RunOptions, slurm: SlurmOptions
) -> tuple[str, list[Any]]:
    """Submit the jobs of ``methods`` not yet on disk as one Slurm array; returns the task's name and
    submitit's job handles (empty when everything is on disk)."""
    data = prepare_task(task_ref, opts)
    for name in methods:
        method_config(data, name, opts)
    opts = start_tracking(data, methods, opts)
    return data.task.name, executors.submit_slurm(
        data, expand_jobs(task_ref, methods, data.folds), opts, slurm
    )


def tune(
    task_ref: str,
    sw: SweepOptions,
    opts: RunOptions,
    formats: Sequence[str],
    log: Log,
    progress: Any | None = None,
) -> str:
    """The nested search of ``sw.method``, its ``best.yaml`` and its report; returns the task's name."""
    studies = sweep.search(task_ref, sw, opts, progress)
    task = read_task(task_ref).name
    best = sweep.write_best(
        studies, opts.out, task, sw.method, storage_url(sw.storage, opts.out, task, sw.method)
    )
    log(f"wrote {best}")
    for path in write_sweep_report(studies, opts.out, task, sw.method, formats):
        log(f"wrote {path}")
    return task


def ablation_methods(method: str) -> tuple[str, list[str]]:
    """The base name of ``method`` and the method names of every variant its ablation tables list."""
    base = parse_methods(method)[0]
    cls = get_method_class(base)
    if not cls.ablations:
        raise BenchError(f"method {base!r} declares no ablation variants (see `bench methods`).")
    names = [f"{base}[{v}]" if v else base for rows in cls.ablations.values() for _, v in rows]
    return base, list(dict.fromkeys(names))


def ablate(base: str, task_ref: str, out: Path, formats: Sequence[str], log: Log) -> list[Table]:
    """Write the ablation tables ``base`` declares from the variants' results on disk; returns them."""
    cls = get_method_class(base)
    task = read_task(task_ref).name
    results = load_results(out, task)
    tables = []
    for table_name, rows in cls.ablations.items():
        variants = [(label, f"{base}[{v}]" if v else base) for label, v in rows]
        caption = f"{base} {table_name.replace('_', ' ')} on {task}: AUC (%), mean ± SD over folds."
        note = cls.ablation_notes.get(table_name)
        table = variant_table(
            results,
            variants,
            f"{caption} {note}" if note else caption,
            f"tab:{base}-{table_name}",
            reference=base,
        )
        for path in write_table(table, Path(out) / task / "report", table_name, formats):
            log(f"wrote {path}")
        tables.append(table)
    return tables


@dataclass(frozen=True)
class ReportOptions:
    """What ``bench report`` writes and how its statistics are drawn."""

    formats: tuple[str, ...] = ("markdown", "latex")
    reference: str | None = None  # None: the best mean internal AUC per task
    n_boot: int = 2000
    seed: int = 0
    loc_slides: int = 12
    device: str = "cpu"


def report(task_refs: Sequence[str], out: Path, ro: ReportOptions, command: str, log: Log) -> Path:
    """Rebuild each task's summary, then write the report; returns report.md's path."""
    names = [load_task(t).name for t in task_refs]
    missing = [n for n in names if not (Path(out) / n).is_dir()]
    if missing:
        raise BenchError(
            f"no results for task(s) {missing} under {out}. Run `bench run --task ...` first, "
            "or point --out at the folder holding them."
        )
    for ref, n in zip(task_refs, names, strict=True):
        _references_on_disk(ref, n, out, log)
        write_summary(out, n)
    return write_report(
        out, names, ro.formats, ro.reference, ro.n_boot, ro.seed, ro.loc_slides, ro.device, command, log
    )


def _references_on_disk(task_ref: str, name: str, out: Path, log: Log) -> None:
    """The task's floor (and, synthetic, ceiling) rows for the folds on disk, computed where missing (cheap:
    no training) on the splits ``bench run`` saved, when those are the splits of every fold on disk. Rows
    already on disk are left as they are (``bench run`` recomputes any whose configuration changed)."""
    methods = [r for r in load_results(out, name).runs if r.kind == "method"]
    if not methods or all(fold_readable(fold_dir(out, name, FLOOR, k)) for k in {r.fold for r in methods}):
        return
    folds, seed = methods[0].design
    data = saved_task_data(task_ref, out, int(folds), int(seed))
    if data is None or any(r.config.get("split") != membership_digest(data.splits, r.fold) for r in methods):
        log(
            f"{name}: no floor or ceiling rows (no splits.tsv of the folds on disk; rerun `bench run` to add them)"
        )
        return
    ensure_references(data, out, log)


def explain(
    method: str, task_ref: str, slide: str, fold: int | None, out: Path, device: str, log: Log
) -> SlideExplanation:
    """Draw ``slide`` under a fold's model of ``method`` into ``<out>/<task>/report/explain/``."""
    name = load_task(task_ref).name
    ex = explain_slide(out, name, method, slide, fold, device)
    stem = f"explain_{method}_{slide}_fold{ex.fold}".replace("[", "-").replace("]", "")
    for path in save_figure(figure_for(ex), Path(out) / name / "report" / "explain", stem):
        log(f"wrote {path}")
    return ex


def check_data(task_ref: str) -> tuple[TaskConfig, list[str], list[str]]:
    """A task's cohorts described (lines) and every problem found in its files and splits, without training;
    returns the task, the lines and the problems."""
    cfg = load_task(task_ref)
    internal, externals, problems = load_cohorts(cfg)
    omics = (
        f", omics for {internal.omics.index.isin(internal.slides.case_id).sum()} patients "
        f"x {internal.omics.shape[1]} genes"
        if internal.omics is not None
        else ", no omics"
    )
    lines = [
        f"internal: {internal.slides.case_id.nunique()} patients, {len(internal.slides)} slides, "
        f"D={internal.dim}{omics}"
    ]
    lines += [
        f"external {name}: {c.slides.case_id.nunique()} patients, {len(c.slides)} slides, D={c.dim}"
        for name, c in externals.items()
    ]
    if not internal.problems:
        try:
            if cfg.splits is not None:
                read_splits(cfg.splits, internal.slides)
            else:
                make_splits(internal.slides, cfg.folds, cfg.seed, cfg.val_fraction, cfg.split_by)
        except BenchError as exc:
            problems.append(str(exc))
    return cfg, lines, problems

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
from .taskdata import RunOptions, TaskData, feature_sets, prepare_task, saved_task_data
from .tasktypes import task_type
from .tracking import open_tracker, resolve_tracking

__all__ = [
    "ReportOptions",
    "ablate",
    "ablation_methods",
    "check_data",
    "explain",
    "prepare_views",
    "report",
    "run",
    "start_tracking",
    "submit",
    "tune",
]

Log = Callable[[str], Any]


def run(task_ref: str, methods: Sequence[str], opts: RunOptions, progress: Any | None = None) -> pd.DataFrame:
    """Run every (method, fold) job of a task not yet on disk, on each of its feature sets and each repeat
    of the CV design (in this process, or ``opts.workers`` processes), then rebuild and return
    ``summary.csv``'s rows of ``methods``.

    Each job runs under a claim (bench/locks.py), so several ``bench run`` processes can share ``opts.out``.
    """
    views = prepare_views(task_ref, methods, opts)
    methods = with_ceiling_models(views[0], methods)  # on a synthetic task: the privileged student
    for data in views:
        for method in methods:
            method_config(data, method, opts)
    opts = start_tracking(views, methods, opts)
    for data in views:
        run_jobs(data, expand_jobs(task_ref, methods, data.folds), opts, progress)
    references = {r for data in views for r in ensure_references(data, opts.out)}
    data = views[0]
    summary = write_summary(opts.out, data.task.name, (data.folds, data.seed))
    summary = summary[summary.method.isin([*methods, *references])]
    tracked = summary[summary.method.isin(methods)]  # the reference rows have no runs in the store
    open_tracker(opts.track, opts.out).summary(data.task.name, _as_tracked(tracked))
    return summary


def _as_tracked(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows as the tracking store's method runs name them: ``<method>@<features>`` on several feature
    sets; with repeats, the rows over all of them."""
    if "repeat" in summary:
        summary = summary[summary.repeat == "all"].drop(columns="repeat")
    if "features" in summary:
        summary = summary.assign(method=summary.method + "@" + summary.features).drop(columns="features")
    return summary


def prepare_views(task_ref: str, methods: Sequence[str], opts: RunOptions) -> list[TaskData]:
    """The task's data on each feature set to run (``opts.features``, default all; one with a single set) and
    each repeat of the CV design (``opts.repeats``), every method's configuration checked on each before any
    training (e.g. a missing sweep result). The feature sets of one repeat share its splits, so the
    comparison between them is paired; a set that lacks slides another has would break that, and is
    refused."""
    task = load_task(task_ref)
    views = [
        prepare_task(task_ref, opts, f, r)
        for r in range(opts.repeats)
        for f in feature_sets(task, opts.features)
    ]
    for data in views:
        first = next(v for v in views if v.repeat == data.repeat)
        if not data.splits.equals(first.splits):
            raise BenchError(
                f"{task.path}: feature sets {first.features!r} and {data.features!r} give different "
                "slides, so their folds would differ. Give every feature set the same slides (see "
                "`bench data check`)."
            )
        for method in methods:
            method_config(data, method, opts)
    return views


def start_tracking(views: Sequence[TaskData], methods: Sequence[str], opts: RunOptions) -> RunOptions:
    """``opts`` with its tracking resolved (the command line's, else the task's; bench/tracking.py) and the
    store prepared for ``methods`` (on every feature set) before any job starts; tracking off when the
    store fails (warned)."""
    data = views[0]
    track = resolve_tracking(opts.track, data.task.tracking, opts.out)
    names = [v.tracked_name(m) for v in views for m in methods]
    if not open_tracker(track, opts.out).start(data.task.name, names):
        track = None
    return dataclasses.replace(opts, track=track)


def submit(
    task_ref: str, methods: Sequence[str], opts: RunOptions, slurm: SlurmOptions
) -> tuple[str, list[Any]]:
    """Submit the jobs of ``methods`` not yet on disk (on each feature set) as Slurm arrays, one per feature
    set; returns the task's name and submitit's job handles (empty when everything is on disk)."""
    views = prepare_views(task_ref, methods, opts)
    opts = start_tracking(views, methods, opts)
    handles = [
        h
        for data in views
        for h in executors.submit_slurm(data, expand_jobs(task_ref, methods, data.folds), opts, slurm)
    ]
    return views[0].task.name, handles


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


#: the score an ablation table shows, by task type
_SCORE_NAMES = {"binary": "AUC", "multiclass": "macro one-vs-rest AUC", "survival": "Harrell's c-index"}


def ablate(base: str, task_ref: str, out: Path, formats: Sequence[str], log: Log) -> list[Table]:
    """Write the ablation tables ``base`` declares from the variants' results on disk; returns them."""
    cls = get_method_class(base)
    config = read_task(task_ref)
    task, score = config.name, _SCORE_NAMES[task_type(config).name]
    tables = []
    for results in load_results(out, task).by_features():  # one set of tables per feature set
        tag = "" if results.features is None else f"_{results.features}"
        for table_name, rows in cls.ablations.items():
            variants = [(label, f"{base}[{v}]" if v else base) for label, v in rows]
            caption = f"{base} {table_name.replace('_', ' ')} on {results.label}: {score} (%), mean ± SD over folds."
            note = cls.ablation_notes.get(table_name)
            table = variant_table(
                results,
                variants,
                f"{caption} {note}" if note else caption,
                f"tab:{base}-{table_name}{tag}",
                reference=base,
            )
            for path in write_table(table, Path(out) / task / "report", f"{table_name}{tag}", formats):
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
    """The task's floor (and, synthetic, ceiling) rows for the folds on disk of each feature set and repeat,
    computed where missing (cheap: no training) on the splits ``bench run`` saved, when those are the splits
    of the folds on disk. Rows already on disk are left as they are (``bench run`` recomputes any whose
    configuration changed)."""
    methods = [r for r in load_results(out, name).runs if r.kind == "method"]
    for features, repeat in sorted({(r.features, r.repeat) for r in methods}, key=str):
        mine = [r for r in methods if (r.features, r.repeat) == (features, repeat)]
        folds = {r.fold for r in mine}
        if all(fold_readable(fold_dir(out, name, FLOOR, k, features, repeat)) for k in folds):
            continue
        n_folds, seed = mine[0].design
        data = saved_task_data(task_ref, out, int(n_folds), int(seed), features, repeat)
        if data is None or any(r.config.get("split") != membership_digest(data.splits, r.fold) for r in mine):
            log(
                f"{name}: no floor or ceiling rows (no splits of the folds on disk; rerun `bench run` to add them)"
            )
            continue
        ensure_references(data, out, log)


def explain(
    method: str,
    task_ref: str,
    slide: str,
    fold: int | None,
    out: Path,
    device: str,
    log: Log,
    features: str | None = None,
) -> SlideExplanation:
    """Draw ``slide`` under a fold's model of ``method`` (on feature set ``features``; default: the task's
    first) into ``<out>/<task>/report/explain/``."""
    task = load_task(task_ref)
    sets = feature_sets(task, None if features is None else [features])
    ex = explain_slide(out, task.name, method, slide, fold, device, sets[0])
    tag = "" if sets[0] is None else f"_{sets[0]}"
    stem = f"explain_{method}{tag}_{slide}_fold{ex.fold}".replace("[", "-").replace("]", "")
    for path in save_figure(figure_for(ex), Path(out) / task.name / "report" / "explain", stem):
        log(f"wrote {path}")
    return ex


def check_data(task_ref: str) -> tuple[TaskConfig, list[str], list[str]]:
    """A task's cohorts described (lines) and every problem found in its files and splits, on each of its
    feature sets, without training; returns the task, the lines and the problems."""
    full = load_task(task_ref)
    lines: list[str] = []
    problems: list[str] = []
    for features in feature_sets(full, None):
        cfg = full.with_features(features)
        internal, externals, found = load_cohorts(cfg)
        problems += [p if features is None else f"feature set {features!r}: {p}" for p in found]
        omics = (
            f", omics for {internal.omics.index.isin(internal.slides.case_id).sum()} patients "
            f"x {internal.omics.shape[1]} genes"
            if internal.omics is not None
            else ", no omics"
        )
        tag = "" if features is None else f" [{features}]"
        lines.append(
            f"internal{tag}: {internal.slides.case_id.nunique()} patients, {len(internal.slides)} slides, "
            f"D={internal.dim}{omics}"
        )
        lines += [
            f"external {name}{tag}: {c.slides.case_id.nunique()} patients, {len(c.slides)} slides, D={c.dim}"
            for name, c in externals.items()
        ]
    if full.type == "survival":
        events = internal.slides.drop_duplicates("case_id").event
        lines.append(
            f"survival: {int((events == 1).sum())} events, {int((events == 0).sum())} censored patients"
        )
    if not internal.problems:  # the labels are every feature set's: one split check
        try:
            if cfg.splits is not None:
                read_splits(cfg.splits, internal.slides)
            else:
                make_splits(internal.slides, cfg.folds, cfg.seed, cfg.val_fraction, cfg.split_by)
        except BenchError as exc:
            problems.append(str(exc))
    return full, lines, problems

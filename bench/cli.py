"""The ``bench`` command line (typer + rich): each command parses its options (bench/cli_options.py builds the
option objects) and calls bench/commands.py. Heavy imports happen inside the commands, so ``--help`` is instant.

Bad input ends with one paragraph naming the file and the fix, exit code 2, and no traceback.

Length (~430 lines): typer declares every option of every command in its signature; the bodies only build
option objects and delegate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .cli_options import (
    Device,
    Epochs,
    Features,
    Folds,
    Format,
    Out,
    Precision,
    Quiet,
    Repeats,
    Seed,
    TaskOpt,
    Track,
    TrackUri,
    Workers,
    console,
    err_console,
    feature_names,
    progress_bar,
    run_options,
    table_formats,
    write_crash_log,
)
from .errors import BenchError, plain_warnings
from .redact import redact

app = typer.Typer(
    name="bench",
    help="Benchmark of MIL and genomics-to-pathology knowledge distillation on whole-slide image features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect a task's data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _run_and_print(task: str, methods: list[str], opts) -> None:
    from .commands import run
    from .report.results_tables import summary_rich_table

    progress = progress_bar(opts.quiet)
    if progress is None:
        summary = run(task, methods, opts)
    else:
        with progress:
            summary = run(task, methods, opts, progress)
    console.print(
        summary_rich_table(
            summary,
            f"{summary.task.iloc[0] if len(summary) else task}: "
            "patient-level AUC / ACC / balanced ACC / F1, % mean ± SD over folds",
        )
    )
    console.print(f"Results in {opts.out / (summary.task.iloc[0] if len(summary) else task)}")


@app.command("run")
def run_cmd(
    task: TaskOpt,
    methods: Annotated[
        str,
        typer.Option(
            "--methods", help="'all' or a comma-separated list, e.g. abmil,momkd[fixed-memory],momkd[best]."
        ),
    ] = "all",
    out: Out = Path("results"),
    folds: Folds = None,
    seed: Seed = None,
    epochs: Epochs = None,
    device: Device = "auto",
    workers: Workers = 1,
    precision: Precision = "auto",
    quiet: Quiet = False,
    track: Track = None,
    track_uri: TrackUri = None,
    features: Features = None,
    repeats: Repeats = 1,
    executor: Annotated[
        str, typer.Option("--executor", help="local (this machine) | slurm (a job array via submitit).")
    ] = "local",
    slurm_partition: Annotated[str | None, typer.Option("--slurm-partition", help="Slurm partition.")] = None,
    slurm_gpus: Annotated[int, typer.Option("--slurm-gpus", help="GPUs per job.", min=0)] = 1,
    slurm_time: Annotated[
        int, typer.Option("--slurm-time", help="Time limit per job, minutes.", min=1)
    ] = 240,
    slurm_mem: Annotated[int, typer.Option("--slurm-mem", help="Memory per job, GB.", min=1)] = 32,
    slurm_cpus: Annotated[int, typer.Option("--slurm-cpus", help="CPU cores per job.", min=1)] = 8,
    slurm_account: Annotated[str | None, typer.Option("--slurm-account", help="Slurm account.")] = None,
    slurm_parallel: Annotated[
        int, typer.Option("--slurm-parallel", help="Array tasks running at once.", min=1)
    ] = 64,
    slurm_extra: Annotated[
        list[str] | None,
        typer.Option(
            "--slurm-extra", help="Any other sbatch option as KEY=VALUE (repeatable), e.g. qos=high."
        ),
    ] = None,
) -> None:
    """K-fold CV of each method on a task, plus every external cohort; resumable."""
    # Long only because typer reads every option from the signature; the body builds option objects and delegates.
    from .jobs import parse_methods

    opts = run_options(
        out, folds, seed, epochs, device, workers, quiet, precision, track, track_uri, features, repeats
    )
    names = parse_methods(methods)
    if executor == "local":
        _run_and_print(task, names, opts)
        return
    if executor != "slurm":
        raise BenchError(f"--executor {executor!r}: choose local or slurm.")
    from .commands import submit
    from .executors import SlurmOptions

    extra = dict(kv.split("=", 1) for kv in slurm_extra or [] if "=" in kv)
    if len(extra) != len(slurm_extra or []):
        raise BenchError("--slurm-extra takes KEY=VALUE, e.g. --slurm-extra qos=high.")
    slurm = SlurmOptions(
        partition=slurm_partition,
        gpus=slurm_gpus,
        time_min=slurm_time,
        mem_gb=slurm_mem,
        cpus=slurm_cpus,
        account=slurm_account,
        array_parallelism=slurm_parallel,
        extra=extra,
    )
    task_name, submitted = submit(task, names, opts, slurm)
    if not submitted:
        console.print(f"Every job of {', '.join(names)} on {task_name} is already in {out}.")
        return
    console.print(f"Submitted {len(submitted)} job(s): {' '.join(j.job_id for j in submitted)}")
    console.print(
        f"Logs in {out / task_name / 'slurm'}. When they are done: bench report --task {task} --out {out}"
    )


@app.command("sweep")
def sweep_cmd(
    method: Annotated[str, typer.Argument(help="The method to tune, e.g. momkd.")],
    task: TaskOpt,
    params: Annotated[
        str | None,
        typer.Option("--params", help="Comma-separated names to search (default: the method's whole space)."),
    ] = None,
    trials: Annotated[
        int, typer.Option("--trials", help="Trials per outer fold (all workers together).", min=0)
    ] = 20,
    inner_folds: Annotated[
        int,
        typer.Option(
            "--inner-folds",
            help="1: score each outer fold's search on its validation patients; J >= 2: by a J-fold inner CV "
            "of its training and validation patients (J times the cost).",
            min=1,
        ),
    ] = 1,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Stop starting trials after this many seconds.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Optuna storage URL (sqlite:///x.db, postgresql://user:pw@host/db) or journal file "
            "(journal:PATH or PATH.journal). Default: <out>/<task>/sweeps/<method>.db.",
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option(
            "--study-name", help="Study name (default: <task>-<method>); fold k's is <name>-fold<k>."
        ),
    ] = None,
    sampler_seed: Annotated[
        int | None,
        typer.Option(
            "--sampler-seed", help="TPE seed (default: the task seed); differ per separate process."
        ),
    ] = None,
    pruning: Annotated[
        bool, typer.Option("--pruning/--no-pruning", help="Median pruning after the first inner fold.")
    ] = True,
    run_best: Annotated[
        bool,
        typer.Option(
            "--run-best/--no-run-best", help="Then run <method>[best] on the folds (test, external)."
        ),
    ] = True,
    out: Out = Path("results"),
    folds: Folds = None,
    seed: Seed = None,
    epochs: Epochs = None,
    device: Device = "auto",
    workers: Workers = 1,
    precision: Precision = "auto",
    quiet: Quiet = False,
    track: Track = None,
    track_uri: TrackUri = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features", help="The feature set to tune on, on a task with several (default: the first)."
        ),
    ] = None,
    fmt: Format = "both",
) -> None:
    """Nested Optuna search, one per outer fold, blind to its test patients; then <method>[best] on the folds."""
    # Long only because typer reads every option from the signature; the body builds option objects and delegates.
    from .commands import tune
    from .sweep import SweepOptions

    formats = table_formats(fmt)
    opts = run_options(
        out, folds, seed, epochs, device, workers, quiet, precision, track, track_uri, features
    )
    sw = SweepOptions(
        method=method,
        params=None if params is None else tuple(p.strip() for p in params.split(",") if p.strip()),
        trials=trials,
        timeout=timeout,
        storage=storage,
        study_name=study_name,
        sampler_seed=sampler_seed,
        pruning=pruning,
        inner_folds=inner_folds,
    )
    progress = progress_bar(quiet)
    if progress is None:
        tune(task, sw, opts, formats, console.print)
    else:
        with progress:
            tune(task, sw, opts, formats, console.print, progress)
    if run_best:
        _run_and_print(task, [f"{method}[best]"], opts)


@app.command("ablate")
def ablate_cmd(
    method: Annotated[str, typer.Argument(help="A method that declares ablation variants, e.g. momkd.")],
    task: TaskOpt,
    out: Out = Path("results"),
    folds: Folds = None,
    seed: Seed = None,
    epochs: Epochs = None,
    device: Device = "auto",
    workers: Workers = 1,
    precision: Precision = "auto",
    quiet: Quiet = False,
    track: Track = None,
    track_uri: TrackUri = None,
    features: Features = None,
    repeats: Repeats = 1,
    fmt: Format = "both",
) -> None:
    """Run a method's ablation variants on the same folds, then write its ablation tables."""
    from .commands import ablate, ablation_methods

    base, names = ablation_methods(method)
    opts = run_options(
        out, folds, seed, epochs, device, workers, quiet, precision, track, track_uri, features, repeats
    )
    _run_and_print(task, names, opts)
    for table in ablate(base, task, out, table_formats(fmt), console.print):
        console.print(table.markdown())


@app.command("report")
def report_cmd(
    task: Annotated[
        str, typer.Option("--task", help="One task or a comma-separated list, e.g. her2,pr,odx.")
    ],
    out: Out = Path("results"),
    fmt: Format = "both",
    vs: Annotated[
        str | None,
        typer.Option("--vs", help="Reference method of the paired tests (default: best mean internal AUC)."),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95 % CIs.", min=1000)
    ] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap and of the slide samples.")] = 0,
    loc_slides: Annotated[
        int,
        typer.Option(
            "--loc-slides",
            help="Test slides per fold scored for localisation (synthetic data; 0: skip).",
            min=0,
        ),
    ] = 12,
    device: Device = "cpu",
) -> None:
    """Tables, figures and <out>/report.md from what is on disk (CIs, paired tests); never retrains."""
    import shlex

    from .commands import ReportOptions, report

    ro = ReportOptions(
        formats=tuple(table_formats(fmt)),
        reference=vs,
        n_boot=bootstrap,
        seed=seed,
        loc_slides=loc_slides,
        device=device,
    )
    command = redact("bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    path = report([t for t in task.split(",") if t.strip()], out, ro, command, console.print)
    console.print(f"Open {path} for the tables, figures and how they were computed.")


@app.command("explain")
def explain_cmd(
    method: Annotated[str, typer.Argument(help="A method (or variant) run on the task, e.g. momkd.")],
    task: TaskOpt,
    slide: Annotated[str, typer.Option("--slide", help="slide_id of the slide to draw.")],
    fold: Annotated[
        int | None,
        typer.Option("--fold", help="Whose model to use (default: the fold that tested the slide).", min=0),
    ] = None,
    out: Out = Path("results"),
    device: Device = "cpu",
    features: Annotated[
        str | None,
        typer.Option(
            "--features", help="Whose feature set's model, on a task with several (default: the first)."
        ),
    ] = None,
) -> None:
    """Draw a slide's patches coloured by a trained model's attention and the method's own patch maps."""
    from .commands import explain

    chosen = feature_names(features)
    if chosen is not None and len(chosen) > 1:
        raise BenchError("--features: bench explain draws one feature set's model; name one.")
    ex = explain(method, task, slide, fold, out, device, console.print, chosen[0] if chosen else None)
    line = f"{method} · {slide} · fold {ex.fold} ({ex.part}) · P(positive) {ex.prob:.3f}"
    if ex.relevance is not None:
        line += f" · localisation AUC {ex.localisation_auc:.3f} (attention vs ground-truth relevance > 0)"
    console.print(line)


@app.command("methods")
def methods_cmd() -> None:
    """List the registered methods: variants, what each does, its paper and the authors' code it follows."""
    from rich.table import Table

    from methods.registry import method_rows

    table = Table("method", "variants", "what", "paper", "authors' code (commit)")
    for row in method_rows():
        table.add_row(row["name"], row["variants"], row["summary"], row["paper"], row["code"])
    console.print(table)


@app.command("tasks")
def tasks_cmd() -> None:
    """List the built-in tasks."""
    import yaml
    from rich.table import Table

    from .config import list_builtin_tasks

    table = Table("task", "label", "positive", "source", "file")
    for path in list_builtin_tasks():
        raw = yaml.safe_load(path.read_text()) or {}
        table.add_row(
            path.stem,
            str(raw.get("label_col")),
            ", ".join(map(str, raw.get("positive", []))),
            str(raw.get("source", "files")),
            str(path),
        )
    console.print(table)


@data_app.command("check")
def data_check_cmd(task: TaskOpt) -> None:
    """Validate a task's files and print every problem found, without training."""
    from .commands import check_data

    cfg, lines, problems = check_data(task)
    for line in lines:
        console.print(line)
    if problems:
        for p in problems:
            err_console.print(f"[red]✗[/red] {p}")
        raise BenchError(f"{len(problems)} problem(s) found in task {cfg.name!r} ({cfg.path}); see above.")
    console.print(f"[green]✓[/green] task {cfg.name!r}: no problems found.")


def main() -> None:
    """Console entry point: usage errors give the usage message (exit 2), a ``BenchError`` its paragraph
    (exit 2), and anything unexpected one line pointing at the traceback written under ``--out`` (exit 1);
    a tracking store's failure one warning line."""
    plain_warnings()
    try:
        app(standalone_mode=False)
    except BenchError as exc:
        err_console.print(
            f"[bold red]error:[/bold red] {escape(redact(str(exc)))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted; finished folds are kept and a rerun resumes from them.")
        sys.exit(130)
    except (
        OSError
    ) as exc:  # the file system said no (a file where a folder should be, permissions, disk full)
        where = f" {exc.filename}" if exc.filename else ""
        err_console.print(
            f"[bold red]error:[/bold red]{escape(redact(where))}: {escape(redact(exc.strerror or str(exc)))}. "
            "Fix: check that "
            "the path exists as the right kind (folder or file), that you may read and write it, and that "
            "the disk has space; results already written are kept.",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # typer's click: usage errors (exit 2) and other click errors
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err_console.print(f"error: {escape(exc.format_message())}", highlight=False)
        sys.exit(exc.exit_code)
    except Exception as exc:
        log = write_crash_log(exc)
        where = f"the traceback is in {log}" if log else "no log could be written"
        err_console.print(
            f"[bold red]internal error:[/bold red] {escape(type(exc).__name__)}: {escape(redact(str(exc)))} "
            f"({escape(where)}; please report it with that file).",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()

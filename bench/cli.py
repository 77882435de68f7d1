"""The ``bench`` command line (typer + rich). Heavy imports happen inside the commands, so ``--help`` is instant.

Bad input ends with one paragraph naming the file and the fix, exit code 2, and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import BenchError

app = typer.Typer(
    name="bench",
    help="Benchmark of MIL and genomics-to-pathology knowledge distillation on whole-slide image features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect a task's data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

Out = Annotated[Path, typer.Option("--out", help="Output folder.")]
Folds = Annotated[
    int | None, typer.Option("--folds", help="Number of CV folds (default: the task's).", min=2)
]
Seed = Annotated[
    int | None, typer.Option("--seed", help="Seed for splits and training (default: the task's).")
]
Epochs = Annotated[
    int | None, typer.Option("--epochs", help="Cap on training epochs (for quick runs).", min=1)
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:i")]
Workers = Annotated[int, typer.Option("--workers", help="Jobs run in parallel.", min=1)]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
TaskOpt = Annotated[str, typer.Option("--task", help="Built-in task name or path to a task YAML.")]


def _options(out: Path, folds, seed, epochs, device: str, workers: int, quiet: bool):
    from .runner import RunOptions

    return RunOptions(
        out=out, folds=folds, seed=seed, epochs=epochs, device=device, workers=workers, quiet=quiet
    )


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def _run_and_print(task: str, methods: list[str], opts) -> None:
    from .report import summary_rich_table
    from .runner import run

    progress = _progress(opts.quiet)
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
        typer.Option("--methods", help="'all' or a comma-separated list, e.g. abmil,momkd[fixed-memory]."),
    ] = "all",
    out: Out = Path("results"),
    folds: Folds = None,
    seed: Seed = None,
    epochs: Epochs = None,
    device: Device = "auto",
    workers: Workers = 1,
    quiet: Quiet = False,
) -> None:
    """K-fold CV of each method on a task, plus every external cohort; resumable."""
    from .runner import parse_methods

    opts = _options(out, folds, seed, epochs, device, workers, quiet)
    _run_and_print(task, parse_methods(methods), opts)


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
    quiet: Quiet = False,
    fmt: Annotated[str, typer.Option("--format", help="markdown | latex | both")] = "both",
) -> None:
    """Run a method's ablation variants on the same folds, then write its ablation tables."""
    from methods import get_method_class

    from .config import load_task
    from .report import variant_table, write_table
    from .runner import parse_methods

    base = parse_methods(method)[0]
    cls = get_method_class(base)
    if not cls.ablations:
        raise BenchError(f"method {base!r} declares no ablation variants (see `bench methods`).")
    names = list(
        dict.fromkeys(f"{base}[{v}]" if v else base for rows in cls.ablations.values() for _, v in rows)
    )
    opts = _options(out, folds, seed, epochs, device, workers, quiet)
    _run_and_print(task, names, opts)
    task_name = load_task(task).name
    for table_name, rows in cls.ablations.items():
        variants = [(label, f"{base}[{v}]" if v else base) for label, v in rows]
        table = variant_table(
            out,
            task_name,
            variants,
            f"{base} {table_name.replace('_', ' ')} on {task_name}: AUC (%), mean ± SD over folds.",
            f"tab:{base}-{table_name}",
        )
        for path in write_table(table, out / task_name / "report", table_name, _formats(fmt)):
            console.print(f"wrote {path}")
        console.print(table.markdown())


def _formats(fmt: str) -> list[str]:
    choices = {"markdown": ["markdown"], "latex": ["latex"], "both": ["markdown", "latex"]}
    if fmt not in choices:
        raise BenchError(f"--format {fmt!r}: choose markdown, latex or both.")
    return choices[fmt]


@app.command("report")
def report_cmd(
    task: Annotated[
        str, typer.Option("--task", help="One task or a comma-separated list, e.g. her2,pr,odx.")
    ],
    out: Out = Path("results"),
    fmt: Annotated[str, typer.Option("--format", help="markdown | latex | both")] = "both",
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

    from .config import load_task
    from .report import write_report
    from .store import write_summary

    names = [load_task(t).name for t in task.split(",") if t.strip()]
    missing = [n for n in names if not (out / n).is_dir()]
    if missing:
        raise BenchError(
            f"no results for task(s) {missing} under {out}. Run `bench run --task ...` first, "
            "or point --out at the folder holding them."
        )
    for n in names:
        write_summary(out, n)
    command = "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = write_report(
        out, names, _formats(fmt), vs, bootstrap, seed, loc_slides, device, command, log=console.print
    )
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
) -> None:
    """Draw a slide's patches coloured by a trained model's attention (and MoMKD's memory assignments)."""
    from .config import load_task
    from .explain import explain_slide, figure_for
    from .figures import save_figure

    name = load_task(task).name
    ex = explain_slide(out, name, method, slide, fold, device)
    stem = f"explain_{method}_{slide}_fold{ex.fold}".replace("[", "-").replace("]", "")
    for path in save_figure(figure_for(ex), out / name / "report" / "explain", stem):
        console.print(f"wrote {path}")
    line = f"{method} · {slide} · fold {ex.fold} ({ex.part}) · P(positive) {ex.prob:.3f}"
    if ex.relevance is not None:
        line += f" · localisation AUC {ex.localisation_auc:.3f} (attention vs ground-truth relevance > 0)"
    console.print(line)


@app.command("methods")
def methods_cmd() -> None:
    """List the registered methods and their variants."""
    from rich.table import Table

    from methods import get_method_class, list_methods

    table = Table("method", "variants", "what")
    for name in list_methods():
        cls = get_method_class(name)
        table.add_row(name, ", ".join(cls.variants) or "–", cls.summary)
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
    from .config import load_task
    from .data.cohort import load_cohort
    from .data.splits import check_splits, make_splits, read_splits

    cfg = load_task(task)
    problems: list[str] = []
    internal = load_cohort(cfg, "internal")
    problems += internal.problems
    summary = [
        f"internal: {internal.slides.case_id.nunique()} patients, {len(internal.slides)} slides, D={internal.dim}"
        + (
            f", omics for {internal.omics.index.isin(internal.slides.case_id).sum()} patients "
            f"x {internal.omics.shape[1]} genes"
            if internal.omics is not None
            else ", no omics"
        )
    ]
    for ext in cfg.external:
        cohort = load_cohort(cfg, ext.name)
        problems += cohort.problems
        if internal.dim and cohort.dim and cohort.dim != internal.dim:
            problems.append(
                f"{ext.features}: external cohort {ext.name!r} has D={cohort.dim}, internal D={internal.dim}. "
                "Fix: extract both cohorts with the same encoder."
            )
        summary.append(
            f"external {ext.name}: {cohort.slides.case_id.nunique()} patients, {len(cohort.slides)} slides, D={cohort.dim}"
        )
    if not internal.problems:
        try:
            if cfg.splits is not None:
                read_splits(cfg.splits, internal.slides)
            else:
                check_splits(make_splits(internal.slides, cfg.folds, cfg.seed, cfg.val_fraction))
        except BenchError as exc:
            problems.append(str(exc))
    for line in summary:
        console.print(line)
    if problems:
        for p in problems:
            err_console.print(f"[red]✗[/red] {p}")
        raise BenchError(f"{len(problems)} problem(s) found in task {cfg.name!r} ({cfg.path}); see above.")
    console.print(f"[green]✓[/green] task {cfg.name!r}: no problems found.")


def main() -> None:
    """Console entry point: run the app, turning user-facing errors into one paragraph and exit code 2."""
    try:
        app(standalone_mode=False)
    except BenchError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished folds are kept and a rerun resumes from them.")
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()

"""The options ``bench`` commands share, as typer annotations, and their conversion into the frozen option
objects the commands take (:class:`bench.taskdata.RunOptions`); the consoles the CLI prints to, and the log
an unexpected error leaves."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import BenchError
from .redact import redact

__all__ = [
    "Device",
    "Epochs",
    "Features",
    "Folds",
    "Format",
    "Out",
    "Precision",
    "Quiet",
    "Repeats",
    "Seed",
    "TaskOpt",
    "Track",
    "TrackUri",
    "Workers",
    "console",
    "err_console",
    "feature_names",
    "progress_bar",
    "run_options",
    "table_formats",
    "write_crash_log",
]

console = Console()
if not console.is_terminal:  # piped or captured: do not squeeze result tables into 80 columns
    console = Console(width=160)
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
Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 (autocast, the CPU included).",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
Track = Annotated[
    str | None,
    typer.Option(
        "--track",
        help="Log each fold to mlflow | tensorboard (the 'tracking' extra), or none (default: the task's "
        "'tracking:' block, else none).",
    ),
]
TrackUri = Annotated[
    str | None,
    typer.Option(
        "--track-uri",
        help="MLflow tracking URI (http://host:5000, sqlite:///x.db) or a folder (default: <out>/mlruns, "
        "<out>/tensorboard).",
    ),
]
TaskOpt = Annotated[str, typer.Option("--task", help="Built-in task name or path to a task YAML.")]
Repeats = Annotated[
    int,
    typer.Option(
        "--repeats",
        help="Run the whole CV design R times, repeat r with split seed seed + r; the report's tests use every "
        "repeat (the corrected repeated k-fold t-test).",
        min=1,
    ),
]
Features = Annotated[
    str | None,
    typer.Option(
        "--features",
        help="Comma-separated feature sets of a task that gives several (features: {name: folder}); "
        "default: every one.",
    ),
]


def run_options(
    out: Path,
    folds,
    seed,
    epochs,
    device: str,
    workers: int,
    quiet: bool,
    precision: str = "auto",
    track: str | None = None,
    track_uri: str | None = None,
    features: str | None = None,
    repeats: int = 1,
):
    from .device import PRECISIONS, cpu_has_bf16
    from .taskdata import RunOptions
    from .tracking import tracking_spec

    if precision not in PRECISIONS:
        raise BenchError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if precision == "bf16" and device == "cpu" and cpu_has_bf16() is False:
        err_console.print(
            "warning: --precision bf16 on a CPU without native bf16 (no AVX-512-BF16/AMX): "
            "expect it to be several times slower than fp32."
        )
    return RunOptions(
        out=out,
        folds=folds,
        seed=seed,
        epochs=epochs,
        device=device,
        workers=workers,
        quiet=quiet,
        precision=precision,
        track=tracking_spec(track, track_uri),
        features=feature_names(features),
        repeats=repeats,
    )


def feature_names(features: str | None) -> tuple[str, ...] | None:
    """``--features a,b`` as names (None: not given)."""
    if features is None:
        return None
    names = tuple(f.strip() for f in features.split(",") if f.strip())
    if not names:
        raise BenchError("--features needs one or more feature-set names, e.g. --features uni_v2,conch_v15.")
    return names


def progress_bar(quiet: bool):
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


def table_formats(fmt: str) -> list[str]:
    choices = {"markdown": ["markdown"], "latex": ["latex"], "both": ["markdown", "latex"]}
    if fmt not in choices:
        raise BenchError(f"--format {fmt!r}: choose markdown, latex or both.")
    return choices[fmt]


Format = Annotated[str, typer.Option("--format", help="markdown | latex | both")]


def _out_folder(argv: list[str]) -> Path:
    """The ``--out`` folder named on the command line (default ``results``), read without parsing."""
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--out="):
            return Path(arg.split("=", 1)[1])
    return Path("results")


def write_crash_log(exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected error under ``<out>/logs/`` (else the temp folder); its path."""
    import tempfile
    import time
    import traceback

    text = f"bench {' '.join(sys.argv[1:])}\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n" + "".join(
        traceback.format_exception(exc)
    )
    text = redact(text)  # a --storage URL's password, on the command line or in a message
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (_out_folder(sys.argv[1:]) / "logs", Path(tempfile.gettempdir()) / "bench-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return None

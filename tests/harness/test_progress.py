"""The progress display of ``bench run`` (bench/progress.py): plain lines off a terminal, a rich display on
one, per finished fold with an ETA, in this process and with a process pool."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from bench.commands import run
from bench.progress import RunProgress, format_eta
from bench.taskdata import RunOptions


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=120), buf


def test_off_a_terminal_one_plain_line_per_finished_fold():
    console, buf = _console(False)
    with RunProgress(console) as progress:
        assert not progress.live
        progress.start("toy: 2 folds to train", 2)
        for key in ("a", "b"):
            progress.fold_started(key, f"toy · abmil · fold {key}")
            progress.fold_checked(key, 100, 400, "val AUC 0.700")
            progress.fold_checked(key, 200, 400, "val AUC 0.710")
            progress.fold_finished(key, "trained")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in buf.getvalue()  # no check lines, no escape codes
    assert lines[0].startswith("[1/2] toy · abmil · fold a · trained (200 updates, ") and "ETA" in lines[0]
    assert lines[1].endswith("ETA 0 s")


def test_on_a_terminal_the_display_shows_updates_and_an_eta():
    console, buf = _console(True)
    with RunProgress(console) as progress:
        assert progress.live
        progress.start("toy: 1 folds to train", 1)
        progress.fold_started("a", "toy · abmil · fold 0")
        progress.fold_checked("a", 100, 400, "val AUC 0.700")
        progress.fold_waiting("a", "running elsewhere")
        progress.fold_finished("a", "trained")
        progress.fold_finished("never started", "skipped", "toy · abmil · fold 1")
    assert "toy · abmil · fold 0 · trained (100 updates" in buf.getvalue()


def test_eta_text():
    assert [format_eta(s) for s in (None, float("nan"), 12, 600, 3900)] == [
        "?",
        "?",
        "12 s",
        "10 min",
        "1 h 05 min",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_reports_every_fold(small_task, tmp_path, workers):
    console, buf = _console(False)
    opts = RunOptions(out=tmp_path / "res", folds=2, epochs=1, workers=workers)
    with RunProgress(console) as progress:
        run(str(small_task), ["abmil"], opts, progress)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and all("toy · abmil · fold" in line and "trained" in line for line in lines)
    assert all("updates" in line for line in lines)  # the workers' checks reached the display

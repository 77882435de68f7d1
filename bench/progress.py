"""What ``bench run`` shows while it trains: per fold its method, fold, optimiser updates (of the most it
can make) and an ETA, and over the run the folds done and an ETA.

It is told about a fold when it starts, at each validation check and when it ends (never per step, so it adds
no host synchronisation); with ``--workers N`` the workers send their checks through a queue
(bench/executors.py). On a terminal it is a rich display; elsewhere (a CI log, a pipe) one plain line per
finished fold, nothing per check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["RunProgress", "format_eta"]


def format_eta(seconds: float | None) -> str:
    """``12 s``, ``4 min``, ``1 h 05 min``, or ``?`` when not known yet."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class _Fold:
    label: str
    started: float = field(default_factory=time.monotonic)
    updates: int = 0
    cap: int | None = None
    text: str = ""
    handle: Any = None

    def eta(self) -> float | None:
        """Seconds to the fold's cap at its rate so far (an upper bound: a plateau may end it sooner)."""
        elapsed = time.monotonic() - self.started
        if not self.updates or self.cap is None:
            return None
        return (self.cap - self.updates) * elapsed / self.updates


class RunProgress:
    """Progress of the jobs of ``bench run`` (use as a context manager); ``live`` None: a rich display when
    ``console`` is a terminal, plain lines otherwise."""

    def __init__(self, console: Console, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._folds: dict[Any, _Fold] = {}
        self._total = self._done = self._trained = 0
        self._workers = 1
        self._train_seconds = 0.0
        self._overall: Any = None
        self._title = ""
        self._progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[count]}"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=console,
                transient=False,
            )
            if self.live
            else None
        )

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, title: str, jobs: int, workers: int = 1) -> None:
        """A run of ``jobs`` folds not yet on disk begins, on ``workers`` processes."""
        self._title, self._total, self._done, self._workers = title, jobs, 0, max(1, workers)
        if self._progress is not None:
            if self._overall is not None:  # a run of several feature sets: one after the other
                self._progress.remove_task(self._overall)
            self._overall = self._progress.add_task(
                title, total=max(1, jobs), count=f"0/{jobs} folds", eta="?"
            )

    def fold_started(self, key: Any, label: str) -> None:
        fold = self._folds[key] = _Fold(label)
        if self._progress is not None:
            fold.handle = self._progress.add_task(label, total=None, count="", eta="?")

    def fold_checked(self, key: Any, updates: int, cap: int, text: str) -> None:
        """A validation check of fold ``key``: ``updates`` made of at most ``cap``; ``text`` its score."""
        fold = self._folds.get(key)
        if fold is None:
            return
        fold.updates, fold.cap, fold.text = updates, cap, text
        if self._progress is not None:
            self._progress.update(
                fold.handle,
                total=cap,
                completed=updates,
                description=f"{fold.label} · {text}",
                count=f"{updates}/{cap} updates",
                eta=format_eta(fold.eta()),
            )

    def fold_waiting(self, key: Any, text: str) -> None:
        """Fold ``key`` is claimed by another process; ``text`` says which."""
        fold = self._folds.get(key)
        if fold is not None and self._progress is not None:
            self._progress.update(fold.handle, description=f"{fold.label} · {text}")

    def fold_finished(self, key: Any, status: str, label: str | None = None) -> None:
        """Fold ``key`` ended: ``trained`` or ``skipped`` (found on disk, or run by another process);
        ``label`` names it if its start was never reported."""
        fold = self._folds.pop(key, None) or _Fold(label or str(key))
        self._done += 1
        seconds = time.monotonic() - fold.started
        if status == "trained":
            self._trained += 1
            self._train_seconds += seconds
        left = self._total - self._done
        per_fold = self._train_seconds / self._trained if self._trained else None
        eta = format_eta(None if per_fold is None else per_fold * left / min(self._workers, max(1, left)))
        detail = f"{fold.updates} updates, " if fold.updates and status == "trained" else ""
        line = f"[{self._done}/{self._total}] {fold.label} · {status} ({detail}{seconds:.0f} s); ETA {eta}"
        self.console.print(line, highlight=False, markup=False)
        if self._progress is None:
            return
        if fold.handle is not None:
            self._progress.remove_task(fold.handle)
        if self._overall is not None:
            self._progress.update(
                self._overall, completed=self._done, count=f"{self._done}/{self._total} folds", eta=eta
            )

"""User-facing errors: the CLI prints their message as one paragraph (no traceback) and exits non-zero; and
warnings that let a run go on (:class:`TrackingWarning`), shown as one line."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any


class BenchError(Exception):
    """Bad input or a state the user must fix; the message says what, where, and how to fix it."""


class DataError(BenchError):
    """A problem with a task's files (labels, features, omics, splits)."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None) -> None:
        parts = [f"{path}: {message}" if path is not None else message]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))
        self.path = path


class TrackingWarning(UserWarning):
    """The tracking store failed (bench/tracking.py); the run goes on, that fold not or only partly tracked."""


def plain_warnings() -> None:
    """Show a :class:`TrackingWarning` as one ``warning: ...`` line on stderr (no file and source line)."""
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None):
        if issubclass(category, TrackingWarning):
            print(f"warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show

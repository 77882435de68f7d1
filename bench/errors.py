"""User-facing errors: the CLI prints their message as one paragraph (no traceback) and exits non-zero."""

from __future__ import annotations

from pathlib import Path


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

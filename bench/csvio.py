"""Reading the CSV/TSV tables bench exchanges with users and with itself, IDs kept exactly as written.

pandas turns ``NA``, ``None``, ``null``, ``NaN`` … into missing values by default; as a case or slide ID
they are real IDs (``NA`` is a patient's initials somewhere), so ID columns are read as strings with no
missing-value conversion, and only the other columns get the usual missing-value markers.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pandas as pd

from .errors import DataError

__all__ = ["ID_COLUMNS", "read_table"]

ID_COLUMNS = ("case_id", "slide_id", "cohort", "gene", "group")
_MISSING = ("", "NA", "N/A", "n/a", "NaN", "nan", "-NaN", "-nan", "NULL", "null", "None", "#N/A", "<NA>")


def read_table(
    path: str | Path, sep: str = ",", ids: Collection[str] | None = ID_COLUMNS, **kwargs
) -> pd.DataFrame:
    """``pd.read_csv`` with the ``ids`` columns (when present; every column when None) as strings taken
    literally. A file that is not a table (empty, binary, malformed) is a ``DataError`` naming it."""
    try:
        header = pd.read_csv(path, sep=sep, nrows=0).columns
        id_cols = list(header) if ids is None else [c for c in header if c in ids]
        return pd.read_csv(
            path,
            sep=sep,
            dtype={c: str for c in id_cols} | kwargs.pop("dtype", {}),
            keep_default_na=False,
            na_values={c: list(_MISSING) for c in header if c not in id_cols},
            **kwargs,
        )
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        kind = "empty" if isinstance(exc, pd.errors.EmptyDataError) else "not a readable table"
        raise DataError(
            f"{kind} ({exc})",
            path,
            f"it should be a {'tab' if sep == chr(9) else 'comma'}-separated table with a header row.",
        ) from exc

"""Names that become file or folder names: task names, cohort names, slide and case IDs.

bench refuses (rather than maps) a name that could make it read or write outside the features folder or
``--out``: one with a path separator, NUL or another control character, ``.`` or ``..``, or surrounding
whitespace. IDs that differ only in Unicode normalisation (``é`` as one code point or as ``e`` + accent)
name the same file on some file systems, so two such IDs in one table are refused too.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

__all__ = ["normalisation_clashes", "unsafe_reason"]


def unsafe_reason(name: str) -> str | None:
    """Why ``name`` cannot be used as a file name, or None when it can."""
    if name in ("", ".", ".."):
        return "it is empty, '.' or '..'"
    if "/" in name or "\\" in name:
        return "it contains a path separator ('/' or '\\')"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "it contains NUL or another control character"
    if name != name.strip():
        return "it starts or ends with whitespace"
    return None


def normalisation_clashes(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of distinct names that are equal once NFC-normalised (the same file on macOS, say)."""
    seen: dict[str, str] = {}
    clashes = []
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if key in seen and seen[key] != name:
            clashes.append((seen[key], name))
        seen.setdefault(key, name)
    return clashes

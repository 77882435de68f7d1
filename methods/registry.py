"""Method registry: the only way to choose a method.

A method name on disk and on the command line is ``base`` or ``base[variant]`` (``momkd[fixed-memory]``);
variants are declared by the method class as small config overrides.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

from .base import MethodCfg, MILMethod

__all__ = [
    "UnknownMethodError",
    "create_method",
    "get_method_class",
    "list_methods",
    "method_rows",
    "methods_markdown",
    "parse_method_name",
    "register_method",
    "resolve_config",
]

_REGISTRY: dict[str, type[MILMethod]] = {}
_NAME = re.compile(r"^(?P<base>[a-z0-9_\-]+)(\[(?P<variant>[A-Za-z0-9_.,=\-]+)\])?$")


class UnknownMethodError(ValueError):
    """A method or variant name that is not registered; the message suggests the nearest names."""


def register_method(name: str):
    """Class decorator: register ``cls`` under ``name`` (a duplicate name is an error)."""

    def wrap(cls: type[MILMethod]) -> type[MILMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__module__}")
        missing = [attr for attr in ("paper", "code_url") if not getattr(cls, attr, "").strip()]
        if missing:
            raise ValueError(
                f"method {name!r} ({cls.__name__}) does not say where it comes from: set the class "
                f"attribute(s) {', '.join(missing)} (the paper's citation and the authors' repository)"
            )
        unknown = [v for rows in cls.ablations.values() for _, v in rows if v and v not in cls.variants]
        if unknown:
            raise ValueError(f"{cls.__name__}.ablations names undeclared variants {unknown}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods(pattern: str = "*") -> list[str]:
    """Registered base names matching a shell-style ``pattern``, in registration order."""
    return [n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)]


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"{hint} Known: {', '.join(choices) or '(none)'}."


def parse_method_name(name: str) -> tuple[str, str]:
    """Split ``base[variant]`` into ``(base, variant)``; variant is ``""`` for the default."""
    m = _NAME.match(name.strip())
    if not m:
        raise UnknownMethodError(f"{name!r} is not a method name of the form 'name' or 'name[variant]'.")
    base, variant = m["base"], m["variant"] or ""
    if base not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {base!r}." + _suggest(base, list(_REGISTRY)))
    return base, variant


def get_method_class(name: str) -> type[MILMethod]:
    return _REGISTRY[parse_method_name(name)[0]]


def resolve_config(name: str, overrides: dict[str, Any] | None = None) -> MethodCfg:
    """The config of ``name`` (variant applied), then ``overrides`` (None values are dropped, as in timm)."""
    base, variant = parse_method_name(name)
    cls = _REGISTRY[base]
    cfg = cls.cfg_class()
    if variant:
        if variant not in cls.variants:
            raise UnknownMethodError(
                f"unknown variant {variant!r} of method {base!r}." + _suggest(variant, list(cls.variants))
            )
        cfg = cfg.replace(**cls.variants[variant])
    if overrides:
        cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    return cfg


def create_method(
    name: str,
    in_dim: int,
    omics_dim: int | None = None,
    cfg: MethodCfg | None = None,
    **overrides: Any,
) -> MILMethod:
    """Build a registered method. ``cfg`` (already resolved) wins over ``name``'s own config."""
    cls = get_method_class(name)
    cfg = cfg if cfg is not None else resolve_config(name, overrides)
    if cfg.uses_omics and not omics_dim:
        raise ValueError(
            f"method {name!r} distils from omics, but the task has no omics table; "
            "add 'omics: <csv>' to the task YAML or choose a WSI-only method."
        )
    return cls(cfg, in_dim=in_dim, omics_dim=omics_dim)


def method_rows() -> list[dict[str, str]]:
    """One row per registered method, in registration order, for ``bench methods`` and the README: ``name``,
    ``variants`` (comma-separated, ``–`` for none), ``summary``, ``paper`` (citation), ``paper_url``, and
    ``code`` (``<authors' repository>@<short commit>``; the repository alone where no commit is known)."""
    rows = []
    for name, cls in _REGISTRY.items():
        commit = cls.code_commit[:7]
        rows.append(
            {
                "name": name,
                "variants": ", ".join(cls.variants) or "–",
                "summary": cls.summary,
                "paper": cls.paper,
                "paper_url": cls.paper_url,
                "code": f"{cls.code_url}@{commit}" if commit else cls.code_url,
            }
        )
    return rows


def methods_markdown() -> str:
    """The README's methods table: :func:`method_rows` as a markdown table (the paper linked to its address)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| method | variants | what | paper | authors' code (commit) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in method_rows():
        variants = ", ".join(f"`{v}`" for v in row["variants"].split(", ")) if row["variants"] != "–" else "–"
        paper = f"[{cell(row['paper'])}]({row['paper_url']})" if row["paper_url"] else cell(row["paper"])
        cells = [f"`{row['name']}`", variants, cell(row["summary"]), paper, cell(row["code"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

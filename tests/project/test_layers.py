"""The package is layered (README, Layout): every import of ``bench/`` points down or within its layer, there
is no import cycle, ``methods/`` never imports the harness, and the harness knows no method by name."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from methods import get_method_class, list_methods
from methods.base import MethodCfg

ROOT = Path(__file__).resolve().parents[2]

#: bottom to top; a module may import modules of its own layer or of the layers before it
LAYERS: list[tuple[str, ...]] = [
    (  # leaves: no bench import above these
        "bench.errors",
        "bench.names",
        "bench.redact",
        "bench.provenance",
        "bench.fsio",
        "bench.csvio",
        "bench.locks",
        "bench.device",
        "bench.tables",
        "bench.figures",
        "bench.config",
        "bench.stats",
        "bench.tasktypes",
        "bench.coxph",
    ),
    (
        "bench.store",
        "bench.best",
        "bench.tracking",
        "bench.data",
    ),  # results on disk, to a tracking store; data
    ("bench.evaluate", "bench.convergence", "bench.train"),  # predicting and training one model
    # a task's data; one fold; the reference rows and their probes
    ("bench.taskdata", "bench.jobs", "bench.baselines", "bench.probes"),
    (
        "bench.executors",
        "bench.studies",
        "bench.sweep",
        "bench.sweep_report",
        "bench.analysis",
        "bench.ceilings",
        "bench.explain",
    ),
    ("bench.report",),
    ("bench.commands",),
    ("bench.progress", "bench.cli_options", "bench.cli"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("bench", "methods"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The modules of this repository that ``name`` imports (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            candidates = named or [base]  # `from . import jobs` imports bench.jobs, not the package
        else:
            continue
        for target in candidates:
            while target and target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name:
                targets.add(target)
    return targets


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(
        f"{module} is in no layer of tests/project/test_layers.py; add it (and to the README)"
    )


def test_every_bench_import_points_down():
    upward = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, targets in GRAPH.items()
        if src.startswith("bench")
        for dst in targets
        if dst.startswith("bench") and _layer(dst) > _layer(src)
    ]
    assert not upward, "\n".join(upward)


def test_methods_never_import_the_harness():
    bad = [f"{src} imports {dst}" for src, ts in GRAPH.items() if src.startswith("methods") for dst in ts]
    assert not [b for b in bad if " imports bench" in b]


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (cycle := visit(start, [start])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _code_strings(tree: ast.AST) -> list[str]:
    """String constants of a module other than docstrings and CLI help texts."""
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    helps = {
        id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "help"
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings | helps
    ]


def test_the_harness_knows_no_method():
    """Method-specific behaviour reaches bench/ only through the method interface: no method's name and no
    field of one method's config appears in its code (docstrings and help texts may cite them), and it asks no
    model or config what it has (``hasattr``)."""
    names = set(list_methods())
    base = {f.name for f in dataclasses.fields(MethodCfg)}
    own_fields = {
        f.name for m in names for f in dataclasses.fields(get_method_class(m).cfg_class) if f.name not in base
    }
    found = []
    for module, path in MODULES.items():
        if not module.startswith("bench"):
            continue
        tree = ast.parse(path.read_text())
        found += [f"{module}: {s!r}" for s in _code_strings(tree) if s.lower() in names or s in own_fields]
        found += [
            f"{module}: hasattr({ast.unparse(n.args[0])}, ...)"
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hasattr"
            if isinstance(n.args[0], ast.Name) and n.args[0].id in {"cfg", "model", "method", "out"}
        ]
    assert not found, "\n".join(found)

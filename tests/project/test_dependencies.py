"""Every third-party module that bench/ and methods/ import is declared in pyproject.toml (main dependencies,
or an optional extra for imports that only an opt-in feature makes), so a fresh install never misses one."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCAL = {"bench", "methods"}


def _imported_modules() -> dict[str, str]:
    """Top-level module -> the first file importing it, over bench/ and methods/."""
    found: dict[str, str] = {}
    for path in sorted([*ROOT.glob("bench/**/*.py"), *ROOT.glob("methods/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_import_is_declared():
    dists = packages_distributions()
    declared = _declared()
    missing = []
    for module, where in _imported_modules().items():
        if module in LOCAL or module in sys.stdlib_module_names or module == "__future__":
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (imported in {where}; distribution {sorted(names)})")
    assert not missing, "imports not declared in pyproject.toml: " + "; ".join(missing)

"""Shared code of the parity scripts: seeding, bags, the reference checkout, recording, writing a fixture.

Each ``benchmarks/parity/<method>.py`` imports the authors' module from a local checkout (``--ref-dir``,
never committed), builds bench's model from a seed, copies bench's weights into the authors' model through
a name map, runs the authors' forward and loss code on a few seeded bags and writes what it gives (outputs,
every loss term, the gradient of every parameter, in bench's parameter names) to
``tests/reference/fixtures/<fixture>.npz``. The format is documented in ``tests/reference/conftest.py``,
which reads it back; nothing of the authors' code goes into the fixture, only numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "reference" / "fixtures"
FORMAT_VERSION = 1

__all__ = [
    "FIXTURES",
    "Recorder",
    "RecordingOptimizer",
    "bench_model",
    "capture_output",
    "copy_into_reference",
    "import_reference",
    "no_dropout",
    "parse_args",
    "reference_commit",
    "reference_grads",
    "seeded_bag",
]


def parse_args(description: str, repo: str) -> argparse.Namespace:
    """``--ref-dir`` (a checkout of ``repo``; default ``$BENCH_PARITY_<REPO NAME>``) and ``--out``."""
    env = "BENCH_PARITY_" + repo.split("/")[-1].upper().replace("-", "_")
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--ref-dir",
        type=Path,
        default=os.environ.get(env),
        help=f"local checkout of github.com/{repo} (default: ${env})",
    )
    p.add_argument("--out", type=Path, default=FIXTURES, help="folder of the fixture files")
    args = p.parse_args()
    if args.ref_dir is None or not args.ref_dir.is_dir():
        p.error(f"--ref-dir must be a checkout of {repo} (or set ${env})")
    args.ref_dir = args.ref_dir.resolve()
    return args


def reference_commit(ref_dir: Path) -> str:
    """The checkout's commit; refuses a checkout with modified tracked files (the fixture would not say
    what produced it). Missing files are allowed: snapshots may leave out large data files."""
    commit = subprocess.check_output(["git", "-C", str(ref_dir), "rev-parse", "HEAD"], text=True).strip()
    status = subprocess.check_output(
        ["git", "-C", str(ref_dir), "status", "--porcelain", "--untracked-files=no"], text=True
    )
    dirty = "\n".join(line for line in status.splitlines() if line[:2] != " D")
    if dirty:
        raise SystemExit(f"{ref_dir} has local changes to tracked files:\n{dirty}")
    return commit


def import_reference(
    ref_dir: Path, *modules: str, stub: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Any]:
    """Import ``modules`` from the checkout (put first on ``sys.path``); ``path/to/file.py`` loads one
    file without its package's ``__init__``.

    ``stub``: modules the reference imports at module level for code the recording never runs (e.g.
    survival metrics, image transforms), each given as the attributes it must offer; they are registered
    as plain modules so the import succeeds without those packages.
    """
    import types

    for name, attrs in (stub or {}).items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            mod = sys.modules.setdefault(sub, types.ModuleType(sub))
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
        for attr, value in attrs.items():
            setattr(sys.modules[name], attr, value)
    sys.path.insert(0, str(ref_dir))
    return [_load(ref_dir, m) for m in modules]


def _load(ref_dir: Path, module: str) -> Any:
    """``pkg.mod`` by import, or ``path/to/file.py`` by file (skips a package ``__init__`` that imports
    what the recorded code does not need, e.g. feature-extractor backbones)."""
    if not module.endswith(".py"):
        return importlib.import_module(module)

    name = "parity_ref_" + module[:-3].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, ref_dir / module)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def seeded_bag(
    seed: int,
    n: int,
    dim: int,
    label: int,
    omics_dim: int | None = None,
    graph_k: int | None = None,
) -> dict[str, np.ndarray]:
    """A bag of Gaussian features (``n x dim``), its label and, when asked, Gaussian omics and the
    k-nearest-neighbour graph (``bench.data.graph``, directed as MoMKD's) of tissue-like grid coordinates."""
    rng = np.random.RandomState(seed)
    bag = {
        "features": rng.standard_normal((n, dim)).astype(np.float32),
        "label": np.array(label, dtype=np.int64),
    }
    if omics_dim:
        bag["omics"] = rng.standard_normal(omics_dim).astype(np.float32)
    if graph_k:
        from bench.data.graph import knn_edge_index

        side = int(np.ceil(np.sqrt(n / 0.6)))
        cells = rng.permutation(side * side)[:n]
        coords = np.stack(np.unravel_index(np.sort(cells), (side, side)), axis=1).astype(np.float32)
        bag["coords"] = coords
        bag["edge_index"] = knn_edge_index(coords, k=graph_k).astype(np.int64)
    return bag


def bench_model(name: str, in_dim: int, omics_dim: int | None, overrides: Mapping[str, Any], seed: int):
    """bench's model ``name`` (variant allowed) with ``overrides``, initialised under ``seed``."""
    from methods import create_method

    torch.manual_seed(seed)
    return create_method(name, in_dim=in_dim, omics_dim=omics_dim, **dict(overrides))


def copy_into_reference(
    bench: nn.Module,
    ref: nn.Module,
    mapping: Mapping[str, str | None],
    keep: Sequence[str] = (),
    extra: Mapping[str, Tensor] | None = None,
) -> None:
    """Load bench's weights into the reference model.

    ``mapping``: bench parameter/buffer name -> reference name, or None for an entry the script maps
    itself (another shape) and passes in ``extra`` (reference name -> value). Every bench entry must be
    named, and every reference entry must be set except those in ``keep`` (reference weights without a
    counterpart in bench, e.g. layers its forward never uses: they keep their own values).
    """
    bench_state = bench.state_dict()
    missing = sorted(set(bench_state) - set(mapping))
    if missing:
        raise SystemExit(f"bench entries without a reference name: {missing}")
    ref_state = ref.state_dict()
    new = {r: v.clone() for r, v in (extra or {}).items()}
    for b_name, r_name in mapping.items():
        if r_name is not None:
            new[r_name] = bench_state[b_name].clone()
    for r_name, value in new.items():
        if r_name not in ref_state or ref_state[r_name].shape != value.shape:
            shape = tuple(ref_state[r_name].shape) if r_name in ref_state else "absent"
            raise SystemExit(f"reference {r_name} {shape} cannot take {tuple(value.shape)}")
    unreached = sorted(set(ref_state) - set(new) - set(keep))
    if unreached:
        raise SystemExit(f"reference entries not set from bench: {unreached}")
    ref.load_state_dict({**ref_state, **new}, strict=True)


def reference_grads(ref: nn.Module, mapping: Mapping[str, str | None]) -> dict[str, Tensor | None]:
    """The reference's gradients under bench's names, for the entries ``mapping`` names (the script adds
    those it maps itself)."""
    params = dict(ref.named_parameters())
    return {
        b: (None if params[r].grad is None else params[r].grad.detach().clone())
        for b, r in mapping.items()
        if r is not None and r in params
    }


def no_dropout(module: nn.Module) -> None:
    """Set every dropout layer of a reference model to p = 0 (its attribute; the code is unchanged)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the outputs of ``module`` during the block (e.g. a head whose output the code post-processes)."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


class RecordingOptimizer:
    """Stands in for the reference's optimiser inside its own training loop: ``step`` records the
    gradients accumulated so far (by reference parameter name), nothing moves; ``zero_grad`` clears."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grads: dict[str, Tensor | None] = {}
        self.param_groups = [{"lr": 0.0}]  # read by progress bars

    def step(self) -> None:
        self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in self.model.named_parameters()}

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def restore(self) -> None:
        """Put the recorded gradients back on the parameters (the loop clears them after stepping)."""
        for name, p in self.model.named_parameters():
            p.grad = self.grads.get(name)


class Recorder:
    """Arrays of one fixture, under the key layout of ``tests/reference/conftest.py``."""

    def __init__(self, name: str, meta: dict[str, Any], bench: nn.Module) -> None:
        self.name = name
        self.meta = {"format": FORMAT_VERSION, "torch": torch.__version__, **meta, "cases": []}
        self.arrays: dict[str, np.ndarray] = {
            f"state/{k}": v.detach().cpu().numpy() for k, v in bench.state_dict().items()
        }
        self.param_names = [n for n, p in bench.named_parameters() if p.requires_grad]

    def case(
        self,
        case: str,
        bags: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[Mapping[str, Tensor]],
        losses: Mapping[str, Tensor],
        grads: Mapping[str, Tensor | None],
    ) -> None:
        """One case: its bags, per bag the outputs, the loss terms (bench's names and weights) and the
        gradient of their sum for every trainable bench parameter (None -> zeros)."""
        missing = sorted(set(self.param_names) - set(grads))
        if missing:
            raise SystemExit(f"{case}: no gradient recorded for {missing}")
        self.meta["cases"].append({"name": case, "bags": len(bags)})
        for j, bag in enumerate(bags):
            for k, v in bag.items():
                self.arrays[f"{case}/bag{j}/{k}"] = np.asarray(v)
        for j, out in enumerate(outputs):
            for k, v in out.items():
                self.arrays[f"{case}/out{j}/{k}"] = _np(v)
        for k, v in losses.items():
            self.arrays[f"{case}/loss/{k}"] = _np(v).reshape(())
        state = dict(self.arrays)
        for k in self.param_names:
            g = grads[k]
            shape = state[f"state/{k}"].shape
            self.arrays[f"{case}/grad/{k}"] = np.zeros(shape, np.float32) if g is None else _np(g)

    def extra(self, key: str, value: Tensor | np.ndarray) -> None:
        """An array outside the cases (a method-specific check, e.g. MoMKD's k-means), under ``extra/``."""
        self.arrays[f"extra/{key}"] = value if isinstance(value, np.ndarray) else _np(value)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.npz"
        np.savez_compressed(path, meta=np.array(json.dumps(self.meta, sort_keys=True)), **self.arrays)
        size = path.stat().st_size / 1024
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({size:.0f} KiB)")
        return path


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()

"""Parity with the authors' code: loading a fixture, building bench's model with its weights, comparing.

Fixture format (version 1)
==========================
One ``fixtures/<name>.npz`` per method and variant, written by ``benchmarks/parity/<method>.py`` through
``benchmarks/parity/common.py`` (``Recorder``) from the authors' code at a recorded commit. Numbers only:
read with ``numpy.load(path, allow_pickle=False)``.

``meta``: a JSON string with
    ``format`` (1), ``method`` (the bench method name, variant included, e.g. ``"abmil[ilse]"``),
    ``overrides`` (config overrides on top of it, e.g. smaller widths, dropout 0), ``in_dim``,
    ``omics_dim`` (or null), ``mode`` (``"train"`` or ``"eval"``: the module mode for forward, loss and
    backward), ``reference`` (``repo``, ``commit``, ``files``: the authors' files whose code produced the
    numbers), ``script``, ``torch`` (version), ``notes`` (what was adapted, and why) and ``cases``
    (a list of ``{"name", "bags"}``).
``state/<name>``: every entry of bench's ``state_dict()`` (parameters and persistent buffers): the
    weights both models had. Loaded with ``load_state_dict(strict=True)``.
Per case ``<c>`` (a few seeded bags passed through the model one at a time, in order, as the trainer does;
one bag, or a window of bags for a method that steps once per window):
    ``<c>/bag<j>/<field>``: the fields of ``methods.base.Bag`` the bag has (``features``, ``label``,
        ``omics``, ``coords``, ``edge_index``);
    ``<c>/out<j>/<field>``: what the reference computed for bag j, compared with bench's ``MILOutput``
        fields of that name (``logits``, ``attention``, ``embedding``);
    ``<c>/loss/<term>``: every loss term, in bench's names and with bench's weights, summed over the
        case's calls of ``loss`` (a window method returns its terms on the window's last bag);
    ``<c>/grad/<param>``: the gradient of the sum of all terms with respect to each trainable parameter,
        zeros where the reference gives none.
``extra/<key>``: optional arrays of a method-specific check (e.g. MoMKD's k-means initialisation), read by
    that method's test; ``meta`` may carry such facts too (e.g. reference parameter counts).

Adding a method: write ``benchmarks/parity/<method>.py`` with ``common.py``'s helpers and run it with
``--ref-dir`` pointing at a checkout of the authors' repository; ``test_parity.py`` checks every fixture it
finds in ``fixtures/`` with :func:`check_fixture` (add the name to its list of expected fixtures too).
Checks that do not fit the case layout read ``extra/`` (see the MoMKD tests). Tolerance: 1e-5 absolute
plus 1e-5 relative, fp32. A refactor that renames parameters fails ``load_state_dict(strict=True)``
naming the keys: rename them in the fixture (``state/`` and ``grad/``) or regenerate it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from methods import create_method
from methods.base import Bag, MILMethod

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = RTOL = 1e-5
BAG_FIELDS = ("features", "label", "omics", "coords", "edge_index")


@dataclass
class Case:
    name: str
    bags: list[Bag]
    outputs: list[dict[str, Tensor]]
    losses: dict[str, Tensor]
    grads: dict[str, Tensor]


@dataclass
class Fixture:
    name: str
    meta: dict[str, Any]
    state: dict[str, Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)
    cases: list[Case] = field(default_factory=list)


def load_fixture(name: str) -> Fixture:
    """Read ``fixtures/<name>.npz`` (a missing file fails: the fixtures are part of the repository)."""
    path = FIXTURES / f"{name}.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    assert meta["format"] == 1, f"{path}: unknown fixture format {meta['format']}"

    def group(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}

    fx = Fixture(name, meta, group("state/"), extra=group("extra/"))
    for c in meta["cases"]:
        n = c["name"]
        bags = []
        for j in range(c["bags"]):
            f = group(f"{n}/bag{j}/")
            bags.append(Bag(**{k: f[k] for k in BAG_FIELDS if k in f}, slide_id=f"{n}/{j}"))
        outputs = [group(f"{n}/out{j}/") for j in range(c["bags"])]
        fx.cases.append(Case(n, bags, outputs, group(f"{n}/loss/"), group(f"{n}/grad/")))
    return fx


def build_model(fx: Fixture, **overrides: Any) -> MILMethod:
    """bench's model as the fixture names it, with the fixture's weights, in the fixture's mode;
    ``overrides`` change settings that must not change the numbers (e.g. an implementation path)."""
    meta = fx.meta
    cfg = {**meta["overrides"], **overrides}
    model = create_method(meta["method"], meta["in_dim"], meta["omics_dim"], **cfg)
    model.load_state_dict(fx.state, strict=True)
    return model.train(meta["mode"] == "train")


def run_case(model: MILMethod, case: Case) -> tuple[list[Any], dict[str, Tensor], dict[str, Tensor]]:
    """Forward and ``loss`` on each bag in turn, one backward of the sum of every term: outputs, the
    terms (summed over calls), the gradients."""
    model.zero_grad(set_to_none=True)
    model.on_epoch_start(0)
    outputs, losses = [], {}
    for bag in case.bags:
        out = model(bag.without_omics())
        outputs.append(out)
        for k, v in model.loss(bag, out).items():
            losses[k] = losses[k] + v if k in losses else v
    assert losses, f"{case.name}: bench returned no loss term"
    torch.stack([v.reshape(()) for v in losses.values()]).sum().backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return outputs, losses, grads


def _diff(name: str, actual: Tensor, expected: Tensor) -> float:
    actual = actual.detach().float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    return float((actual - expected).abs().max()) if actual.numel() else 0.0


def check_fixture(name: str, **overrides: Any) -> dict[str, float]:
    """Compare bench with fixture ``name``: every recorded output, loss term and gradient, every case
    (``overrides``: see :func:`build_model`).

    Returns the largest absolute difference per kind (``output``, ``loss``, ``grad``), printed too
    (``pytest -s`` shows them).
    """
    fx = load_fixture(name)
    model = build_model(fx, **overrides)
    worst = {"output": 0.0, "loss": 0.0, "grad": 0.0}
    for case in fx.cases:
        outputs, losses, grads = run_case(model, case)
        for j, (out, expected) in enumerate(zip(outputs, case.outputs, strict=True)):
            assert expected, f"{case.name}: bag {j} has no recorded output"
            for k, v in expected.items():
                worst["output"] = max(worst["output"], _diff(f"{case.name} bag {j} {k}", getattr(out, k), v))
        assert set(losses) == set(case.losses), (
            f"{case.name}: terms {sorted(losses)} != {sorted(case.losses)}"
        )
        for k, v in case.losses.items():
            worst["loss"] = max(worst["loss"], _diff(f"{case.name} loss {k}", losses[k], v))
        assert set(grads) == set(case.grads), f"{case.name}: parameters differ from the fixture's"
        for k, v in case.grads.items():
            worst["grad"] = max(worst["grad"], _diff(f"{case.name} grad {k}", grads[k], v))
    ref = fx.meta["reference"]
    label = name + "".join(f" {k}={v}" for k, v in overrides.items())
    print(
        f"\n{label} vs {ref['repo']}@{ref['commit'][:7]}: "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    )
    return worst


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)

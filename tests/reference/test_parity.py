"""bench against the authors' code: outputs, every loss term and every gradient, from recorded fixtures.

The fixtures (``fixtures/*.npz``) are numbers written by ``benchmarks/parity/<method>.py`` from the authors'
repositories at a recorded commit; these tests need neither the repositories nor their dependencies.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from .conftest import FIXTURES as FIXTURE_DIR
from .conftest import build_model, check_fixture, load_fixture, run_case

pytestmark = pytest.mark.reference

#: every recorded fixture (a new one is tested as soon as it is written)
FIXTURES = sorted(p.stem for p in FIXTURE_DIR.glob("*.npz"))
#: the same fixture through another implementation path of bench (same weights, same numbers expected)
PATHS: list[tuple[str, dict[str, Any]]] = [("momkd", {"fast_graph": False})]


def test_every_method_with_public_code_has_fixtures() -> None:
    """The methods whose authors' code is public, with their code variants, each have a fixture (others,
    e.g. TDC's where a reference is pinned, join by being written)."""
    expected = {"abmil", "abmil-ilse", "wikg", "wikg-attn-pool", "wikg-gcn", "wikg-sage", "mkd", "ghanet"}
    assert expected | {"momkd", "momkd-paper"} <= set(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_reference(name: str) -> None:
    worst = check_fixture(name)
    assert max(worst.values()) <= 1e-5


@pytest.mark.parametrize(("name", "overrides"), PATHS, ids=[f"{n}-{'-'.join(o)}" for n, o in PATHS])
def test_other_paths_match_reference(name: str, overrides: dict[str, Any]) -> None:
    assert max(check_fixture(name, **overrides).values()) <= 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_records_its_source(name: str) -> None:
    meta = load_fixture(name).meta
    ref = meta["reference"]
    assert len(ref["commit"]) == 40 and ref["repo"] and ref["files"]
    assert meta["cases"] and meta["script"].startswith("benchmarks/parity/")


def test_a_changed_weight_is_caught() -> None:
    """The comparison can fail: one weight moved by 1e-3 changes the gradients beyond the tolerance."""
    fx = load_fixture("abmil")
    model = build_model(fx)
    with torch.no_grad():
        model.classifier.bias[0] += 1e-3
    _, _, grads = run_case(model, fx.cases[0])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            grads["classifier.bias"], fx.cases[0].grads["classifier.bias"], atol=1e-5, rtol=1e-5
        )


def test_knn_graph_matches_reference_graph() -> None:
    """bench's spatial graph is MoMKD's ``graph.py`` graph (the momkd fixture's bags carry the latter)."""
    from bench.data.graph import knn_edge_index

    for case in load_fixture("momkd").cases:
        bag = case.bags[0]
        ours = knn_edge_index(bag.coords.numpy(), k=8)
        assert (ours == bag.edge_index.numpy()).all(), case.name


def test_momkd_kmeans_matches_bootstrap_codebooks() -> None:
    """``spherical_kmeans`` leaves the memories the code's ``bootstrap_codebooks`` leaves, from the same
    RNG state and points (the code clusters the positive class first)."""
    from methods.momkd import spherical_kmeans

    fx = load_fixture("momkd")
    km = fx.meta["kmeans"]
    k = fx.extra["kmeans_memory"].shape[1]
    torch.manual_seed(km["seed"])
    positive = spherical_kmeans(fx.extra["kmeans_points_1"], k, km["iters"])
    negative = spherical_kmeans(fx.extra["kmeans_points_0"], k, km["iters"])
    torch.testing.assert_close(
        torch.stack([negative, positive]), fx.extra["kmeans_memory"], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("method", ["momkd", "momkd[paper-run]"])
def test_momkd_parameter_count_matches_reference(method: str) -> None:
    from methods import create_method

    ref = load_fixture("momkd").meta["reference_parameters"][method]
    model = create_method(method, ref["in_dim"], ref["omics_dim"])
    assert sum(p.numel() for p in model.parameters()) == ref["count"]


def test_momkd_eval_forward_matches_forward_inference() -> None:
    """In eval mode bench's forward is the code's separate inference path (validation and test)."""
    fx = load_fixture("momkd")
    model = build_model(fx).eval()
    with torch.no_grad():
        for case in fx.cases:
            out = model(case.bags[0].without_omics())
            for field in ("logits", "attention"):
                expected = fx.extra[f"inference/{case.name}/{field}"]
                torch.testing.assert_close(getattr(out, field), expected, atol=1e-5, rtol=1e-5)

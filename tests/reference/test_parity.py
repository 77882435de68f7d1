"""bench against the authors' code: outputs, every loss term and every gradient, from recorded fixtures.

The fixtures (``fixtures/*.npz``) are numbers written by ``benchmarks/parity/<method>.py`` from the authors'
repositories at a recorded commit; these tests need neither the repositories nor their dependencies.
"""

from __future__ import annotations

import pytest

from .conftest import check_fixture, load_fixture

pytestmark = pytest.mark.reference

FIXTURES = ["abmil", "abmil-ilse", "wikg", "wikg-attn-pool", "wikg-gcn", "wikg-sage"]


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_reference(name: str) -> None:
    worst = check_fixture(name)
    assert max(worst.values()) <= 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_records_its_source(name: str) -> None:
    meta = load_fixture(name).meta
    ref = meta["reference"]
    assert len(ref["commit"]) == 40 and ref["repo"] and ref["files"]
    assert meta["cases"] and meta["script"].startswith("benchmarks/parity/")

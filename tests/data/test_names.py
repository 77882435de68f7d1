"""Nothing escapes its folder: task, cohort, slide and case names that could reach outside are refused."""

from __future__ import annotations

import unicodedata

import pandas as pd
import pytest
import yaml

from bench.data.cohort import load_cohort
from bench.data.task import load_task
from bench.errors import BenchError
from bench.jobs import parse_methods

UNSAFE = ["../../outside", "/etc/passwd", "a/b", "a\\b", "nul\x00byte", "..", " padded"]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_task_and_cohort_names_are_refused(small_task, name):
    raw = yaml.safe_load(small_task.read_text())
    small_task.write_text(yaml.safe_dump({**raw, "name": name}))
    with pytest.raises(BenchError, match="cannot be used as a folder name"):
        load_task(small_task)
    raw["external"][0]["name"] = name
    small_task.write_text(yaml.safe_dump(raw))
    with pytest.raises(BenchError, match="cannot be used as a folder name"):
        load_task(small_task)


@pytest.mark.parametrize("bad", UNSAFE)
@pytest.mark.parametrize("col", ["slide_id", "case_id"])
def test_unsafe_ids_are_refused_naming_the_row(small_task, tmp_path, bad, col):
    labels = small_task.parent / "internal" / "labels.csv"
    df = pd.read_csv(labels, dtype=str)
    df.loc[4, col] = bad
    df.to_csv(labels, index=False)
    outside = tmp_path.parent / "outside.h5"
    problems = load_cohort(load_task(small_task)).problems
    if bad.strip() == bad:  # leading whitespace is stripped as before; everything else is refused
        assert any(f"row 6 has {col}" in p and "cannot name a file" in p for p in problems), problems
    assert not outside.exists()


def test_ids_differing_only_in_normalisation_are_refused(small_task):
    labels = small_task.parent / "internal" / "labels.csv"
    df = pd.read_csv(labels, dtype=str)
    df.loc[0, "case_id"] = unicodedata.normalize("NFC", "café")
    df.loc[1, "case_id"] = unicodedata.normalize("NFD", "café")
    df.to_csv(labels, index=False)
    problems = load_cohort(load_task(small_task)).problems
    assert any("differ only in Unicode normalisation" in p for p in problems), problems


@pytest.mark.parametrize("name", ["abmil[../../x]", "../abmil", "abmil[..]", "abmil/x", "momkd[best/..]"])
def test_method_names_cannot_be_paths(name):
    with pytest.raises(BenchError):
        parse_methods(name)

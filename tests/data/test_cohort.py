"""Cohort loading, omics scaling without leakage, and every bad-input problem collected at once."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pandas as pd
import pytest

from bench.data.cohort import load_cohort
from bench.data.omics import OmicsScaler
from bench.data.task import load_task


def test_loads_labels_features_and_omics(small_task):
    task = load_task(small_task)
    cohort = load_cohort(task)
    assert cohort.problems == []
    assert cohort.dim == 16 and cohort.omics.shape[1] == 12
    assert cohort.slides.case_id.str.startswith("P-").all()  # IDs stay strings
    bags = cohort.bags(cohort.slides.slide_id[:3].tolist())
    assert bags[0].features.shape[1] == 16 and bags[0].coords is not None and bags[0].omics is None


def test_omics_scaler_uses_training_patients_only():
    rng = np.random.default_rng(0)
    omics = pd.DataFrame(rng.poisson(10, size=(10, 4)).astype(float), index=[f"c{i}" for i in range(10)])
    train = [f"c{i}" for i in range(6)]
    scaler = OmicsScaler(log1p=True).fit(omics, train)
    z = scaler.transform(omics).loc[train]
    np.testing.assert_allclose(z.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(ddof=0), 1, atol=1e-5)
    changed = omics.copy()
    changed.loc["c9"] *= 100  # a held-out patient's values must not move the training statistics
    again = OmicsScaler(log1p=True).fit(changed, train)
    pd.testing.assert_series_equal(scaler.mean, again.mean)
    pd.testing.assert_series_equal(scaler.std, again.std)


def _break(root, what):
    labels = pd.read_csv(root / "internal" / "labels.csv", dtype=str)
    first = root / "internal" / "features" / f"{labels.slide_id[0]}.h5"
    if what == "nan":
        with h5py.File(first, "a") as f:
            x = f["features"][()]
            x[0, 0] = np.nan
            f["features"][...] = x
    elif what == "width":
        with h5py.File(first, "a") as f:
            del f["features"], f["coords"]
            f["features"] = np.ones((5, 9), np.float32)
            f["coords"] = np.arange(10).reshape(5, 2) * 512
    elif what == "empty":
        with h5py.File(first, "a") as f:
            del f["features"], f["coords"]
            f["features"] = np.ones((0, 16), np.float32)
            f["coords"] = np.ones((0, 2), np.int64)
    elif what == "missing_file":
        first.unlink()
    elif what == "unknown_label":
        labels.loc[0, "odx_risk"] = "intermediate"
        labels.to_csv(root / "internal" / "labels.csv", index=False)
    elif what == "missing_column":
        labels.drop(columns="odx_risk").to_csv(root / "internal" / "labels.csv", index=False)
    return first


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("nan", r"NaN/inf features"),
        ("width", r"feature widths disagree"),
        ("empty", r"empty or malformed bag"),
        ("missing_file", r"no feature file for 1 slide"),
        ("unknown_label", r"value\(s\) \[.*'intermediate'"),
        ("missing_column", r"missing column\(s\) odx_risk"),
    ],
)
def test_bad_input_is_reported_with_file_and_fix(small_task, what, pattern):
    _break(small_task.parent, what)
    problems = load_cohort(load_task(small_task)).problems
    assert any(re.search(pattern, p) for p in problems), problems
    assert all("Fix:" in p for p in problems)


@pytest.mark.parametrize(
    ("recode", "message"),
    [
        ({"high": "low"}, "only negative patients"),
        ({"low": "high"}, "only positive patients"),
        ({"high": "1", "low": "0"}, "not in the task's classes"),
    ],
)
def test_external_labels_checked_like_internal_ones(small_task, recode, message):
    from bench.data.cohort import load_cohorts

    labels = small_task.parent / "ext" / "labels.csv"
    df = pd.read_csv(labels, dtype=str)
    df["odx_risk"] = df.odx_risk.replace(recode)
    df.to_csv(labels, index=False)
    _, _, problems = load_cohorts(load_task(small_task))
    assert any(message in p and "ext" in p for p in problems), problems


@pytest.mark.parametrize("which", ["labels.csv", "omics.csv"])
@pytest.mark.parametrize("content", [b"", b"\x00\x01\xff\xfe garbage\n\x00,\x00\n"])
def test_empty_or_binary_tables_are_problems_not_crashes(small_task, which, content):
    (small_task.parent / "internal" / which).write_bytes(content)
    problems = load_cohort(load_task(small_task)).problems
    assert any(which in p and "Fix:" in p for p in problems), problems

"""Several feature sets (backbones) of one task: the task YAML's mapping, folds keyed by backbone on disk,
shared splits, ``summary.csv``'s ``features`` column, and the report's method × backbone table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.commands import check_data, run
from bench.config import read_task
from bench.data.formats import read_slide
from bench.data.synthetic import SyntheticSpec
from bench.data.synthetic.generator import generate
from bench.errors import BenchError
from bench.report.document import write_report
from bench.taskdata import RunOptions, feature_sets


@pytest.fixture
def two_backbones(tmp_path, cohort_tools):
    """The small task's cohorts with a second, narrower feature set of the same slides (``b``, D = 8)."""
    make_cohort, write_task = cohort_tools
    for name, dim in (("a", 16), ("b", 8)):
        make_cohort(tmp_path / f"internal_{name}", dim=dim)
        make_cohort(
            tmp_path / f"ext_{name}", n_patients=20, dim=dim, seed=1, prefix="E", shift=0.3, omics=False
        )
    return write_task(
        tmp_path / "task.yaml",
        name="toy",
        label_col="odx_risk",
        positive=["high"],
        labels="internal_a/labels.csv",
        features={"a": "internal_a/features", "b": "internal_b/features"},
        omics="internal_a/omics.csv",
        folds=2,
        seed=0,
        train={"epochs": 1, "patience": 2, "min_epochs": 0},
        external=[
            {
                "name": "ext",
                "labels": "ext_a/labels.csv",
                "features": {"a": "ext_a/features", "b": "ext_b/features"},
            }
        ],
    )


def test_every_method_runs_on_every_feature_set_on_shared_splits(two_backbones, tmp_path):
    opts = RunOptions(out=tmp_path / "res", quiet=True)
    summary = run(str(two_backbones), ["abmil"], opts)
    task_dir = opts.out / "toy"
    configs = {
        (f, k): yaml.safe_load((task_dir / "abmil" / f / f"fold_{k}" / "config.yaml").read_text())
        for f in ("a", "b")
        for k in range(2)
    }
    assert not (task_dir / "abmil" / "fold_0").exists()
    assert {c["in_dim"] for (f, _), c in configs.items() if f == "a"} == {16}
    assert {c["in_dim"] for (f, _), c in configs.items() if f == "b"} == {8}
    for k in range(2):  # the same patients in each fold whatever the backbone: the comparison is paired
        assert configs[("a", k)]["split"] == configs[("b", k)]["split"]
        assert configs[("a", k)]["hash"] != configs[("b", k)]["hash"]
    on_disk = pd.read_csv(task_dir / "summary.csv")
    assert list(on_disk.columns[:3]) == ["task", "features", "method"]
    assert set(on_disk.features) == set(summary.features) == {"a", "b"}

    write_report(opts.out, ["toy"], ["markdown"], n_boot=0, loc_slides=0, log=lambda _: None)
    table = (task_dir / "report" / "backbones_toy.md").read_text()
    assert "a internal" in table and "b ext. ext" in table and "the same method on a" in table
    assert (task_dir / "report" / "backbone_tests_toy.md").is_file()
    assert (task_dir / "report" / "runs_toy_a.md").is_file() and (
        task_dir / "report" / "runs_toy_b.md"
    ).is_file()


def test_features_option_runs_only_the_named_sets(two_backbones, tmp_path):
    opts = RunOptions(out=tmp_path / "res", quiet=True, features=("b",))
    run(str(two_backbones), ["abmil"], opts)
    method_dir = opts.out / "toy" / "abmil"
    assert sorted(p.name for p in method_dir.iterdir()) == ["b"]
    with pytest.raises(BenchError, match=r"no feature set 'c'.*a, b"):
        feature_sets(read_task(two_backbones), ["c"])


def test_check_data_checks_every_feature_set(two_backbones, tmp_path):
    (tmp_path / "internal_b" / "features" / "P-0003-00.h5").unlink()
    _, lines, problems = check_data(str(two_backbones))
    assert any(line.startswith("internal [a]") for line in lines)
    assert problems and all(p.startswith("feature set 'b'") for p in problems)


def test_single_feature_set_keeps_todays_paths(small_task, tmp_path):
    opts = RunOptions(out=tmp_path / "res", quiet=True, epochs=1)
    summary = run(str(small_task), ["abmil"], opts)
    assert (opts.out / "toy" / "abmil" / "fold_0" / "config.yaml").is_file()
    assert "features" not in summary and "features" not in pd.read_csv(opts.out / "toy" / "summary.csv")
    with pytest.raises(BenchError, match="one features folder"):
        feature_sets(read_task(small_task), ["uni_v2"])


@pytest.mark.parametrize(
    ("features", "external", "message"),
    [
        ({"fold_1": "f"}, "e", "not a usable feature-set name"),
        ({}, "e", "empty mapping"),
        ({"a": "f", "b": "g"}, "e", "must give 'features' as a mapping with the feature sets"),
        ("f", {"a": "e"}, "one folder, as the task does"),
    ],
)
def test_bad_feature_mappings_are_one_paragraph_errors(tmp_path, cohort_tools, features, external, message):
    _, write_task = cohort_tools
    path = write_task(
        tmp_path / "t.yaml",
        name="t",
        label_col="y",
        positive=["p"],
        labels="l.csv",
        features=features,
        external=[{"name": "x", "labels": "l.csv", "features": external}],
    )
    with pytest.raises(BenchError, match=message):
        read_task(path)


def test_synthetic_backbones_share_slides_and_keep_the_main_features(tmp_path):
    base = dict(n_patients=6, n_genes=8, feature_dim=16, bag_min=20, bag_max=30, external=[{"n_patients": 3}])
    generate(SyntheticSpec(**base), tmp_path / "one")
    spec = SyntheticSpec(**base, backbone="wide", backbones=[{"name": "narrow", "feature_dim": 8}])
    generate(spec, tmp_path / "two")
    assert spec.feature_sets() == {"wide": "features", "narrow": "features_narrow"}
    for cohort in ("internal", "external"):
        slides = sorted((tmp_path / "one" / cohort / "features").glob("*.h5"))
        assert slides and [p.name for p in slides] == sorted(
            p.name for p in (tmp_path / "two" / cohort / "features_narrow").glob("*.h5")
        )
        for path in slides:
            one = read_slide(path)
            main = read_slide(tmp_path / "two" / cohort / "features" / path.name)
            narrow = read_slide(tmp_path / "two" / cohort / "features_narrow" / path.name)
            assert np.array_equal(one.features, main.features)  # adding a backbone changes nothing else
            assert narrow.features.shape == (len(one.features), 8)
            assert np.array_equal(narrow.coords, one.coords)
    with pytest.raises(ValueError, match="unique"):
        SyntheticSpec(backbone="x", backbones=[{"name": "x"}])

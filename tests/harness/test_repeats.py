"""``--repeats R``: the whole CV design R times with split seeds seed + r, the first repeat at today's paths,
and statistics over every repeat's folds (the corrected repeated k-fold t-test)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

import bench.jobs as jobs
from bench.analysis import analyse
from bench.commands import run
from bench.errors import BenchError
from bench.report.document import write_report
from bench.stats import corrected_resampled_ttest
from bench.store import load_results
from bench.taskdata import RunOptions


def test_repeats_add_new_splits_and_keep_the_first_repeat(small_task, tmp_path, monkeypatch):
    out = tmp_path / "res"
    run(str(small_task), ["abmil"], RunOptions(out=out, quiet=True, epochs=1))
    trained = []
    real = jobs.train_fold
    monkeypatch.setattr(
        jobs,
        "train_fold",
        lambda data, fold, *a, **k: trained.append(data.repeat) or real(data, fold, *a, **k),
    )
    summary = run(str(small_task), ["abmil"], RunOptions(out=out, quiet=True, epochs=1, repeats=2))
    assert trained == [1, 1, 1]  # repeat 0 is the run already on disk: same paths, same hashes
    task_dir = out / "toy"
    first = pd.read_csv(task_dir / "splits.tsv", sep="\t")
    second = pd.read_csv(task_dir / "splits_repeat_1.tsv", sep="\t")
    assert list(first.case_id) == list(second.case_id) and not first.equals(second)
    config = yaml.safe_load((task_dir / "abmil" / "repeat_1" / "fold_0" / "config.yaml").read_text())
    assert config["seed"] == 0 and config["repeat"] == 1
    for k in range(3):  # no patient crosses parts within a repeat: test parts still cover every patient once
        assert second.groupby("case_id")[f"fold_{k}"].nunique().max() == 1
    assert (second[[f"fold_{k}" for k in range(3)]] == "test").sum(axis=1).eq(1).all()

    assert set(summary.repeat) == {"0", "1", "all"}
    auc = summary[(summary.cohort == "test") & (summary.metric == "auc")].set_index("repeat")
    assert auc.loc["all", "n"] == 6 and auc.loc["0", "n"] == 3
    assert auc.loc["all", "mean"] == pytest.approx((auc.loc["0", "mean"] + auc.loc["1", "mean"]) / 2)


def test_paired_tests_use_every_repeat(small_task, tmp_path):
    opts = RunOptions(out=tmp_path / "res", quiet=True, epochs=1, repeats=2)
    run(str(small_task), ["abmil", "abmil[ilse]"], opts)
    st = analyse(load_results(opts.out, "toy"), reference="abmil", n_boot=0)
    fa = st.fold_auc[st.fold_auc.cohort == "test"].pivot(index="fold", columns="method", values="auc")
    assert len(fa) == 6  # 2 repeats x 3 folds, each one pairing unit
    row = st.tests[(st.tests.cohort == "test") & (st.tests.test == "corrected t")].iloc[0]
    expected = corrected_resampled_ttest((fa["abmil[ilse]"] - fa["abmil"]).to_numpy(), st.test_train_ratio[0])
    assert row.folds == 6 and row.p == pytest.approx(expected.p_value)
    assert "splits.tsv" in st.test_train_ratio[1]  # both repeats' saved splits were found and used
    internal = st.summary[(st.summary.method == "abmil") & (st.summary.cohort == "test")].iloc[0]
    assert internal.folds == 6

    write_report(opts.out, ["toy"], ["markdown"], n_boot=0, loc_slides=0, log=lambda _: None)
    runs = (opts.out / "toy" / "report" / "runs_toy.md").read_text()
    assert "repeat 0: 3 of 3" in runs and "repeat 1: 3 of 3" in runs


def test_repeats_refuse_imported_splits(small_task, tmp_path):
    opts = RunOptions(out=tmp_path / "res", quiet=True, epochs=1)
    run(str(small_task), ["abmil"], opts)
    task = yaml.safe_load(small_task.read_text())
    task["splits"] = str(opts.out / "toy" / "splits.tsv")
    small_task.write_text(yaml.safe_dump(task))
    with pytest.raises(BenchError, match="--repeats draws new splits"):
        run(str(small_task), ["abmil"], RunOptions(out=tmp_path / "res2", quiet=True, epochs=1, repeats=2))

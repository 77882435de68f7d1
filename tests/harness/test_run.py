"""`bench run` end to end on a small cohort: files of the contract, resume, determinism, no leakage."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

import bench.jobs as jobs
from bench.commands import run
from bench.stats import expected_calibration_error
from bench.store import FOLD_FILES
from bench.taskdata import RunOptions, prepare_task


@pytest.fixture
def opts(tmp_path):
    return RunOptions(out=tmp_path / "res", quiet=True)


def test_run_writes_contract_files(small_task, opts):
    summary = run(str(small_task), ["abmil"], opts)
    task_dir = opts.out / "toy"
    for k in range(3):
        fold = task_dir / "abmil" / f"fold_{k}"
        assert all((fold / f).is_file() for f in FOLD_FILES)
        pred = pd.read_csv(fold / "predictions.csv", dtype={"case_id": str, "slide_id": str})
        assert list(pred.columns) == ["slide_id", "case_id", "label", "prob", "cohort"]
        assert set(pred.cohort) == {"test", "ext"}
        record = json.loads((fold / "metrics.json").read_text())
        assert record["stopped"] in ("plateau", "cap")
        assert 0.0 <= record["train_auc"] <= 1.0  # the kept model on its training patients
        metrics = record["cohorts"]
        for cohort in ("test", "ext"):
            assert set(metrics[cohort]) == {
                *("auc", "acc", "balanced_acc", "f1", "threshold", "n"),
                *("acc@0.5", "balanced_acc@0.5", "f1@0.5"),
                *("brier", "ece", "ece_bins"),
            }
            # both operating points, recomputed from the saved predictions (patients: mean of their slides)
            pat = (
                pred[pred.cohort == cohort]
                .groupby("case_id")
                .agg(label=("label", "first"), prob=("prob", "mean"))
            )
            m = metrics[cohort]
            assert m["acc"] == pytest.approx(((pat.prob >= m["threshold"]) == pat.label).mean())
            assert m["acc@0.5"] == pytest.approx(((pat.prob > 0.5) == pat.label).mean())
            assert m["brier"] == pytest.approx(((pat.prob - pat.label) ** 2).mean())
            assert m["ece"] == pytest.approx(
                expected_calibration_error(pat.label.to_numpy(), pat.prob.to_numpy(), m["ece_bins"])
            )
        assert metrics["test"]["threshold"] == metrics["ext"]["threshold"] == metrics["val"]["threshold"]
        config = yaml.safe_load((fold / "config.yaml").read_text())
        assert config["method"] == "abmil" and config["fold"] == k and "hash" in config
        assert config["method_config"]["epochs"] == 3  # the task's train override
    disk = pd.read_csv(task_dir / "summary.csv")
    assert list(disk.columns) == ["task", "method", "cohort", "metric", "mean", "std", "n"]
    assert set(disk.cohort) == {"test", "ext"} and (disk.n == 3).all()
    assert set(disk.method) == {"abmil", "floor-probe"}  # the floor row of every task, like a method's
    assert set(disk.metric) == {
        *("auc", "acc", "balanced_acc", "f1", "acc@0.5", "balanced_acc@0.5", "f1@0.5", "brier", "ece")
    }
    assert len(summary) == len(disk)
    splits = pd.read_csv(task_dir / "splits.tsv", sep="\t", dtype=str)
    assert {"case_id", "slide_id", "fold_0", "fold_1", "fold_2"} <= set(splits.columns)


def test_test_patients_never_trained_on(small_task, opts, monkeypatch):
    seen = []
    real_fit = jobs.fit

    def spy(method, cfg, in_dim, omics_dim, train_bags, val_bags, *args, **kwargs):
        seen.append(({b.case_id for b in train_bags}, {b.case_id for b in val_bags}))
        return real_fit(method, cfg, in_dim, omics_dim, train_bags, val_bags, *args, **kwargs)

    monkeypatch.setattr(jobs, "fit", spy)
    run(str(small_task), ["abmil"], opts)
    for k, (train, val) in enumerate(seen):
        pred = pd.read_csv(opts.out / "toy" / "abmil" / f"fold_{k}" / "predictions.csv", dtype=str)
        test = set(pred.case_id[pred.cohort == "test"])
        assert not (train & test) and not (val & test) and not (train & val)


def test_rerun_trains_nothing_and_resumes_missing_folds(small_task, opts, monkeypatch):
    first = run(str(small_task), ["abmil"], opts)
    import shutil

    shutil.rmtree(opts.out / "toy" / "abmil" / "fold_1")  # as if killed before fold 1 landed
    trained = []
    real_fit = jobs.fit
    monkeypatch.setattr(jobs, "fit", lambda *a, **k: trained.append(1) or real_fit(*a, **k))
    second = run(str(small_task), ["abmil"], opts)
    assert len(trained) == 1
    pd.testing.assert_frame_equal(first.reset_index(drop=True), second.reset_index(drop=True))
    run(str(small_task), ["abmil"], opts)
    assert len(trained) == 1


def test_same_seed_same_numbers_on_cpu(small_task, tmp_path):
    a = run(str(small_task), ["abmil"], RunOptions(out=tmp_path / "a", quiet=True, folds=2))
    b = run(str(small_task), ["abmil"], RunOptions(out=tmp_path / "b", quiet=True, folds=2))
    pa = pd.read_csv(tmp_path / "a" / "toy" / "abmil" / "fold_1" / "predictions.csv")
    pb = pd.read_csv(tmp_path / "b" / "toy" / "abmil" / "fold_1" / "predictions.csv")
    pd.testing.assert_frame_equal(pa, pb)
    pd.testing.assert_frame_equal(a, b)


def test_changed_config_is_a_new_run_and_old_results_are_kept(small_task, opts):
    run(str(small_task), ["abmil"], RunOptions(out=opts.out, quiet=True, epochs=1))
    old = (opts.out / "toy" / "abmil" / "fold_0" / "config.yaml").read_text()
    run(str(small_task), ["abmil"], RunOptions(out=opts.out, quiet=True, epochs=2))
    new = yaml.safe_load((opts.out / "toy" / "abmil" / "fold_0" / "config.yaml").read_text())
    assert new["method_config"]["epochs"] == 2
    aside = list((opts.out / "toy" / "abmil").glob("fold_0.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "config.yaml").read_text() == old


def test_omics_scaled_with_training_patients_only(small_task, opts):
    data = prepare_task(str(small_task), opts)
    from bench.data.splits import fold_parts

    parts = fold_parts(data.splits, 0)
    train_cases = data.internal.slides.case_id[data.internal.slides.slide_id.isin(parts["train"])].unique()
    from bench.data.omics import OmicsScaler

    scaled = OmicsScaler().fit(data.internal.omics, train_cases).transform(data.internal.omics)
    assert abs(float(scaled.loc[train_cases].mean().abs().max())) < 1e-5
    held_out = scaled.drop(index=train_cases)
    assert float(held_out.mean().abs().max()) > 1e-3  # held-out patients are not re-centred on themselves


def test_validation_omics_only_for_a_mean_auc_monitor(small_task, opts, monkeypatch):
    """MKD selects on its teachers too, so its validation bags carry omics; ABMIL's never do. The test
    part never reaches training or selection either way."""
    seen: dict[str, list[bool]] = {}
    real_fit = jobs.fit

    def spy(method, cfg, in_dim, omics_dim, train_bags, val_bags, *args, **kwargs):
        seen[method] = [b.omics is not None for b in val_bags]
        return real_fit(method, cfg, in_dim, omics_dim, train_bags, val_bags, *args, **kwargs)

    monkeypatch.setattr(jobs, "fit", spy)
    run(str(small_task), ["abmil", "mkd"], RunOptions(out=opts.out, quiet=True, epochs=1))
    assert not any(seen["abmil"]) and any(seen["mkd"])
    metrics = json.loads((opts.out / "toy" / "mkd" / "fold_0" / "metrics.json").read_text())
    assert metrics["monitor"] == "mean-auc" and "val_mean_auc" in metrics["history"][0]


def test_threshold_is_fit_on_validation_patients_only(small_task, tmp_path, monkeypatch):
    """Reversing what the model says about the test and external patients reverses their metrics at both
    operating points, never the threshold: it is chosen on the validation patients alone."""
    run(str(small_task), ["abmil"], RunOptions(out=tmp_path / "a", quiet=True, folds=2, epochs=1))
    real_predict, real_train_fold = jobs.predict, jobs.train_fold
    selecting = []

    def train_fold(*args, **kwargs):  # validation predictions are made in here
        selecting.append(True)
        try:
            return real_train_fold(*args, **kwargs)
        finally:
            selecting.pop()

    def predict(model, bags, *args, **kwargs):
        p = real_predict(model, bags, *args, **kwargs)
        return p if selecting else 1.0 - p

    monkeypatch.setattr(jobs, "train_fold", train_fold)
    monkeypatch.setattr(jobs, "predict", predict)
    run(str(small_task), ["abmil"], RunOptions(out=tmp_path / "b", quiet=True, folds=2, epochs=1))
    for k in range(2):
        a, b = (
            json.loads((tmp_path / o / "toy" / "abmil" / f"fold_{k}" / "metrics.json").read_text())["cohorts"]
            for o in ("a", "b")
        )
        assert a["val"] == b["val"] and a["test"]["threshold"] == b["test"]["threshold"]
        for cohort in ("test", "ext"):
            assert a[cohort]["auc"] == pytest.approx(1 - b[cohort]["auc"])
            assert a[cohort]["acc@0.5"] == pytest.approx(1 - b[cohort]["acc@0.5"])

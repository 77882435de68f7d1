"""The report's reference rows: the floor on every task, ground-truth ceilings on synthetic tasks only, no
leakage into the probe (tests/harness/test_references_types.py, for every type), the Bayes ceiling against a hand computation, and the share of the privileged gap."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

import bench.baselines as baselines
from bench.analysis import analyse
from bench.ceilings import gap_shares
from bench.commands import run
from bench.data.groundtruth import bayes_probability, latent_programs
from bench.data.synthetic import SyntheticSpec, label_posterior
from bench.errors import BenchError
from bench.evaluate import patient_level
from bench.jobs import method_config, parse_methods, with_ceiling_models
from bench.stats import gap_share
from bench.store import load_results
from bench.taskdata import RunOptions, prepare_task


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    """Two candidate Cs instead of seven: the tests check what is fit on what, not the grid."""
    monkeypatch.setattr(baselines, "C_GRID", (0.01, 1.0))


@pytest.fixture
def synthetic_task(tmp_path, cohort_tools, monkeypatch):
    """A tiny synthetic task (60 patients, D = 8) with an external cohort not named 'external'."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    _, write_task = cohort_tools
    return write_task(
        tmp_path / "syn.yaml",
        name="syn",
        source="synthetic",
        label_col="odx_risk",
        positive=["high"],
        folds=2,
        seed=0,
        synthetic={
            "n_patients": 60,
            "n_genes": 16,
            "feature_dim": 8,
            "bag_min": 10,
            "bag_max": 20,
            "prevalence_odx": 0.4,
            "external": [{"name": "site_b", "n_patients": 20, "bag_min": 10, "bag_max": 20}],
        },
        external=[{"name": "site_b"}],
    )


def _data(task, tmp_path):
    return prepare_task(str(task), RunOptions(out=tmp_path / "res", quiet=True))


def test_floor_on_a_real_format_task_and_no_ceiling(small_task, tmp_path):
    data = _data(small_task, tmp_path)
    assert data.privileged is None
    assert baselines.ensure_references(data, tmp_path / "res") == ["floor-probe"]
    results = load_results(tmp_path / "res", "toy")
    assert {r.method for r in results.runs} == {"floor-probe"} and {r.kind for r in results.runs} == {"floor"}
    metrics = results.runs[0].metrics
    assert set(metrics["cohorts"]) == {"val", "test", "ext"} and 0 <= metrics["train_auc"] <= 1
    assert metrics["C"] in baselines.C_GRID
    # computed once: a second call finds every fold on disk and fits nothing
    before = [(r.path / "metrics.json").stat().st_mtime_ns for r in results.runs]
    baselines.ensure_references(data, tmp_path / "res")
    assert [(r.path / "metrics.json").stat().st_mtime_ns for r in results.runs] == before


def test_ceilings_only_on_synthetic_tasks(synthetic_task, tmp_path):
    data = _data(synthetic_task, tmp_path)
    applied = baselines.ensure_references(data, tmp_path / "res")
    assert applied == ["floor-probe", "ceiling-bayes", "ceiling-omics", "ceiling-oracle"]
    st = analyse(load_results(tmp_path / "res", "syn"), reference="floor-probe", n_boot=0)
    assert st.kinds == {"floor-probe": "floor", **{m: "ceiling" for m in applied[1:]}}
    # every external cohort by its own name; the omics ceiling has none (omics are the internal cohort's)
    assert set(st.cohorts) == {"test", "site_b"}
    assert set(st.summary.cohort[st.summary.method == "ceiling-omics"]) == {"test"}
    assert set(st.summary.cohort[st.summary.method == "ceiling-bayes"]) == {"test", "site_b"}


def test_bayes_ceiling_is_the_auc_of_the_latent_score(synthetic_task, tmp_path):
    data = _data(synthetic_task, tmp_path)
    latent = pd.read_csv(data.task.labels.parent / "latent.csv", dtype={"case_id": str}).set_index("case_id")
    score = 0.8 * latent.proliferation - 0.6 * latent.luminal  # ODX's w·z (docs/synthetic.md), by hand
    labels = data.internal.patients.set_index("case_id").label
    for k in range(2):
        cohorts, chosen = baselines._fold(data, baselines._bayes_inputs(data), k)
        assert chosen == {}  # nothing is fit
        test = patient_level(cohorts["test"]).set_index("case_id")
        assert roc_auc_score(test.label, test.prob) == pytest.approx(
            roc_auc_score(labels[test.index], score[test.index])
        )
    ext = patient_level(cohorts["site_b"])
    assert len(ext) == 20 and ext.prob.between(0, 1).all()


def test_label_posterior_by_hand():
    """At z = 0, P(high) = Φ(−t/σ) with t = sd(w·z)·√(1 + ν²)·Φ⁻¹(1 − π) and σ = ν·sd(w·z): Φ(−√(1+ν²)/ν ·
    Φ⁻¹(1 − π)) = Φ(−2.0418…) for ν = 0.35, π = 0.25."""
    p = label_posterior(SyntheticSpec(feature_dim=8, n_genes=8), "odx_risk", np.zeros((1, 6)))
    assert p[0] == pytest.approx(
        0.5 * math.erfc(math.sqrt(1 + 0.35**2) / 0.35 * 0.6744897501960817 / math.sqrt(2))
    )
    assert p[0] == pytest.approx(0.02059, abs=1e-4)


def test_no_ground_truth_outside_the_synthetic_cache(small_task):
    labels = small_task.parent / "internal" / "labels.csv"
    assert latent_programs(labels) is None and bayes_probability(labels, "odx_risk", ["high"]) is None


def test_gap_share_by_hand():
    y = np.array([1, 1, 0, 0])
    base = np.array([0.5, 0.1, 0.3, 0.2])  # AUC 2/4
    method = np.array([0.9, 0.25, 0.3, 0.2])  # AUC 3/4
    top = np.array([0.9, 0.8, 0.1, 0.2])  # AUC 1
    share, lo, hi = gap_share(y, base, method, top, n_boot=200, seed=0)
    assert share == pytest.approx(0.5)
    assert lo <= hi
    assert gap_share(y, base, top, top, n_boot=0)[0] == pytest.approx(1.0)
    assert math.isnan(gap_share(y, base, method, base, n_boot=0)[0])  # no gap: no share
    # several rows (an external cohort's folds): AUCs averaged before the ratio
    two = gap_share(y, np.stack([base, base]), np.stack([method, top]), np.stack([top, top]), n_boot=0)[0]
    assert two == pytest.approx(0.75)


def test_privileged_student_runs_on_synthetic_tasks_only(synthetic_task, small_task, tmp_path):
    """It is a ceiling: not in `--methods all`, refused on a real-format task, added beside a distillation
    method on a synthetic one, recorded as kind ceiling; a distillation method equal to label-only training
    closes 0 % of its gap."""
    assert "ceiling-privileged" not in parse_methods("all")
    real = _data(small_task, tmp_path)
    with pytest.raises(BenchError, match="only a synthetic task has"):
        method_config(real, "ceiling-privileged", RunOptions())
    assert with_ceiling_models(real, ["abmil", "mkd"]) == ["abmil", "mkd"]
    opts = RunOptions(out=tmp_path / "res", quiet=True, epochs=1)
    data = _data(synthetic_task, tmp_path)
    assert with_ceiling_models(data, ["abmil"]) == ["abmil"]
    assert with_ceiling_models(data, ["mkd"]) == ["mkd"]  # no label-only twin to measure the gap from
    assert with_ceiling_models(data, ["abmil", "mkd"]) == ["abmil", "mkd", "ceiling-privileged"]
    run(str(synthetic_task), ["abmil", "ceiling-privileged"], opts)
    fold = tmp_path / "res" / "syn" / "ceiling-privileged" / "fold_0"
    config = yaml.safe_load((fold / "config.yaml").read_text())
    assert config["kind"] == "ceiling" and config["omics_dim"] == 6  # the six programs
    assert 0 <= json.loads((fold / "metrics.json").read_text())["train_auc"] <= 1
    for k in range(2):  # a stand-in distillation method: label-only ABMIL's folds, marked as reading omics
        src, dst = (
            tmp_path / "res" / "syn" / "abmil" / f"fold_{k}",
            tmp_path / "res" / "syn" / "kd" / f"fold_{k}",
        )
        shutil.copytree(src, dst)
        cfg = yaml.safe_load((dst / "config.yaml").read_text())
        cfg["method"], cfg["method_config"]["uses_omics"] = "kd", True
        (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    gaps = gap_shares(analyse(load_results(tmp_path / "res", "syn"), reference="abmil", n_boot=50))
    assert set(gaps.method) == {"kd"} and set(gaps.cohort) == {"test", "site_b"}
    assert (gaps.baseline == "abmil").all() and (gaps.student == "ceiling-privileged").all()
    gap = gaps.student_auc != gaps.baseline_auc
    assert np.allclose(gaps.share[gap], 0.0) and gaps.share[~gap].isna().all()


def test_report_adds_missing_floor_rows_on_the_saved_splits(small_task, tmp_path):
    """`bench report` on results without reference rows computes them on the splits.tsv of the folds."""
    from bench.commands import _references_on_disk

    out, task_dir = tmp_path / "res", tmp_path / "res" / "toy"
    baselines.ensure_references(_data(small_task, tmp_path), out)
    shutil.move(task_dir / "floor-probe", task_dir / "stand-in")  # a "method" with folds on this split
    for k in range(3):
        path = task_dir / "stand-in" / f"fold_{k}" / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        del cfg["kind"]
        path.write_text(yaml.safe_dump(cfg))
    logged = []
    _references_on_disk(str(small_task), "toy", out, logged.append)
    assert logged == ["toy: floor-probe (floor) computed on 3 fold(s)"]
    assert {r.method: r.kind for r in load_results(out, "toy").runs} == {
        "stand-in": "method",
        "floor-probe": "floor",
    }

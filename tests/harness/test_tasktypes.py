"""Task types: the YAML's type/classes/time_col/event_col checked, multiclass labels encoded and stratified,
multiclass metrics and statistics on hand-checked cases, a multiclass task end to end (run, report), the
synthetic outcomes (subtype, survival) derived without touching the binary labels, survival labels checked,
time bins as the authors cut them, the c-index against a hand count of pairs, a survival task end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import log_loss, roc_auc_score

from bench.commands import check_data, run
from bench.config import read_task
from bench.data.cohort import load_cohort
from bench.data.splits import fold_parts
from bench.data.synthetic import OUTCOMES_FILE, SUBTYPES, SyntheticSpec, ensure_outcomes, materialise
from bench.errors import BenchError
from bench.evaluate import auc, c_index, multiclass_metrics, patient_level, validation_loss
from bench.report.document import write_report
from bench.stats import (
    bootstrap_cindex_ci,
    bootstrap_macro_auc_ci,
    class_counts,
    paired_bootstrap_test,
    resampled_cindex,
    resampled_macro_aucs,
)
from bench.taskdata import RunOptions, prepare_task
from bench.tasktypes import time_bin_edges, time_bin_index


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "multiclass"}, "type 'multiclass' needs 'classes'"),
        ({"classes": ["a", "b", "c"]}, "'classes' cannot be used with type 'binary'"),
        ({"type": "multiclass", "classes": ["a", "b", "a"], "positive": None}, "lists a value twice"),
        ({"type": "survival", "positive": None}, "type 'survival' needs 'time_col' and 'event_col'"),
    ],
)
def test_type_fields_are_checked_with_the_file_named(tmp_path, cohort_tools, fields, message):
    _, write_task = cohort_tools
    base = {"name": "t", "label_col": "y", "positive": ["1"], "labels": "l.csv", "features": "f"}
    path = write_task(tmp_path / "t.yaml", **{k: v for k, v in {**base, **fields}.items() if v is not None})
    with pytest.raises(BenchError, match=message) as err:
        read_task(path)
    assert str(path) in str(err.value)


def test_multiclass_labels_follow_the_classes_order_and_unknown_values_are_named(grade_task):
    cohort = load_cohort(read_task(grade_task))
    assert not cohort.problems
    raw = pd.read_csv(grade_task.parent / "internal" / "labels.csv", dtype=str).set_index("slide_id").grade
    classes = read_task(grade_task).classes
    expected = raw.loc[cohort.slides.slide_id].map({g: i for i, g in enumerate(classes)}).to_numpy()
    np.testing.assert_array_equal(cohort.slides.label.to_numpy(), expected)
    task = read_task(grade_task).model_copy(update={"classes": ["g1", "g2", "g4"]})
    problems = load_cohort(task).problems
    assert len(problems) == 1 and "['g3']" in problems[0] and "under 'classes'" in problems[0]


def test_macro_auc_is_sklearns_one_vs_rest_and_skips_absent_classes():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    p = rng.dirichlet(np.ones(3), size=30)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    two = y < 2  # class 2 absent: the mean of the two classes' AUCs
    expected = np.mean([roc_auc_score(y[two] == c, p[two, c]) for c in (0, 1)])
    assert auc(y[two], p[two]) == pytest.approx(expected)


def test_multiclass_metrics_hand_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.5, 0, 0.5]]
    )
    m = multiclass_metrics(y, p)  # argmax: 0, 1, 1, 1, 2, 0 (a tie goes to the lower class)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["balanced_acc"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    # F1 per class: 2PR/(P+R): class 0 P=1/2 R=1/2 -> 1/2; class 1 P=2/3 R=1 -> 0.8; class 2 P=1 R=1/2 -> 2/3
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["n"] == 6
    assert validation_loss(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1, 2]))


def test_patient_level_keeps_every_class_column():
    pred = pd.DataFrame(
        {"case_id": ["a", "a", "b"], "label": [1, 1, 0], "prob_0": [0.2, 0.4, 0.9], "prob_1": [0.8, 0.6, 0.1]}
    )
    pat = patient_level(pred)
    assert list(pat.columns) == ["case_id", "label", "prob_0", "prob_1"]
    assert pat.prob_0.tolist() == pytest.approx([0.3, 0.9])
    mx = patient_level(pred, "max")  # maxima renormalised to a distribution: (0.4, 0.8) / 1.2
    assert mx.prob_0.iloc[0] == pytest.approx(0.4 / 1.2)


def test_class_stratified_bootstrap_and_paired_test():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 12)
    good = np.eye(3)[y] * 2 + rng.random((36, 3))
    noise = rng.random((36, 3))
    counts = class_counts(y, 50, 0)
    assert all((counts[:, y == c].sum(1) == (y == c).sum()).all() for c in range(3))
    ones = np.ones((1, 36))  # the resample that draws every patient once is the data
    assert resampled_macro_aucs(y, good, ones)[0] == pytest.approx(auc(y, good))
    lo, hi = bootstrap_macro_auc_ci(y, noise[None], 500, 0)
    assert lo < auc(y, noise) < hi
    test = paired_bootstrap_test(y, good[None], noise[None], 500, 0)
    assert test.estimate == pytest.approx(auc(y, good) - auc(y, noise)) and test.p_value < 0.01
    same = paired_bootstrap_test(y, noise[None], noise[None], 200, 0)
    assert same.estimate == 0 and np.isnan(same.p_value)


def test_multiclass_task_end_to_end(grade_task, tmp_path):
    opts = RunOptions(out=tmp_path / "res", quiet=True, folds=2)
    data = prepare_task(grade_task, opts)
    for k in range(2):  # stratified by class: every class in every part of every fold
        per_part = data.splits.groupby(f"fold_{k}").label.nunique()
        assert (per_part == 3).all()
    summary = run(str(grade_task), ["abmil"], opts)
    assert {"auc", "acc", "balanced_acc", "f1"} <= set(summary.metric)
    assert set(summary.method) == {"abmil", "floor-probe"}  # the floor, no ceiling (not synthetic)
    fold = opts.out / "grade" / "abmil" / "fold_0"
    pred = pd.read_csv(fold / "predictions.csv")
    assert list(pred.columns) == ["slide_id", "case_id", "label", "prob_0", "prob_1", "prob_2", "cohort"]
    assert np.allclose(pred[["prob_0", "prob_1", "prob_2"]].sum(axis=1), 1)
    metrics = json.loads((fold / "metrics.json").read_text())["cohorts"]
    pat = patient_level(pred[pred.cohort == "test"])
    probs = pat[["prob_0", "prob_1", "prob_2"]].to_numpy()
    assert metrics["test"]["auc"] == pytest.approx(auc(pat.label.to_numpy(), probs))
    assert np.sum(metrics["test"]["confusion"]) == metrics["test"]["n"] == len(pat)
    assert "threshold" not in metrics["test"]
    write_report(opts.out, ["grade"], ["markdown"], n_boot=1000, loc_slides=0, log=lambda _: None)
    report = (opts.out / "report.md").read_text()
    assert "macro one-vs-rest" in report and "| floor-probe | +" in report  # in the paired bootstrap tests
    assert "multinomial linear probe on each slide's mean patch feature" in report
    assert (opts.out / "grade" / "report" / "confusion_grade_internal.png").is_file()


def test_survival_labels_are_checked(small_task, cohort_tools):
    _, write_task = cohort_tools
    root = small_task.parent
    path = root / "internal" / "labels.csv"
    df = pd.read_csv(path, dtype=str)
    df["os_days"] = ["100"] * len(df)
    df["os_event"] = ["1"] * len(df)
    df.loc[2, "os_days"], df.loc[3, "os_days"], df.loc[4, "os_event"] = "-3", "", "yes"  # 3 patients
    df.to_csv(path, index=False)
    task = write_task(
        root / "os.yaml",
        name="os",
        type="survival",
        time_col="os_days",
        event_col="os_event",
        labels="internal/labels.csv",
        features="internal/features",
    )
    problems = load_cohort(read_task(task)).problems
    assert len(problems) == 2
    assert "time column 'os_days'" in problems[0] and "2 slide(s)" in problems[0]
    assert "event column 'os_event'" in problems[1] and "'yes'" in problems[1]
    df.loc[[2, 3], "os_days"], df.loc[4, "os_event"] = "5", "0"  # patient P-0003 censored
    df.to_csv(path, index=False)
    _, lines, problems = check_data(str(task))
    assert "survival: 39 events, 1 censored patients" in lines[-1]


def test_synthetic_outcomes_leave_the_binary_labels_unchanged(tmp_path):
    spec = SyntheticSpec.from_dict(
        {"n_patients": 40, "n_genes": 16, "feature_dim": 8, "bag_min": 10, "bag_max": 20}
        | {"external": [{"name": "ext", "n_patients": 20, "bag_min": 10, "bag_max": 20}]}
    )
    root = materialise(spec, tmp_path)
    before = hashlib.sha256((root / "internal" / "labels.csv").read_bytes()).hexdigest()
    ensure_outcomes(spec, root)
    assert hashlib.sha256((root / "internal" / "labels.csv").read_bytes()).hexdigest() == before
    first = (root / "internal" / OUTCOMES_FILE).read_text()
    (root / "internal" / OUTCOMES_FILE).unlink()
    ensure_outcomes(spec, root)  # regenerated the same: its own seeded stream
    assert (root / "internal" / OUTCOMES_FILE).read_text() == first
    for cohort in ("internal", "ext"):
        out = pd.read_csv(root / cohort / OUTCOMES_FILE, dtype={"case_id": str})
        labels = pd.read_csv(root / cohort / "labels.csv", dtype={"case_id": str})
        assert out.slide_id.tolist() == labels.slide_id.tolist()
        assert set(out.subtype) <= set(SUBTYPES)
        assert set(out.os_event) <= {0, 1} and (out.os_days > 0).all()
        assert out.groupby("case_id").subtype.nunique().max() == 1


def test_time_bins_are_the_authors_quantile_cut():
    time = np.array([5.0, 1.0, 3.0, 8.0, 2.0, 9.0, 4.0, 7.0, 6.0, 10.0])
    event = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0])
    edges = time_bin_edges(time, event, 4)
    observed = pd.Series(time[event == 1])
    _, q = pd.qcut(observed, q=4, retbins=True)
    np.testing.assert_allclose(edges[1:-1], q[1:-1])
    assert edges[0] < 1.0 and edges[-1] > 10.0  # widened to every patient's time
    expected = pd.cut(time, bins=edges, labels=False, right=False, include_lowest=True)
    np.testing.assert_array_equal(time_bin_index(time, edges), expected)


def _harrell_by_hand(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C counted pair by pair: (i, j) is usable when i has an event before j's time; concordant when
    i's risk is higher, half when tied."""
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and time[i] < time[j]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_c_index_is_torchsurvs_harrell_and_the_bootstrap_resampler_agrees():
    rng = np.random.default_rng(0)
    time, event, risk = rng.exponential(10, 60), (rng.random(60) < 0.4).astype(int), rng.normal(size=60)
    harrell = c_index(time, event, risk)
    assert harrell == pytest.approx(_harrell_by_hand(time, event, risk), abs=1e-6)
    assert resampled_cindex(time, event, risk, np.ones((1, 60)))[0] == pytest.approx(harrell, abs=1e-6)
    lo, hi = bootstrap_cindex_ci(time, event, risk[None], 300, 0)
    assert lo < harrell < hi


def test_survival_task_end_to_end(os_task, tmp_path):
    opts = RunOptions(out=tmp_path / "res", quiet=True)
    data = prepare_task(os_task, opts)
    for k in range(2):  # stratified by event: both events and censorings in every part
        parts = data.splits.merge(data.internal.slides[["slide_id", "event"]], on="slide_id")
        assert (parts.groupby(f"fold_{k}").event.nunique() == 2).all()
    summary = run(str(os_task), ["abmil"], opts)
    assert {"c_index", "c_index_uno", "auc_q1", "ibs"} <= set(summary.metric)
    floor = summary[summary.method == "floor-probe"]
    assert set(summary.method) == {"abmil", "floor-probe"} and set(floor.metric) == set(summary.metric)
    fold = opts.out / "os" / "abmil" / "fold_0"
    pred = pd.read_csv(fold / "predictions.csv")
    assert list(pred.columns) == [
        *("slide_id", "case_id", "label", "time", "event", "risk"),
        *(f"surv_{k}" for k in range(4)),
        "cohort",
    ]
    config = yaml.safe_load((fold / "config.yaml").read_text())
    edges = np.array(config["time_bins"])
    np.testing.assert_array_equal(pred.label, time_bin_index(pred.time.to_numpy(), edges))
    train = data.internal.slides[data.internal.slides.slide_id.isin(fold_parts(data.splits, 0)["train"])]
    train = train.drop_duplicates("case_id")
    np.testing.assert_allclose(edges, time_bin_edges(train.time.to_numpy(), train.event.to_numpy(), 4))
    assert config["method_config"]["head"] == "survival" and config["method_config"]["num_classes"] == 4
    metrics = json.loads((fold / "metrics.json").read_text())["cohorts"]
    pat = patient_level(pred[pred.cohort == "test"])
    assert metrics["test"]["c_index"] == pytest.approx(
        c_index(pat.time.to_numpy(), pat.event.to_numpy(), pat.risk.to_numpy()), abs=1e-6
    )
    assert metrics["test"]["risk_cut"] == metrics["val"]["risk_cut"]
    write_report(opts.out, ["os"], ["markdown"], n_boot=1000, loc_slides=0, log=lambda _: None)
    report = (opts.out / "report.md").read_text()
    assert "Harrell's c-index" in report and "L2-penalised linear Cox model (Breslow)" in report
    assert "evaluated on the same folds and cohorts (c-index %" in report  # the reference rows' table
    assert (opts.out / "os" / "report" / "km_os_internal.png").is_file()

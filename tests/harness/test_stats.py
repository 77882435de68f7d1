"""Statistics of `bench report`, each against an independent computation (hand values, O(n²) loops, scipy)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from bench.analysis import analyse_task
from bench.data.splits import membership_digest
from bench.stats import (
    bootstrap_auc_ci,
    corrected_resampled_ttest,
    delong,
    delong_test,
    resampled_aucs,
    stratified_counts,
)

# ---------------------------------------------------------------- DeLong


def test_delong_hand_examples():
    # positives 3, 1; negatives 2, 0: V10 = (1, 1/2), V01 = (1/2, 1); S10 = S01 = 1/8; var = 1/16 + 1/16.
    d = delong(np.array([1, 1, 0, 0]), np.array([3.0, 1.0, 2.0, 0.0]))
    assert d.aucs[0] == pytest.approx(0.75) and d.cov[0, 0] == pytest.approx(0.125)
    # with a tie: positives 1, 2; negatives 1, 0: V10 = (3/4, 1), V01 = (3/4, 1); var = 1/32.
    d = delong(np.array([1, 1, 0, 0]), np.array([1.0, 2.0, 1.0, 0.0]))
    assert d.aucs[0] == pytest.approx(0.875) and d.cov[0, 0] == pytest.approx(1 / 32)


def _direct_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) written out: ψ over every (positive, negative) pair, then the component covariances."""
    pos_idx, neg_idx = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n, k = len(pos_idx), len(neg_idx), len(scores)
    v10 = np.zeros((k, m))
    v01 = np.zeros((k, n))
    for r in range(k):
        for a, i in enumerate(pos_idx):
            for b, j in enumerate(neg_idx):
                x, w = scores[r][i], scores[r][j]
                psi = 1.0 if x > w else (0.5 if x == w else 0.0)
                v10[r, a] += psi / n
                v01[r, b] += psi / m
    aucs = v10.mean(axis=1)
    s10 = np.zeros((k, k))
    s01 = np.zeros((k, k))
    for r in range(k):
        for s in range(k):
            s10[r, s] = sum((v10[r, a] - aucs[r]) * (v10[s, a] - aucs[s]) for a in range(m)) / (m - 1)
            s01[r, s] = sum((v01[r, b] - aucs[r]) * (v01[s, b] - aucs[s]) for b in range(n)) / (n - 1)
    return aucs, s10 / m + s01 / n


def test_fast_delong_matches_direct_structural_components():
    rng = np.random.default_rng(3)
    y = (rng.random(45) < 0.4).astype(int)
    base = y + rng.normal(size=45)
    scores = np.stack(
        [np.round(base + rng.normal(scale=s, size=45), 1) for s in (0.3, 1.0, 2.0)]
    )  # with ties
    aucs, cov = _direct_delong(y, scores)
    d = delong(y, scores)
    np.testing.assert_allclose(d.aucs, aucs, atol=1e-12)
    np.testing.assert_allclose(d.aucs, [roc_auc_score(y, s) for s in scores], atol=1e-12)
    np.testing.assert_allclose(d.cov, cov, atol=1e-12)
    t = delong_test(y, scores[0], scores[2])
    z = (aucs[0] - aucs[2]) / math.sqrt(cov[0, 0] + cov[2, 2] - 2 * cov[0, 2])
    assert t.statistic == pytest.approx(z) and t.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))


def test_delong_test_is_calibrated_under_the_null_and_detects_a_difference():
    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(300):
        y = (rng.random(80) < 0.5).astype(int)
        signal = y + rng.normal(size=80)
        a, b = signal + rng.normal(size=80), signal + rng.normal(size=80)  # exchangeable: same true AUC
        rejections += delong_test(y, a, b).p_value < 0.05
    assert 0.02 <= rejections / 300 <= 0.09
    y = (rng.random(200) < 0.5).astype(int)
    good, poor = y + rng.normal(scale=0.5, size=200), y + rng.normal(scale=3.0, size=200)
    assert delong_test(y, good, poor).p_value < 1e-3
    assert math.isnan(delong_test(y, good, good).p_value)  # nothing to test: not p = 1 (or 0)


# ---------------------------------------------------------------- corrected resampled t-test


def test_corrected_ttest_against_hand_computation():
    diffs = [0.02, 0.05, -0.01, 0.03, 0.04]
    # mean 0.026; squared deviations sum to 0.00212, so s² = 0.00053; (1/5 + 1/4) s² = 0.0002385.
    t_hand = 0.026 / math.sqrt(0.0002385)
    # Student t with 4 df has a closed-form CDF: 1/2 + 3/8 · a (1 − t²/(12 (1 + t²/4))), a = t / sqrt(1 + t²/4).
    a = t_hand / math.sqrt(1 + t_hand**2 / 4)
    p_hand = 2 * (1 - (0.5 + 0.375 * a * (1 - t_hand**2 / (12 * (1 + t_hand**2 / 4)))))
    res = corrected_resampled_ttest(diffs, 0.25)
    assert res.estimate == pytest.approx(0.026)
    assert res.statistic == pytest.approx(t_hand, rel=1e-9) and res.p_value == pytest.approx(p_hand, rel=1e-9)
    assert t_hand == pytest.approx(1.68357, abs=1e-5)
    # no correction term: the ordinary paired t-test; the correction can only widen (raise p).
    a_scores, b_scores = np.array([0.8, 0.82, 0.75, 0.79, 0.81]), np.array([0.78, 0.77, 0.76, 0.76, 0.77])
    plain = corrected_resampled_ttest(a_scores - b_scores, 0.0)
    ref = sps.ttest_rel(a_scores, b_scores)
    assert plain.statistic == pytest.approx(ref.statistic) and plain.p_value == pytest.approx(ref.pvalue)
    assert corrected_resampled_ttest(a_scores - b_scores, 0.25).p_value > plain.p_value


# ---------------------------------------------------------------- bootstrap


def test_resampled_aucs_match_an_explicit_resampling_loop():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(12, int), np.zeros(20, int)]
    scores = np.stack([np.round(y + rng.normal(size=32), 1), y * 0.5 + rng.normal(size=32)])
    cp, cn = stratified_counts(12, 20, 50, seed=7)
    fast = resampled_aucs(y, scores, cp, cn)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for b in range(50):
        idx = np.r_[np.repeat(pos, cp[b].astype(int)), np.repeat(neg, cn[b].astype(int))]
        assert len(idx) == 32 and y[idx].sum() == 12  # class sizes kept
        expected = np.mean([roc_auc_score(y[idx], s[idx]) for s in scores])
        assert fast[b] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_ci_is_seeded_and_agrees_with_delong_normal_interval():
    rng = np.random.default_rng(2)
    y = (rng.random(400) < 0.3).astype(int)
    p = y + rng.normal(scale=1.2, size=400)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=2000, seed=0)
    assert (lo, hi) == bootstrap_auc_ci(y, p, n_boot=2000, seed=0)
    assert (lo, hi) != bootstrap_auc_ci(y, p, n_boot=2000, seed=1)
    d = delong(y, p)
    se = math.sqrt(d.cov[0, 0])
    assert lo < d.aucs[0] < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)


# ---------------------------------------------------------------- plumbing on saved predictions


def _write_fold(out: Path, method: str, fold: int, pred: pd.DataFrame, split: str, folds: int) -> None:
    fd = out / "toy" / method / f"fold_{fold}"
    fd.mkdir(parents=True)
    pred.to_csv(fd / "predictions.csv", index=False)
    config = {"hash": "x", "task": {"name": "toy", "patient_aggregation": "mean"}, "method": method}
    config.update({"fold": fold, "folds": folds, "seed": 0, "split": split})
    (fd / "config.yaml").write_text(yaml.safe_dump(config))
    (fd / "metrics.json").write_text("{}")


@pytest.fixture
def saved_results(tmp_path: Path) -> Path:
    """Two methods x 3 folds on 30 internal patients (every third with two slides) and 16 external ones."""
    rng = np.random.default_rng(5)
    cases = [f"P{i:02d}" for i in range(30)]
    labels = {c: int(i % 2 == 0) for i, c in enumerate(cases)}
    slides = [(c, f"{c}-{s}") for i, c in enumerate(cases) for s in range(2 if i % 3 == 0 else 1)]
    ext = [(f"E{i:02d}", f"E{i:02d}-0", int(i % 2 == 0)) for i in range(16)]
    split = pd.DataFrame(slides, columns=["case_id", "slide_id"])
    split["label"] = split.case_id.map(labels)
    for f in range(3):
        split[f"fold_{f}"] = [
            "test" if int(c[1:]) % 3 == f else ("val" if int(c[1:]) % 7 == 0 else "train")
            for c in split.case_id
        ]
    (tmp_path / "toy").mkdir()
    split.to_csv(tmp_path / "toy" / "splits.tsv", sep="\t", index=False)
    for method, noise in (("good", 0.6), ("weak", 2.0)):
        for f in range(3):
            test = split[split[f"fold_{f}"] == "test"]
            rows = [
                (s, c, labels[c], labels[c] + rng.normal(scale=noise), "test")
                for c, s in zip(test.case_id, test.slide_id, strict=True)
            ]
            rows += [(s, c, y, y + rng.normal(scale=noise), "ext") for c, s, y in ext]
            pred = pd.DataFrame(rows, columns=["slide_id", "case_id", "label", "prob", "cohort"])
            _write_fold(tmp_path, method, f, pred, membership_digest(split, f), 3)
    return tmp_path


def test_analysis_resamples_patients_and_pools_as_documented(saved_results):
    st = analyse_task(saved_results, "toy", n_boot=500, seed=3)
    assert st.reference == "good"  # best mean internal AUC
    preds = {
        (m, f): pd.read_csv(
            saved_results / "toy" / m / f"fold_{f}" / "predictions.csv", dtype={"case_id": str}
        )
        for m in ("good", "weak")
        for f in range(3)
    }
    pat = {
        k: v.groupby(["cohort", "case_id"]).agg(label=("label", "first"), prob=("prob", "mean"))
        for k, v in preds.items()
    }
    s = st.summary.set_index(["method", "cohort"])
    for m in ("good", "weak"):
        fold_aucs = [roc_auc_score(pat[m, f].loc["test"].label, pat[m, f].loc["test"].prob) for f in range(3)]
        assert s.loc[(m, "test"), "mean"] == pytest.approx(np.mean(fold_aucs))
        assert s.loc[(m, "test"), "sd"] == pytest.approx(np.std(fold_aucs, ddof=1))
        pooled = pd.concat([pat[m, f].loc["test"] for f in range(3)]).sort_index()
        assert len(pooled) == 30  # one row per patient, two-slide patients averaged first
        assert s.loc[(m, "test"), "auc"] == pytest.approx(roc_auc_score(pooled.label, pooled.prob))
        assert (s.loc[(m, "test"), "ci_lo"], s.loc[(m, "test"), "ci_hi"]) == bootstrap_auc_ci(
            pooled.label.to_numpy(), pooled.prob.to_numpy(), 500, 3
        )
        ext = np.stack([pat[m, f].loc["ext"].sort_index().prob.to_numpy() for f in range(3)])
        y_ext = pat[m, 0].loc["ext"].sort_index().label.to_numpy()
        assert s.loc[(m, "ext"), "auc"] == pytest.approx(np.mean([roc_auc_score(y_ext, e) for e in ext]))
        assert (s.loc[(m, "ext"), "ci_lo"], s.loc[(m, "ext"), "ci_hi"]) == bootstrap_auc_ci(
            y_ext, ext, 500, 3
        )

    tests = st.tests.set_index(["cohort", "test"])
    # n_test / n_train from splits.tsv: 10 test patients, 20 in training + validation, in every fold.
    assert st.test_train_ratio[0] == pytest.approx(0.5)
    fa = st.fold_auc[st.fold_auc.cohort == "test"].pivot(index="fold", columns="method", values="auc")
    diffs = (fa.weak - fa.good).to_numpy()
    t_hand = diffs.mean() / math.sqrt((1 / 3 + 0.5) * diffs.var(ddof=1))
    assert tests.loc[("test", "corrected t"), "statistic"] == pytest.approx(t_hand)
    good = pd.concat([pat["good", f].loc["test"] for f in range(3)]).sort_index()
    weak = pd.concat([pat["weak", f].loc["test"] for f in range(3)]).sort_index()
    ref = delong_test(good.label.to_numpy(), weak.prob.to_numpy(), good.prob.to_numpy())
    assert tests.loc[("test", "DeLong"), "p"] == pytest.approx(ref.p_value)
    # external: the difference of the two methods' mean fold AUCs, tested on the same external patients.
    d_ext = s.loc[("weak", "ext"), "auc"] - s.loc[("good", "ext"), "auc"]
    assert tests.loc[("ext", "DeLong"), "diff"] == pytest.approx(d_ext)


def test_folds_of_another_design_are_left_out_with_a_note(saved_results):
    stray = pd.DataFrame(
        [("P00-0", "P00", 1, 0.9, "test"), ("P01-0", "P01", 0, 0.1, "test")],
        columns=["slide_id", "case_id", "label", "prob", "cohort"],
    )
    _write_fold(saved_results, "weak", 4, stray, "other", folds=5)  # left behind by an earlier 5-fold run
    st = analyse_task(saved_results, "toy", n_boot=200)
    assert sorted(st.fold_auc.fold.unique()) == [0, 1, 2]
    assert st.notes == [
        "ignored weak/fold_4: from a 5-fold run with seed 0, not the 3-fold, seed 0 design of the other folds"
    ]


def test_unknown_reference_is_a_clear_error(saved_results):
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="--vs momkd"):
        analyse_task(saved_results, "toy", reference="momkd")


def test_no_significance_from_zero_variance():
    """Identical or constant paired differences have nothing to test: NaN (shown as –), never p = 0 or 1."""
    assert math.isnan(corrected_resampled_ttest([0.03] * 5, 0.25).p_value)
    assert math.isnan(corrected_resampled_ttest([0.0] * 5, 0.25).p_value)
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert math.isnan(delong_test(y, s, s).p_value)
    assert math.isnan(delong_test(y, s, s + 1.0).p_value)  # same ranking, shifted scores


def test_ids_that_look_missing_are_real_ids(tmp_path, cohort_tools):
    """Patients called NA, None, null survive every read: metrics.json and the report count the same."""
    import json

    from bench.commands import run
    from bench.taskdata import RunOptions

    make_cohort, write_task = cohort_tools
    root = make_cohort(tmp_path / "c", n_patients=24)
    labels = pd.read_csv(root / "labels.csv", dtype=str)
    omics = pd.read_csv(root / "omics.csv", dtype=str)
    rename = {"P-0000": "NA", "P-0001": "None", "P-0002": "null", "P-0003": "nan"}
    labels["case_id"] = labels.case_id.replace(rename)
    omics["case_id"] = omics.case_id.replace(rename)
    labels.to_csv(root / "labels.csv", index=False)
    omics.to_csv(root / "omics.csv", index=False)
    task = write_task(
        tmp_path / "t.yaml",
        name="ids",
        label_col="odx_risk",
        positive=["high"],
        labels="c/labels.csv",
        features="c/features",
        omics="c/omics.csv",
        folds=2,
        train={"epochs": 1, "patience": 1, "min_epochs": 0},
    )
    out = tmp_path / "res"
    run(str(task), ["abmil"], RunOptions(out=out, quiet=True))
    st = analyse_task(out, "ids", n_boot=0)
    on_disk = sum(
        json.loads((out / "ids" / "abmil" / f"fold_{k}" / "metrics.json").read_text())["cohorts"]["test"]["n"]
        for k in range(2)
    )
    row = st.summary[(st.summary.method == "abmil") & (st.summary.cohort == "test")].iloc[0]
    assert row.patients == on_disk == 24
    assert set(rename.values()) <= set(st.patients.case_id)

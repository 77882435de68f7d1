"""Patient-level metrics and the validation-chosen threshold, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.evaluate import best_f1_threshold, binary_metrics, cohort_metrics, patient_level
from bench.stats import calibration_bins, expected_calibration_error
from bench.store import METRICS
from bench.tasktypes import SURVIVAL_METRICS


def test_best_f1_threshold_hand_case():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    # thresholds 0.8 -> F1 0.8; 0.35 -> TP3 FP1 FN0 -> F1 6/7 = 0.857 (best); 0.2 -> F1 0.75
    assert best_f1_threshold(y, p) == pytest.approx(0.35)


def test_metrics_at_threshold():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.6, 0.55, 0.9])
    m = binary_metrics(y, p, threshold=0.5)
    assert m["auc"] == pytest.approx(0.75)
    assert m["acc"] == pytest.approx(0.75) and m["balanced_acc"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.8) and m["n"] == 4


def test_patient_aggregation_mean_and_max():
    pred = pd.DataFrame({"case_id": ["a", "a", "b"], "label": [1, 1, 0], "prob": [0.2, 0.6, 0.3]})
    assert patient_level(pred, "mean").prob.tolist() == pytest.approx([0.4, 0.3])
    assert patient_level(pred, "max").prob.tolist() == pytest.approx([0.6, 0.3])


def test_two_operating_points_hand_case():
    """The validation-chosen threshold and the argmax give different hard predictions on the same patients."""
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.45, 0.4, 0.9])
    m = cohort_metrics(y, p, threshold=0.35)
    # threshold 0.35: predictions 0, 1, 1, 1 -> 3/4 right, F1 = 2·2 / (2·2 + 1) = 0.8
    assert m["threshold"] == 0.35 and m["acc"] == pytest.approx(0.75) and m["f1"] == pytest.approx(0.8)
    # argmax (p > 0.5): predictions 0, 0, 0, 1 -> 3/4 right, balanced 0.75, F1 = 2 / 3
    assert m["acc@0.5"] == pytest.approx(0.75) and m["balanced_acc@0.5"] == pytest.approx(0.75)
    assert m["f1@0.5"] == pytest.approx(2 / 3) and m["auc"] == pytest.approx(0.75) and m["n"] == 4


def test_argmax_tie_is_the_negative_class():
    """Probability exactly 0.5 (equal logits) is class 0 at the argmax, as torch.argmax picks the first."""
    m = cohort_metrics(np.array([0, 1]), np.array([0.5, 0.9]), threshold=0.5)
    assert m["acc@0.5"] == 1.0 and m["acc"] == 0.5


def test_summary_metrics_are_the_cohort_metrics():
    """summary.csv carries every per-cohort result of cohort_metrics (not the threshold, the count or the
    number of ECE bins)."""
    keys = cohort_metrics(np.array([0, 1]), np.array([0.2, 0.7]), 0.5)
    assert set(METRICS) - set(SURVIVAL_METRICS) == set(keys) - {"threshold", "n", "ece_bins"}


def test_ece_hand_case():
    """Three equal-mass bins of two patients: |0 − 0.15|, |1 − 0.45|, |0.5 − 0.8| weighted 1/3 each."""
    y = np.array([1, 0, 0, 1, 0, 1])
    p = np.array([0.3, 0.1, 0.2, 0.6, 0.7, 0.9])  # unsorted on purpose: bins are of the sorted probabilities
    assert expected_calibration_error(y, p, bins=3) == pytest.approx((0.15 + 0.55 + 0.3) / 3)
    assert expected_calibration_error(y, p, bins=1) == pytest.approx(abs(0.5 - 2.8 / 6))
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


def test_calibration_bins_rule():
    assert [calibration_bins(n) for n in (2, 12, 44, 45, 90, 150, 400)] == [2, 3, 3, 3, 6, 10, 10]


def test_calibration_metrics_in_cohort_metrics():
    """Brier = mean (p − y)² = (0.49 + 0.01 + 0.04 + 0.16 + 0.49 + 0.01) / 6 = 0.2; 6 patients: 3 bins;
    the keys that existed before calibration keep their values and come first."""
    y = np.array([1, 0, 0, 1, 0, 1])
    p = np.array([0.3, 0.1, 0.2, 0.6, 0.7, 0.9])
    m = cohort_metrics(y, p, threshold=0.5)
    assert m["brier"] == pytest.approx(0.2) and m["ece_bins"] == 3
    assert m["ece"] == pytest.approx(1.0 / 3)
    assert list(m)[-3:] == ["brier", "ece", "ece_bins"] and list(m)[list(m).index("n") + 1] == "brier"
    assert {k: m[k] for k in list(m)[:-3]} == binary_metrics(y, p, 0.5) | {
        k: m[k] for k in ("acc@0.5", "balanced_acc@0.5", "f1@0.5")
    }

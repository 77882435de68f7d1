"""Patient-level metrics and the validation-chosen threshold, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.evaluate import best_f1_threshold, binary_metrics, patient_level


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

"""Prediction and patient-level metrics.

Slides are predicted from the H&E features alone, several bags per forward (each bag's output as alone); several slides of one patient get one
patient probability (mean by default, ``max`` selectable) and every metric is patient-level.

Threshold-dependent metrics are reported at two operating points, as the MoMKD authors' ``test.py`` does:
- at the threshold with the best F1 on the validation patients, applied unchanged to test and external
  cohorts (keys ``acc``, ``balanced_acc``, ``f1``; the threshold itself is ``threshold``);
- at the argmax of the two-class softmax, i.e. probability > 0.5 (keys ``acc@0.5``, ``balanced_acc@0.5``,
  ``f1@0.5``): no fitted threshold, so it does not move with a small validation split.

Calibration needs no operating point: the Brier score (``brier``, sklearn's ``brier_score_loss``, the mean of
``(p − y)²``) and the expected calibration error (``ece``, over ``ece_bins`` equal-mass bins:
:func:`bench.stats.expected_calibration_error`), both of the patient probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
)

from methods.base import Bag, MILMethod
from methods.packing import chunk_bags

from .stats import calibration_bins, expected_calibration_error

__all__ = [
    "ARGMAX",
    "PREDICT_PATCHES",
    "THRESHOLD_METRICS",
    "auc",
    "best_f1_threshold",
    "binary_metrics",
    "calibration_metrics",
    "cohort_metrics",
    "fold_metrics",
    "patient_auc",
    "patient_level",
    "predict",
    "predict_patches",
    "slide_predictions",
]

THRESHOLD_METRICS = ("acc", "balanced_acc", "f1")  # the metrics that depend on an operating point
ARGMAX = "@0.5"  # suffix of those metrics at the argmax operating point (probability > 0.5)

#: patches per packed forward when predicting, per device type (bigger bags go alone). On a GPU, packing
#: removes the per-bag kernel launches; on the CPU a bag of a few hundred patches is already bound by its
#: matrix products and larger packs only spill the activations out of cache (benchmarks/README.md), so
#: only small bags are packed there.
PREDICT_PATCHES = {"cuda": 65536, "cpu": 2048}


def predict_patches(device: torch.device) -> int:
    """The packing budget for ``device`` (:data:`PREDICT_PATCHES`; other device types as CUDA)."""
    return PREDICT_PATCHES.get(device.type, PREDICT_PATCHES["cuda"])


@torch.inference_mode()
def predict(
    model: MILMethod,
    bags: Sequence[Bag],
    device: torch.device,
    autocast: bool = False,
    max_patches: int | None = None,
) -> np.ndarray:
    """Positive-class probability of each bag (omics removed; eval mode), several bags per forward
    (``MILMethod.predict_logits``: each bag's value as predicted alone), at most ``max_patches`` patches
    per forward (default :func:`predict_patches`)."""
    was_training = model.training
    model.eval()
    probs = []
    for group in chunk_bags(bags, max_patches or predict_patches(device)):
        chunk = [bags[i].without_omics().to(device, non_blocking=True) for i in group]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model.predict_logits(chunk)
        probs.append(logits.float().softmax(-1)[:, 1])
    model.train(was_training)
    return torch.cat(probs).cpu().numpy() if probs else np.zeros(0)


def slide_predictions(bags: Sequence[Bag], probs: np.ndarray, cohort: str) -> pd.DataFrame:
    """The contract's predictions.csv rows: slide_id, case_id, label, prob, cohort."""
    return pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "case_id": [b.case_id for b in bags],
            "label": [int(b.label) for b in bags],
            "prob": probs.astype(np.float64),
            "cohort": cohort,
        }
    )


def patient_level(pred: pd.DataFrame, aggregation: str = "mean") -> pd.DataFrame:
    """One row per patient: case_id, label, prob (mean or max over the patient's slides)."""
    return (
        pred.groupby("case_id", sort=True)
        .agg(label=("label", "first"), prob=("prob", aggregation))
        .reset_index()
    )


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (sklearn); NaN when only one class is present."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def patient_auc(pred: pd.DataFrame, aggregation: str = "mean") -> float:
    """AUC of slide predictions (columns case_id, label, prob) aggregated to patients: the one patient-level
    AUC that training's validation, the sweep's objective and the report compute."""
    pat = patient_level(pred, aggregation)
    return auc(pat.label.to_numpy(), pat.prob.to_numpy())


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold with the highest F1 (predict positive when prob >= threshold)."""
    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0
    )
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _at(y: np.ndarray, y_hat: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (NaN with one class) and positive-class F1 of hard predictions."""
    two = len(np.unique(y)) == 2
    return {
        "acc": float(accuracy_score(y, y_hat)),
        "balanced_acc": float(balanced_accuracy_score(y, y_hat)) if two else float("nan"),
        "f1": float(f1_score(y, y_hat, zero_division=0)),
    }


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and F1 at ``threshold``; AUC is NaN when only one class is present."""
    return {
        "auc": auc(y, p),
        **_at(y, (p >= threshold).astype(int)),
        "threshold": float(threshold),
        "n": len(y),
    }


def calibration_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Brier score, ECE and the number of ECE bins of patient labels ``y`` and probabilities ``p`` (NaN and 0
    bins without patients)."""
    if len(y) == 0:
        return {"brier": float("nan"), "ece": float("nan"), "ece_bins": 0}
    bins = calibration_bins(len(y))
    return {
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "ece": expected_calibration_error(y, p, bins),
        "ece_bins": bins,
    }


def cohort_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """:func:`binary_metrics` at the validation-chosen ``threshold``, plus the same threshold-dependent
    metrics at the argmax (``acc@0.5``, ``balanced_acc@0.5``, ``f1@0.5``), then :func:`calibration_metrics`
    (after ``n``: the keys before it are as they were before calibration was added).

    The argmax of a two-class softmax predicts positive when probability > 0.5 (a tie goes to class 0, as
    ``torch.argmax`` does in the authors' ``test.py``).
    """
    metrics = binary_metrics(y, p, threshold)
    n = metrics.pop("n")
    at_argmax = _at(y, (p > 0.5).astype(int))
    return {
        **metrics,
        **{f"{k}{ARGMAX}": at_argmax[k] for k in THRESHOLD_METRICS},
        "n": n,
        **calibration_metrics(y, p),
    }


def fold_metrics(
    cohorts: Mapping[str, pd.DataFrame], aggregation: str = "mean"
) -> dict[str, dict[str, float]]:
    """Per cohort, :func:`cohort_metrics` of a fold's slide predictions (``val`` among them) aggregated to
    patients, at the threshold of best F1 on the ``val`` patients: a fold's ``metrics.json`` ``cohorts``."""
    patients = {name: patient_level(pred, aggregation) for name, pred in cohorts.items()}
    val = patients["val"]
    threshold = best_f1_threshold(val.label.to_numpy(), val.prob.to_numpy())
    return {
        name: cohort_metrics(p.label.to_numpy(), p.prob.to_numpy(), threshold) for name, p in patients.items()
    }

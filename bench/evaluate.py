"""Prediction and patient-level metrics.

Slides are predicted from the H&E features alone, several bags per forward (each bag's output as alone); several slides of one patient get one
patient probability (mean by default, ``max`` selectable) and every metric is patient-level. The decision
threshold is the one with the best F1 on the validation patients, then applied unchanged to test and
external cohorts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
)

from methods.base import Bag, MILMethod
from methods.packing import chunk_bags

__all__ = [
    "PREDICT_PATCHES",
    "best_f1_threshold",
    "binary_metrics",
    "patient_level",
    "predict",
    "predict_patches",
    "slide_predictions",
]


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


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold with the highest F1 (predict positive when prob >= threshold)."""
    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0
    )
    return float(thresholds[int(np.argmax(f1[:-1]))])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and F1 at ``threshold``; AUC is NaN when only one class is present."""
    y_hat = (p >= threshold).astype(int)
    return {
        "auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
        "acc": float(accuracy_score(y, y_hat)),
        "balanced_acc": float(balanced_accuracy_score(y, y_hat)) if len(np.unique(y)) == 2 else float("nan"),
        "f1": float(f1_score(y, y_hat, zero_division=0)),
        "threshold": float(threshold),
        "n": len(y),
    }

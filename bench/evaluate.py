"""Prediction and patient-level metrics.

Slides are predicted from the H&E features alone, several bags per forward (each bag's output as alone); several slides of one patient get one
patient probability (mean by default, ``max`` selectable) and every metric is patient-level.

Threshold-dependent metrics are reported at two operating points, as the MoMKD authors' ``test.py`` does:
- at the threshold with the best F1 on the validation patients, applied unchanged to test and external
  cohorts (keys ``acc``, ``balanced_acc``, ``f1``; the threshold itself is ``threshold``);
- at the argmax of the two-class softmax, i.e. probability > 0.5 (keys ``acc@0.5``, ``balanced_acc@0.5``,
  ``f1@0.5``): no fitted threshold, so it does not move with a small validation split.

A multiclass task (bench/tasktypes.py) has one probability per class (``prob_0`` … in predictions.csv) and
the metrics of :func:`multiclass_metrics`: ``auc`` the macro one-vs-rest ROC AUC, ``acc``, ``balanced_acc``
(mean per-class recall), ``f1`` (macro) at the argmax, and the ``confusion`` matrix; no threshold.

A survival task has, per slide, its ``time``, ``event``, the ``risk`` −Σ_k S_k and the survival function
``surv_k`` at the end of each time bin, and the metrics of :func:`survival_metrics` (torchsurv, MIT): Harrell's
and Uno's c-index, the time-dependent AUC at the quartiles of the training patients' event times and the
integrated Brier score; ``risk_cut`` is the median risk of the validation patients (the report's risk groups).

Calibration needs no operating point: the Brier score (``brier``, sklearn's ``brier_score_loss``, the mean of
``(p − y)²``) and the expected calibration error (``ece``, over ``ece_bins`` equal-mass bins:
:func:`bench.stats.expected_calibration_error`), both of the patient probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
)

from methods.base import Bag, MILMethod, survival_curves
from methods.packing import chunk_bags

from .stats import calibration_bins, expected_calibration_error
from .tasktypes import (
    prob_columns,
    probabilities,
    score_columns,
    survival_columns,
    time_bin_index,
)

__all__ = [
    "ARGMAX",
    "PREDICT_PATCHES",
    "THRESHOLD_METRICS",
    "auc",
    "best_f1_threshold",
    "binary_metrics",
    "c_index",
    "calibration_metrics",
    "cohort_metrics",
    "fold_metrics",
    "multiclass_metrics",
    "patient_auc",
    "patient_level",
    "patient_metrics",
    "patient_probs",
    "predict",
    "predict_patches",
    "scores_from_logits",
    "slide_predictions",
    "survival_metrics",
    "validation_loss",
    "validation_threshold",
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
    """Positive-class probability of each bag ``(B,)`` (omics removed; eval mode), or with more than two
    classes every class's probability ``(B, C)``, or with a survival head the risk and the survival function
    ``(B, 1 + K)`` (``methods.base.survival_curves``); several bags per forward
    (``MILMethod.predict_logits``: each bag's value as predicted alone), at most ``max_patches`` patches
    per forward (default :func:`predict_patches`)."""
    was_training = model.training
    model.eval()
    probs = []
    for group in chunk_bags(bags, max_patches or predict_patches(device)):
        chunk = [bags[i].without_omics().to(device, non_blocking=True) for i in group]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model.predict_logits(chunk)
        probs.append(scores_from_logits(logits, model.cfg.head))
    model.train(was_training)
    if not probs:
        c = model.cfg.num_classes
        if model.cfg.head == "survival":
            return np.zeros((0, c + 1))
        return np.zeros(0) if c == 2 else np.zeros((0, c))
    return torch.cat(probs).cpu().numpy()


def scores_from_logits(logits: torch.Tensor, head: str) -> torch.Tensor:
    """What is saved of logits ``(B, C)``: the positive class's probability ``(B,)`` (two classes), every
    class's ``(B, C)``, or (survival head) the risk and survival function ``(B, 1 + K)``."""
    if head == "survival":
        risk, surv = survival_curves(logits.float())
        return torch.cat([risk.unsqueeze(1), surv], dim=1)
    p = logits.float().softmax(-1)
    return p[:, 1] if p.shape[-1] == 2 else p


def slide_predictions(bags: Sequence[Bag], probs: np.ndarray, cohort: str) -> pd.DataFrame:
    """The contract's predictions.csv rows: slide_id, case_id, label, prob, cohort (multiclass: prob_0 …
    prob_{C-1} for ``probs`` of shape ``(B, C)``; survival bags, with an event: time, event, risk, surv_0 …
    for ``probs`` of shape ``(B, 1 + K)``)."""
    probs = probs.astype(np.float64)
    values = probs.reshape(len(probs), -1)
    survival = bool(bags) and bags[0].event is not None
    if survival:
        columns = survival_columns(values.shape[1] - 1)
        outcome = {"time": [float(b.time) for b in bags], "event": [int(b.event) for b in bags]}
    else:
        columns, outcome = prob_columns(2 if probs.ndim == 1 else probs.shape[1]), {}
    return pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "case_id": [b.case_id for b in bags],
            "label": [int(b.label) for b in bags],
            **outcome,
            **{c: values[:, i] for i, c in enumerate(columns)},
            "cohort": cohort,
        }
    )


def patient_level(pred: pd.DataFrame, aggregation: str = "mean") -> pd.DataFrame:
    """One row per patient: case_id, label, prob (or prob_0 …; mean or max over the patient's slides; a
    multiclass patient's maxima are renormalised to sum to one)."""
    cols = score_columns(pred.columns)
    outcome = {c: (c, "first") for c in ("time", "event") if c in pred.columns}
    pat = (
        pred.groupby("case_id", sort=True)
        .agg(label=("label", "first"), **outcome, **{c: (c, aggregation) for c in cols})
        .reset_index()
    )
    if "risk" in cols:
        return pat
    if len(cols) > 1 and aggregation == "max":
        pat[cols] = pat[cols].div(pat[cols].sum(axis=1), axis=0)
    return pat


def patient_probs(pat: pd.DataFrame) -> np.ndarray:
    """The probabilities of a (patient-level) predictions table: ``(N,)`` binary, ``(N, C)`` multiclass."""
    cols = probabilities(pat.columns)
    return pat[cols[0]].to_numpy() if len(cols) == 1 else pat[cols].to_numpy()


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (sklearn); NaN when only one class is present. With ``p`` of shape ``(N, C)``: the macro
    one-vs-rest AUC, the mean over the classes present (and absent from some patients) of each class's
    AUC against the rest; with every class present, sklearn's ``roc_auc_score(multi_class="ovr")``."""
    if p.ndim == 2:
        per_class = [auc((y == c).astype(int), p[:, c]) for c in range(p.shape[1])]
        found = [a for a in per_class if not np.isnan(a)]
        return float(np.mean(found)) if len(np.unique(y)) >= 2 and found else float("nan")
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def patient_auc(pred: pd.DataFrame, aggregation: str = "mean") -> float:
    """AUC of slide predictions (columns case_id, label, prob) aggregated to patients: the one patient-level
    AUC that training's validation, the sweep's objective and the report compute (multiclass: the macro
    one-vs-rest AUC; survival: Harrell's c-index of the risk, :func:`c_index`)."""
    pat = patient_level(pred, aggregation)
    if "risk" in pat.columns:
        return c_index(pat.time.to_numpy(), pat.event.to_numpy(), pat.risk.to_numpy())
    return auc(pat.label.to_numpy(), patient_probs(pat))


def _surv_tensors(time: np.ndarray, event: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies (``torch.tensor``), so a read-only array (pandas' ``to_numpy`` view) is never shared."""
    return torch.tensor(time, dtype=torch.float32), torch.tensor(event).bool()


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, uno: bool = False) -> float:
    """Harrell's c-index of ``risk`` (higher: earlier event) by torchsurv's ``ConcordanceIndex``; ``uno``:
    Uno's, weighted by the inverse probability of censoring (torchsurv's ``get_ipcw``, the censoring
    distribution estimated on the same patients). NaN without an event or a comparable pair."""
    if len(time) < 2 or not np.any(event == 1):
        return float("nan")
    from torchsurv.metrics.cindex import ConcordanceIndex  # imported when used: torchmetrics is slow to load
    from torchsurv.stats.ipcw import get_ipcw

    t, e = _surv_tensors(time, event)
    weight = get_ipcw(e, t) if uno else None
    value = float(ConcordanceIndex()(torch.tensor(risk, dtype=torch.float32), e, t, weight=weight))
    return value if np.isfinite(value) else float("nan")


def validation_loss(y: np.ndarray, p: np.ndarray, event: np.ndarray | None = None) -> float:
    """Mean cross-entropy of slide labels ``y`` under probabilities ``p``: ``(N,)`` positive class, clipped
    to [1e-7, 1 - 1e-7] (as the binary form always was), or ``(N, C)`` (sklearn's ``log_loss``); survival
    (``event`` given, ``p`` = risk and survival function ``(N, 1 + K)``): the discrete-time NLL of the time
    bins ``y``, −log(S_{y−1} − S_y) for an event, −log S_y censored (clipped at 1e-7), as the training loss."""
    if event is not None:
        surv = np.concatenate([np.ones((len(y), 1)), p[:, 1:]], axis=1)  # S_{-1} = 1
        rows = np.arange(len(y))
        died = np.clip(surv[rows, y] - surv[rows, y + 1], 1e-7, None)
        alive = np.clip(surv[rows, y + 1], 1e-7, None)
        return float(np.mean(np.where(event == 1, -np.log(died), -np.log(alive)))) if len(y) else float("nan")
    if p.ndim == 2:
        return float(log_loss(y, p, labels=np.arange(p.shape[1])))
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


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


def multiclass_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Macro one-vs-rest AUC, accuracy, balanced accuracy and macro F1 at the argmax of the class
    probabilities ``p`` ``(N, C)``, the number of patients and the confusion matrix (rows: true class,
    columns: predicted class, sklearn's ``confusion_matrix``)."""
    c = p.shape[1]
    y_hat = p.argmax(axis=1)
    present = len(np.unique(y)) >= 2
    return {
        "auc": auc(y, p),
        "acc": float(accuracy_score(y, y_hat)) if len(y) else float("nan"),
        "balanced_acc": float(balanced_accuracy_score(y, y_hat)) if present else float("nan"),
        "f1": float(f1_score(y, y_hat, labels=np.arange(c), average="macro", zero_division=0)),
        "n": len(y),
        "confusion": confusion_matrix(y, y_hat, labels=np.arange(c)).tolist(),
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


def validation_threshold(val: pd.DataFrame) -> float | None:
    """The operating point fitted on the validation patients (patient-level table): the best-F1 threshold
    of a binary task, the median risk of a survival task (its risk groups), None for a multiclass one (its
    metrics are at the argmax)."""
    if "risk" in val.columns:
        return float(np.median(val.risk)) if len(val) else float("nan")
    if len(probabilities(val.columns)) > 1:
        return None
    return best_f1_threshold(val.label.to_numpy(), val.prob.to_numpy())


def survival_metrics(pat: pd.DataFrame, edges: np.ndarray, risk_cut: float) -> dict[str, Any]:
    """A survival cohort's metrics from its patient-level table (time, event, risk, surv_k), by torchsurv:
    Harrell's and Uno's c-index (:func:`c_index`); the cumulative/dynamic AUC (IPCW) at the quartile times
    ``q1``–``q3`` (the fold's interior bin edges: quantiles of its training patients' event times, with
    ``time_bins`` 4 its quartiles); the integrated Brier score (IPCW) over 20 times evenly spaced from the
    first to the last interior edge, each patient's S(t) the step function of its bins (S(t) = S_{k−1} in
    bin k); and ``risk_cut`` (the validation patients' median risk), ``n``, ``events``. A quartile time
    outside the cohort's follow-up is NaN (and left out of the Brier grid)."""
    from torchsurv.metrics.auc import Auc
    from torchsurv.metrics.brier_score import BrierScore
    from torchsurv.stats.ipcw import get_ipcw

    time, event, risk = pat.time.to_numpy(), pat.event.to_numpy(), pat.risk.to_numpy()
    quartiles = edges[1:-1]
    out: dict[str, Any] = {
        "c_index": c_index(time, event, risk),
        "c_index_uno": c_index(time, event, risk, uno=True),
    }
    t, e = _surv_tensors(time, event)
    usable = bool(e.any()) and len(time) > 1
    inside = (quartiles >= np.min(time)) & (quartiles < np.max(time)) if usable else quartiles < -np.inf
    aucs = np.full(len(quartiles), np.nan)
    if inside.any():
        nt = torch.tensor(quartiles[inside], dtype=torch.float32)
        r = torch.tensor(risk, dtype=torch.float32)
        aucs[inside] = Auc()(r, e, t, new_time=nt, weight=get_ipcw(e, t), weight_new_time=get_ipcw(e, t, nt))
    out.update({f"auc_q{i + 1}": float(a) for i, a in enumerate(aucs)})
    out.update({f"q{i + 1}": float(q) for i, q in enumerate(quartiles)})
    grid = np.linspace(quartiles[0], quartiles[-1], 20)
    grid = grid[(grid >= np.min(time)) & (grid < np.max(time))] if usable else grid[:0]
    ibs = float("nan")
    if len(grid) >= 2:
        surv = np.concatenate(
            [np.ones((len(pat), 1)), pat[[c for c in pat.columns if c.startswith("surv_")]]], 1
        )
        step = surv[:, time_bin_index(grid, edges)]  # S(t) = S_{k-1} for t in bin k
        nt = torch.tensor(grid, dtype=torch.float32)
        brier = BrierScore()
        brier(
            torch.tensor(step, dtype=torch.float32),
            e,
            t,
            new_time=nt,
            weight=get_ipcw(e, t),
            weight_new_time=get_ipcw(e, t, nt),
        )
        ibs = float(brier.integral())
    return {**out, "ibs": ibs, "risk_cut": risk_cut, "n": len(pat), "events": int(np.sum(event == 1))}


def patient_metrics(
    pat: pd.DataFrame, threshold: float | None, edges: np.ndarray | None = None
) -> dict[str, Any]:
    """A cohort's metrics from its patient-level table: :func:`cohort_metrics` at ``threshold`` (binary),
    :func:`multiclass_metrics` (several probability columns), :func:`survival_metrics` with the fold's time
    bins ``edges`` (``threshold``: the risk cut)."""
    if "risk" in pat.columns:
        return survival_metrics(pat, edges, threshold)
    y, p = pat.label.to_numpy(), patient_probs(pat)
    if p.ndim == 2:
        return multiclass_metrics(y, p)
    return cohort_metrics(y, p, threshold)


def fold_metrics(
    cohorts: Mapping[str, pd.DataFrame], aggregation: str = "mean", edges: np.ndarray | None = None
) -> dict[str, dict[str, Any]]:
    """Per cohort, :func:`patient_metrics` of a fold's slide predictions (``val`` among them) aggregated to
    patients, at the operating point fitted on the ``val`` patients (:func:`validation_threshold`); a
    survival task's with the fold's time bins ``edges``: a fold's ``metrics.json`` ``cohorts``."""
    patients = {name: patient_level(pred, aggregation) for name, pred in cohorts.items()}
    threshold = validation_threshold(patients["val"])
    return {name: patient_metrics(p, threshold, edges) for name, p in patients.items()}

"""The report's prose, kept out of the code that lays the report out: notes shared by several tables, and the
closing section on how every number was computed."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CALIBRATION", "OPERATING_POINTS", "how_computed"]

OPERATING_POINTS = (
    "ACC, BACC, F1: at the threshold of best F1 on each fold's validation patients, applied unchanged to the "
    "test part and every external cohort; @0.5: at the argmax (probability > 0.5), no fitted threshold."
)

CALIBRATION = (
    "calibration of the patient probabilities, mean ± SD over folds (each fold's test part, or each fold's "
    "model on the external cohort; lower is better, 0 is perfect). Brier: mean of (p − y)² (0.25 for a constant "
    "0.5). ECE: expected calibration error, Σ_b (n_b / N) · |observed positive fraction − mean probability| over "
    "equal-mass bins (patients sorted by probability, cut into bins of equal size); ECE bins: how many, about one "
    "per 15 patients, 3 to 10 (fewer, fuller bins for small cohorts: tiny bins inflate the ECE with sampling "
    "noise), the bins of the calibration figure. Neither depends on a threshold."
)


def how_computed(n_boot: int, seed: int, reference_given: bool, references: Sequence[str]) -> list[str]:
    """The closing section of report.md; ``references``: "TASK: method" of each task."""
    return [
        "## How the numbers were computed",
        "",
        "- Every number comes from the saved per-slide predictions (`predictions.csv` of each fold); slides are "
        "aggregated to patients first, and patients are what is resampled and ranked.",
        "- Internal cohort: the test parts of the folds partition the patients; their out-of-fold predictions are "
        "pooled (one prediction per patient) for the ROC curve, the bootstrap CI and DeLong's test. Mean ± SD is over "
        "the fold AUCs.",
        "- External cohorts: every fold's model predicts the whole cohort. The table reports the mean ± SD of the "
        "fold AUCs; its CI applies each bootstrap resample of patients to every fold and averages the fold AUCs; "
        "DeLong's test compares the two methods' mean fold AUCs (a linear contrast of correlated AUCs).",
        f"- Bootstrap: {n_boot} resamples, stratified by class, percentile interval, seed {seed}.",
        "- Accuracy, balanced accuracy and F1 (each fold's `metrics.json`) need an operating point and are given "
        "at two, as the MoMKD authors' `test.py` does: at the threshold of best F1 on the fold's validation "
        "patients (never the test part; Table 2 and `bench run`'s table) and at the argmax (probability > 0.5). "
        "AUC, the headline, needs none.",
        "- Reference method per task: "
        + ("given by `--vs`" if reference_given else "the best mean internal AUC")
        + f" ({'; '.join(references)}).",
        "- The corrected resampled t-test (Nadeau & Bengio 2003) widens the paired t-test's variance by "
        "1/n + n_test/n_train (n paired folds; with repeats of the CV design, every repeat's folds: the "
        "corrected repeated k-fold test of Bouckaert & Frank 2004) for the overlap of the folds' training sets, "
        "so it reflects training variability; "
        "DeLong's test treats the trained models as fixed and reflects only which patients were sampled. "
        "p-values are not corrected for multiple comparisons.",
        "",
    ]

"""Statistics of AUCs (pure functions of labels and scores; bench/analysis.py applies them to saved results):
bootstrap CIs and paired tests; and the expected calibration error (bench/evaluate.py, the calibration figure).

bench/analysis.py feeds them patient-level values: slides are first aggregated to patients with the task's
aggregation (``patient_aggregation``: mean or max of the slide probabilities), then patients are resampled
or ranked.

- **Spread over folds**: mean ± SD (ddof 1) of the fold AUCs, the paper's form.
- **Internal CI**: the test parts of the k folds partition the patients, so their out-of-fold predictions are
  pooled into one prediction per patient; the CI is a seeded percentile bootstrap of that pooled AUC.
- **External CI**: every fold's model predicts the whole external cohort. We bootstrap per fold and average:
  one resample of external patients is applied to every fold's predictions, the k AUCs are averaged, and
  the percentiles of that average make the CI. It is the CI of the same number the table reports (the mean
  of the fold AUCs), and the averaging keeps the fold models separate (no ensemble is formed).
- The bootstrap is stratified by class (as pROC's default): positives and negatives are resampled
  separately, so every resample has both classes and the AUC is always defined.
- **Corrected resampled t-test** (Nadeau & Bengio 2003, Machine Learning 52:239): paired differences of
  fold AUCs ``d_j``, :math:`t = \\bar d / \\sqrt{(1/n + n_{test}/n_{train})\\, s_d^2}` with n − 1 degrees
  of freedom over the n paired folds; ``n_train`` counts every patient outside the fold's test part
  (training + validation). Over the folds of r repeats of a k-fold CV (n = r·k) it is Bouckaert & Frank's
  (2004) corrected repeated k-fold CV test.
- **DeLong's test** (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837), computed with the midrank
  algorithm of Sun & Xu (2014, IEEE SPL 21:1389), for any linear contrast of AUCs measured on the same
  patients: a difference of two pooled AUCs, or a difference of two means of fold AUCs (external cohort).
- **Multiclass** (bench/tasktypes.py): the macro one-vs-rest AUC gets the same percentile bootstrap, stratified
  by class (each class resampled on its own, :func:`class_counts`), and paired comparisons a paired bootstrap
  (:func:`paired_bootstrap_test`: both methods on the same resamples, z = difference / SD of the resampled
  differences, as pROC's bootstrap test) instead of DeLong's, which is defined for one binary AUC.
- **Survival**: Harrell's c-index gets the same percentile bootstrap, stratified by event
  (:func:`resampled_cindex`, one resample applied to every fold's risks), and paired comparisons the same paired
  bootstrap test.
- **Gap share** (:func:`gap_share`): the share of the AUC gap between two reference models that a third
  closes, with a paired stratified bootstrap CI (the report's distillation methods between label-only ABMIL
  and the privileged-information student, synthetic tasks).
- **Expected calibration error** over equal-mass bins (:func:`expected_calibration_error`), as many bins as
  :func:`calibration_bins` gives (about 15 patients a bin, 3 to 10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

__all__ = [
    "DeLong",
    "PairedTest",
    "bootstrap_auc_ci",
    "bootstrap_cindex_ci",
    "bootstrap_macro_auc_ci",
    "calibration_bins",
    "class_counts",
    "corrected_resampled_ttest",
    "delong",
    "delong_contrast",
    "delong_test",
    "expected_calibration_error",
    "gap_share",
    "logrank_p",
    "midranks",
    "paired_bootstrap_test",
    "resampled_aucs",
    "resampled_cindex",
    "resampled_macro_aucs",
    "stratified_counts",
]


# ---------------------------------------------------------------- DeLong (fast algorithm of Sun & Xu)


@dataclass(frozen=True)
class DeLong:
    """AUCs of several score rows on the same patients, and their DeLong covariance.

    Attributes:
        aucs: shape ``(k,)``.
        cov: shape ``(k, k)``.
    """

    aucs: np.ndarray
    cov: np.ndarray


@dataclass(frozen=True)
class PairedTest:
    """A two-sided test of a difference: estimate, its statistic and p-value (NaN when undefined)."""

    estimate: float
    statistic: float
    p_value: float


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` along the last axis, ties sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    return np.apply_along_axis(sps.rankdata, -1, x) if x.ndim > 1 else sps.rankdata(x)


def delong(y: np.ndarray, scores: np.ndarray) -> DeLong:
    """AUC of each row of ``scores`` and the DeLong covariance matrix, in O(k N log N).

    With m positives and n negatives, the structural components are
    ``V10_i = (1/n) Σ_j ψ(X_i, Y_j)`` (per positive) and ``V01_j = (1/m) Σ_i ψ(X_i, Y_j)`` (per negative),
    ψ = 1 if X > Y, ½ if equal; they come from midranks (Sun & Xu 2014): ``V10_i = (T_Z,i − T_X,i) / n``,
    ``V01_j = 1 − (T_Z,j − T_Y,j) / m``. Then ``cov = S10 / m + S01 / n`` with S the sample covariances
    (ddof 1) of the components across positives and across negatives.

    Args:
        y: labels of shape ``(N,)`` in {0, 1}, both classes present.
        scores: shape ``(k, N)`` or ``(N,)``.
    """
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(
            f"DeLong needs at least two patients of each class, got {m} positive and {n} negative"
        )
    tz = midranks(np.concatenate([pos, neg], axis=1))  # (k, m + n)
    tx, ty = midranks(pos), midranks(neg)  # (k, m), (k, n)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n  # (k, m)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # (k, n)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return DeLong(aucs, cov)


def delong_contrast(y: np.ndarray, scores: np.ndarray, contrast: Sequence[float]) -> PairedTest:
    """Two-sided z-test of ``Σ c_i AUC_i = 0`` for AUCs measured on the same patients.

    Two methods' fold-mean AUCs are compared with ``c = (1/k, …, 1/k, −1/k, …, −1/k)``.
    """
    c = np.asarray(contrast, dtype=np.float64)
    d = delong(y, scores)
    estimate = float(c @ d.aucs)
    var = float(c @ d.cov @ c)
    if var <= 1e-15:  # every structural component agrees (e.g. identical rankings): nothing to test
        return PairedTest(estimate, float("nan"), float("nan"))
    z = estimate / np.sqrt(var)
    return PairedTest(estimate, float(z), float(2 * sps.norm.sf(abs(z))))


def delong_test(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> PairedTest:
    """DeLong's test of AUC(a) − AUC(b) on the same patients."""
    return delong_contrast(y, np.stack([scores_a, scores_b]), [1.0, -1.0])


# ---------------------------------------------------------------- corrected resampled t-test


def corrected_resampled_ttest(diffs: Sequence[float], test_train_ratio: float) -> PairedTest:
    """Nadeau & Bengio's corrected resampled t-test of paired fold differences (two-sided, n − 1 df).

    Given the folds of r repeats of a k-fold CV (n = r·k differences) it is Bouckaert & Frank's (2004)
    corrected repeated k-fold CV test: the same variance factor 1/n + n_test/n_train.

    Args:
        diffs: per-fold differences of a score (here AUC of a method minus the reference), length n.
        test_train_ratio: n_test / n_train (mean over the folds); 0 gives the ordinary paired t-test.
    """
    d = np.asarray(diffs, dtype=np.float64)
    k = d.size
    if k < 2:
        return PairedTest(float(d.mean()) if k else float("nan"), float("nan"), float("nan"))
    mean, var = float(d.mean()), float(d.var(ddof=1))
    if var <= 1e-15:  # every fold gives the same difference: no spread, so no test (not p = 0 or 1)
        return PairedTest(mean, float("nan"), float("nan"))
    t = mean / np.sqrt((1.0 / k + test_train_ratio) * var)
    return PairedTest(mean, float(t), float(2 * sps.t.sf(abs(t), df=k - 1)))


# ---------------------------------------------------------------- stratified percentile bootstrap


def stratified_counts(m: int, n: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each positive (``(B, m)``) and each negative (``(B, n)``) is drawn in B resamples with
    replacement, positives and negatives drawn separately (class sizes fixed)."""
    rng = np.random.default_rng(seed)
    return (
        rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(np.float64),
        rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64),
    )


def resampled_aucs(
    y: np.ndarray, scores: np.ndarray, counts_pos: np.ndarray, counts_neg: np.ndarray
) -> np.ndarray:
    """AUC of every resample, averaged over the score rows (one resample applies to every row).

    A resample drawing positive i ``a_i`` times and negative j ``b_j`` times has
    ``AUC = Σ_ij a_i b_j ψ(X_i, Y_j) / (m n)``: one matrix product per row instead of a loop.

    Args:
        y: labels ``(N,)``; scores: ``(k, N)`` or ``(N,)``; counts: from :func:`stratified_counts`.

    Returns:
        shape ``(B,)``.
    """
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = counts_pos.shape[1], counts_neg.shape[1]
    total = np.zeros(counts_pos.shape[0])
    for row in scores:
        pos, neg = row[y == 1], row[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (m, n)
        total += np.einsum("bn,bn->b", counts_pos @ psi, counts_neg) / (m * n)
    return total / scores.shape[0]


def bootstrap_auc_ci(
    y: np.ndarray, scores: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC (of the mean AUC over the rows of ``scores``), class-stratified;
    NaN for a single class or ``n_boot`` 0 (no CI wanted)."""
    y = np.asarray(y).astype(int)
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    cp, cn = stratified_counts(m, n, n_boot, seed)
    boots = resampled_aucs(y, scores, cp, cn)
    return percentile_ci(boots, level)


# ---------------------------------------------------------------- multiclass: macro one-vs-rest AUC


def class_counts(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """How often each patient is drawn ``(B, N)`` in B resamples with replacement, each class's patients
    drawn separately (class sizes fixed, so every class is in every resample)."""
    y = np.asarray(y).astype(int)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(y)))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return counts


def resampled_macro_aucs(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC of every resample, averaged over the score rows.

    For class c, the resample's AUC of c against the rest is ``Σ_ij a_i b_j ψ(X_i, Y_j) / (Σa Σb)`` over
    class-c patients i and the others j (a, b their counts); the macro AUC is its mean over the classes
    present, each with both sides in the data.

    Args:
        y: labels ``(N,)``; scores: class probabilities ``(k, N, C)`` or ``(N, C)``; counts: :func:`class_counts`.

    Returns:
        shape ``(B,)``.
    """
    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[None] if scores.ndim == 2 else scores
    present = [c for c in range(scores.shape[2]) if 0 < int((y == c).sum()) < len(y)]
    total = np.zeros(counts.shape[0])
    for row in scores:
        for c in present:
            pos, neg = row[y == c, c], row[y != c, c]
            a, b = counts[:, y == c], counts[:, y != c]
            psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
            total += np.einsum("bn,bn->b", a @ psi, b) / (a.sum(1) * b.sum(1))
    return total / (scores.shape[0] * max(1, len(present)))


def bootstrap_macro_auc_ci(
    y: np.ndarray, scores: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the macro one-vs-rest AUC (of its mean over the rows of ``scores``
    ``(k, N, C)``), class-stratified; NaN with fewer than two classes or ``n_boot`` 0."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2 or n_boot == 0:
        return float("nan"), float("nan")
    boots = resampled_macro_aucs(y, scores, class_counts(y, n_boot, seed))
    return percentile_ci(boots, level)


def paired_bootstrap_test(
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    statistic: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> PairedTest:
    """Two-sided paired bootstrap test of macro AUC(a) − macro AUC(b) on the same patients (score arrays
    ``(k, N, C)`` each): one class-stratified resample applied to both, ``z = d / SD(d*)``, p from the
    normal distribution (pROC's ``roc.test(method="bootstrap")``); NaN when the resampled differences do
    not vary. ``statistic(y, scores, counts)``: another resampled statistic (:func:`resampled_cindex`
    with ``y`` = the survival strata); default :func:`resampled_macro_aucs`."""
    stat = statistic or resampled_macro_aucs
    y = np.asarray(y).astype(int)
    everyone = np.ones((1, len(y)))
    d = float(stat(y, a, everyone)[0] - stat(y, b, everyone)[0])
    if len(np.unique(y)) < 2 or n_boot == 0:
        return PairedTest(d, float("nan"), float("nan"))
    counts = class_counts(y, n_boot, seed)
    sd = float(np.std(stat(y, a, counts) - stat(y, b, counts), ddof=1))
    if sd <= 1e-15:
        return PairedTest(d, float("nan"), float("nan"))
    z = d / sd
    return PairedTest(d, z, float(2 * sps.norm.sf(abs(z))))


# ---------------------------------------------------------------- survival: Harrell's c-index


def resampled_cindex(
    time: np.ndarray, event: np.ndarray, risks: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Harrell's c-index of every resample, averaged over the risk rows (``(k, N)`` or ``(N,)``).

    Pair (i, j) is comparable when patient i had the event before j's time (``t_i < t_j``, ``e_i = 1``) and
    concordant when ``r_i > r_j`` (a tie counts half); a resample drawing patient i ``a_i`` times has
    ``C = Σ a_i a_j conc_ij / Σ a_i a_j comp_ij``: one matrix product per row. With every count 1 it is
    Harrell's c-index (torchsurv's, which a test checks against a hand count of concordant pairs).

    Returns:
        shape ``(B,)``.
    """
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event).astype(bool)
    risks = np.atleast_2d(np.asarray(risks, dtype=np.float64))
    comparable = (t[:, None] < t[None, :]) & e[:, None]  # (N, N)
    pairs = np.einsum("bi,ij,bj->b", counts, comparable.astype(np.float64), counts)
    total = np.zeros(counts.shape[0])
    for r in risks:
        conc = comparable * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))
        total += np.einsum("bi,ij,bj->b", counts, conc, counts) / np.where(pairs > 0, pairs, np.nan)
    return total / risks.shape[0]


def bootstrap_cindex_ci(
    time: np.ndarray,
    event: np.ndarray,
    risks: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of Harrell's c-index (of its mean over the rows of ``risks``), the patients
    with and without the event resampled separately; NaN without an event or with ``n_boot`` 0."""
    event = np.asarray(event).astype(int)
    if event.sum() == 0 or n_boot == 0:
        return float("nan"), float("nan")
    boots = resampled_cindex(time, event, risks, class_counts(event, n_boot, seed))
    return percentile_ci(boots, level, skip_nan=True)


def logrank_p(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """p-value of the two-sided log-rank test of two groups (``group`` bool), SciPy's ``stats.logrank`` on
    right-censored data (lifelines' ``logrank_test`` gives the same p; not a dependency, as it pins
    pandas < 3); NaN when a group is empty or there is no event."""
    group = np.asarray(group, dtype=bool)
    event = np.asarray(event).astype(int)
    if group.all() or not group.any() or event.sum() == 0:
        return float("nan")
    return float(
        sps.logrank(
            right_censored(time[group], event[group]), right_censored(time[~group], event[~group])
        ).pvalue
    )


def right_censored(time: np.ndarray, event: np.ndarray) -> sps.CensoredData:
    """Follow-up times as SciPy's censored data: an event (1) is observed, a 0 is censored at its time."""
    return sps.CensoredData.right_censored(np.asarray(time, dtype=float), np.asarray(event) == 0)


def gap_share(
    y: np.ndarray,
    base: np.ndarray,
    method: np.ndarray,
    top: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Share of the AUC gap from ``base`` to ``top`` that ``method`` closes, ``(A_m − A_b) / (A_t − A_b)``,
    and its percentile bootstrap CI.

    Each of ``base``, ``method``, ``top`` is score rows ``(k, N)`` or ``(N,)`` on the same patients (the AUC
    of several rows is their mean AUC, as an external cohort's). One class-stratified resample of patients is
    applied to all three, so the correlation of their AUCs is kept; resamples whose gap is 0 are dropped.
    NaN share where the gap itself is 0; NaN CI for ``n_boot`` 0 or a single class.
    """
    y = np.asarray(y).astype(int)
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan"), float("nan")
    once = np.ones((1, m)), np.ones((1, n))  # every patient drawn once: the AUC itself
    a_base, a_method, a_top = (float(resampled_aucs(y, s, *once)[0]) for s in (base, method, top))
    share = (a_method - a_base) / (a_top - a_base) if a_top != a_base else float("nan")
    if n_boot == 0:
        return share, float("nan"), float("nan")
    cp, cn = stratified_counts(m, n, n_boot, seed)
    b, mm, t = (resampled_aucs(y, s, cp, cn) for s in (base, method, top))
    keep = t != b
    if not keep.any():
        return share, float("nan"), float("nan")
    shares = (mm[keep] - b[keep]) / (t[keep] - b[keep])
    return float(share), *percentile_ci(shares, level)


# ---------------------------------------------------------------- calibration


#: patients per calibration bin aimed at, and the range of the number of bins
PATIENTS_PER_BIN, MIN_BINS, MAX_BINS = 15, 3, 10


def percentile_ci(boots: np.ndarray, level: float = 0.95, skip_nan: bool = False) -> tuple[float, float]:
    """The two-sided percentile interval of bootstrap replicates ``boots`` (``skip_nan``: NaN replicates, a
    resample without a comparable pair, left out)."""
    tail = (1 - level) / 2
    lo, hi = (np.nanquantile if skip_nan else np.quantile)(boots, [tail, 1 - tail])
    return float(lo), float(hi)


def calibration_bins(n: int) -> int:
    """Bins for ``n`` patients: ``n // 15`` clipped to 3 … 10, and never more than ``n``.

    About 15 patients a bin keeps the observed fraction of a bin within about ±0.13 (its SD at p = 0.5), so a
    test fold of a few dozen patients gets 3 bins rather than 10 nearly empty ones, whose gaps would be mostly
    sampling noise (ECE is biased upwards by small bins); 10, the usual number, from 150 patients on.
    """
    return min(int(np.clip(n // PATIENTS_PER_BIN, MIN_BINS, MAX_BINS)), n)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int | None = None) -> float:
    """Expected calibration error over equal-mass bins (Naeini et al., AAAI 2015; Guo et al., ICML 2017).

    The patients, sorted by probability (stable: ties keep their order), are cut into ``B`` contiguous bins
    ``S_1 … S_B`` whose sizes differ by at most one (``B`` = ``bins``, default :func:`calibration_bins`);
    with ``N`` patients, ``ȳ_b`` the positive fraction and ``p̄_b`` the mean probability of bin ``b``:

        ECE = Σ_b (|S_b| / N) · |ȳ_b − p̄_b|

    It is 0 for a perfectly calibrated model and at most 1; NaN without patients.
    """
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    groups = np.array_split(order, bins or calibration_bins(len(y)))
    return float(sum(len(g) * abs(y[g].mean() - p[g].mean()) for g in groups if len(g)) / len(y))

"""Outcomes beyond the binary labels, derived from each cohort's latent programs (``latent.csv``): a 4-class
PAM50-like molecular subtype and an overall-survival time with its event indicator.

They are written to ``<cohort>/outcomes-v<OUTCOMES_VERSION>.csv`` (case_id, slide_id, subtype, os_days,
os_event), next to ``labels.csv``, the first time a task asks for them (a synthetic task's ``labels:
outcomes.csv``; :func:`ensure_outcomes`), with their own random streams:
the binary labels, omics and features of a cohort never change with them, and a cohort cached before they
existed gains them without being regenerated.

Subtype (luminal A, luminal B, HER2-enriched, basal-like): class scores linear in the programs,

    s_LumA = 1.0 luminal − 0.8 proliferation,       s_LumB = 0.8 luminal + 0.8 proliferation,
    s_Her2 = 1.4 erbb2 − 0.3 luminal,               s_Basal = 1.2 basal − 0.6 luminal + 0.3 proliferation,

the class drawn from softmax(β (s + b)), β = :data:`SUBTYPE_SHARPNESS` (the label noise: a patient's class
is a draw, not the argmax), the intercepts b set once per seed so the internal population's prevalences are
:data:`SUBTYPE_PREVALENCE` (TCGA-BRCA's PAM50 shares without normal-like, renormalised). The true class
probabilities and log-hazards are written to :data:`TRUTH_FILE` (the ceiling of any predictor: docs/synthetic.md).

Survival: proportional hazards on the programs, log-hazard ``η = 0.6 proliferation − 0.5 luminal +
0.2 erbb2``, event time Weibull (shape 1.2) with the baseline scale set so the median event time of a patient
with η = 0 is 7.5 years, censored by an independent uniform follow-up of 0.5 to 8 years (about two thirds
censored, as in TCGA-BRCA). Measured ceilings and shares: docs/synthetic.md (benchmarks/outcome_ceilings.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...fsio import atomic_write_text
from .generator import _HELDOUT_INDEX, _PROGRAM_CORR
from .spec import HELDOUT, PROGRAMS, SyntheticSpec

__all__ = [
    "OUTCOMES_FILE",
    "OUTCOMES_TABLE",
    "OUTCOMES_VERSION",
    "SUBTYPES",
    "SUBTYPE_PREVALENCE",
    "SUBTYPE_SHARPNESS",
    "TRUTH_FILE",
    "Outcomes",
    "draw_outcomes",
    "ensure_outcomes",
    "population",
    "subtype_probabilities",
    "true_cumulative_hazard",
]

#: bump whenever a change alters the outcomes: it is part of the file's name, so of every fold's configuration
OUTCOMES_VERSION = 1
#: the table a synthetic task names (``labels: outcomes.csv``) and the file that holds it on disk
OUTCOMES_TABLE = "outcomes.csv"
OUTCOMES_FILE = f"outcomes-v{OUTCOMES_VERSION}.csv"
TRUTH_FILE = f"outcomes-v{OUTCOMES_VERSION}-truth.csv"
SUBTYPES = ("luminal_a", "luminal_b", "her2_enriched", "basal_like")
#: TCGA-BRCA PAM50 (LumA 0.50, LumB 0.20, Her2 0.08, Basal 0.18; normal-like left out), renormalised
SUBTYPE_PREVALENCE = np.array([0.52, 0.21, 0.08, 0.19])
#: β of softmax(β (s + b)): higher is a cleaner subtype (its true-probability macro AUC in docs/synthetic.md)
SUBTYPE_SHARPNESS = 1.5
_P = {name: i for i, name in enumerate(PROGRAMS)}
_SUBTYPE_WEIGHTS = np.zeros((len(SUBTYPES), len(PROGRAMS)))
_SUBTYPE_WEIGHTS[0, [_P["luminal"], _P["proliferation"]]] = [1.0, -0.8]
_SUBTYPE_WEIGHTS[1, [_P["luminal"], _P["proliferation"]]] = [0.8, 0.8]
_SUBTYPE_WEIGHTS[2, [_P["erbb2"], _P["luminal"]]] = [1.4, -0.3]
_SUBTYPE_WEIGHTS[3, [_P["basal"], _P["luminal"], _P["proliferation"]]] = [1.2, -0.6, 0.3]
_HAZARD_WEIGHTS = np.zeros(len(PROGRAMS))
_HAZARD_WEIGHTS[[_P["proliferation"], _P["luminal"], _P["erbb2"]]] = [0.6, -0.5, 0.2]
_WEIBULL_SHAPE = 1.2
_MEDIAN_DAYS = 7.5 * 365.25
_FOLLOW_UP_DAYS = (0.5 * 365.25, 8 * 365.25)


def _intercepts(spec: SyntheticSpec) -> np.ndarray:
    """Class intercepts b giving :data:`SUBTYPE_PREVALENCE` in the internal population (no site shift),
    fitted by a fixed-point iteration on 200,000 draws of the programs (seeded by the spec's seed, all they
    depend on: computed once per process and seed, as the fit takes seconds)."""
    return _seed_intercepts(spec.seed)


@functools.cache
def _seed_intercepts(seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    z = rng.standard_normal((200_000, len(PROGRAMS))) @ np.linalg.cholesky(_PROGRAM_CORR).T
    s = SUBTYPE_SHARPNESS * (z @ _SUBTYPE_WEIGHTS.T)
    b = np.zeros(len(SUBTYPES))
    for _ in range(200):
        share = _softmax(s + SUBTYPE_SHARPNESS * b).mean(axis=0)
        b += np.log(SUBTYPE_PREVALENCE / share) / SUBTYPE_SHARPNESS
    b.setflags(write=False)
    return b


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def subtype_probabilities(z: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """True class probabilities ``(n, 4)`` of patients with programs ``z`` ``(n, K)``."""
    return _softmax(SUBTYPE_SHARPNESS * (z @ _SUBTYPE_WEIGHTS.T + intercepts))


def _weibull_scale() -> float:
    """Baseline Weibull scale λ: a patient with η = 0 has median event time :data:`_MEDIAN_DAYS`
    (the median of λ (−log U)^(1/k) exp(−η / k) is λ (log 2)^(1/k) exp(−η / k))."""
    return _MEDIAN_DAYS / math.log(2.0) ** (1.0 / _WEIBULL_SHAPE)


def true_cumulative_hazard(days: np.ndarray) -> np.ndarray:
    """The true baseline cumulative hazard ``H₀(t) = (t / λ)^k`` of the Weibull event times at ``days``: a
    patient with log-hazard η has ``S(t) = exp(−H₀(t) exp(η))`` (before censoring, which is independent)."""
    return (np.clip(np.asarray(days, dtype=np.float64), 0.0, None) / _weibull_scale()) ** _WEIBULL_SHAPE


@dataclass(frozen=True)
class Outcomes:
    """Outcomes of n patients: true class probabilities ``(n, 4)``, the drawn subtype index, the true
    log-hazard η, the observed time (days) and the event indicator (1 event, 0 censored)."""

    probs: np.ndarray
    subtype: np.ndarray
    log_hazard: np.ndarray
    days: np.ndarray
    event: np.ndarray


def draw_outcomes(z: np.ndarray, intercepts: np.ndarray, rng: np.random.Generator) -> Outcomes:
    """Subtype and survival of patients with programs ``z`` ``(n, K)`` (the model of this module's docstring)."""
    probs = subtype_probabilities(z, intercepts)
    subtype = (probs.cumsum(axis=1) < rng.random((len(z), 1))).sum(axis=1).clip(max=len(SUBTYPES) - 1)
    eta = z @ _HAZARD_WEIGHTS
    u = rng.random(len(z))
    event_time = _weibull_scale() * (-np.log(u)) ** (1.0 / _WEIBULL_SHAPE) * np.exp(-eta / _WEIBULL_SHAPE)
    follow_up = rng.uniform(*_FOLLOW_UP_DAYS, size=len(z))
    return Outcomes(
        probs, subtype, eta, np.minimum(event_time, follow_up), (event_time <= follow_up).astype(int)
    )


def population(spec: SyntheticSpec, n: int, seed: int = 0) -> Outcomes:
    """Outcomes of ``n`` patients drawn from the internal population of ``spec`` (no site shift): what the
    ceilings of docs/synthetic.md are measured on."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 5, seed]))
    z = rng.standard_normal((n, len(PROGRAMS))) @ np.linalg.cholesky(_PROGRAM_CORR).T
    return draw_outcomes(z, _intercepts(spec), rng)


def ensure_outcomes(spec: SyntheticSpec, root: Path) -> None:
    """Write :data:`OUTCOMES_FILE` and :data:`TRUTH_FILE` of every cohort under ``root`` that lacks them, each
    from a stream of its own keyed by the cohort's index as the generator numbers them (0 internal, the
    held-out cohort's, then the external cohorts in the spec's order): adding a cohort changes no other's."""
    names = {"internal": 0, **({HELDOUT: _HELDOUT_INDEX} if spec.heldout else {})}
    names.update({e.name: i for i, e in enumerate(spec.external, start=1)})
    if all((root / n / OUTCOMES_FILE).is_file() for n in names):
        return
    intercepts = _intercepts(spec)
    for name, index in names.items():
        folder = root / name
        if (folder / OUTCOMES_FILE).is_file():
            continue
        latent = pd.read_csv(folder / "latent.csv", dtype={"case_id": str}, keep_default_na=False)
        slides = pd.read_csv(folder / "labels.csv", dtype=str, keep_default_na=False)[["case_id", "slide_id"]]
        z = latent[list(PROGRAMS)].to_numpy(np.float64)
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 4, index]))
        draw = draw_outcomes(z, intercepts, rng)
        probs, eta, days = draw.probs, draw.log_hazard, draw.days
        truth = pd.DataFrame(
            {
                "case_id": latent.case_id,
                "subtype": [SUBTYPES[k] for k in draw.subtype],
                "os_days": np.round(days, 1),
                "os_event": draw.event,
            }
        )
        outcomes = slides.merge(truth, on="case_id", how="left")
        probs_table = pd.DataFrame(probs, columns=[f"p_{s}" for s in SUBTYPES]).round(6)
        truth_table = pd.concat([latent[["case_id"]], probs_table], axis=1).assign(
            log_hazard=np.round(eta, 6)
        )
        atomic_write_text(folder / TRUTH_FILE, truth_table.to_csv(index=False))
        atomic_write_text(folder / OUTCOMES_FILE, outcomes.to_csv(index=False))

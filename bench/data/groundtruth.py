"""What a synthetic cohort knows about its patients that no real cohort does: the latent programs behind every
label (``latent.csv`` beside its ``labels.csv``) and the Bayes-optimal prediction they give: P(positive) of a binary label, the true class probabilities of the
subtype and the true log-hazard of the survival outcome (``outcomes-v<k>-truth.csv`` beside ``outcomes-v<k>.csv``).

The report's ceilings (bench/baselines.py) and the privileged-information student (a method whose
``DataNeeds.privileged`` asks for these programs as its auxiliary target) read them; a cohort that is not a
cached synthetic one has none, and every function here returns None for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..csvio import read_table
from .synthetic import GENERATOR_VERSION, LABEL_VALUES, PROGRAMS, SyntheticSpec, label_posterior, spec_record
from .synthetic.outcomes import OUTCOMES_FILE, SUBTYPES, TRUTH_FILE, true_cumulative_hazard

__all__ = [
    "LATENT_FILE",
    "bayes_class_probabilities",
    "bayes_probability",
    "latent_programs",
    "true_cumulative_hazard",
    "true_log_hazard",
]

#: the outcome columns the generator writes (bench/data/synthetic/outcomes.py)
SUBTYPE_COL, TIME_COL, EVENT_COL = "subtype", "os_days", "os_event"

#: each synthetic cohort's ground truth, ``<cohort>/latent.csv``: case_id, the programs, the label scores
LATENT_FILE = "latent.csv"


def latent_programs(labels: Path) -> pd.DataFrame | None:
    """The latent programs of the synthetic cohort whose labels file is ``labels``: one row per patient
    (index case_id, columns :data:`PROGRAMS`), or None when ``labels`` is not a cached synthetic cohort's."""
    path = Path(labels).parent / LATENT_FILE
    if spec_record(Path(labels)) is None or not path.is_file():
        return None
    table = read_table(path, ids=("case_id",))
    return table.set_index("case_id")[list(PROGRAMS)].astype("float64")


def bayes_probability(labels: Path, label_col: str, positive: Sequence[str]) -> pd.Series | None:
    """P(positive | true programs) of every patient of a synthetic cohort (index case_id), by the generator's
    own label rule; None for a cohort that is not synthetic, a label the generator does not draw, or a
    cohort written by another generator version (whose rule may differ from this one's)."""
    record = spec_record(Path(labels))
    latent = latent_programs(labels)
    if record is None or latent is None or label_col not in LABEL_VALUES:
        return None
    if record.get("generator_version") != GENERATOR_VERSION:
        return None
    p = label_posterior(SyntheticSpec.from_dict(record["spec"]), label_col, latent.to_numpy())
    first_is_positive = LABEL_VALUES[label_col][0] in set(positive)
    return pd.Series(p if first_is_positive else 1.0 - p, index=latent.index, name="prob")


def _outcome_truth(labels: Path) -> pd.DataFrame | None:
    """The true class probabilities and log-hazard (index case_id) of the synthetic cohort whose outcomes file
    is ``labels``; None for any other file (the file names carry the outcome model's version)."""
    labels = Path(labels)
    path = labels.parent / TRUTH_FILE
    if labels.name != OUTCOMES_FILE or spec_record(labels) is None or not path.is_file():
        return None
    return read_table(path, ids=("case_id",)).set_index("case_id")


def bayes_class_probabilities(labels: Path, label_col: str, classes: Sequence[str]) -> pd.DataFrame | None:
    """The true subtype probabilities of every patient of a synthetic cohort (index case_id, columns
    ``prob_0`` … in the order of ``classes``), the Bayes-optimal multiclass prediction; None for a cohort that
    is not synthetic, another label, or ``classes`` that are not the generator's subtypes."""
    truth = _outcome_truth(labels)
    if truth is None or label_col != SUBTYPE_COL or sorted(classes) != sorted(SUBTYPES):
        return None
    table = truth[[f"p_{c}" for c in classes]].astype("float64")
    return table.set_axis([f"prob_{k}" for k in range(len(classes))], axis=1)


def true_log_hazard(labels: Path, time_col: str, event_col: str) -> pd.Series | None:
    """The true log-hazard η of every patient of a synthetic cohort (index case_id, name ``risk``), the
    Bayes-optimal risk score (its survival function: :func:`true_cumulative_hazard`); None for a cohort that is not synthetic or another outcome."""
    truth = _outcome_truth(labels)
    if truth is None or (time_col, event_col) != (TIME_COL, EVENT_COL):
        return None
    return truth["log_hazard"].astype("float64").rename("risk")

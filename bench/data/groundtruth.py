"""What a synthetic cohort knows about its patients that no real cohort does: the latent programs behind every
label (``latent.csv`` beside its ``labels.csv``) and the Bayes-optimal prediction they give.

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

__all__ = ["LATENT_FILE", "bayes_probability", "latent_programs"]

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

"""Synthetic TCGA-BRCA-like cohorts with known ground truth: the embedded default data of her2, pr and odx.

- :mod:`.spec`: the settings (:class:`SyntheticSpec`, :class:`ExternalSpec`), their validation, the cache key;
- :mod:`.generator`: the generative model, writing every cohort of a spec (described in ``docs/synthetic.md``);
- :mod:`.outcomes`: the subtype and survival outcomes derived from the latent programs (``labels: outcomes.csv``);
- :mod:`.cache`: one folder per spec, published atomically (:func:`materialise`), and the settings of a cached
  cohort read back from its labels file (:func:`spec_record`).
"""

from .cache import materialise, spec_record
from .generator import LABEL_VALUES, TISSUES, label_posterior
from .outcomes import OUTCOMES_FILE, OUTCOMES_TABLE, SUBTYPES, ensure_outcomes
from .spec import GENERATOR_VERSION, HELDOUT, PROGRAMS, ExternalSpec, SyntheticSpec, spec_hash

__all__ = [
    "GENERATOR_VERSION",
    "HELDOUT",
    "LABEL_VALUES",
    "OUTCOMES_FILE",
    "OUTCOMES_TABLE",
    "PROGRAMS",
    "SUBTYPES",
    "TISSUES",
    "ExternalSpec",
    "SyntheticSpec",
    "ensure_outcomes",
    "label_posterior",
    "materialise",
    "spec_hash",
    "spec_record",
]

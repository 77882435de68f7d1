"""The cache of generated cohorts: one folder per spec, named by its :func:`spec_hash` and published
atomically by :func:`materialise`; :func:`spec_record` reads a cohort's settings back from its labels file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from ...locks import HOST, remove_dead_temporaries
from .generator import LABELS_FILE, generate
from .outcomes import OUTCOMES_FILE
from .spec import GENERATOR_VERSION, SyntheticSpec, spec_hash

__all__ = ["materialise", "spec_record"]

_SPEC_FILE = "spec.json"
_ROOT_NAME = re.compile(r"^synthetic-[0-9a-f]{16}$")  # the name of a cohort root (see ``spec_hash``)


def materialise(spec: SyntheticSpec, cache_root: Path) -> Path:
    """Generate (once; cached by a hash of the spec and :data:`GENERATOR_VERSION`); return the cohort root.

    The cohort is written into a hidden temporary folder next to its final place and renamed when complete,
    so an interrupted generation never leaves a folder that looks finished; leftovers of dead generations on
    this host are removed on the next call.

    Layout under the returned root::

        spec.json                          the settings, generator version and hash
        internal/labels.csv                case_id, slide_id, her2, pr, odx_risk
        internal/omics.csv                 case_id + one count column per gene (some patients absent)
        internal/latent.csv                case_id, the latent programs and label scores (ground truth)
        internal/features/<slide_id>.h5    TRIDENT format + ``relevance`` (N,) float32, ``tissue`` (N,) int8
        <external>/labels.csv, latent.csv, features/
    """
    cache_root = Path(cache_root)
    digest = spec_hash(spec)
    root = cache_root / f"synthetic-{digest}"
    if root.is_dir():
        return root
    cache_root.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(cache_root, f".synthetic-{digest}")
    tmp = cache_root / f".synthetic-{digest}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate(spec, tmp)
        (tmp / _SPEC_FILE).write_text(
            json.dumps(
                {"generator_version": GENERATOR_VERSION, "hash": digest, "spec": spec.to_dict()}, indent=2
            )
            + "\n"
        )
        try:
            tmp.rename(root)
        except OSError:
            if not root.is_dir():  # a concurrent generation that finished first is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def spec_record(labels: Path) -> dict[str, Any] | None:
    """The generator settings of the cached cohort whose labels file is ``labels``, or None when it is not one.

    The record is the cohort's ``spec.json``: ``{"generator_version", "hash", "spec"}`` (``spec`` as
    :meth:`SyntheticSpec.to_dict` writes it). ``labels`` is ``<root>/<cohort>/labels.csv`` (or ``outcomes.csv``) of any cohort of
    the root, internal or external; any other file, or a root without its ``spec.json``, gives None.
    """
    labels = Path(labels)
    root = labels.parent.parent
    record = root / _SPEC_FILE
    if (
        labels.name not in (LABELS_FILE, OUTCOMES_FILE)
        or not _ROOT_NAME.match(root.name)
        or not record.is_file()
    ):
        return None
    return json.loads(record.read_text())

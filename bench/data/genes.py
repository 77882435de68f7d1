"""Per-fold gene selection: the omics genes a fold's models see, chosen from that fold's training patients.

The MoMKD authors' pipeline (``gene_selection/`` of CAIR-LAB-WFUSM/MoMKD) keeps 768 genes ranked by the
feature importances of an XGBoost classifier (100 trees, depth 3, learning rate 0.01) fit once on an 80 %
stratified split of the whole cohort, a split that ignores the cross-validation folds: the genes every fold
trains on were ranked with the labels of most of that fold's test patients. bench refits the ranking in
every fold on the fold's training patients alone (not its validation or test part, never an external
cohort) and applies the chosen genes unchanged to every other patient; a task asks for it with
``omics_select: {method: ..., k: ...}`` (default: none, every gene of the omics file is used).

Every method ranks log-expression (``log2(x + 1)`` when the task says ``omics_log1p``, the values the models'
z-scoring starts from):

- ``variance``: variance over the training patients (no labels);
- ``univariate``: ANOVA F statistic of each gene against the label (scikit-learn's ``f_classif``; for two
  classes the square of the pooled-variance t statistic);
- ``gbdt``: impurity-based importances of scikit-learn's ``GradientBoostingClassifier`` with the authors'
  XGBoost settings. With 100 trees of depth 3 at most 700 genes can have a non-zero importance, so with
  k = 768 the authors' ranking orders the rest arbitrarily; here ties are broken by training variance.

Ties of any method are broken by training variance, then by the genes' order in the omics file, so a
selection is a deterministic function of the training patients. The kept genes stay in the file's order.

A ``gbdt`` ranking of ~20,000 genes takes minutes (``benchmarks/gene_selection.py``), and every job of a fold
(each method, each Slurm array task) needs the same one; with ``cache_dir`` a selection is saved under a key
that hashes exactly what it reads (the training patients' values and labels, the gene names, method, k,
seed and the scikit-learn version) and reused from there.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError

__all__ = ["METHODS", "GeneSelection", "gene_scores", "select_genes"]

METHODS = ("variance", "univariate", "gbdt")
GBDT = {"n_estimators": 100, "max_depth": 3, "learning_rate": 0.01}  # the authors' XGBoost settings


@dataclass(frozen=True)
class GeneSelection:
    """The genes one fold keeps (in the omics file's column order) and how they were chosen."""

    method: str
    k: int
    genes: tuple[str, ...]
    train_patients: int

    def apply(self, omics: pd.DataFrame) -> pd.DataFrame:
        """``omics`` restricted to the kept genes (any patients: training, validation or test)."""
        return omics[list(self.genes)]

    def record(self) -> dict[str, Any]:
        """What a fold's config.yaml records: the method, k, a hash of the gene list, and the list."""
        digest = hashlib.sha256("\n".join(self.genes).encode()).hexdigest()[:16]
        return {
            "method": self.method,
            "k": self.k,
            "fit_on_patients": self.train_patients,
            "genes_sha256": digest,
            "genes": list(self.genes),
        }


def gene_scores(x: np.ndarray, y: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """A score per gene, higher = kept first.

    Args:
        x: log-expression of the training patients, shape ``(patients, genes)``.
        y: their labels in {0, 1}, shape ``(patients,)`` (not read by ``variance``).
        method: one of :data:`METHODS`.
        seed: seed of the tree model (``gbdt``).

    Returns:
        shape ``(genes,)``; ``-inf`` where a gene cannot be scored (constant on the training patients).
    """
    if method == "variance":
        return x.var(axis=0)
    if method not in METHODS:
        raise ValueError(f"unknown gene selection method {method!r}; choose one of {', '.join(METHODS)}")
    if len(np.unique(y)) < 2:
        raise DataError(
            f"omics_select method {method!r} needs training patients of both classes with omics; this fold "
            "has one class only. Use method 'variance' or give more patients omics."
        )
    if method == "univariate":
        from sklearn.feature_selection import f_classif

        with warnings.catch_warnings():  # constant genes: F is undefined, scored -inf below
            warnings.simplefilter("ignore", category=RuntimeWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            f, _ = f_classif(x, y)
        return np.where(np.isfinite(f), f, -np.inf)
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(**GBDT, random_state=seed % 2**32).fit(x, y)
    return model.feature_importances_


def select_genes(
    log_omics: pd.DataFrame,
    labels: pd.Series,
    train_cases: Sequence[str],
    method: str,
    k: int,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> GeneSelection:
    """The ``k`` best genes by ``method``, fit on the training patients that have omics.

    Args:
        log_omics: log-expression of every patient (case_id index, one column per gene); only the rows of
            ``train_cases`` are read.
        labels: label (0/1) per case_id; only the training patients' are read.
        train_cases: the fold's training patients.
        method: ``variance``, ``univariate`` or ``gbdt``.
        k: genes to keep, at most the number of columns.
        seed: seed of the tree model.
        cache_dir: where selections are saved and looked up (None: always fit).
    """
    genes = log_omics.columns
    if not 1 <= k <= len(genes):
        raise DataError(
            f"omics_select asks for k = {k} genes but the omics table has {len(genes)}. "
            "Fix: lower 'k' under 'omics_select' in the task YAML, or remove 'omics_select' to use every gene."
        )
    cases = log_omics.index.intersection(pd.Index(list(train_cases))).sort_values()
    if len(cases) < 2:
        raise DataError(
            f"omics_select needs at least two training patients with omics in every fold; a fold has {len(cases)}."
        )
    x = log_omics.loc[cases].to_numpy(np.float64)
    y = labels.loc[cases].to_numpy().astype(int)
    path = (
        None
        if cache_dir is None
        else Path(cache_dir) / f"{_cache_key(log_omics.loc[cases], y, method, k, seed)}.json"
    )
    if path is not None and path.is_file():
        return GeneSelection(method, k, tuple(json.loads(path.read_text())["genes"]), len(cases))
    score = gene_scores(x, y, method, seed)
    variance = x.var(axis=0)
    order = np.lexsort((np.arange(len(genes)), -variance, -score))  # last key first: score, variance, order
    kept = np.sort(order[:k])
    selection = GeneSelection(method, k, tuple(str(g) for g in genes[kept]), len(cases))
    if path is not None:
        from ..fsio import atomic_write_text

        atomic_write_text(path, json.dumps(selection.record()))
    return selection


def _cache_key(x: pd.DataFrame, y: np.ndarray, method: str, k: int, seed: int) -> str:
    """Hash of everything a selection reads: the training rows (case ids, values, gene names), their labels,
    the method's settings and the scikit-learn version."""
    import sklearn

    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(x, index=True).to_numpy().tobytes())
    h.update("\0".join(map(str, x.columns)).encode())
    h.update(np.asarray(y, dtype=np.int64).tobytes())
    h.update(json.dumps([method, k, seed, GBDT, sklearn.__version__]).encode())
    return f"{method}-{k}-{h.hexdigest()[:24]}"

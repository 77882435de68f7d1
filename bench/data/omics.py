"""Omics as the distilling methods read them: log-expression, z-scored with the training patients' statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import DataError

__all__ = ["OmicsScaler"]


class OmicsScaler:
    """log2(x + 1) (optional) then z-scoring with statistics of the training patients only.

    Genes constant on the training patients get unit scale (their z-score is 0), never a division by zero.
    """

    def __init__(self, log1p: bool = True) -> None:
        self.log1p = log1p
        self.mean: pd.Series | None = None
        self.std: pd.Series | None = None

    def log_expression(self, df: pd.DataFrame) -> pd.DataFrame:
        """log2(x + 1) when ``log1p``, else ``df`` unchanged: what is z-scored (and ranked by omics_select)."""
        return np.log2(df + 1.0) if self.log1p else df

    def fit(self, omics: pd.DataFrame, train_cases: Sequence[str]) -> OmicsScaler:
        x = self.log_expression(omics.loc[omics.index.intersection(list(train_cases))])
        if len(x) == 0:
            raise DataError("no training patient has omics in this fold; omics-based methods cannot train.")
        self.mean = x.mean(axis=0)
        std = x.std(axis=0, ddof=0)
        self.std = std.where(std > 1e-8, 1.0)
        return self

    def transform(self, omics: pd.DataFrame) -> pd.DataFrame:
        if self.mean is None:
            raise RuntimeError("OmicsScaler.transform called before fit")
        return ((self.log_expression(omics) - self.mean) / self.std).astype(np.float32)

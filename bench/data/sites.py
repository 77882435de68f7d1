"""Tissue source sites of a labels table, for ``split_by: site``: a column the task names (``site_col``), or the
site code of TCGA barcodes (``TCGA-<site>-<participant>``: the two characters after ``TCGA-``)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..config import TaskConfig

__all__ = ["read_sites"]


#: a TCGA patient barcode, TCGA-<tissue source site>-<participant>, possibly followed by sample parts
_TCGA = re.compile(r"^TCGA-([A-Za-z0-9]{2})-[A-Za-z0-9]{4}(?:-|$)")


def read_sites(task: TaskConfig, df: pd.DataFrame, path: Path, problems: list[str]) -> pd.Series:
    """Each slide's tissue source site for ``split_by: site``: the ``site_col`` values, else the two
    characters after ``TCGA-`` of the case_id; a patient's slides must share one site."""
    if task.site_col is not None:
        site = df["site"].str.strip()
        if (site == "").any():
            problems.append(
                f"{path}: {int((site == '').sum())} row(s) have an empty '{task.site_col}' (the site column of "
                f"split_by: site). Fix: give every slide its tissue source site."
            )
    else:
        site = df.case_id.str.extract(_TCGA, expand=False)
        other = df.case_id[site.isna()].unique()
        if len(other):
            problems.append(
                f"{path}: split_by: site without site_col reads each patient's tissue source site from its TCGA "
                f"barcode (TCGA-<site>-<participant>, e.g. TCGA-A1-A0SB: site A1), but {len(other)} case_id(s) "
                f"are not TCGA barcodes (e.g. {', '.join(other[:3])}). Fix: add a column naming each patient's "
                f"site to the labels CSV and set 'site_col' in {task.path}, or use 'split_by: patient'."
            )
            return site.fillna("")
    mixed = site.groupby(df.case_id).nunique()
    mixed = mixed[mixed > 1].index
    if len(mixed):
        problems.append(
            f"{path}: patient(s) {', '.join(mixed[:5])} have slides from different sites in '{task.site_col}'; "
            "a patient belongs to one site. Fix: give every slide of a patient the same site."
        )
    return site

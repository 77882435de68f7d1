"""Fixtures of the harness tests beyond binary tasks: the small task's cohorts as a multiclass and as a
survival task (planted signals), shared by the task-type, reference-row, ablation and sweep tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.config import read_task

GRADES = ["g1", "g2", "g3"]


@pytest.fixture
def grade_task(small_task, cohort_tools):
    """The small task's cohorts with a three-class ``grade`` column (planted: grade 1 = the high-risk
    patients of the toy cohort), as a multiclass task."""
    _, write_task = cohort_tools
    root = small_task.parent
    for name in ("internal", "ext"):
        path = root / name / "labels.csv"
        df = pd.read_csv(path, dtype=str)
        index = df.case_id.str[-4:].astype(int)
        df["grade"] = np.where(df.odx_risk == "high", "g1", np.where(index % 2 == 0, "g2", "g3"))
        df.to_csv(path, index=False)
    raw = read_task(small_task).model_dump(mode="json", exclude={"path"})
    for key in ("positive", "negative"):
        raw.pop(key)
    raw.update(
        name="grade",
        type="multiclass",
        label_col="grade",
        classes=GRADES,
        labels="internal/labels.csv",
        features="internal/features",
        omics="internal/omics.csv",
        external=[{"name": "ext", "labels": "ext/labels.csv", "features": "ext/features"}],
        train={"epochs": 2, "patience": 2, "min_epochs": 0},
    )
    return write_task(root / "grade.yaml", **{k: v for k, v in raw.items() if v is not None})


@pytest.fixture
def os_task(small_task, cohort_tools):
    """The small task's cohorts with a survival outcome whose hazard follows the planted signal."""
    _, write_task = cohort_tools
    root = small_task.parent
    rng = np.random.default_rng(0)
    for name in ("internal", "ext"):
        path = root / name / "labels.csv"
        df = pd.read_csv(path, dtype=str)
        cases = df.case_id.unique()
        high = df.drop_duplicates("case_id").set_index("case_id").odx_risk.eq("high")
        t = pd.Series(rng.exponential(np.where(high.loc[cases], 300.0, 900.0)), index=cases)
        e = pd.Series((rng.random(len(cases)) < 0.6).astype(int), index=cases)
        df["os_days"] = df.case_id.map(t).round(1).astype(str)
        df["os_event"] = df.case_id.map(e).astype(str)
        df.to_csv(path, index=False)
    return write_task(
        root / "os.yaml",
        name="os",
        type="survival",
        time_col="os_days",
        event_col="os_event",
        labels="internal/labels.csv",
        features="internal/features",
        omics="internal/omics.csv",
        folds=2,
        train={"epochs": 2, "patience": 2, "min_epochs": 0},
        external=[{"name": "ext", "labels": "ext/labels.csv", "features": "ext/features"}],
    )

"""Small on-disk cohorts for the harness tests (TRIDENT-format files written through bench's own writer)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bench.data.formats import write_trident_h5

torch.set_num_threads(1)


def make_cohort(
    root: Path,
    n_patients: int = 40,
    dim: int = 16,
    genes: int = 12,
    seed: int = 0,
    prefix: str = "P",
    shift: float = 0.0,
    omics: bool = True,
    two_slide_every: int = 7,
) -> Path:
    """Write labels.csv, omics.csv and features/*.h5 under ``root``; a weak planted signal in a few patches."""
    rng = np.random.default_rng(seed)
    rows, omics_rows = [], []
    for i in range(n_patients):
        case = f"{prefix}-{i:04d}"
        label = "high" if i % 3 == 0 else "low"
        y = float(label == "high")
        n_slides = 2 if i % two_slide_every == 0 else 1
        for s in range(n_slides):
            slide = f"{case}-0{s}"
            n = int(rng.integers(20, 60))
            side = int(np.ceil(np.sqrt(n)))
            grid = np.stack(np.unravel_index(np.arange(n), (side, side)), axis=1)
            feats = rng.normal(size=(n, dim)).astype(np.float32) + shift
            k = max(1, n // 8)
            feats[:k, 0] += 2.0 * y
            write_trident_h5(root / "features" / f"{slide}.h5", feats, grid * 512)
            rows.append((case, slide, label))
        omics_rows.append([case, *rng.poisson(5 + 20 * y, size=genes).tolist()])
    pd.DataFrame(rows, columns=["case_id", "slide_id", "odx_risk"]).to_csv(root / "labels.csv", index=False)
    if omics:
        cols = ["case_id"] + [f"G{j}" for j in range(genes)]
        pd.DataFrame(omics_rows, columns=cols).to_csv(root / "omics.csv", index=False)
    return root


def write_task(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def pytest_configure(config: pytest.Config) -> None:
    """The shared feature store of the tests' throw-away cohorts in a temporary folder, not in $BENCH_CACHE
    (unless BENCH_FEATURE_STORE is set, e.g. to 0 to test without the store). Set before collection, so that
    the environments test modules copy for their subprocesses have it too."""
    if "BENCH_FEATURE_STORE" not in os.environ:
        _STORE_DIR.append(tempfile.mkdtemp(prefix="bench-feature-store-"))
        os.environ["BENCH_FEATURE_STORE"] = _STORE_DIR[0]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STORE_DIR:
        shutil.rmtree(_STORE_DIR.pop(), ignore_errors=True)
        del os.environ["BENCH_FEATURE_STORE"]


_STORE_DIR: list[str] = []


@pytest.fixture(scope="session")
def cohort_tools():
    """``(make_cohort, write_task)`` for tests that build cohorts of their own (no sys.path edits needed)."""
    return make_cohort, write_task


@pytest.fixture
def small_task(tmp_path: Path) -> Path:
    """A task YAML over a 40-patient internal cohort and a shifted 20-patient external cohort."""
    make_cohort(tmp_path / "internal")
    make_cohort(tmp_path / "ext", n_patients=20, seed=1, prefix="E", shift=0.3, omics=False)
    return write_task(
        tmp_path / "task.yaml",
        name="toy",
        label_col="odx_risk",
        positive=["high"],
        labels="internal/labels.csv",
        features="internal/features",
        omics="internal/omics.csv",
        folds=3,
        seed=0,
        train={"epochs": 3, "patience": 2, "min_epochs": 0},
        external=[{"name": "ext", "labels": "ext/labels.csv", "features": "ext/features"}],
    )

"""Figures: written as PNG and SVG, non-trivial images, one colour per method across figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from bench.figures import (
    COLUMN_WIDTH,
    PatchPanel,
    _grid_image,
    calibration_figure,
    explain_figure,
    fold_auc_figure,
    method_colors,
    roc_figure,
    save_figure,
)


def _check_image(paths: list[Path], min_kb: int = 15) -> np.ndarray:
    png, svg = paths
    assert png.suffix == ".png" and svg.suffix == ".svg"
    assert png.stat().st_size > min_kb * 1000
    image = imread(png)
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 20 and image[..., :3].std() > 0.02  # drawn, not blank
    width_in = image.shape[1] / 300
    assert 0.5 * COLUMN_WIDTH <= width_in <= 1.1 * COLUMN_WIDTH  # readable at column width (300 dpi)
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    return image


@pytest.fixture
def predictions() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.4).astype(int)
    return {
        "abmil": (y, (y + rng.normal(scale=1.0, size=120))[None, :]),
        "momkd": (y, np.stack([y + rng.normal(scale=0.8, size=120) for _ in range(5)])),
    }


def test_roc_and_calibration_figures(tmp_path, predictions):
    colors = method_colors(["abmil", "momkd"])
    _check_image(save_figure(roc_figure(predictions, "ROC", colors), tmp_path, "roc"))
    svg = (tmp_path / "roc.svg").read_text()
    assert "momkd (" in svg and "False positive rate" in svg  # text kept as text, legend carries the AUC
    calib = {m: (y, 1 / (1 + np.exp(-s.mean(axis=0)))) for m, (y, s) in predictions.items()}
    _check_image(save_figure(calibration_figure(calib, "Calibration", colors), tmp_path, "calibration"))


def test_fold_auc_figure(tmp_path):
    rows = [
        (m, f, c, 0.6 + 0.05 * i + 0.01 * f)
        for i, m in enumerate(["a", "b", "c"])
        for f in range(5)
        for c in ("test", "ext")
    ]
    fold_auc = pd.DataFrame(rows, columns=["method", "fold", "cohort", "auc"])
    _check_image(save_figure(fold_auc_figure(fold_auc, "Fold AUCs", ["a", "b", "c"], "b"), tmp_path, "folds"))
    assert "external: ext" in (tmp_path / "folds.svg").read_text()


def test_method_colours_are_fixed_by_order():
    a = method_colors(["abmil", "momkd", "tdc"])
    assert a == method_colors(["abmil", "momkd", "tdc"]) and len(set(a.values())) == 3


def test_grid_image_places_each_patch_at_its_coordinates():
    coords = np.array([[2.0, 1.0], [3.0, 1.0], [2.0, 3.0]])
    image = _grid_image(coords, np.array([0.1, 0.2, 0.3]))
    assert image.shape == (3, 2)  # rows = y extent, columns = x extent
    assert image[0, 0] == 0.1 and image[0, 1] == 0.2 and image[2, 0] == 0.3
    assert np.isnan(image[1]).all()  # no patch there


def test_explain_figure_with_categorical_and_continuous_panels(tmp_path):
    yx = np.stack(np.meshgrid(np.arange(20), np.arange(30)), axis=-1).reshape(-1, 2).astype(float)
    rng = np.random.default_rng(0)
    panels = [
        PatchPanel("attention", rng.random(len(yx)), cmap="magma"),
        PatchPanel(
            "bank", (yx[:, 0] > 10).astype(float), categories=["C-", "C+"], colors=[(0, 0, 1), (1, 0, 0)]
        ),
        PatchPanel("relevance", (yx[:, 1] < 5).astype(float), cmap="Greens"),
    ]
    _check_image(save_figure(explain_figure(yx, panels, "slide"), tmp_path, "explain"), min_kb=20)

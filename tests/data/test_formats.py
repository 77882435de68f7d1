"""Feature files: TRIDENT / CLAM .h5 and CLAM .pt, coordinate conventions, bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from bench.data.formats import read_slide, write_trident_h5
from bench.errors import DataError


def test_trident_roundtrip_uses_patch_size_level0(tmp_path):
    feats = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    grid = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [5, 3]])
    write_trident_h5(tmp_path / "s.h5", feats, grid * 512 + 1000, patch_size=256, patch_size_level0=512)
    sf = read_slide(tmp_path / "s.h5")
    np.testing.assert_allclose(sf.features, feats)
    assert sf.step_level0 == 512  # 40x slide: the step is patch_size_level0, not patch_size
    np.testing.assert_allclose(sf.coords - sf.coords.min(0), grid)


def _clam_h5(path, feats, coords, **attrs):
    with h5py.File(path, "w") as f:
        f["features"] = feats
        c = f.create_dataset("coords", data=coords)
        for k, v in attrs.items():
            c.attrs[k] = v


def test_clam_h5_step_from_patch_size_and_downsample(tmp_path):
    feats = np.ones((3, 4), np.float32)
    _clam_h5(
        tmp_path / "c.h5",
        feats,
        np.array([[0, 0], [1024, 0], [0, 2048]]),
        patch_size=256,
        downsample=[4.0, 4.0],
    )
    sf = read_slide(tmp_path / "c.h5")
    assert sf.step_level0 == 1024
    np.testing.assert_allclose(sf.coords, [[0, 0], [1, 0], [0, 2]])


def test_step_inferred_from_smallest_spacing_without_attributes(tmp_path):
    _clam_h5(tmp_path / "n.h5", np.ones((3, 4), np.float32), np.array([[0, 0], [448, 0], [896, 448]]))
    np.testing.assert_allclose(read_slide(tmp_path / "n.h5").coords, [[0, 0], [1, 0], [2, 1]])


def test_coords_off_the_declared_grid_are_an_error(tmp_path):
    # patch_size_level0 says 512, but the patches sit 256 apart: a wrong attribute must not pass silently
    _clam_h5(
        tmp_path / "bad.h5",
        np.ones((2, 4), np.float32),
        np.array([[0, 0], [256, 0]]),
        patch_size=256,
        patch_size_level0=512,
    )
    with pytest.raises(DataError, match=r"bad\.h5.*grid"):
        read_slide(tmp_path / "bad.h5")


def test_clam_pt_has_no_coords(tmp_path):
    torch.save(torch.randn(5, 7), tmp_path / "p.pt")
    sf = read_slide(tmp_path / "p.pt")
    assert sf.features.shape == (5, 7) and sf.features.dtype == np.float32 and sf.coords is None


def test_missing_features_dataset_names_the_file(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["feats"] = np.ones((2, 2))
    with pytest.raises(DataError, match=r"x\.h5.*no 'features' dataset"):
        read_slide(tmp_path / "x.h5")


def test_extra_datasets_are_kept(tmp_path):
    write_trident_h5(
        tmp_path / "r.h5",
        np.ones((3, 2), np.float32),
        np.array([[0, 0], [512, 0], [1024, 0]]),
        extras={"relevance": np.array([0.0, 1.0, 0.0], np.float32)},
    )
    np.testing.assert_allclose(read_slide(tmp_path / "r.h5").extras["relevance"], [0, 1, 0])


@pytest.mark.parametrize(
    ("features", "coords", "dataset"),
    [
        (np.zeros((6, 8)), np.zeros((6, 3)), "coords"),  # (N, 3) must not be reread as (9, 2)
        (np.zeros((6, 8)), np.zeros((12,)), "coords"),  # flat coords
        (np.zeros((6, 8)), np.zeros((2, 6, 2)), "coords"),
        (np.zeros((6,)), np.zeros((6, 2)), "features"),
        (np.zeros((2, 6, 8)), np.zeros((6, 2)), "features"),
        (np.array([b"a", b"b"]), np.zeros((2, 2)), "features"),
    ],
)
def test_arrays_of_the_wrong_shape_are_refused_naming_file_and_dataset(tmp_path, features, coords, dataset):
    path = tmp_path / "s.h5"
    _clam_h5(path, features, coords, patch_size=256, downsample=1.0)
    with pytest.raises(DataError, match=rf"s\.h5: dataset '{dataset}'"):
        read_slide(path)


def test_clam_style_leading_axis_of_one_is_accepted(tmp_path):
    feats = np.ones((1, 4, 8), dtype=np.float32)
    _clam_h5(
        tmp_path / "s.h5", feats, np.zeros((1, 4, 2)) + np.arange(4)[None, :, None] * 256, patch_size=256
    )
    sf = read_slide(tmp_path / "s.h5")
    assert sf.features.shape == (4, 8) and sf.coords.shape == (4, 2)


@pytest.mark.parametrize(
    "obj",
    [torch.zeros(3, 4, 5), torch.zeros(7), {"features": "x"}, [1, 2], torch.zeros(3, 4, dtype=torch.int64)],
)
def test_pt_files_of_the_wrong_shape_or_type_are_refused(tmp_path, obj):
    torch.save(obj, tmp_path / "s.pt")
    with pytest.raises(DataError, match=r"s\.pt: expected"):
        read_slide(tmp_path / "s.pt")

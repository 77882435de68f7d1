"""Patch-feature files as TRIDENT and CLAM write them, read natively (no conversion step).

- TRIDENT ``.h5``: datasets ``features`` (N, D) and ``coords`` (N, 2, level-0 pixels); ``coords`` attributes
  ``patch_size``, ``patch_size_level0``, ``overlap``, ... A slide without tissue is an empty ``(0, D)`` array.
- CLAM ``.h5``: the same datasets; ``coords`` attributes ``patch_size``, ``patch_level``, ``downsample``.
- CLAM ``.pt``: a bare ``(N, D)`` tensor, no coordinates.

Coordinates are returned in grid units (one patch step = 1). The step is taken from ``patch_size_level0``
(TRIDENT), else ``patch_size × downsample`` (CLAM), else the smallest spacing between distinct coordinates;
coordinates that do not sit on that grid are an error, never silently rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import DataError
from ..names import unsafe_reason

__all__ = ["FEATURE_SUFFIXES", "SlideFeatures", "feature_path", "read_slide", "write_trident_h5"]

FEATURE_SUFFIXES = (".h5", ".pt")


@dataclass
class SlideFeatures:
    """Features of one slide as read from disk.

    Attributes:
        features: float32 array ``(N, D)``.
        coords: grid-unit coordinates ``(N, 2)`` (float32), or None when the file has none.
        step_level0: level-0 pixels per grid step used for the conversion, or None.
        extras: any other ``(N, ...)`` datasets in the file (e.g. the synthetic ``relevance``).
    """

    features: np.ndarray
    coords: np.ndarray | None
    step_level0: float | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def feature_path(folder: Path, slide_id: str) -> Path | None:
    """The feature file of ``slide_id`` in ``folder`` (``.h5`` preferred over ``.pt``), or None.

    A slide_id that is not a plain file name (``../x``, an absolute path, NUL) is never looked up."""
    if unsafe_reason(slide_id) is not None:
        return None
    for suffix in FEATURE_SUFFIXES:
        p = folder / f"{slide_id}{suffix}"
        if p.is_file():
            return p
    return None


def _attr(attrs: h5py.AttributeManager, name: str) -> float | None:
    if name not in attrs:
        return None
    value = np.asarray(attrs[name]).ravel()
    return float(value[0]) if value.size else None


def _grid_step(path: Path, coords: np.ndarray, attrs: h5py.AttributeManager) -> float:
    """Level-0 pixels per patch step, from attributes when present, else from the coordinates."""
    size0 = _attr(attrs, "patch_size_level0")
    size = _attr(attrs, "patch_size")
    overlap = _attr(attrs, "overlap") or 0.0
    if size0 is not None:
        step = size0 * (size - overlap) / size if size and overlap else size0
    elif size is not None and "downsample" in attrs:
        step = (size - overlap) * _attr(attrs, "downsample")
    else:
        spacings = [np.diff(np.unique(coords[:, j])) for j in range(2)]
        positive = np.concatenate([s[s > 0] for s in spacings])
        step = float(positive.min()) if positive.size else 1.0
    if step <= 0:
        raise DataError(f"patch step {step} from the coords attributes is not positive", path)
    rel = (coords - coords.min(axis=0)) / step
    if np.abs(rel - rel.round()).max(initial=0.0) > 1e-3:
        raise DataError(
            f"coordinates do not lie on a grid of step {step:g} level-0 pixels (from the file's "
            "patch_size_level0 / patch_size x downsample attributes, or the smallest spacing)",
            path,
            "check that 'coords' are level-0 pixel positions and that the coords attributes describe "
            "the patching (TRIDENT: patch_size_level0; CLAM: patch_size and downsample).",
        )
    return step


def _dataset(f: h5py.File, name: str, path: Path, width: int | None, dtype: type = np.float32) -> np.ndarray:
    """Dataset ``name`` as a ``(N, width)`` array of ``dtype`` (any width when None), refused when its shape or type
    is not the one TRIDENT/CLAM define. A leading axis of length one (CLAM's ``(1, N, D)``) is dropped."""
    ds = f[name]
    shape = ds.shape
    if not isinstance(ds, h5py.Dataset) or not np.issubdtype(ds.dtype, np.number):
        raise DataError(
            f"dataset {name!r} is not numeric (type {getattr(ds, 'dtype', type(ds).__name__)})",
            path,
            "re-extract the slide with TRIDENT or CLAM.",
        )
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or (width is not None and shape[1] != width):
        expected = f"(N, {width})" if width is not None else "(N, D)"
        raise DataError(
            f"dataset {name!r} has shape {ds.shape}, expected {expected}",
            path,
            "re-extract the slide with TRIDENT or CLAM; bench does not reshape arrays it does not recognise.",
        )
    return np.asarray(ds[()], dtype=dtype).reshape(shape)


def read_slide(path: str | Path) -> SlideFeatures:
    """Read one TRIDENT/CLAM ``.h5`` or CLAM ``.pt`` feature file."""
    path = Path(path)
    if not path.is_file():
        raise DataError("feature file not found", path, "check the task's 'features' folder and slide_id.")
    if path.suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot read as a torch file ({exc})", path) from exc
        if isinstance(obj, dict) and "features" in obj:
            obj = obj["features"]
        if not isinstance(obj, torch.Tensor) or not obj.dtype.is_floating_point:
            raise DataError(
                f"expected a float (N, D) tensor, found {type(obj).__name__}"
                + (f" of dtype {obj.dtype}" if isinstance(obj, torch.Tensor) else ""),
                path,
                "CLAM .pt feature files hold one (N, D) tensor of patch features.",
            )
        if obj.ndim != 2:
            raise DataError(
                f"expected an (N, D) tensor, found shape {tuple(obj.shape)}",
                path,
                "CLAM .pt feature files hold one (N, D) tensor of patch features.",
            )
        return SlideFeatures(features=obj.float().numpy(), coords=None)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise DataError(
                    f"no 'features' dataset (found: {', '.join(f.keys()) or 'nothing'})",
                    path,
                    "point the task at TRIDENT/CLAM feature .h5 files (datasets 'features' and 'coords').",
                )
            feats = _dataset(f, "features", path, width=None)
            coords, step, extras = None, None, {}
            if "coords" in f:
                raw = _dataset(f, "coords", path, width=2, dtype=np.float64)
                if raw.shape[0] != feats.shape[0]:
                    raise DataError(
                        f"dataset 'coords' has {raw.shape[0]} rows but 'features' has {feats.shape[0]}",
                        path,
                        "coords and features must describe the same patches, one row each.",
                    )
                if not np.isfinite(raw).all():
                    raise DataError(
                        "dataset 'coords' has NaN or infinite values", path, "re-extract the slide."
                    )
                step = _grid_step(path, raw, f["coords"].attrs) if raw.shape[0] else 1.0
                coords = (raw / step).astype(np.float32)
            for key in f:
                if key not in ("features", "coords") and isinstance(f[key], h5py.Dataset):
                    value = f[key][()]
                    if np.ndim(value) >= 1 and len(value) == feats.shape[0]:
                        extras[key] = np.asarray(value)
    except OSError as exc:
        raise DataError(f"cannot open as HDF5 ({exc})", path, "re-extract or re-copy the file.") from exc
    return SlideFeatures(features=feats, coords=coords, step_level0=step, extras=extras)


def write_trident_h5(
    path: str | Path,
    features: np.ndarray,
    coords_level0: np.ndarray,
    patch_size: int = 256,
    patch_size_level0: int = 512,
    encoder: str = "",
    extras: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a feature file exactly as TRIDENT lays it out (used by the synthetic cohorts and the tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features).attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=np.asarray(coords_level0, dtype=np.int64))
        c.attrs["patch_size"] = patch_size
        c.attrs["patch_size_level0"] = patch_size_level0
        c.attrs["overlap"] = 0
        c.attrs["level0_magnification"] = 40 if patch_size_level0 == 2 * patch_size else 20
        c.attrs["target_magnification"] = 20
        for key, value in (extras or {}).items():
            f.create_dataset(key, data=value)
    tmp.replace(path)

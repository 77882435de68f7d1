"""A cohort: labels, patch features and optional omics of one set of slides, checked and kept in memory.

Checks collect every problem before failing, so ``bench data check`` can list them all at once and a run
fails before any training with one message naming the files and the fixes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from methods.base import Bag, MethodCfg

from ..config import TaskConfig, cache_root
from ..csvio import read_table
from ..errors import DataError
from ..names import normalisation_clashes, unsafe_reason
from ..tasktypes import survival_strata, task_type, time_bin_index
from .featurestore import StoredSlide, load_or_store, nonfinite_patches, store_root
from .formats import SlideFeatures, feature_path, read_slide
from .graph import load_or_build_graph
from .sites import read_sites

__all__ = [
    "Cohort",
    "graph_settings",
    "load_cohort",
    "load_cohorts",
    "raise_problems",
    "read_slide_cached",
    "slide_bag",
]

ID_COLS = ("case_id", "slide_id")


@dataclass
class Cohort:
    """Slides of one cohort with their patient labels.

    Attributes:
        name: ``internal`` or the external cohort's name.
        slides: one row per slide: case_id, slide_id, label (class index; survival: the splits' stratum,
            event × time bin), path (feature file); survival: time, event; and site with ``split_by: site``
            (internal cohort).
        dim: feature width D, read from the files.
        omics: raw omics (case_id index, one column per gene), or None.
    """

    name: str
    slides: pd.DataFrame
    dim: int
    omics: pd.DataFrame | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def patients(self) -> pd.DataFrame:
        """One row per patient: case_id, label."""
        return self.slides.groupby("case_id", sort=True)["label"].first().reset_index()

    def bags(
        self,
        slide_ids: Sequence[str] | None = None,
        omics: pd.DataFrame | None = None,
        graph: tuple[int, bool, Path] | None = None,
        time_edges: np.ndarray | None = None,
    ) -> list[Bag]:
        """Bags of the given slides (all by default); ``omics`` = transformed table to attach (train only);
        ``graph`` = (k, symmetric, cache_dir) to attach spatial kNN graphs; ``time_edges`` (survival): the
        fold's time bins, each bag's label its bin, with its event and time."""
        rows = (
            self.slides
            if slide_ids is None
            else self.slides.set_index("slide_id").loc[list(slide_ids)].reset_index()
        )
        if time_edges is not None:
            bins = time_bin_index(rows.time.to_numpy(), time_edges)
            return [
                dataclasses.replace(
                    bag,
                    label=torch.tensor(int(k)),
                    event=torch.tensor(int(e)),
                    time=torch.tensor(float(t), dtype=torch.float64),
                )
                for bag, k, e, t in zip(
                    self.bags(slide_ids, omics, graph), bins, rows.event, rows.time, strict=True
                )
            ]
        return [
            slide_bag(
                r.path,
                int(r.label),
                r.slide_id,
                r.case_id,
                graph,
                None if omics is None or r.case_id not in omics.index else omics.loc[r.case_id],
            )
            for r in rows.itertuples(index=False)
        ]


def graph_settings(cfg: MethodCfg) -> tuple[int, bool, Path] | None:
    """``(k, symmetric, cache folder)`` of the spatial kNN graph a method's config asks for, or None."""
    return (cfg.graph_k, cfg.graph_symmetric, cache_root() / "graphs") if cfg.needs().graph else None


def slide_bag(
    path: str | Path,
    label: int,
    slide_id: str,
    case_id: str,
    graph: tuple[int, bool, Path] | None = None,
    omics: pd.Series | None = None,
) -> Bag:
    """The bag of one slide's feature file: the one place a :class:`Bag` is built from disk. ``graph`` =
    :func:`graph_settings` to attach the spatial kNN graph (cached); ``omics`` = the patient's transformed
    gene vector (training only)."""
    sf = read_slide_cached(path)
    edge_index = None
    if graph is not None:
        k, symmetric, cache_dir = graph
        edge_index = load_or_build_graph(Path(path), sf.coords, k, symmetric, cache_dir)
    return Bag(
        features=torch.from_numpy(sf.features),
        label=torch.tensor(label),
        coords=None if sf.coords is None else torch.from_numpy(sf.coords),
        edge_index=edge_index,
        omics=None if omics is None else torch.tensor(omics.to_numpy(np.float32)),
        slide_id=slide_id,
        case_id=case_id,
    )


@cache
def _read_slide_memo(path: str, mtime_ns: int, size: int, root: Path | None) -> StoredSlide:
    if root is not None:
        try:
            return load_or_store(path, root)
        except OSError as exc:
            warnings.warn(
                f"{root}: cannot use the shared feature store ({exc}); every process reads its own copy of the "
                "features. Fix: point BENCH_CACHE (or BENCH_FEATURE_STORE) at a writable folder with room for "
                "the cohort's features.",
                stacklevel=4,
            )
    sf = read_slide(path)
    return StoredSlide(sf, nonfinite_patches(sf.features))


def _stored(path: str | Path) -> StoredSlide:
    st = Path(path).stat()
    return _read_slide_memo(str(path), st.st_mtime_ns, st.st_size, store_root())


def read_slide_cached(path: str | Path) -> SlideFeatures:
    """Read a feature file once per process (keyed by path, mtime and size), then serve it from memory: the
    machine's one memory-mapped copy in the feature store (bench/data/featurestore.py), or this process's own
    copy when the store is off or cannot be written."""
    return _stored(path).slide


def _read_labels(
    task: TaskConfig, path: Path, problems: list[str], sites: bool = False
) -> pd.DataFrame | None:
    """case_id, slide_id, label (class index, bench/tasktypes.py; survival: time, event) of a labels CSV,
    every problem collected; ``sites``: also the
    ``site`` of each slide (:func:`bench.data.sites.read_sites`)."""
    if not path.is_file():
        problems.append(f"{path}: labels file not found. Fix: correct 'labels' in {task.path}.")
        return None
    try:
        df = read_table(path, ids=None)
    except DataError as exc:
        problems.append(str(exc))
        return None
    site_col = [task.site_col] if sites and task.site_col else []
    label_cols = [task.time_col, task.event_col] if task.type == "survival" else [task.label_col]
    missing = [c for c in (*ID_COLS, *label_cols, *site_col) if c not in df.columns]
    if missing:
        needed = (
            f"time_col '{task.time_col}' and event_col '{task.event_col}'"
            if task.type == "survival"
            else f"label_col '{task.label_col}'"
        )
        problems.append(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)}). "
            f"Fix: the labels CSV needs case_id, slide_id and the task's {needed}"
            + (f" and site_col '{task.site_col}'." if site_col else ".")
        )
        return None
    df = df[[*ID_COLS, *label_cols, *site_col]].rename(
        columns={label_cols[0]: "raw_label", **{c: "site" for c in site_col}}
    )
    for col in ID_COLS:
        df[col] = df[col].str.strip()
    empty = df[(df.case_id == "") | (df.slide_id == "")]
    if len(empty):
        problems.append(
            f"{path}: {len(empty)} row(s) with an empty case_id or slide_id. Fix: fill or remove them."
        )
    _check_ids(df, path, problems)
    dup = df.slide_id[df.slide_id.duplicated()].unique()
    if len(dup):
        problems.append(f"{path}: slide_id(s) listed twice: {', '.join(dup[:5])}. Fix: one row per slide.")
    if task.type == "survival":
        df = _survival_labels(task, df.rename(columns={"raw_label": "raw_time"}), path, problems)
        key = ["time", "event"]
    else:
        kind = task_type(task)
        df["label"], unknown = kind.encode(task, df.raw_label)
        if unknown:
            where = "'classes'" if kind.name == "multiclass" else "'positive'/'negative'"
            problems.append(
                f"{path}: label column '{task.label_col}' has value(s) {unknown!r} that are not in the task's "
                f"classes ({kind.describe(task)}). Fix: correct the CSV, or list the values under {where} in "
                "the task YAML."
            )
        key = ["label"]
    mixed = df.groupby("case_id")[key].nunique().max(axis=1)
    mixed = mixed[mixed > 1].index
    if len(mixed):
        problems.append(
            f"{path}: patient(s) {', '.join(mixed[:5])} have slides with different labels; labels are patient-level. "
            "Fix: give every slide of a patient the same label."
        )
    if sites:
        df["site"] = read_sites(task, df, path, problems)
    return df.drop(columns=[c for c in ("raw_label", "raw_time", task.event_col) if c in df.columns])


def _survival_labels(task: TaskConfig, df: pd.DataFrame, path: Path, problems: list[str]) -> pd.DataFrame:
    """``time`` (float, >= 0) and ``event`` (1 event, 0 censored) of a survival task's labels, every bad
    row counted in one problem per column."""
    time = pd.to_numeric(df.raw_time, errors="coerce")
    bad_time = df.slide_id[~np.isfinite(time) | (time < 0)]
    if len(bad_time):
        problems.append(
            f"{path}: time column '{task.time_col}' is missing, not a number or negative for {len(bad_time)} "
            f"slide(s) ({', '.join(bad_time[:5])}). Fix: give every slide its patient's follow-up time "
            f"(>= 0, in {task.time_unit}), or remove those rows."
        )
    event = df[task.event_col].str.strip()
    bad_event = df.slide_id[~event.isin(["0", "1"])]
    if len(bad_event):
        problems.append(
            f"{path}: event column '{task.event_col}' must be 1 (event) or 0 (censored); {len(bad_event)} "
            f"slide(s) have another value ({', '.join(bad_event[:5])}, e.g. {event[~event.isin(['0', '1'])].iloc[0]!r}). "
            "Fix: code the event as 0/1."
        )
    df = df.assign(time=time.fillna(-1.0), event=event.map({"0": 0, "1": 1}).fillna(-1).astype(int))
    valid = (df.time >= 0) & (df.event >= 0)
    strata = np.zeros(len(df), dtype=int)
    if valid.all() and (df.event == 1).sum() >= task.time_bins:
        strata = survival_strata(df.time.to_numpy(), df.event.to_numpy())
    elif valid.all():
        problems.append(
            f"{path}: {int((df.event == 1).sum())} slide(s) with an event cannot cut {task.time_bins} time bins. "
            f"Fix: lower 'time_bins' in {task.path}, or add patients with events."
        )
    return df.assign(label=strata)


def _check_ids(df: pd.DataFrame, path: Path, problems: list[str]) -> None:
    """Refuse IDs that cannot be file names (a slide_id names its feature file; IDs name report files)."""
    for col in ID_COLS:
        for row, value in zip(df.index, df[col], strict=True):
            reason = unsafe_reason(value) if value else None
            if reason:
                problems.append(
                    f"{path}: row {row + 2} has {col} {value!r}, which cannot name a file: {reason}. "
                    f"Fix: rename the {col} (and its feature file) without path characters."
                )
        clashes = normalisation_clashes(df[col].unique())
        if clashes:
            a, b = clashes[0]
            problems.append(
                f"{path}: {col}s {a!r} and {b!r} differ only in Unicode normalisation and would name the same "
                f"file on some file systems ({len(clashes)} such pair(s)). Fix: spell each ID one way (NFC)."
            )


def _check_features(df: pd.DataFrame, folder: Path, problems: list[str]) -> tuple[pd.DataFrame, int | None]:
    """Find each slide's file and check shapes from the headers (cheap: no feature is read)."""
    if not folder.is_dir():
        problems.append(f"{folder}: features folder not found. Fix: correct 'features' in the task YAML.")
        return df, None
    paths = [feature_path(folder, s) for s in df.slide_id]
    missing = [s for s, p in zip(df.slide_id, paths, strict=True) if p is None]
    if missing:
        problems.append(
            f"{folder}: no feature file for {len(missing)} slide(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}). Fix: extract them, or remove those rows from the labels CSV."
        )
    df = df.assign(path=[str(p) if p else "" for p in paths])
    dims: dict[int, list[str]] = {}
    for slide_id, p in zip(df.slide_id, paths, strict=True):
        if p is None:
            continue
        try:
            shape = _feature_shape(p)
        except Exception as exc:
            problems.append(f"{p}: cannot read ({exc}). Fix: re-extract or re-copy the file.")
            df.loc[df.slide_id == slide_id, "path"] = ""  # one message per file: its values are not read
            continue
        if len(shape) != 2 or shape[0] == 0:
            problems.append(
                f"{p}: slide {slide_id} has an empty or malformed bag (features shape {shape}). "
                "Fix: remove the slide from the labels CSV (no tissue found) or re-extract it."
            )
            continue
        dims.setdefault(shape[1], []).append(str(p))
    if len(dims) > 1:
        detail = "; ".join(f"D={d}: {len(ps)} file(s), e.g. {ps[0]}" for d, ps in sorted(dims.items()))
        problems.append(
            f"{folder}: feature widths disagree across slides ({detail}). Fix: use one encoder's features."
        )
    dim = max(dims, key=lambda d: len(dims[d])) if dims else None
    return df, dim


def _feature_shape(path: Path) -> tuple[int, ...]:
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError("no 'features' dataset")
            shape = f["features"].shape
            return shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
    return tuple(read_slide_cached(path).features.shape)


def _check_values(df: pd.DataFrame, problems: list[str]) -> None:
    """Reject NaN/inf features (counted once per file as it enters the store, so a cohort already stored is
    checked without touching its features)."""
    for slide_id, p in zip(df.slide_id, df.path, strict=True):
        if not p:
            continue
        try:
            bad = _stored(p).nonfinite
        except DataError as exc:
            problems.append(str(exc))
            continue
        if bad:
            problems.append(
                f"{p}: slide {slide_id} has NaN/inf features in {bad} patch(es). Fix: re-extract the slide or drop it."
            )


def _read_omics(task: TaskConfig, cases: pd.Index, problems: list[str]) -> pd.DataFrame | None:
    path = task.omics
    if path is None:
        return None
    if not path.is_file():
        problems.append(f"{path}: omics file not found. Fix: correct 'omics' in {task.path} or remove it.")
        return None
    try:
        df = read_table(path, ids=("case_id",))
    except DataError as exc:
        problems.append(str(exc))
        return None
    if "case_id" not in df.columns:
        problems.append(f"{path}: no 'case_id' column. Fix: the omics CSV is case_id + one column per gene.")
        return None
    df = df.set_index(df.case_id.str.strip()).drop(columns="case_id")
    non_numeric = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        problems.append(
            f"{path}: non-numeric gene column(s) {non_numeric[:5]}. Fix: only numbers after case_id."
        )
        return None
    if df.index.duplicated().any():
        problems.append(f"{path}: case_id(s) listed twice. Fix: one row per patient.")
    values = df.to_numpy(np.float64)
    if not np.isfinite(values).all():
        problems.append(f"{path}: missing or non-finite values. Fix: impute them or drop those genes.")
    if task.omics_log1p and (values < 0).any():
        problems.append(
            f"{path}: negative values, but the task applies log2(x+1). "
            f"Fix: set 'omics_log1p: false' in {task.path} if the values are already log-transformed."
        )
    if not len(df.index.intersection(cases)):
        problems.append(f"{path}: no case_id in common with the labels CSV. Fix: use the same patient IDs.")
    if task.omics_select is not None and task.omics_select.k > df.shape[1]:
        problems.append(
            f"{path}: omics_select keeps k = {task.omics_select.k} genes but the file has {df.shape[1]}. "
            f"Fix: lower 'k' under 'omics_select' in {task.path}, or remove 'omics_select' to use every gene."
        )
    return df.astype(np.float32)


def load_cohort(task: TaskConfig, cohort: str = "internal", check_values: bool = True) -> Cohort:
    """Load and check a cohort of ``task`` (``internal`` or an external cohort's name).

    Every problem found is collected in ``Cohort.problems``; callers that train raise them all at once
    (``raise_problems``), ``bench data check`` prints them.
    """
    problems: list[str] = []
    if cohort == "internal":
        labels_path, features_dir = task.labels, task.features
    else:
        ext = next(e for e in task.external if e.name == cohort)
        labels_path, features_dir = ext.labels, ext.features
    df = _read_labels(task, labels_path, problems, sites=cohort == "internal" and task.split_by == "site")
    if df is None:
        return Cohort(cohort, pd.DataFrame(columns=[*ID_COLS, "label", "path"]), 0, None, problems)
    df, dim = _check_features(df, features_dir, problems)
    if check_values:
        _check_values(df, problems)
    omics = _read_omics(task, pd.Index(df.case_id.unique()), problems) if cohort == "internal" else None
    if cohort == "internal" and task.require_omics and omics is not None:
        df = df[df.case_id.isin(omics.index)].reset_index(drop=True)
    return Cohort(cohort, df.reset_index(drop=True), dim or 0, omics, problems)


def load_cohorts(task: TaskConfig) -> tuple[Cohort, dict[str, Cohort], list[str]]:
    """The internal cohort, each external cohort by name, and every problem found in any of them,
    including an external cohort whose feature width differs from the internal one's."""
    internal = load_cohort(task, "internal")
    problems = list(internal.problems)
    externals: dict[str, Cohort] = {}
    for ext in task.external:
        cohort = externals[ext.name] = load_cohort(task, ext.name)
        problems += cohort.problems
        if not cohort.problems:
            problems += _class_problems(task, ext.labels, cohort)
        if internal.dim and cohort.dim and cohort.dim != internal.dim:
            problems.append(
                f"{ext.features}: external cohort {ext.name!r} has D={cohort.dim} features but the internal "
                f"cohort has D={internal.dim}. Fix: extract both cohorts with the same encoder."
            )
    return internal, externals, problems


def _class_problems(task: TaskConfig, labels: Path, cohort: Cohort) -> list[str]:
    """An external cohort whose patients are all of one class (or that has none) gives no AUC: an error."""
    if task.type == "survival":
        return []
    counts = cohort.patients.label.value_counts()
    if len(counts) >= 2:
        return []
    kind = task_type(task)
    found = (
        "no patients"
        if counts.empty
        else f"only {kind.class_name(int(counts.index[0]))} patients ({int(counts.iloc[0])})"
    )
    where = "'classes'" if kind.name == "multiclass" else "'positive'/'negative'"
    return [
        f"{labels}: external cohort {cohort.name!r} has {found} once its '{task.label_col}' values are mapped "
        f"({kind.describe(task).replace('one other', 'other')}); its AUC would be undefined. "
        f"Fix: check that the cohort codes labels as the task's {where} values, or remove it from 'external'."
    ]


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one DataError listing every problem, or do nothing."""
    if problems:
        raise DataError(" | ".join(problems) + ("" if len(problems) == 1 else f" ({len(problems)} problems)"))

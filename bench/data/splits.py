"""Patient-level splits in Patho-Bench's long format, made here or imported from Patho-Bench / CLAM files.

The table has one row per slide: ``case_id, slide_id, label, fold_0 … fold_{k-1}``, each fold cell
``train``, ``val`` or ``test``. A patient is always in exactly one part of every fold. Splits made with
``split_by: site`` group patients by tissue source site (a ``site`` column, kept in the table): a site is
then in one part of every fold too, so no stain or scanner signature is shared by training and test patients
(Howard et al., Nature Communications 2021).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from ..config import TaskConfig
from ..errors import DataError

__all__ = [
    "PARTS",
    "check_splits",
    "fold_columns",
    "fold_parts",
    "make_splits",
    "membership_digest",
    "read_splits",
    "split_grouping",
]

PARTS = ("train", "val", "test")
TCGA_BARCODE = "TCGA barcode"  # where a site comes from without site_col: the barcode's tissue source site


def fold_columns(splits: pd.DataFrame) -> list[str]:
    return sorted((c for c in splits.columns if c.startswith("fold_")), key=lambda c: int(c.split("_")[1]))


def make_splits(
    slides: pd.DataFrame, folds: int, seed: int, val_fraction: float, by: str = "patient"
) -> pd.DataFrame:
    """Stratified k-fold over patients (seeded), then validation patients carved from each training part
    (stratified). ``slides`` has case_id, slide_id, label (and site, for ``by="site"``).

    ``by="site"``: stratified group k-fold over patients grouped by site (sklearn's ``StratifiedGroupKFold``),
    and the validation part is one fold of a stratified group J-fold split of the training part's sites,
    J = ``round(1 / val_fraction)`` (at most the number of those sites, at least 2), the first whose
    validation and training parts both hold every class: its share of patients is about 1 / J, not exactly
    ``val_fraction`` (sites are indivisible).
    """
    patients = slides.groupby("case_id", sort=True)["label"].first()
    _check_design(patients.value_counts(), folds, val_fraction)
    cases, y = patients.index.to_numpy(), patients.to_numpy()
    columns = ["case_id", "slide_id", "label"]
    if by == "site":
        sites = slides.groupby("case_id", sort=True)["site"].first().to_numpy()
        _check_site_design(patients, sites, folds)
        parts = _site_folds(y, sites, folds, seed, val_fraction)
        columns.append("site")
    else:
        parts = _patient_folds(y, folds, seed, val_fraction)
    table = slides[columns].copy()
    try:
        for k, (va, test_idx) in enumerate(parts):
            part = pd.Series("train", index=cases)
            part.iloc[va] = "val"
            part.iloc[test_idx] = "test"
            table[f"fold_{k}"] = table.case_id.map(part).to_numpy()
    except ValueError as exc:  # a corner the check above does not foresee: still one paragraph
        raise DataError(
            f"cannot split {len(cases)} patients ({patients.value_counts().to_dict()}) into {folds} folds "
            f"with val_fraction {val_fraction}{' by site' if by == 'site' else ''}: {exc}",
            fix="use fewer folds, a larger val_fraction, or add patients of the rarer class.",
        ) from exc
    try:
        check_splits(
            table, source=f"{folds}-fold CV of {patients.value_counts().to_dict()} patients per class"
        )
    except DataError as exc:
        raise DataError(f"{exc} (val_fraction {val_fraction}, seed {seed}, split by {by})") from exc
    return table


def _patient_folds(y: np.ndarray, folds: int, seed: int, val_fraction: float) -> Iterator[tuple]:
    """(validation, test) patient positions of each fold: stratified k-fold, stratified validation carve."""
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (train_idx, test_idx) in enumerate(skf.split(np.zeros(len(y)), y)):
        _, va = train_test_split(
            train_idx, test_size=val_fraction, stratify=y[train_idx], random_state=seed + k
        )
        yield va, test_idx


def _site_folds(
    y: np.ndarray, sites: np.ndarray, folds: int, seed: int, val_fraction: float
) -> Iterator[tuple]:
    """(validation, test) patient positions of each fold, every site in one part (see :func:`make_splits`)."""
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (train_idx, test_idx) in enumerate(outer.split(np.zeros(len(y)), y, sites)):
        n_val = min(max(2, round(1 / val_fraction)), len(set(sites[train_idx])))
        inner = StratifiedGroupKFold(n_splits=n_val, shuffle=True, random_state=seed + k)
        splits = list(inner.split(train_idx, y[train_idx], sites[train_idx]))
        classes = len(set(y))
        both = [
            va
            for tr, va in splits
            if len(set(y[train_idx[tr]])) == classes and len(set(y[train_idx[va]])) == classes
        ]
        yield train_idx[both[0] if both else splits[0][1]], test_idx


def _check_site_design(patients: pd.Series, sites: np.ndarray, folds: int) -> None:
    """Refuse, before any split is drawn, a site-level design with too few sites of a class for every fold's
    test, validation and training parts to hold one (a site lies in one part of a fold)."""
    per_class = pd.Series(sites).groupby(patients.to_numpy()).nunique()
    need = next(
        n for n in range(folds, folds + 4) if n - -(-n // folds) >= 2
    )  # 2 sites left out of a test part
    for label, n in per_class.items():
        if n < need:
            raise DataError(
                f"split_by: site keeps each tissue source site in one part of every fold, so each class needs "
                f"patients at a site of its own in every fold's test, validation and training parts: at least "
                f"{need} sites with patients of each class for {folds} folds; class {label} has patients at "
                f"{n} site(s) (sites per class: {per_class.to_dict()}; {len(set(sites))} sites in all)",
                fix="lower 'folds' (or --folds), use 'split_by: patient', or add patients from more sites.",
            )


def split_grouping(task: TaskConfig) -> dict[str, str | None]:
    """How a task's splits group patients, as recorded in each fold's config and stated by the report:
    ``by`` patient, site (``site_from``: the labels column, or the TCGA barcode) or imported (``file``)."""
    if task.splits is not None:
        return {"by": "imported", "file": str(task.splits)}
    if task.split_by == "site":
        return {"by": "site", "site_from": task.site_col or TCGA_BARCODE}
    return {"by": "patient"}


def _check_design(counts: pd.Series, folds: int, val_fraction: float) -> None:
    """Refuse, before any split is drawn, a design that cannot give every fold's test, validation and training
    parts at least one patient of each class (the numbers and the fix in the message)."""
    fix = "lower 'folds' (or --folds), change 'val_fraction', or add patients of the rarer class."
    if len(counts) < 2:
        raise DataError(
            f"the labels have one class only ({counts.to_dict()}); a task needs patients of at least two",
            fix="check 'positive'/'negative' (or 'classes') in the task YAML against the label column's values.",
        )
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must be between 0 and 1 (exclusive)", fix=fix)
    for label, n in counts.items():
        if n < folds:
            raise DataError(
                f"stratified {folds}-fold CV needs at least {folds} patients of each class; class {label} has "
                f"{n} (all classes: {counts.to_dict()})",
                fix=fix,
            )
        train = n - -(-n // folds)  # the fewest of this class a training part can keep
        if train < 2:
            raise DataError(
                f"class {label} has {n} patients, so in {folds}-fold CV a training part keeps as few as "
                f"{train}, but it needs one for training and one for validation",
                fix=fix,
            )
    n_train = int(counts.sum()) - -(-int(counts.sum()) // folds)
    if -(-val_fraction * n_train // 1) < len(counts):
        raise DataError(
            f"val_fraction {val_fraction} of a {n_train}-patient training part gives fewer validation "
            f"patients than the {len(counts)} classes",
            fix=fix,
        )


def read_splits(path: Path, slides: pd.DataFrame) -> pd.DataFrame:
    """Import a Patho-Bench TSV (one row per slide, fold_k columns) or a folder of CLAM ``splits_{k}.csv``."""
    if path.is_dir():
        files = sorted(path.glob("splits_*.csv"), key=lambda p: int(p.stem.split("_")[1]))
        if not files:
            raise DataError(
                "no splits_{k}.csv files in the folder", path, "point 'splits' at CLAM's split folder."
            )
        table = slides[["case_id", "slide_id", "label"]].copy()
        for k, f in enumerate(files):
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
            missing = [c for c in PARTS if c not in df.columns]
            if missing:
                raise DataError(
                    f"missing column(s) {missing}", f, "CLAM split files have train, val, test columns."
                )
            part = {s: name for name in PARTS for s in df[name] if s}
            table[f"fold_{k}"] = table.slide_id.map(part)
    else:
        if not path.is_file():
            raise DataError("splits file not found", path, "correct 'splits' in the task YAML.")
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        if "slide_id" not in df.columns or not fold_columns(df):
            raise DataError("expected a Patho-Bench TSV with slide_id and fold_0 … fold_k columns", path)
        df = df.set_index("slide_id")[fold_columns(df)]
        table = slides[["case_id", "slide_id", "label"]].join(df, on="slide_id")
    for col in fold_columns(table):
        unassigned = table.slide_id[table[col].isna()]
        if len(unassigned):
            raise DataError(
                f"{len(unassigned)} slide(s) have no part in {col} (e.g. {', '.join(unassigned[:3])})",
                path,
                "every slide of the labels CSV must be in train, val or test of every fold.",
            )
    check_splits(table, source=path)
    return table


def check_splits(table: pd.DataFrame, source: Path | str = "splits") -> None:
    """Raise if any patient (or, with a ``site`` column, any site) appears in two parts of a fold, a part is
    missing, or a cell is not a part name."""
    groups = [("case_id", "patient", "split by case_id, not by slide.")]
    if "site" in table.columns:
        groups.append(("site", "site", "split by site ('split_by: site' makes such splits)."))
    for col in fold_columns(table):
        bad = set(table[col]) - set(PARTS)
        if bad:
            raise DataError(f"{col} has value(s) {sorted(bad)}; allowed: {', '.join(PARTS)}", source)
        for key, what, fix in groups:
            per_group = table.groupby(key)[col].nunique()
            leaking = per_group[per_group > 1].index
            if len(leaking):
                raise DataError(
                    f"{what}(s) {', '.join(map(str, leaking[:5]))} are in more than one part of {col}: "
                    f"{what} leakage",
                    source,
                    fix,
                )
        for part in PARTS:
            labels = table.label[table[col] == part]
            if labels.nunique() < 2:
                per_class = table[table[col] == part].groupby("label").case_id.nunique().to_dict()
                raise DataError(
                    f"{col}'s {part} part has {'no slides' if labels.empty else 'one class only'} "
                    f"(patients per class: {per_class}); AUC and early stopping need both classes",
                    source,
                    "use fewer folds, a larger val_fraction, or add patients of the rarer class.",
                )


def fold_parts(table: pd.DataFrame, fold: int) -> dict[str, list[str]]:
    """Slide ids of train / val / test in ``fold``."""
    col = f"fold_{fold}"
    return {part: table.slide_id[table[col] == part].tolist() for part in PARTS}


def membership_digest(table: pd.DataFrame, fold: int) -> str:
    """A short digest of who is where in ``fold`` (part of each job's configuration hash)."""
    col = f"fold_{fold}"
    rows = np.sort((table.slide_id + ":" + table[col]).to_numpy().astype(str))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]

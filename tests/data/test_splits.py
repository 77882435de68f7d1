"""Patient-level splits: no patient in two parts of any fold, stratification, import/export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.data.splits import check_splits, fold_columns, make_splits, read_splits
from bench.errors import DataError


def _slides(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = int(i % 4 == 0)
        for s in range(1 + int(rng.random() < 0.3)):
            rows.append((f"{i:03d}", f"{i:03d}-{s}", label))  # leading zeros must survive
    return pd.DataFrame(rows, columns=["case_id", "slide_id", "label"])


def test_no_patient_in_two_parts_and_each_patient_tested_once():
    table = make_splits(_slides(), folds=5, seed=3, val_fraction=0.2)
    cols = fold_columns(table)
    assert cols == [f"fold_{k}" for k in range(5)]
    for col in cols:
        assert (table.groupby("case_id")[col].nunique() == 1).all()
    tested = table.groupby("case_id")[cols].first().eq("test").sum(axis=1)
    assert (tested == 1).all()
    assert set(table.case_id) == set(_slides().case_id) and table.case_id.str.len().eq(3).all()


def test_stratified_and_seeded():
    a = make_splits(_slides(), 5, seed=1, val_fraction=0.2)
    b = make_splits(_slides(), 5, seed=1, val_fraction=0.2)
    c = make_splits(_slides(), 5, seed=2, val_fraction=0.2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    patients = a.groupby("case_id").first()
    for col in fold_columns(a):
        for part in ("train", "val", "test"):
            frac = patients.label[patients[col] == part].mean()
            assert abs(frac - 0.25) < 0.12


def test_too_few_patients_of_a_class():
    slides = _slides(12)
    with pytest.raises(DataError, match="at least 5 patients of each class"):
        make_splits(slides, 5, 0, 0.2)


def test_patho_bench_roundtrip(tmp_path):
    slides = _slides()
    table = make_splits(slides, 3, 0, 0.2)
    table.to_csv(tmp_path / "splits.tsv", sep="\t", index=False)
    back = read_splits(tmp_path / "splits.tsv", slides)
    pd.testing.assert_frame_equal(back[fold_columns(back)], table[fold_columns(table)])


def test_clam_folder_import(tmp_path):
    slides = _slides()
    table = make_splits(slides, 2, 0, 0.2)
    for k, col in enumerate(fold_columns(table)):
        parts = {p: pd.Series(table.slide_id[table[col] == p].tolist()) for p in ("train", "val", "test")}
        pd.DataFrame(parts).to_csv(tmp_path / f"splits_{k}.csv", index=False)
    back = read_splits(tmp_path, slides)
    assert (back[fold_columns(back)].to_numpy() == table[fold_columns(table)].to_numpy()).all()


def test_imported_split_that_leaks_a_patient_is_rejected(tmp_path):
    slides = _slides()
    table = make_splits(slides, 3, 0, 0.2)
    two = table.case_id.value_counts()
    case = two[two > 1].index[0]
    idx = table.index[table.case_id == case]
    table.loc[idx[0], "fold_0"], table.loc[idx[1], "fold_0"] = "train", "test"
    table.to_csv(tmp_path / "leaky.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match=r"leaky\.tsv.*patient leakage"):
        read_splits(tmp_path / "leaky.tsv", slides)


def test_one_class_part_is_rejected():
    table = make_splits(_slides(), 3, 0, 0.2)
    table.loc[(table.fold_1 == "val") & (table.label == 1), "fold_1"] = "train"
    with pytest.raises(DataError, match=r"fold_1's val part has one class only"):
        check_splits(table)


def _patients(pos: int, neg: int) -> pd.DataFrame:
    n = pos + neg
    return pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in range(n)],
            "slide_id": [f"s{i}" for i in range(n)],
            "label": [1] * pos + [0] * neg,
        }
    )


@pytest.mark.parametrize("pos", [1, 2, 3, 4, 5, 7, 12])
@pytest.mark.parametrize("folds", [2, 3, 5, 10])
@pytest.mark.parametrize("val_fraction", [0.05, 0.2, 0.5, 0.9])
def test_any_design_splits_or_is_refused_in_one_paragraph(pos, folds, val_fraction):
    """Never a scikit-learn traceback: either every part of every fold has both classes, or a DataError
    with the numbers and the fix."""
    try:
        table = make_splits(_patients(pos, 40), folds, 0, val_fraction)
    except DataError as exc:
        assert "Fix:" in str(exc) and str(folds) in str(exc)
        return
    check_splits(table)


def test_one_class_and_bad_val_fraction_are_refused():
    with pytest.raises(DataError, match="one class only"):
        make_splits(_patients(0, 30), 5, 0, 0.2)
    with pytest.raises(DataError, match=r"val_fraction 1\.5"):
        make_splits(_patients(15, 30), 5, 0, 1.5)
    with pytest.raises(DataError, match=r"class 1 has 2 patients, so in 2-fold CV.*as few as 1"):
        make_splits(_patients(2, 30), 2, 0, 0.2)
    with pytest.raises(DataError, match=r"gives fewer validation patients than the 2 classes"):
        make_splits(_patients(4, 4), 2, 0, 0.2)

"""Site-level splits (``split_by: site``): no patient and no site in two parts of a fold, sites from a column
or from TCGA barcodes, clear errors, and the grouping recorded (hashed only when it is by site)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bench.jobs as jobs
from bench.config import read_task
from bench.data.splits import check_splits, fold_columns, make_splits
from bench.errors import BenchError, DataError
from bench.report.document import _grouping_line
from bench.sweep import search_folds
from bench.taskdata import RunOptions, prepare_task


def _site_slides(n_patients: int = 90, n_sites: int = 12, seed: int = 0) -> pd.DataFrame:
    """Patients at sites of unequal size and prevalence, some with two slides."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        site = f"S{int(rng.integers(n_sites)):02d}"
        label = int(rng.random() < 0.2 + 0.04 * int(site[1:]))
        for s in range(1 + int(rng.random() < 0.3)):
            rows.append((f"{i:03d}", f"{i:03d}-{s}", label, site))
    return pd.DataFrame(rows, columns=["case_id", "slide_id", "label", "site"])


def _parts(table: pd.DataFrame, key: str, col: str) -> pd.Series:
    return table.groupby(key)[col].nunique()


def test_no_patient_and_no_site_in_two_parts():
    slides = _site_slides()
    table = make_splits(slides, folds=3, seed=1, val_fraction=0.2, by="site")
    assert (table.site.to_numpy() == slides.site.to_numpy()).all()
    for col in fold_columns(table):
        assert (_parts(table, "case_id", col) == 1).all() and (_parts(table, "site", col) == 1).all()
        for part in ("train", "val", "test"):
            assert table.label[table[col] == part].nunique() == 2
    tested = table.groupby("case_id")[fold_columns(table)].first().eq("test").sum(axis=1)
    assert (tested == 1).all()
    pd.testing.assert_frame_equal(table, make_splits(slides, 3, 1, 0.2, by="site"))
    # a patient split of the same patients puts some site on both sides of a fold
    by_patient = make_splits(slides, 3, 1, 0.2).assign(site=slides.site)
    assert any((_parts(by_patient, "site", c) > 1).any() for c in fold_columns(by_patient))


def test_too_few_sites_of_a_class():
    slides = _site_slides()
    slides["label"] = slides.site.isin(["S00", "S01"]).astype(int)  # positives at two sites only
    with pytest.raises(DataError, match=r"at least 3 sites .* for 3 folds; class 1 has patients at 2 site"):
        make_splits(slides, 3, 0, 0.2, by="site")
    slides["label"] = slides.site.isin(["S00", "S01", "S02"]).astype(int)  # 2 folds: a test part takes 2 of 3
    with pytest.raises(DataError, match=r"at least 4 sites .* for 2 folds; class 1 has patients at 3 site"):
        make_splits(slides, 2, 0, 0.2, by="site")


def test_site_leakage_in_a_table_is_refused():
    """One patient of a test site moved to training: no patient crosses, but its site does."""
    table = make_splits(_site_slides(), 3, 0, 0.2, by="site")
    check_splits(table)
    test = table[table.fold_0 == "test"].groupby("site").case_id.nunique()
    site = test.index[test > 1][0]
    case = table.case_id[table.site == site].iloc[0]
    table.loc[table.case_id == case, "fold_0"] = "train"
    with pytest.raises(
        DataError, match=f"site\\(s\\) {site} are in more than one part of fold_0: site leakage"
    ):
        check_splits(table)


def _tcga(task_path, sites: int = 8):
    """Rewrite the small task's internal case ids as TCGA barcodes spread over ``sites`` sites."""
    labels = task_path.parent / "internal" / "labels.csv"
    df = pd.read_csv(labels, dtype=str)
    codes = {
        c: f"TCGA-{'ABCDEFGHJK'[i % sites]}{i % sites}-{i:04d}" for i, c in enumerate(sorted(set(df.case_id)))
    }
    df.case_id = df.case_id.map(codes)
    df.to_csv(labels, index=False)
    omics = task_path.parent / "internal" / "omics.csv"
    om = pd.read_csv(omics, dtype={"case_id": str})
    om.case_id = om.case_id.map(codes)
    om.to_csv(omics, index=False)
    return df


def _with(task_path, text: str, name: str | None = None):
    """The task with ``text`` appended: in place, or as a new YAML ``name`` beside it."""
    out = task_path if name is None else task_path.parent / name
    out.write_text(task_path.read_text() + text)
    return out


def test_sites_from_tcga_barcodes_recorded_and_hashed(small_task, tmp_path):
    _tcga(small_task)
    opts = RunOptions(out=tmp_path / "res", quiet=True, folds=2)
    patient = prepare_task(str(small_task), opts)
    explicit = prepare_task(str(_with(small_task, "split_by: patient\n", "p.yaml")), opts)
    site = prepare_task(str(_with(small_task, "split_by: site\n")), opts)
    assert set(site.splits.site) == {f"{c}{i}" for i, c in enumerate("ABCDEFGH")}
    saved = pd.read_csv(opts.out / "toy" / "splits.tsv", sep="\t", dtype=str)
    for col in fold_columns(saved):
        assert (_parts(saved, "site", col) == 1).all() and (_parts(saved, "case_id", col) == 1).all()
    plans = {
        k: jobs.plan_job(d, jobs.Job("toy", "abmil", 0), opts)
        for k, d in [("p", patient), ("e", explicit), ("s", site)]
    }
    assert plans["p"].hash == plans["e"].hash != plans["s"].hash
    assert "split_by" not in plans["p"].config["task"] and plans["s"].config["task"]["split_by"] == "site"
    assert plans["p"].config["split_grouping"] == {"by": "patient"}
    assert plans["s"].config["split_grouping"] == {"by": "site", "site_from": "TCGA barcode"}


def test_case_ids_that_are_not_tcga_barcodes(small_task, tmp_path):
    with pytest.raises(DataError, match=r"internal/labels\.csv: split_by: site without site_col.*P-0000"):
        prepare_task(str(_with(small_task, "split_by: site\n")), RunOptions(out=tmp_path / "res"))


def test_sites_from_a_column(small_task, tmp_path):
    labels = small_task.parent / "internal" / "labels.csv"
    df = pd.read_csv(labels, dtype=str)
    df["tss"] = [f"site-{int(c[2:]) % 7}" for c in df.case_id]
    df.to_csv(labels, index=False)
    data = prepare_task(
        str(_with(small_task, "split_by: site\nsite_col: tss\n")), RunOptions(out=tmp_path / "r")
    )
    assert set(data.splits.site) == {f"site-{i}" for i in range(7)}
    df.loc[0, "tss"] = ""
    df.to_csv(labels, index=False)
    with pytest.raises(DataError, match=r"1 row\(s\) have an empty 'tss'"):
        prepare_task(str(small_task), RunOptions(out=tmp_path / "r"))
    df.drop(columns="tss").to_csv(labels, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) tss.*site_col 'tss'"):
        prepare_task(str(small_task), RunOptions(out=tmp_path / "r"))


def test_site_settings_checked_in_the_yaml(small_task):
    with pytest.raises(BenchError, match="'site_col' is read only with 'split_by: site'"):
        read_task(_with(small_task, "site_col: tss\n", "a.yaml"))
    with pytest.raises(BenchError, match="give one of the two"):
        read_task(_with(small_task, "split_by: site\nsplits: s.tsv\n", "b.yaml"))


def test_report_states_the_grouping():
    """The report's "What was run" line, from a fold's recorded ``split_grouping`` (older folds: the task)."""
    site = _grouping_line({"split_grouping": {"by": "site", "site_from": "tss"}})
    assert "**by site**" in site and "site from tss" in site
    assert "**by patient**" in _grouping_line({"task": {"splits": None}})
    assert "**imported** from `/x/s.tsv`" in _grouping_line({"task": {"splits": "/x/s.tsv"}})


def test_inner_folds_of_a_sweep_keep_sites_apart(small_task, tmp_path):
    _tcga(small_task)
    data = prepare_task(str(_with(small_task, "split_by: site\n")), RunOptions(out=tmp_path, folds=2))
    inner = search_folds(data, 0, 2)
    outer_test = set(data.splits.site[data.splits.fold_0 == "test"])
    for inner_data, j in inner:
        table = inner_data.splits
        assert (_parts(table, "site", f"fold_{j}") == 1).all()
        assert set(table.site[table[f"fold_{j}"] == "test"]) == outer_test

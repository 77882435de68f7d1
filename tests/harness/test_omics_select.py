"""`omics_select` in a run: fit per fold on training patients only, recorded, hashed, and the model built on it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

import bench.jobs as jobs
import bench.taskdata as taskdata
from bench.data.splits import fold_parts
from bench.explain import load_fold_model
from bench.taskdata import RunOptions, fold_genes, prepare_task


def _with_select(task, setting: str = "{method: gbdt, k: 4}"):
    task.write_text(task.read_text() + f"omics_select: {setting}\n")
    return task


@pytest.mark.parametrize("method", ["variance", "univariate", "gbdt"])
def test_fold_selection_never_reads_validation_or_test_patients(small_task, tmp_path, method, monkeypatch):
    """Replacing the omics and flipping the labels of every patient outside fold 0's training part leaves
    the fold's genes unchanged (each selection fit afresh: separate caches)."""
    _with_select(small_task, f"{{method: {method}, k: 4}}")
    opts = RunOptions(out=tmp_path / "res", quiet=True)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache-a"))
    ref = fold_genes(prepare_task(str(small_task), opts), 0)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache-b"))
    data = prepare_task(str(small_task), opts)
    parts = fold_parts(data.splits, 0)
    slides = data.internal.slides
    held_out = slides.case_id[~slides.slide_id.isin(parts["train"])].unique()
    omics = data.internal.omics
    rows = omics.index.isin(held_out)
    omics.loc[rows] = omics.loc[rows].to_numpy()[:, ::-1] * 7.0 + 100.0
    slides.loc[slides.case_id.isin(held_out), "label"] = 1 - slides.label[slides.case_id.isin(held_out)]
    assert fold_genes(data, 0) == ref and len(ref.genes) == 4
    assert ref.train_patients == len(
        set(slides.case_id[slides.slide_id.isin(parts["train"])]) & set(omics.index)
    )


def test_hash_changes_for_methods_that_read_omics_only(small_task, tmp_path):
    """A resumed run retrains MKD when omics_select is added (the hash moves) but not ABMIL, which reads no
    omics; a task without omics_select keeps the hashes it had before the key existed."""
    opts = RunOptions(out=tmp_path / "res", quiet=True)
    before = prepare_task(str(small_task), opts)
    after = prepare_task(str(_with_select(small_task)), opts)
    plans = {
        (m, d): jobs.plan_job(data, jobs.Job("toy", m, 0), opts)
        for m in ("abmil", "mkd")
        for d, data in (("before", before), ("after", after))
    }
    assert plans["abmil", "before"].hash == plans["abmil", "after"].hash
    assert plans["mkd", "before"].hash != plans["mkd", "after"].hash
    assert plans["mkd", "after"].config["omics_dim"] == 4 and plans["mkd", "before"].config["omics_dim"] == 12
    assert "omics_select" not in plans["mkd", "before"].config["task"]


def test_run_trains_on_the_selected_genes_and_records_them(small_task, tmp_path, monkeypatch):
    opts = RunOptions(out=tmp_path / "res", quiet=True, folds=2, epochs=1)
    widths: set[int] = set()
    real_fit = jobs.fit

    def spy(method, cfg, in_dim, omics_dim, train_bags, val_bags, *args, **kwargs):
        widths.update(
            {b.omics.numel() for b in [*train_bags, *val_bags] if b.omics is not None} | {omics_dim}
        )
        return real_fit(method, cfg, in_dim, omics_dim, train_bags, val_bags, *args, **kwargs)

    monkeypatch.setattr(jobs, "fit", spy)
    data = prepare_task(str(_with_select(small_task)), opts)
    assert jobs.run_job(data, jobs.Job("toy", "mkd", 0), opts) == "trained"
    assert widths == {4}  # training and (MKD's monitor) validation omics: the 4 selected genes
    for fold in [opts.out / "toy" / "mkd" / "fold_0"]:
        config = yaml.safe_load((fold / "config.yaml").read_text())
        sel = config["omics_selection"]
        assert sel["method"] == "gbdt" and sel["k"] == 4 and len(sel["genes"]) == 4
        assert set(sel["genes"]) <= {f"G{j}" for j in range(12)} and len(sel["genes_sha256"]) == 16
        assert config["omics_dim"] == 4 and config["task"]["omics_select"] == {"method": "gbdt", "k": 4}
        model, _ = load_fold_model(fold, torch.device("cpu"))  # `bench explain` rebuilds it from config.yaml
        assert model.omics_dim == 4


def test_gene_groups_follow_the_selected_genes(small_task, tmp_path, monkeypatch):
    """G-HANet's gene groups (omics_groups) are restricted to the fold's genes, in their order."""
    groups = pd.DataFrame({"gene": [f"G{j}" for j in range(12)], "group": [f"grp{j % 6}" for j in range(12)]})
    groups.to_csv(small_task.parent / "groups.csv", index=False)
    small_task.write_text(small_task.read_text() + "omics_groups: groups.csv\n")
    _with_select(small_task, "{method: variance, k: 5}")
    seen = []

    class Built(Exception):
        pass

    def fit(method, cfg, *args, **kwargs):
        seen.append(cfg)
        raise Built

    monkeypatch.setattr(jobs, "fit", fit)
    data = prepare_task(str(small_task), RunOptions(out=tmp_path / "res", quiet=True))
    cfg = jobs.method_config(data, "ghanet", RunOptions())
    assert len(cfg.gene_groups) == 12
    with pytest.raises(Built):
        jobs.train_fold(data, 0, "ghanet", cfg, torch.device("cpu"))
    genes = fold_genes(data, 0).genes
    assert seen[0].gene_groups == tuple(int(g[1:]) % 6 for g in genes)


def test_a_sweep_s_inner_folds_get_their_own_selection(small_task, tmp_path):
    """Inner fold 0 of a nested sweep reuses fold number 0 but not outer fold 0's genes: its selection is
    fit on its own training patients, none of them a test patient of the outer fold searched."""
    from bench.sweep import search_folds

    _with_select(small_task, "{method: univariate, k: 3}")
    data = prepare_task(str(small_task), RunOptions(out=tmp_path / "res", quiet=True))
    outer = fold_genes(data, 0)
    inner_data, j = search_folds(data, 1, 2)[0]
    inner = fold_genes(inner_data, j)
    train = taskdata.train_cases(inner_data, j)
    outer_test = set(data.splits.case_id[data.splits.fold_1 == "test"])
    assert not set(train) & outer_test
    assert inner.train_patients == len(set(train) & set(data.internal.omics.index)) != outer.train_patients

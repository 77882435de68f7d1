"""Per-fold gene selection: k kept, the right genes on planted cases, training patients only, bad config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bench.data.genes as genes
from bench.data.cohort import load_cohort
from bench.data.genes import METHODS, select_genes
from bench.data.task import load_task
from bench.errors import BenchError, DataError


def _planted(n: int = 60, genes: int = 30, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """Log-expression where gene 3 tracks the label, gene 7 has by far the largest variance (no signal),
    and the rest are small noise."""
    rng = np.random.default_rng(seed)
    cases = [f"c{i:03d}" for i in range(n)]
    y = pd.Series(np.arange(n) % 2, index=cases)
    x = rng.normal(scale=0.1, size=(n, genes))
    x[:, 3] += 1.5 * y.to_numpy()
    x[:, 7] = rng.normal(scale=5.0, size=n)
    return pd.DataFrame(x, index=cases, columns=[f"g{j:02d}" for j in range(genes)]), y


@pytest.mark.parametrize("method", METHODS)
def test_keeps_exactly_k_genes_in_file_order(method):
    x, y = _planted()
    sel = select_genes(x, y, x.index[:40], method, k=5, seed=0)
    assert len(sel.genes) == 5 == sel.k and len(set(sel.genes)) == 5
    assert list(sel.genes) == [g for g in x.columns if g in sel.genes]  # file order, not score order
    assert sel.apply(x).shape == (60, 5) and list(sel.apply(x).columns) == list(sel.genes)
    record = sel.record()
    assert (
        record["genes"] == list(sel.genes) and record["fit_on_patients"] == 40 and record["method"] == method
    )


def test_each_method_finds_what_it_ranks():
    x, y = _planted()
    train = x.index[:40]
    assert select_genes(x, y, train, "variance", k=1).genes == ("g07",)  # the noisy wide gene
    assert select_genes(x, y, train, "univariate", k=1).genes == ("g03",)  # the label-tracking gene
    assert select_genes(x, y, train, "gbdt", k=1).genes == ("g03",)


@pytest.mark.parametrize("method", METHODS)
def test_selection_ignores_held_out_patients(method):
    """Whatever the omics and labels of the patients outside the training part, the genes are the same;
    changing the training patients' omics does change them (so the comparison can fail)."""
    x, y = _planted()
    train = x.index[:40]
    ref = select_genes(x, y, train, method, k=3, seed=0)
    rng = np.random.default_rng(1)
    x2, y2 = x.copy(), y.copy()
    held_out = x.index[40:]
    x2.loc[held_out] = rng.normal(scale=50.0, size=(len(held_out), x.shape[1]))
    y2.loc[held_out] = 1 - y2.loc[held_out]
    assert select_genes(x2, y2, train, method, k=3, seed=0) == ref
    x3 = x.copy()
    x3.loc[train, "g03"] = x3.loc[train, "g07"].to_numpy()  # g07's spread, no signal left in g03
    x3.loc[train, "g07"] = 0.0
    x3.loc[train, "g11"] = 8.0 * y.loc[train].to_numpy()  # a new label-tracking, wide gene
    assert select_genes(x3, y, train, method, k=3, seed=0) != ref


def test_constant_genes_come_last_and_ties_break_by_variance():
    x, y = _planted(genes=10)
    x.loc[:, ["g00", "g01"]] = 1.0  # constant: no F statistic
    x["g04"] = 4.0 * x["g03"]  # the same F as g03 (a power-of-two scale is exact), 16 times the variance
    assert select_genes(x, y, x.index, "univariate", k=1).genes == ("g04",)
    sel = select_genes(x, y, x.index, "univariate", k=8)
    assert "g00" not in sel.genes and "g01" not in sel.genes


def test_k_larger_than_the_gene_count_is_an_error():
    x, y = _planted(genes=10)
    with pytest.raises(DataError, match=r"k = 11 genes but the omics table has 10"):
        select_genes(x, y, x.index, "variance", k=11)


def test_one_class_among_training_patients_is_an_error_for_supervised_methods():
    x, y = _planted()
    train = y.index[y == 1]
    assert len(select_genes(x, y, train, "variance", k=2).genes) == 2
    with pytest.raises(DataError, match="both classes"):
        select_genes(x, y, train, "gbdt", k=2)


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        (
            "{method: xgboost, k: 4}",
            r"omics_select\.method: Input should be 'variance', 'univariate' or 'gbdt'",
        ),
        ("{method: variance, kk: 4}", r"omics_select\.kk: Extra inputs are not permitted"),
        ("{method: variance, k: 0}", r"omics_select\.k: Input should be greater than or equal to 1"),
        ("768", r"omics_select: Input should be a valid dictionary"),
    ],
)
def test_bad_omics_select_is_a_one_paragraph_error(small_task, setting, pattern):
    small_task.write_text(small_task.read_text() + f"omics_select: {setting}\n")
    with pytest.raises(BenchError, match=pattern) as exc:
        load_task(small_task)
    assert str(small_task) in str(exc.value) and "\n" not in str(exc.value)


def test_omics_select_without_omics_is_an_error(small_task):
    text = "\n".join(line for line in small_task.read_text().splitlines() if not line.startswith("omics:"))
    small_task.write_text(text + "\nomics_select: {method: variance}\n")
    with pytest.raises(BenchError, match="'omics_select' needs an 'omics' file"):
        load_task(small_task)


def test_k_above_the_file_s_genes_is_a_data_problem(small_task):
    small_task.write_text(small_task.read_text() + "omics_select: {method: variance, k: 13}\n")
    task = load_task(small_task)
    assert task.omics_select.k == 13 and task.omics_select.method == "variance"
    problems = load_cohort(task, check_values=False).problems
    assert len(problems) == 1 and "k = 13 genes but the file has 12" in problems[0]


def test_k_defaults_to_the_authors_768(small_task):
    small_task.write_text(small_task.read_text() + "omics_select: {method: gbdt}\n")
    assert load_task(small_task).omics_select.k == 768


def test_cached_selection_is_reused_only_for_the_same_training_data(tmp_path, monkeypatch):
    x, y = _planted()
    train = x.index[:40]
    first = select_genes(x, y, train, "gbdt", k=3, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("gbdt-3-*.json"))) == 1
    monkeypatch.setattr(genes, "gene_scores", lambda *a, **k: pytest.fail("refit despite a cached selection"))
    x_held_out = x.copy()
    x_held_out.loc[x.index[40:]] = 0.0  # not read: same key
    assert select_genes(x_held_out, y, train, "gbdt", k=3, seed=0, cache_dir=tmp_path) == first
    monkeypatch.undo()
    x_train = x.copy()
    x_train.loc[train[0], "g05"] += 1.0  # one training value: another key, fit again
    select_genes(x_train, y, train, "gbdt", k=3, seed=0, cache_dir=tmp_path)
    select_genes(x, y, train, "gbdt", k=3, seed=1, cache_dir=tmp_path)  # another seed
    assert len(list(tmp_path.glob("gbdt-3-*.json"))) == 3

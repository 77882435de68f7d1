"""`bench explain` and `bench report` on a tiny trained cohort whose files store ground-truth relevance."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from bench.cli import main
from bench.data.formats import read_slide, write_trident_h5
from bench.explain import explain_slide, load_fold_model, localisation_auc, localisation_table
from bench.store import MODEL_FILE, load_results


def _add_relevance(folder: Path) -> None:
    """make_cohort plants its signal in the first N // 8 patches of each slide: mark those as relevant."""
    for path in sorted(folder.glob("*.h5")):
        sf = read_slide(path)
        relevance = np.zeros(len(sf.features), np.float32)
        relevance[: max(1, len(sf.features) // 8)] = 1.0
        write_trident_h5(path, sf.features, sf.coords * 512, extras={"relevance": relevance})


def _bench(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    try:
        main()
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cohort_tools) -> tuple[Path, Path]:
    """ABMIL and MoMKD, 2 folds x 1 epoch, on 30 patients (+ 8 external) with relevance in every file."""
    make_cohort, write_task = cohort_tools
    root = tmp_path_factory.mktemp("explain")
    make_cohort(root / "internal", n_patients=30, genes=8)
    make_cohort(root / "ext", n_patients=8, seed=1, prefix="E", omics=False)
    for cohort in ("internal", "ext"):
        _add_relevance(root / cohort / "features")
    task = write_task(
        root / "task.yaml",
        name="toy",
        label_col="odx_risk",
        positive=["high"],
        labels="internal/labels.csv",
        features="internal/features",
        omics="internal/omics.csv",
        folds=2,
        seed=0,
        train={"epochs": 1, "patience": 1, "min_epochs": 0},
        external=[{"name": "ext", "labels": "ext/labels.csv", "features": "ext/features"}],
    )
    out = root / "res"
    with pytest.MonkeyPatch.context() as mp:
        args = ("run", "--methods", "abmil,momkd", "--task", str(task), "--out", str(out), "--quiet")
        assert _bench(mp, *args) == 0
    return task, out


def test_localisation_auc_counts_pairs():
    attention = np.array([0.5, 0.1, 0.3, 0.05, 0.3])
    relevance = np.array([1.0, 0.0, 0.5, 0.0, 0.0])
    # relevant {0.5, 0.3} vs other {0.1, 0.05, 0.3}: pairs won 3 + 2 + a tie (0.3 = 0.3) = 5.5 of 6.
    assert localisation_auc(attention, relevance) == pytest.approx(5.5 / 6)
    assert np.isnan(localisation_auc(attention, None))
    assert np.isnan(localisation_auc(attention, np.ones(5)))


def test_fold_keeps_weights_that_reproduce_its_predictions(trained):
    task, out = trained
    splits = pd.read_csv(out / "toy" / "splits.tsv", sep="\t", dtype=str)
    for method in ("abmil", "momkd"):
        for fold in (0, 1):
            assert (out / "toy" / method / f"fold_{fold}" / MODEL_FILE).is_file()
        slide = splits.slide_id[splits.fold_1 == "test"].iloc[0]
        ex = explain_slide(out, "toy", method, slide)
        assert ex.fold == 1 and ex.part == "test"  # the fold that tested the slide
        pred = pd.read_csv(out / "toy" / method / "fold_1" / "predictions.csv", dtype=str)
        saved = float(pred.prob[(pred.slide_id == slide) & (pred.cohort == "test")].iloc[0])
        assert ex.prob == pytest.approx(saved, abs=1e-5)
        n = len(read_slide(next((task.parent / "internal" / "features").glob(f"{slide}.h5"))).features)
        assert ex.attention.shape == (n,) and ex.attention.sum() == pytest.approx(1.0, abs=1e-4)
        assert ex.relevance is not None and ex.relevance.sum() == max(1, n // 8)
        assert ex.localisation_auc == pytest.approx(localisation_auc(ex.attention, ex.relevance))


def test_momkd_memory_assignment_is_the_nearest_component(trained):
    _, out = trained
    splits = pd.read_csv(out / "toy" / "splits.tsv", sep="\t", dtype=str)
    slide = splits.slide_id[splits.fold_0 == "test"].iloc[0]
    ex = explain_slide(out, "toy", "momkd", slide, fold=0)
    banks, codes_map = ex.maps["nearest class memory bank"], ex.maps["nearest memory component"]
    assert len(codes_map.categories) == 2 * 4 and banks.categories is not None  # K = 4 per class
    model, _ = load_fold_model(out / "toy" / "momkd" / "fold_0", torch.device("cpu"))
    from bench.data.graph import knn_edge_index
    from methods.base import Bag

    sf = read_slide(next((out.parent / "internal" / "features").glob(f"{slide}.h5")))
    bag = Bag(
        features=torch.from_numpy(sf.features),
        label=torch.tensor(0),
        edge_index=torch.from_numpy(knn_edge_index(sf.coords, 8)),
    )
    with torch.no_grad():
        z = model(bag).extras["z"]  # unit patch embeddings (N, S)
        codes = F.normalize(model.memory, dim=-1)  # (2, K, S): bank 0 = C-, bank 1 = C+
        cos = torch.einsum("ns,bks->nbk", z, codes)
    flat = cos.reshape(len(z), -1).argmax(dim=1).numpy()
    bank, code = banks.values.numpy().astype(int), codes_map.values.numpy().astype(int)
    np.testing.assert_array_equal(bank, flat // 4)
    np.testing.assert_array_equal(code % 4, flat % 4)
    assert cos.amax(dim=2).argmax(dim=1).numpy().tolist() == bank.tolist()


def test_localisation_table_scores_each_fold(trained):
    _, out = trained
    table = localisation_table(load_results(out, "toy"), n_slides=3)
    assert set(table.method) == {"abmil", "momkd"} and set(table.fold) == {0, 1}
    assert (
        table.slides.max() <= 3 and table.auc.between(0, 1).all() and table.auc_untrained.between(0, 1).all()
    )
    assert (table.auc != table.auc_untrained).any()  # the baseline is another model, not the kept weights
    fold_dir = out / "toy" / "abmil" / "fold_0"
    a, _ = load_fold_model(fold_dir, torch.device("cpu"), untrained_seed=3)
    b, _ = load_fold_model(fold_dir, torch.device("cpu"), untrained_seed=3)
    kept, _ = load_fold_model(fold_dir, torch.device("cpu"))
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), name  # seeded
    assert any(
        not torch.equal(wa, wk)
        for wa, wk in zip(a.state_dict().values(), kept.state_dict().values(), strict=True)
    )


def test_explain_command_writes_a_figure(trained, monkeypatch):
    task, out = trained
    slide = pd.read_csv(out / "toy" / "splits.tsv", sep="\t", dtype=str).slide_id.iloc[0]
    assert (
        _bench(monkeypatch, "explain", "momkd", "--task", str(task), "--slide", slide, "--out", str(out)) == 0
    )
    pngs = list((out / "toy" / "report" / "explain").glob(f"explain_momkd_{slide}_fold*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 20_000
    image = imread(pngs[0])
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50  # a picture, not a blank
    assert pngs[0].with_suffix(".svg").is_file()
    assert (
        _bench(monkeypatch, "explain", "momkd", "--task", str(task), "--slide", "nope", "--out", str(out))
        == 2
    )


def test_report_assembles_tables_figures_and_report_md(trained, monkeypatch):
    task, out = trained
    args = ("report", "--task", str(task), "--out", str(out), "--bootstrap", "1000", "--loc-slides", "2")
    assert _bench(monkeypatch, *args) == 0
    text = (out / "report.md").read_text()
    for needed in ("95 % percentile bootstrap CI", "Nadeau & Bengio", "DeLong", "Localisation AUC", "seed 0"):
        assert needed in text
    folder = out / "toy" / "report"
    for stem in ("table_headline", "tests_toy", "table_localisation", "table1_internal", "runs_toy"):
        assert (folder / f"{stem}.md").is_file() and (folder / f"{stem}.tex").is_file()
    assert "| Converged |" in (folder / "runs_toy.md").read_text()
    assert "| Train AUC | Val AUC | Test AUC |" in (folder / "runs_toy.md").read_text()
    references = (folder / "references_toy.md").read_text()  # a task from files: the floor, no ceiling
    assert "| floor-probe | floor |" in references and "ceiling-" not in references
    assert "| floor-probe |" in (folder / "table_headline.md").read_text()
    memory = (folder / "table_method_reports.md").read_text()  # MoMKD's memories, per class; ABMIL has none
    assert "| momkd | " in memory and "abmil" not in memory and memory.count(" of 4") == 2
    tex = (folder / "table_headline.tex").read_text()
    assert r"\toprule" in tex and "{[}" in tex and "†" not in tex
    images = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert any("roc_toy_internal" in i for i in images) and any("explain_toy_momkd" in i for i in images)
    assert any("learning_curves_toy" in i for i in images)  # validation score against optimiser updates
    for image in images:
        assert (out / image).is_file() and (out / image).stat().st_size > 10_000
    assert _bench(monkeypatch, "report", "--task", str(task), "--out", str(out), "--vs", "nosuch") == 2


def test_report_reads_each_tasks_results_once(trained, monkeypatch):
    """Every table and figure of the report comes from one walk of each task's results on disk."""
    import bench.store as store
    from bench.report.document import write_report

    _, out = trained
    walks = []
    real = store.iter_fold_dirs

    def counted(*args, **kwargs):
        walks.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "iter_fold_dirs", counted)
    write_report(out, ["toy"], ["markdown"], n_boot=0, loc_slides=2, log=lambda _: None)
    assert walks == ["toy"]

"""``bench ablate``: a method's declared variants run on the same folds, tables shaped like the paper's, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from methods import get_method_class

from .test_cli import bench


def _rows(md: str) -> dict[str, list[str]]:
    """Configuration -> its cells, from a markdown table."""
    lines = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in lines)}


@pytest.mark.slow
def test_ablate_momkd_writes_both_tables_and_resumes(small_task, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    args = ("ablate", "momkd", "--task", str(small_task), "--out", str(out), "--folds", "2", "--epochs", "1")
    code, _, err = bench(monkeypatch, capsys, *args, "--quiet")
    assert code == 0, err
    task_dir, report = out / "toy", out / "toy" / "report"
    ablations = get_method_class("momkd").ablations
    variants = {v for rows in ablations.values() for _, v in rows}
    for v in variants:  # every variant is a method on disk, on the same splits
        for k in range(2):
            assert (task_dir / (f"momkd[{v}]" if v else "momkd") / f"fold_{k}" / "metrics.json").is_file()
    config = yaml.safe_load((task_dir / "momkd[no-recon]" / "fold_0" / "config.yaml").read_text())
    assert config["method_config"]["recon_weight"] == 0.0

    for table, rows in ablations.items():
        assert {p.name for p in report.glob(f"{table}.*")} == {f"{table}.md", f"{table}.tex"}
        md = (report / f"{table}.md").read_text()
        cells = _rows(md)
        assert list(cells) == [label for label, _ in rows]  # the paper's rows, in its order
        assert (
            "(ref)" in cells[next(label for label, v in rows if v == "")][0]
        )  # tests against the full model
        for label, v in rows:  # each cell is that variant's mean over its folds' test AUCs
            name = f"momkd[{v}]" if v else "momkd"
            aucs = [
                json.loads((task_dir / name / f"fold_{k}" / "metrics.json").read_text())["cohorts"]["test"][
                    "auc"
                ]
                for k in range(2)
            ]
            assert cells[label][0].strip("*").startswith(f"{np.mean(aucs) * 100:.1f} ± ")
        assert len(cells[rows[0][0]]) == 3  # internal, the external cohort, the drop between them
        for label, v in rows:  # the drop: mean over folds of internal minus external AUC of each fold model
            name = f"momkd[{v}]" if v else "momkd"
            metrics = [
                json.loads((task_dir / name / f"fold_{k}" / "metrics.json").read_text()) for k in range(2)
            ]
            drop = np.mean([m["cohorts"]["test"]["auc"] - m["cohorts"]["ext"]["auc"] for m in metrics])
            assert cells[label][2].startswith(f"{drop * 100:.1f} ± ")
    assert "What reaches the memory" in (report / "memory_modes.md").read_text()
    config = yaml.safe_load((task_dir / "momkd[adaptive-memory]" / "fold_0" / "config.yaml").read_text())
    assert config["method_config"]["adaptive_memory"] and config["method_config"]["memory_size"] == 16
    metrics = json.loads((task_dir / "momkd[adaptive-memory]" / "fold_0" / "metrics.json").read_text())
    assert 1 <= metrics["history"][0]["memory_positive_kept"] <= 16
    assert metrics["method_report"]["adaptive_memory"]

    log = (task_dir / "claims.log").read_text()
    before = (report / "ablation.md").read_text()
    code, _, err = bench(monkeypatch, capsys, *args, "--quiet", "--format", "markdown")
    assert code == 0, err
    assert (task_dir / "claims.log").read_text().count(" trained ") == log.count(" trained ")  # nothing rerun
    assert (report / "ablation.md").read_text() == before


def test_ablate_needs_declared_variants(small_task, tmp_path, monkeypatch, capsys):
    code, _, err = bench(
        monkeypatch, capsys, "ablate", "abmil", "--task", str(small_task), "--out", str(tmp_path)
    )
    assert code == 2 and "declares no ablation variants" in err and "Traceback" not in err


@pytest.mark.slow
def test_ablate_on_a_survival_task_tabulates_the_c_index(os_task, tmp_path, monkeypatch, capsys):
    """Every variant of WiKG's ablation on a survival task, each cell the mean of its folds' test c-index."""
    out = tmp_path / "results"
    args = ("ablate", "wikg", "--task", str(os_task), "--out", str(out), "--folds", "2", "--epochs", "1")
    code, _, err = bench(monkeypatch, capsys, *args, "--quiet", "--format", "markdown")
    assert code == 0, err
    md = (out / "os" / "report" / "ablation.md").read_text()
    assert "Harrell's c-index (%)" in md and "Internal c-index" in md
    cells = _rows(md)
    for label, v in get_method_class("wikg").ablations["ablation"]:
        name = f"wikg[{v}]" if v else "wikg"
        folds = [json.loads((out / "os" / name / f"fold_{k}" / "metrics.json").read_text()) for k in range(2)]
        c = np.mean([m["cohorts"]["test"]["c_index"] for m in folds])
        assert cells[label][0].strip("*").startswith(f"{c * 100:.1f} ± ")

"""The built-in tasks' held-out cohort (issue 16): present, large, never used for selection; and validation
splits large enough to select on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bench.commands import run
from bench.config import list_builtin_tasks, read_task
from bench.data.splits import make_splits
from bench.data.synthetic import HELDOUT, SyntheticSpec
from bench.data.task import load_task
from bench.store import MODEL_FILE
from bench.taskdata import RunOptions

BUILTIN = [p.stem for p in list_builtin_tasks()]


def test_builtin_tasks_carry_a_large_heldout_cohort() -> None:
    """Every built-in task, the multiclass and survival ones on the binary tasks' cohort."""
    tasks = {name: read_task(name) for name in BUILTIN if name != "her2-backbones"}
    assert all(
        tasks[t].synthetic == tasks["odx"].synthetic for t in ("her2", "pr", "subtype", "os")
    )  # one cohort for the five
    for task in tasks.values():
        assert SyntheticSpec.from_dict(task.synthetic or {}).heldout >= 2000
        assert HELDOUT in [e.name for e in task.external]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_validation_splits_hold_at_least_150_patients(name: str) -> None:
    """The split design of each built-in task (its patients, folds, seed, val_fraction), on labels at the
    task's internal prevalence (stratification moves the part sizes by a patient or two, the labels no more)."""
    task = read_task(name)
    spec = SyntheticSpec.from_dict(task.synthetic or {})
    n = spec.n_patients
    prevalence = spec.prevalences.get(task.label_col, 0.5)  # multiclass / survival: about even strata
    cases = [f"SYN-{i + 1:04d}" for i in range(n)]
    slides = pd.DataFrame(
        {
            "case_id": cases,
            "slide_id": [f"{c}-01" for c in cases],
            "label": np.arange(n) < round(prevalence * n),
        }
    )
    splits = make_splits(slides, task.folds, task.seed, task.val_fraction, task.split_by)
    for k in range(task.folds):
        assert (splits[f"fold_{k}"] == "val").sum() >= 150, k


def test_heldout_cohort_is_predicted_and_never_used_for_selection(tmp_path, monkeypatch) -> None:
    """Reversing the held-out patients' labels changes no trained weight, no chosen epoch, no threshold and no
    other cohort's result; only the held-out AUC, to 1 - AUC."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "task.yaml"
    task.write_text(
        "name: toy\nsource: synthetic\nlabel_col: odx_risk\npositive: [high]\nnegative: [low]\n"
        "synthetic: {n_patients: 48, n_genes: 16, feature_dim: 16, bag_min: 20, bag_max: 40, heldout: 40,"
        " external: [{name: external, n_patients: 20, bag_min: 20, bag_max: 40}]}\n"
        "external: [{name: external}, {name: heldout}]\n"
        "folds: 2\nseed: 0\ntrain: {epochs: 3, patience: 5, min_epochs: 0}\n"
    )
    run(str(task), ["abmil"], RunOptions(out=tmp_path / "a", quiet=True))
    labels = load_task(task).external[1].labels
    table = pd.read_csv(labels, dtype=str)
    table["odx_risk"] = table.odx_risk.map({"high": "low", "low": "high"})
    table.to_csv(labels, index=False)
    run(str(task), ["abmil"], RunOptions(out=tmp_path / "b", quiet=True))
    for k in range(2):
        a, b = (tmp_path / o / "toy" / "abmil" / f"fold_{k}" for o in ("a", "b"))
        ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
        assert ma["best_epoch"] == mb["best_epoch"] and ma["history"] == mb["history"]
        wa, wb = (torch.load(d / MODEL_FILE, weights_only=True) for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[p], wb[p]) for p in wa)
        for cohort in ("val", "test", "external"):
            assert ma["cohorts"][cohort] == mb["cohorts"][cohort]
        ha, hb = ma["cohorts"][HELDOUT], mb["cohorts"][HELDOUT]
        assert ha["threshold"] == hb["threshold"] == ma["cohorts"]["val"]["threshold"]
        assert ha["n"] == 40 and ha["auc"] == pytest.approx(1 - hb["auc"])
        pred = pd.read_csv(a / "predictions.csv")
        assert set(pred.cohort) == {"test", "external", HELDOUT}

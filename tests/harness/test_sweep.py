"""`bench sweep`: the search sees validation data only, ``M[best]`` runs like any method, restricted search
spaces, the report and figures, and several worker processes sharing one study (journal file, PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import optuna
import pytest
import yaml

import bench.runner as runner
import bench.sweep as sweep
from bench.cli import main
from bench.data.splits import fold_parts
from bench.errors import BenchError
from bench.runner import RunOptions
from bench.sweep import SweepOptions, make_storage, restricted_overrides, search, space_names
from methods import get_method_class, resolve_config

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def bench(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_sweep_searches_on_validation_only_then_runs_best(small_task, tmp_path, monkeypatch, capsys):
    """During the search no test slide and no external slide is ever read; then abmil[best] lands on disk."""
    loaded, state = [], {"fold": None}  # fold: set while a trial trains a fold (None in the final run)
    real_bags, real_train_fold = runner._bags, sweep.train_fold

    def spy_bags(cohort, slide_ids, cfg, omics):
        loaded.append((state["fold"], cohort.name, set(slide_ids)))
        return real_bags(cohort, slide_ids, cfg, omics)

    def spy_train_fold(data, fold, *args, **kwargs):
        state["fold"] = fold
        try:
            return real_train_fold(data, fold, *args, **kwargs)
        finally:
            state["fold"] = None

    monkeypatch.setattr(runner, "_bags", spy_bags)
    monkeypatch.setattr(sweep, "train_fold", spy_train_fold)
    out = tmp_path / "res"
    args = ["sweep", "abmil", "--task", str(small_task), "--trials", "3", "--folds", "2", "--epochs", "1"]
    code, printed, err = bench(monkeypatch, capsys, *args, "--out", str(out), "--quiet")
    assert code == 0, err

    splits = runner.prepare_task(str(small_task), RunOptions(out=tmp_path / "x", folds=2)).splits
    searched = [(fold, cohort, ids) for fold, cohort, ids in loaded if fold is not None]
    assert len(searched) == 3 * 2 * 2  # trials x folds x (train, val)
    for fold, cohort, ids in searched:
        assert cohort == "internal" and not ids & set(fold_parts(splits, fold)["test"])
    assert any(cohort == "ext" for fold, cohort, _ in loaded if fold is None)  # the final run is reported

    best = yaml.safe_load((out / "toy" / "sweeps" / "abmil" / "best.yaml").read_text())
    study = optuna.load_study(
        study_name="toy-abmil", storage=f"sqlite:///{out / 'toy' / 'sweeps' / 'abmil.db'}"
    )
    assert len(study.trials) == 3 and best["mean_val_auc"] == study.best_value
    assert all(set(t.intermediate_values) == {0, 1} for t in study.trials)  # one report per fold
    for k in range(2):
        fold = out / "toy" / "abmil[best]" / f"fold_{k}"
        config = yaml.safe_load((fold / "config.yaml").read_text())
        assert config["method"] == "abmil[best]" and config["method_config"]["lr"] == best["overrides"]["lr"]
        val_auc = json.loads((fold / "metrics.json").read_text())["cohorts"]["val"]["auc"]
        assert val_auc == pytest.approx(best["fold_val_auc"][k])  # the best trial's models, trained again
    assert not (out / "toy" / "abmil").exists()  # trials never write fold folders
    report = out / "toy" / "report"
    for name in ("sweep_abmil.md", "sweep_abmil.tex", "sweep_abmil_history.png", "sweep_abmil_lr.png"):
        assert (report / name).is_file()
    assert "Results in" in printed

    trained = []
    monkeypatch.setattr(runner, "fit", lambda *a, **k: trained.append(1))
    code, _, err = bench(
        monkeypatch, capsys, *args[:4], "--trials", "0", *args[6:], "--out", str(out), "--quiet"
    )
    assert code == 0, err  # --trials 0: report the study as it is; abmil[best] is on disk already
    assert (
        not trained and yaml.safe_load((out / "toy" / "sweeps" / "abmil" / "best.yaml").read_text()) == best
    )


def test_best_variant_needs_a_sweep(small_task, tmp_path, monkeypatch, capsys):
    args = ["run", "--methods", "abmil[best]", "--task", str(small_task), "--out", str(tmp_path), "--quiet"]
    code, _, err = bench(monkeypatch, capsys, *args)
    assert code == 2 and "bench sweep abmil" in err.replace("\n", "")


def test_params_restrict_the_search_space():
    momkd = get_method_class("momkd")
    assert space_names(momkd) == ["adaptive_memory", "lr", "margin", "memory_size"]
    trial = optuna.create_study().ask()
    overrides = restricted_overrides(momkd, trial, ["margin", "memory_size"])
    assert set(overrides) == set(trial.params) == {"margin", "memory_size"}  # lr neither sampled nor set
    assert 0.0 <= overrides["margin"] <= 0.6 and overrides["memory_size"] in (2, 4, 8, 16, 32, 64)
    trial = optuna.create_study().ask()
    overrides = restricted_overrides(momkd, trial, ["memory_size", "adaptive_memory"])  # a data-chosen size
    assert set(overrides) == {"memory_size", "adaptive_memory"}
    assert resolve_config("momkd", overrides).adaptive_memory == overrides["adaptive_memory"]
    with pytest.raises(BenchError, match="declares adaptive_memory, lr, margin, memory_size"):
        search("odx", SweepOptions("momkd", params=("margin", "memory")), RunOptions())


def test_report_has_best_trial_and_sensitivity_figures(tmp_path):
    study = optuna.create_study(direction="maximize")
    margin = optuna.distributions.FloatDistribution(0.0, 0.6)
    memory = optuna.distributions.CategoricalDistribution([2, 4, 8, 16, 32, 64])
    for i, (m, k) in enumerate([(0.1, 4), (0.3, 8), (0.5, 16), (0.2, 8), (0.4, 64)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"margin": m, "memory_size": k},
                distributions={"margin": margin, "memory_size": memory},
                value=0.6 + 0.05 * i,
                user_attrs={"fold_val_auc": [0.55 + 0.05 * i, 0.65 + 0.05 * i]},
                intermediate_values={0: 0.55 + 0.05 * i, 1: 0.6 + 0.05 * i},  # running means
            )
        )
    study.add_trial(
        optuna.trial.create_trial(
            params={"margin": 0.6, "memory_size": 2},
            distributions={"margin": margin, "memory_size": memory},
            state=optuna.trial.TrialState.PRUNED,
            intermediate_values={0: 0.5},
        )
    )
    paths = sweep.write_sweep_report(study, tmp_path, "odx", "momkd", ["markdown", "latex"])
    names = {p.name for p in paths}
    figures = ("sweep_momkd_history", "sweep_momkd_margin", "sweep_momkd_memory_size")
    tables = {f"{stem}.{e}" for stem in ("sweep_momkd", "sweep_momkd_sensitivity") for e in ("md", "tex")}
    assert names == tables | {f + e for f in figures for e in (".png", ".svg")}
    md = (tmp_path / "odx" / "report" / "sweep_momkd.md").read_text()
    assert "5 complete, 1 pruned" in md and "Best: trial 4" in md and "memory_size = 64" in md
    assert md.index("| 1 | 4 |") < md.index("| 2 | 3 |")  # ranked by validation AUC
    sens = (tmp_path / "odx" / "report" / "sweep_momkd_sensitivity.md").read_text()
    # all six trials on their common first fold (the pruned one, margin 0.6, is the worst there): margin ranks
    # 1,3,5,2,4,6 against AUC ranks 2,3,4,5,6,1, so rho = 1 - 6 * 40 / (6 * 35) = -0.14 (+0.50 without it)
    assert "| margin |" in sens and "| -0.14 |" in sens and "| 6 |" in sens and "first 1 fold(s)" in sens
    assert "range 60.0–80.0" in sens and "median fold SD 7.1, 2 folds" in sens  # fold SD: 0.1 / sqrt(2)


def test_sensitivity_of_a_flat_study_is_undefined_not_an_error(tmp_path):
    study = optuna.create_study(direction="maximize")
    margin = optuna.distributions.FloatDistribution(0.0, 0.6)
    for m in (0.1, 0.3, 0.5):  # every trial at chance: fANOVA has no variance to share out, rho is undefined
        study.add_trial(
            optuna.trial.create_trial(params={"margin": m}, distributions={"margin": margin}, value=0.5)
        )
    sweep.write_sweep_report(study, tmp_path, "odx", "momkd", ["markdown"])
    sens = (tmp_path / "odx" / "report" / "sweep_momkd_sensitivity.md").read_text()
    assert "| margin | – | – | – | 3 |" in sens


def _shared_study_check(storage: str, name: str, trials: int) -> None:
    study = optuna.load_study(study_name=name, storage=make_storage(storage))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == trials
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers ran trials


@pytest.mark.slow
def test_two_workers_share_a_study_through_a_journal_file(small_task, tmp_path):
    journal = tmp_path / "shared" / "study.journal"
    sw = SweepOptions("abmil", trials=2, storage=str(journal), study_name="shared", pruning=False)
    search(str(small_task), sw, RunOptions(out=tmp_path / "res", folds=2, epochs=1, workers=2, quiet=True))
    _shared_study_check(f"journal:{journal}", "shared", 2)


@pytest.mark.slow
@pytest.mark.skipif("BENCH_TEST_POSTGRES_URL" not in os.environ, reason="no PostgreSQL server configured")
def test_two_processes_share_a_study_through_postgresql(small_task, tmp_path):
    """Two separate ``bench sweep`` processes (as on two machines) on one PostgreSQL study."""
    url, name = os.environ["BENCH_TEST_POSTGRES_URL"], f"test-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "bench.cli", "sweep", "abmil", "--task", str(small_task), "--trials", "2"]
    cmd += [
        "--folds",
        "2",
        "--epochs",
        "1",
        "--storage",
        url,
        "--study-name",
        name,
        "--no-run-best",
        "--quiet",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--out", str(tmp_path / f"w{i}"), "--sampler-seed", str(i)], env=SUBPROCESS_ENV
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    _shared_study_check(url, name, 4)
    optuna.delete_study(study_name=name, storage=url)

"""`bench sweep`: the search sees validation data only, ``M[best]`` runs like any method, restricted search
spaces, the report and figures, and several worker processes sharing one study (journal file, PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import optuna
import pytest
import yaml

import bench.jobs as jobs
import bench.sweep as sweep
import bench.taskdata as taskdata
from bench.best import best_path
from bench.cli import main
from bench.data.splits import fold_parts
from bench.errors import BenchError
from bench.studies import make_storage
from bench.sweep import SweepOptions, restricted_overrides, search, space_names
from bench.sweep_report import write_sweep_report
from bench.taskdata import RunOptions
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


def _spy_search(monkeypatch) -> tuple[list, list]:
    """Record, per outer fold whose search is running, the slides each trial reads and the patients it scores
    (the case IDs of the predictions its objective turns into an AUC); outer fold None outside a search."""
    read, scored, state = [], [], {"outer": None}
    real_bags, real_val_auc, real_objective = jobs._bags, jobs.FoldFit.val_auc, sweep._objective

    def spy_bags(cohort, slide_ids, cfg, omics, *rest):
        read.append((state["outer"], cohort.name, set(slide_ids)))
        return real_bags(cohort, slide_ids, cfg, omics, *rest)

    def spy_val_auc(self, aggregation):
        scored.append((state["outer"], set(self.val.case_id)))
        return real_val_auc(self, aggregation)

    def spy_objective(data, fold, *args, **kwargs):
        objective = real_objective(data, fold, *args, **kwargs)

        def run(trial):
            state["outer"] = fold
            try:
                return objective(trial)
            finally:
                state["outer"] = None

        return run

    monkeypatch.setattr(jobs, "_bags", spy_bags)
    monkeypatch.setattr(jobs.FoldFit, "val_auc", spy_val_auc)
    monkeypatch.setattr(sweep, "_objective", spy_objective)
    return read, scored


def _cases(splits, fold: int, part: str) -> set[str]:
    return set(splits.case_id[splits[f"fold_{fold}"] == part])


def test_nested_sweep_never_scores_a_fold_s_test_patients_and_best_uses_each_fold_s_config(
    small_task, tmp_path, monkeypatch, capsys
):
    """Outer fold k's search reads and scores only fold k's training/validation patients (never its test
    patients, who are other folds' validation patients); abmil[best] on fold k runs fold k's own best trial."""
    read, scored = _spy_search(monkeypatch)
    out = tmp_path / "res"
    args = ["sweep", "abmil", "--task", str(small_task), "--trials", "3", "--folds", "2", "--epochs", "1"]
    code, printed, err = bench(monkeypatch, capsys, *args, "--out", str(out), "--quiet")
    assert code == 0, err

    splits = taskdata.prepare_task(str(small_task), RunOptions(out=tmp_path / "x", folds=2)).splits
    searched = [(k, ids) for k, ids in scored if k is not None]
    assert sorted(k for k, _ in searched) == [0, 0, 0, 1, 1, 1]  # 3 trials per outer fold, one score each
    for k, cases in searched:
        assert cases == _cases(splits, k, "val")  # the fold's own validation patients, no test patient
        assert not cases & _cases(splits, k, "test") and _cases(splits, k, "test") & _cases(
            splits, 1 - k, "val"
        )
    for k, cohort, slides in read:
        if k is not None:
            assert cohort == "internal" and not slides & set(fold_parts(splits, k)["test"])
    assert any(cohort == "ext" for k, cohort, _ in read if k is None)  # the final run is reported

    best = yaml.safe_load((out / "toy" / "sweeps" / "abmil" / "best.yaml").read_text())
    assert best["design"] == "nested" and best["outer_folds"] == 2 and best["inner_folds"] == 1
    storage = f"sqlite:///{out / 'toy' / 'sweeps' / 'abmil.db'}"
    lrs = []
    for k in range(2):
        entry = best["folds"][k]
        study = optuna.load_study(study_name=f"toy-abmil-fold{k}", storage=storage)
        assert entry["study"] == study.study_name and len(study.trials) == 3
        assert entry["mean_val_auc"] == study.best_value and entry["trial"] == study.best_trial.number
        fold = out / "toy" / "abmil[best]" / f"fold_{k}"
        config = yaml.safe_load((fold / "config.yaml").read_text())
        assert config["method"] == "abmil[best]" and config["method_config"]["lr"] == entry["overrides"]["lr"]
        assert (
            config["tuned_by"]["study"] == f"toy-abmil-fold{k}"
            and config["tuned_by"]["trial"] == entry["trial"]
        )
        val_auc = json.loads((fold / "metrics.json").read_text())["cohorts"]["val"]["auc"]
        assert val_auc == pytest.approx(
            entry["inner_val_auc"][0]
        )  # fold k's best trial's model, trained again
        lrs.append(entry["overrides"]["lr"])
    assert lrs[0] != lrs[1]  # one configuration per outer fold, not one for all
    assert not (out / "toy" / "abmil").exists()  # trials never write fold folders
    report = out / "toy" / "report"
    for name in ("sweep_abmil.md", "sweep_abmil.tex", "sweep_abmil_history.png", "sweep_abmil_lr.png"):
        assert (report / name).is_file()
    assert "| 0 | " in (report / "sweep_abmil.md").read_text() and "Results in" in printed

    trained = []
    monkeypatch.setattr(jobs, "fit", lambda *a, **k: trained.append(1))
    code, _, err = bench(
        monkeypatch, capsys, *args[:4], "--trials", "0", *args[6:], "--out", str(out), "--quiet"
    )
    assert code == 0, err  # --trials 0: report the studies as they are; abmil[best] is on disk already
    assert (
        not trained and yaml.safe_load((out / "toy" / "sweeps" / "abmil" / "best.yaml").read_text()) == best
    )
    # another split of the patients (here: another seed) must not reuse configurations tuned on this one
    code, _, err = bench(
        monkeypatch,
        capsys,
        "run",
        "--methods",
        "abmil[best]",
        "--task",
        str(small_task),
        "--folds",
        "2",
        "--seed",
        "1",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 2 and "tuned on another split" in err.replace("\n", " ") and not trained


def test_inner_cv_search_partitions_the_fold_s_training_and_validation_patients(
    small_task, tmp_path, monkeypatch
):
    """With --inner-folds 2, outer fold k's trial scores two held-out parts that together are exactly fold
    k's training and validation patients; its test patients are never read."""
    read, scored = _spy_search(monkeypatch)
    opts = RunOptions(out=tmp_path / "res", folds=2, epochs=1, quiet=True)
    studies = search(str(small_task), SweepOptions("abmil", trials=1, inner_folds=2), opts)
    splits = taskdata.prepare_task(str(small_task), RunOptions(out=tmp_path / "x", folds=2)).splits
    assert set(studies) == {0, 1}
    for k in range(2):
        parts = [cases for outer, cases in scored if outer == k]
        seen = _cases(splits, k, "train") | _cases(splits, k, "val")
        assert len(parts) == 2 and not parts[0] & parts[1] and parts[0] | parts[1] == seen
        assert all(not slides & set(fold_parts(splits, k)["test"]) for outer, _, slides in read if outer == k)
        trial = studies[k].trials[0]
        assert len(trial.user_attrs["inner_val_auc"]) == 2 and set(trial.intermediate_values) == {0, 1}
    with pytest.raises(BenchError, match="searched with"):  # a study never mixes designs
        search(str(small_task), SweepOptions("abmil", trials=0, inner_folds=1), opts)


def test_best_yaml_of_a_former_flat_sweep_is_refused(small_task, tmp_path):
    data = taskdata.prepare_task(str(small_task), RunOptions(out=tmp_path, folds=2))
    path = best_path(tmp_path, "toy", "abmil")
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"method": "abmil", "overrides": {"lr": 1e-3}}))
    with pytest.raises(BenchError, match="one configuration per outer fold"):
        jobs.method_config(data, "abmil[best]", RunOptions(out=tmp_path, folds=2), fold=0)


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


def test_report_has_each_fold_s_best_trial_and_sensitivity_figures(tmp_path):
    margin = optuna.distributions.FloatDistribution(0.0, 0.6)
    memory = optuna.distributions.CategoricalDistribution([2, 4, 8, 16, 32, 64])
    studies = {k: optuna.create_study(direction="maximize") for k in (0, 1)}
    for k, study in studies.items():
        study.set_user_attr("search", {"outer_fold": k, "outer_folds": 2, "split": "x", "inner_folds": 2})
    for i, (m, size) in enumerate([(0.1, 4), (0.3, 8), (0.5, 16), (0.2, 8), (0.4, 64)]):
        studies[int(i >= 3)].add_trial(
            optuna.trial.create_trial(
                params={"margin": m, "memory_size": size},
                distributions={"margin": margin, "memory_size": memory},
                value=0.6 + 0.05 * i,
                user_attrs={"inner_val_auc": [0.55 + 0.05 * i, 0.65 + 0.05 * i]},
                intermediate_values={0: 0.55 + 0.05 * i, 1: 0.6 + 0.05 * i},  # running means
            )
        )
    studies[1].add_trial(
        optuna.trial.create_trial(
            params={"margin": 0.6, "memory_size": 2},
            distributions={"margin": margin, "memory_size": memory},
            state=optuna.trial.TrialState.PRUNED,
            intermediate_values={0: 0.5},
        )
    )
    paths = write_sweep_report(studies, tmp_path, "odx", "momkd", ["markdown", "latex"])
    names = {p.name for p in paths}
    figures = ("sweep_momkd_history", "sweep_momkd_margin", "sweep_momkd_memory_size")
    tables = {f"{stem}.{e}" for stem in ("sweep_momkd", "sweep_momkd_sensitivity") for e in ("md", "tex")}
    assert names == tables | {f + e for f in figures for e in (".png", ".svg")}
    md = (tmp_path / "odx" / "report" / "sweep_momkd.md").read_text()
    # fold 0's best is its trial 2 (margin 0.5, 16), fold 1's its trial 1 (0.4, 64); inner SD 0.1 / sqrt(2)
    assert (
        "| 0 | 2 | 3/0/0 | 70.0 ± 7.1 | 0.5 | 16 |" in md
        and "| 1 | 1 | 2/1/0 | 80.0 ± 7.1 | 0.4 | 64 |" in md
    )
    assert "2-fold inner CV" in md
    sens = (tmp_path / "odx" / "report" / "sweep_momkd_sensitivity.md").read_text()
    # all six trials pooled on their common first inner fold (the pruned one, margin 0.6, is the worst there):
    # margin ranks 1,3,5,2,4,6 against AUC ranks 2,3,4,5,6,1, so rho = 1 - 6 * 40 / (6 * 35) = -0.14
    assert (
        "| margin |" in sens and "| -0.14 |" in sens and "| 6 |" in sens and "first 1 inner fold(s)" in sens
    )
    assert "range 60.0–80.0" in sens and "median inner-fold SD 7.1, 2 inner folds" in sens
    assert "2 outer folds' searches pooled" in sens


def test_sensitivity_of_a_flat_study_is_undefined_not_an_error(tmp_path):
    study = optuna.create_study(direction="maximize")
    margin = optuna.distributions.FloatDistribution(0.0, 0.6)
    for m in (0.1, 0.3, 0.5):  # every trial at chance: fANOVA has no variance to share out, rho is undefined
        study.add_trial(
            optuna.trial.create_trial(params={"margin": m}, distributions={"margin": margin}, value=0.5)
        )
    write_sweep_report({0: study}, tmp_path, "odx", "momkd", ["markdown"])
    sens = (tmp_path / "odx" / "report" / "sweep_momkd_sensitivity.md").read_text()
    assert "| margin | – | – | – | 3 |" in sens


def _shared_study_check(storage: str, name: str, trials: int) -> None:
    """Each outer fold's study (of a 2-fold sweep) has ``trials`` finished trials, run by both workers."""
    for k in range(2):
        study = optuna.load_study(study_name=f"{name}-fold{k}", storage=make_storage(storage))
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
    """Two separate ``bench sweep`` processes (as on two machines) on one PostgreSQL study; a third writes
    best.yaml and the report. The URL's password is in no output and no file."""
    url, name = os.environ["BENCH_TEST_POSTGRES_URL"], f"test-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "bench.cli", "sweep", "abmil", "--task", str(small_task)]
    cmd += ["--folds", "2", "--epochs", "1", "--storage", url, "--study-name", name, "--no-run-best"]
    procs = [
        subprocess.Popen(
            [*cmd, "--trials", "2", "--out", str(tmp_path / f"w{i}"), "--sampler-seed", str(i)],
            env=SUBPROCESS_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    _shared_study_check(url, name, 4)
    last = subprocess.run(
        [*cmd, "--trials", "0", "--out", str(tmp_path / "w0")],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert last.returncode == 0, last.stderr
    written = "".join(
        p.read_text(errors="replace")
        for p in (tmp_path / "w0").rglob("*")
        if p.suffix in {".yaml", ".md", ".tex", ".log"}
    )
    password = urlsplit(url).password or ""
    for text in (*outputs, last.stdout, last.stderr, written):
        assert not password or password not in text
    for k in range(2):
        optuna.delete_study(study_name=f"{name}-fold{k}", storage=url)


def test_sweep_on_a_survival_task_maximises_the_c_index(os_task, tmp_path, monkeypatch, capsys):
    """Each outer fold's trial value is Harrell's c-index of the validation predictions it trained on (a
    multiclass search's is the macro AUC through the same ``patient_auc`` as a binary one's)."""
    from bench.evaluate import c_index, patient_level

    seen = []
    real = sweep.train_fold

    def spy(*args, **kwargs):
        fitted = real(*args, **kwargs)
        seen.append(fitted.val)
        return fitted

    monkeypatch.setattr(sweep, "train_fold", spy)
    out = tmp_path / "res"
    args = ["sweep", "abmil", "--task", str(os_task), "--trials", "1", "--folds", "2", "--epochs", "1"]
    code, _, err = bench(monkeypatch, capsys, *args, "--out", str(out), "--quiet")
    assert code == 0, err
    best = yaml.safe_load((out / "os" / "sweeps" / "abmil" / "best.yaml").read_text())
    assert len(seen) == 2  # one trial per outer fold
    for k, val in enumerate(seen):
        pat = patient_level(val)
        expected = c_index(pat.time.to_numpy(), pat.event.to_numpy(), pat.risk.to_numpy())
        assert best["folds"][k]["mean_val_auc"] == pytest.approx(expected, abs=1e-6)
    assert (out / "os" / "abmil[best]" / "fold_1" / "metrics.json").is_file()

"""Experiment tracking (bench/tracking.py): each fold's run read back through MLflow's own client and
TensorBoard's event reader; results never change with tracking; an unreachable store is a warning, never a
failed run; without the 'tracking' extra, ``--track`` says how to install it. The tests that need the extra
skip without it."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.commands import run
from bench.config import Tracking
from bench.errors import BenchError, TrackingWarning
from bench.jobs import Job, plan_job
from bench.sweep import SweepOptions, search
from bench.taskdata import RunOptions, prepare_task
from bench.tracking import open_tracker, resolve_tracking, tracking_spec
from bench.tracking.base import flatten, numeric

FOLDS = 2


def _opts(out: Path, **kw) -> RunOptions:
    return RunOptions(out=out, **{"folds": FOLDS, "epochs": 2, "quiet": True, **kw})


def _fold(out: Path, k: int) -> tuple[dict, dict]:
    folder = out / "toy" / "abmil" / f"fold_{k}"
    return yaml.safe_load((folder / "config.yaml").read_text()), json.loads(
        (folder / "metrics.json").read_text()
    )


# ------------------------------------------------------------------------------------- without the backends


def test_tracking_never_enters_the_configuration_hash(small_task, tmp_path):
    """A fold's hash is the same with --track, with a task's tracking block, and without either."""
    data = prepare_task(str(small_task), _opts(tmp_path))
    job = Job(str(small_task), "abmil", 0)
    plain = plan_job(data, job, _opts(tmp_path)).hash
    assert plan_job(data, job, _opts(tmp_path, track=Tracking(backend="tensorboard"))).hash == plain
    tracked_task = small_task.with_name("tracked.yaml")
    raw = yaml.safe_load(small_task.read_text())
    tracked_task.write_text(yaml.safe_dump({**raw, "tracking": {"backend": "mlflow", "uri": "store"}}))
    tracked = prepare_task(str(tracked_task), _opts(tmp_path))
    assert tracked.task.tracking.uri == str(tmp_path / "store")  # relative to the YAML's folder
    assert plan_job(tracked, Job(str(tracked_task), "abmil", 0), _opts(tmp_path)).hash == plain


def _extra(monkeypatch, installed: bool) -> None:
    """Make the 'tracking' extra look installed or not (``--track`` checks for it before anything else)."""
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in {"mlflow", "tensorboard"}:
            return object() if installed else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_the_command_line_wins_and_uris_default_under_out(tmp_path, monkeypatch):
    _extra(monkeypatch, installed=True)  # resolving needs no backend, only the check that it is there
    task = Tracking(backend="mlflow", uri="http://mlflow.lab:5000")
    out = tmp_path / "res"
    assert resolve_tracking(None, task, out) == task
    assert resolve_tracking(None, None, out) is None
    assert resolve_tracking(Tracking(backend="none"), task, out) is None  # --track none switches it off
    tb = resolve_tracking(Tracking(backend="tensorboard"), task, out)
    assert tb == Tracking(backend="tensorboard", uri=str(out.resolve() / "tensorboard"))
    local = resolve_tracking(Tracking(backend="mlflow"), None, out)
    assert local.uri == f"sqlite:///{out.resolve()}/mlruns/mlflow.db"  # MLflow's recommended store
    assert resolve_tracking(local, None, tmp_path) == local  # resolving twice changes nothing
    folder = resolve_tracking(Tracking(backend="mlflow", uri=str(tmp_path / "store")), None, out)
    assert folder.uri == f"sqlite:///{tmp_path}/store/mlflow.db"
    opts = RunOptions(out=out, track=tb)
    assert pickle.loads(pickle.dumps(opts)) == opts  # travels to spawned workers and Slurm array tasks
    with pytest.raises(BenchError, match="--track-uri needs --track"):
        tracking_spec(None, "http://x")
    with pytest.raises(BenchError, match="choose mlflow, tensorboard or none"):
        tracking_spec("wandb", None)


def test_without_the_extra_track_says_how_to_install(monkeypatch, small_task, tmp_path):
    _extra(monkeypatch, installed=False)
    for backend in ("mlflow", "tensorboard"):
        with pytest.raises(BenchError, match=r"pip install -e '\.\[tracking\]'"):
            tracking_spec(backend, None)
    assert tracking_spec("none", None) == Tracking(backend="none")  # needs nothing
    raw = yaml.safe_load(small_task.read_text())
    small_task.write_text(yaml.safe_dump({**raw, "tracking": {"backend": "mlflow"}}))
    with pytest.raises(BenchError, match=r"'tracking' extra"):  # a task's block, before any training
        run(str(small_task), ["abmil"], _opts(tmp_path))
    assert not (tmp_path / "toy" / "abmil").exists()


def test_params_respect_mlflow_limits():
    flat = flatten({"a": {"b": [1, 2], "c@d": "x" * 7000}, "e": None, "k" * 300: 1})
    assert flat["a.b"] == "[1, 2]" and flat["e"] == "null"
    assert len(flat["a.c_at_d"]) == 6000 and flat["a.c_at_d"].endswith("…")
    assert max(len(k) for k in flat) == 250
    record = {
        "epoch": 3,
        "train_loss": np.float32(0.5),
        "val_auc": float("nan"),
        "stopped": True,
        "note": "x",
    }
    assert set(numeric(record)) == {"train_loss", "val_auc"}  # NumPy scalars kept; booleans, text left out


# ------------------------------------------------------------------------------------------------- MLflow


def test_mlflow_runs_read_back(small_task, tmp_path):
    """The folds log to the default SQLite store under --out: task experiment -> method run -> nested fold
    runs, with the config and its hash, every epoch, the final metrics per cohort and the fold's files; a
    sweep's trials nest in the method's sweep run."""
    mlflow = pytest.importorskip("mlflow")
    tracked = tmp_path / "tracked"
    mlflow_spec = Tracking(backend="mlflow")
    run(str(small_task), ["abmil"], _opts(tracked, track=mlflow_spec))

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tracked}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("bench/toy")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["bench.level"] == "method"]
    folds = {int(r.data.tags["bench.fold"]): r for r in runs if r.data.tags["bench.level"] == "fold"}
    assert parent.info.run_name == "abmil" and sorted(folds) == list(range(FOLDS))
    summary = pd.read_csv(tracked / "toy" / "summary.csv")
    test_auc = summary[(summary.cohort == "test") & (summary.metric == "auc")].iloc[0]
    assert parent.data.metrics["test/auc_mean"] == pytest.approx(test_auc["mean"])
    for k, r in folds.items():
        config, metrics = _fold(tracked, k)
        assert r.info.status == "FINISHED" and r.info.run_name == f"fold_{k}"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.params["config_hash"] == config["hash"] == r.data.tags["bench.config_hash"]
        assert r.data.params["method_config.lr"] == str(config["method_config"]["lr"])
        for key in ("train_loss", "val_auc"):
            logged = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)]
            assert logged == [(h["epoch"], pytest.approx(h[key])) for h in metrics["history"]]
        for cohort in ("test", "ext"):
            assert r.data.metrics[f"{cohort}/auc"] == pytest.approx(metrics["cohorts"][cohort]["auc"])
        assert r.data.metrics["test/acc_at_0.5"] == pytest.approx(metrics["cohorts"]["test"]["acc@0.5"])
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert names == {"predictions.csv", "metrics.json", "config.yaml"}
        got = pd.read_csv(
            client.download_artifacts(r.info.run_id, "predictions.csv", str(tmp_path / f"dl{k}"))
        )
        pd.testing.assert_frame_equal(
            got, pd.read_csv(tracked / "toy" / "abmil" / f"fold_{k}" / "predictions.csv")
        )

    # bench sweep: each outer fold's trials nested in the method's sweep run, with their overrides and scores
    studies = search(
        str(small_task), SweepOptions("abmil", trials=1), _opts(tracked, epochs=1, track=mlflow_spec)
    )
    runs = client.search_runs([exp.experiment_id])
    (sweep,) = [r for r in runs if r.data.tags["bench.level"] == "sweep"]
    trials = {int(r.data.tags["bench.fold"]): r for r in runs if r.data.tags["bench.level"] == "trial"}
    assert sweep.info.run_name == "abmil sweep" and sorted(trials) == list(range(FOLDS))
    for k, r in trials.items():
        (best,) = studies[k].trials
        assert (
            r.data.tags["mlflow.parentRunId"] == sweep.info.run_id
            and r.data.tags["optuna.state"] == "COMPLETE"
        )
        assert r.data.metrics["mean_val_auc"] == pytest.approx(best.value)
        assert {key: float(v) for key, v in r.data.params.items()} == pytest.approx(best.params)


def test_unreachable_store_is_a_warning_and_the_run_goes_on(small_task, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = Tracking(backend="mlflow", uri="http://127.0.0.1:9")  # the discard port: connection refused
    with pytest.warns(TrackingWarning, match="127.0.0.1:9"):
        run(str(small_task), ["abmil"], _opts(tmp_path, epochs=1, track=dead))
    assert (tmp_path / "toy" / "summary.csv").is_file() and _fold(tmp_path, 1)[1]["cohorts"]
    with pytest.warns(TrackingWarning, match="abmil fold 0"):  # a store gone mid-run: every call is safe
        fold = open_tracker(dead, tmp_path).fold("toy", "abmil", 0)
    fold.epoch(0, {"epoch": 0, "train_loss": 1.0})
    fold.finish({}, "h", {}, tmp_path)
    fold.close(True)


# --------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_read_back_and_results_unchanged(small_task, tmp_path):
    """Each fold's event files hold every epoch, the final metrics, the config and a PR curve per cohort;
    summary.csv is byte for byte the untracked run's; a sweep's trials are hparams sessions."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    plain = tmp_path / "plain"
    run(str(small_task), ["abmil"], _opts(plain))
    tb = Tracking(backend="tensorboard")
    run(str(small_task), ["abmil"], _opts(tmp_path, track=tb))
    assert (plain / "toy" / "summary.csv").read_bytes() == (tmp_path / "toy" / "summary.csv").read_bytes()
    for k in range(FOLDS):
        config, metrics = _fold(tmp_path, k)
        events = EventAccumulator(str(tmp_path / "tensorboard" / "toy" / "abmil" / f"fold_{k}"))
        events.Reload()
        val_auc = [(e.step, e.value) for e in events.Scalars("val_auc")]
        assert val_auc == [(h["epoch"], pytest.approx(h["val_auc"])) for h in metrics["history"]]
        (final,) = events.Scalars("test/auc")
        assert final.step == metrics["best_epoch"]
        assert final.value == pytest.approx(metrics["cohorts"]["test"]["auc"])
        (text,) = events.Tensors("config/text_summary")
        assert config["hash"] in text.tensor_proto.string_val[0].decode()
        assert {"test/pr_curve", "ext/pr_curve"} <= set(events.Tags()["tensors"])
    studies = search(str(small_task), SweepOptions("abmil", trials=1), _opts(tmp_path, epochs=1, track=tb))
    for k in range(FOLDS):  # each trial's overrides and score for TensorBoard's HParams dashboard
        events = EventAccumulator(
            str(tmp_path / "tensorboard" / "toy" / "abmil-sweep" / f"fold_{k}" / "trial_0")
        )
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        tried = HParamsPluginData.FromString(content).session_start_info.hparams
        assert {k: v.number_value for k, v in tried.items()} == pytest.approx(studies[k].trials[0].params)
        assert events.Scalars("mean_val_auc")[0].value == pytest.approx(studies[k].trials[0].value)


@pytest.mark.slow
def test_slurm_array_tasks_log_too(small_task, tmp_path):
    """The tracking options travel pickled into another process (an array task of submitit's local executor,
    as a --workers process gets them), which opens its backend and logs its fold (TensorBoard: the backend
    a fresh process imports fastest; which backend does not change how the options travel)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bench.commands import start_tracking
    from bench.executors import SlurmOptions, submit_slurm

    opts = _opts(tmp_path, epochs=1, track=Tracking(backend="tensorboard"))
    data = prepare_task(str(small_task), opts)
    opts = start_tracking([data], ["abmil"], opts)
    handles = submit_slurm(data, [Job(str(small_task), "abmil", 1)], opts, SlurmOptions(), cluster="local")
    assert [h.result() for h in handles] == ["trained"]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "toy" / "abmil" / "fold_1"))
    events.Reload()
    (final,) = events.Scalars("test/auc")
    assert final.value == pytest.approx(_fold(tmp_path, 1)[1]["cohorts"]["test"]["auc"])


@pytest.mark.parametrize("command", [["run"], ["sweep", "abmil"], ["ablate", "momkd"]])
def test_every_training_command_takes_track(command, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(
        sys, "argv", ["bench", *command, "--task", "odx", "--out", str(tmp_path), "--track", "x"]
    )
    from bench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main()
    assert (
        exit_.value.code == 2 and "--track 'x': choose mlflow, tensorboard or none" in capsys.readouterr().err
    )

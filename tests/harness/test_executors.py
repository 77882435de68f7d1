"""Executors and claims: a process pool gives the serial results, two processes sharing an output folder never
run a fold twice, a run killed with SIGKILL resumes to the same summary, Slurm arrays through submitit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.device as device
import bench.executors as executors
from bench.commands import run
from bench.jobs import expand_jobs, run_job, stage_bags
from bench.locks import HOST, is_stale, try_claim
from bench.store import FOLD_FILES, write_summary
from bench.taskdata import RunOptions, prepare_task
from methods.base import Bag

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def bench_cmd(task: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        "--methods",
        "abmil",
        "--task",
        str(task),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def predictions(out: Path, folds: int) -> list[pd.DataFrame]:
    return predictions_of(out, "abmil", folds)


def predictions_of(out: Path, method: str, folds: int) -> list[pd.DataFrame]:
    return [pd.read_csv(out / "toy" / method / f"fold_{k}" / "predictions.csv") for k in range(folds)]


def log_events(out: Path) -> Counter:
    """(event, job) counts of claims.log; a line is ``<time> <host> <pid> <event> <job>``."""
    lines = (out / "toy" / "claims.log").read_text().splitlines()
    return Counter((line.split(" ", 4)[3], line.split(" ", 4)[4]) for line in lines)


# ------------------------------------------------------------------------------------------------ claims


def test_claim_is_exclusive_and_released(tmp_path):
    path, log = tmp_path / "m" / "fold_0.claim", tmp_path / "claims.log"
    claim = try_claim(path, "m fold 0", log)
    assert claim is not None and json.loads(path.read_text())["pid"] == os.getpid()
    assert try_claim(path, "m fold 0", log) is None  # held by a live process (this one)
    with claim:
        claim.outcome = "trained"
    assert not path.exists()
    assert [line.split()[3] for line in log.read_text().splitlines()] == ["claimed", "trained"]


def test_stale_claims_are_recovered(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "fold_0.claim"
    path.write_text(json.dumps({"host": HOST, "pid": dead.pid, "token": "x"}))
    assert is_stale(path)
    claim = try_claim(path, "m fold 0", tmp_path / "claims.log")
    assert claim is not None
    claim.release()
    assert "recovered stale claim" in (tmp_path / "claims.log").read_text()

    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))  # fresh heartbeat
    assert not is_stale(path) and try_claim(path, "m fold 0") is None
    old = time.time() - 3600
    os.utime(path, (old, old))  # no heartbeat for an hour: that node is gone
    assert is_stale(path)
    claim = try_claim(path, "m fold 0")
    assert claim is not None
    claim.release()


# ------------------------------------------------------------------------------------------- local pool


@pytest.mark.slow
def test_pool_gives_the_serial_results(small_task, tmp_path):
    serial, pooled = tmp_path / "serial", tmp_path / "pooled"
    a = run(str(small_task), ["abmil"], RunOptions(out=serial, quiet=True, folds=2, epochs=2))
    b = run(str(small_task), ["abmil"], RunOptions(out=pooled, quiet=True, folds=2, epochs=2, workers=2))
    for pa, pb in zip(predictions(serial, 2), predictions(pooled, 2), strict=True):
        pd.testing.assert_frame_equal(pa, pb, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=False)
    assert len({line.split()[2] for line in (pooled / "toy" / "claims.log").read_text().splitlines()}) == 2


@pytest.mark.slow
def test_pool_workers_see_this_process_environment_and_folder(small_task, tmp_path, monkeypatch):
    """Workers fork from a server started by an earlier pool, yet read the environment and the working folder
    of the process that starts their pool (as spawned workers would)."""
    run(
        str(small_task),
        ["abmil"],
        RunOptions(out=tmp_path / "first", quiet=True, folds=2, epochs=1, workers=2),
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))  # where the workers cache the kNN graphs
    run(
        str(small_task), ["momkd"], RunOptions(out=Path("relative"), quiet=True, folds=2, epochs=1, workers=2)
    )
    assert len(predictions_of(tmp_path / "relative", "momkd", 2)) == 2
    assert any((tmp_path / "cache" / "graphs").iterdir())


def test_worker_devices_and_threads(monkeypatch):
    bag = Bag(torch.zeros(3, 4), torch.tensor(1))
    assert stage_bags([[bag]], torch.device("cpu"))[0][0] is bag  # no copies on the CPU
    assert device.worker_device("cpu", 3) == torch.device("cpu")
    cores = len(os.sched_getaffinity(0))
    assert device.worker_threads(1) == cores and device.worker_threads(4 * cores) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [device.worker_device("auto", i) for i in range(3)] == [
        torch.device(f"cuda:{i}") for i in (0, 1, 0)
    ]  # round robin over the GPUs
    assert device.worker_device("cuda:1", 0) == torch.device("cuda:1")  # an explicit GPU is kept


# ------------------------------------------------------------------------------------ real subprocesses


@pytest.mark.slow
def test_two_processes_never_run_a_fold_twice(small_task, tmp_path):
    """A ``bench run`` subprocess and this process share one output folder: every fold trained exactly once."""
    out = tmp_path / "shared"
    proc = subprocess.Popen(bench_cmd(small_task, out, "--folds", "4", "--epochs", "2"), env=SUBPROCESS_ENV)
    log = out / "toy" / "claims.log"
    deadline = time.time() + 600  # generous: a loaded machine starts torch slowly
    while not log.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)  # start once the other process holds its first claim
    summary = run(str(small_task), ["abmil"], RunOptions(out=out, quiet=True, folds=4, epochs=2))
    assert proc.wait(timeout=300) == 0
    events = log_events(out)
    assert all(events[("trained", f"abmil fold {k}")] == 1 for k in range(4))
    assert sum(n for (event, _), n in events.items() if event == "trained") == 4
    assert not any(event.startswith("recovered") for event, _ in events)
    workers = {line.split()[2] for line in log.read_text().splitlines() if line.split()[3] == "trained"}
    assert str(proc.pid) in workers and workers <= {str(proc.pid), str(os.getpid())}
    assert (summary.n == 4).all()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_summary(small_task, tmp_path):
    reference = run(
        str(small_task), ["abmil"], RunOptions(out=tmp_path / "ref", quiet=True, folds=4, epochs=2)
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen(bench_cmd(small_task, out, "--folds", "4", "--epochs", "2"), env=SUBPROCESS_ENV)
    first = out / "toy" / "abmil" / "fold_0" / "config.yaml"
    deadline = time.time() + 600  # generous: a loaded machine starts torch slowly
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folds = out / "toy" / "abmil"
    done = [k for k in range(4) if all((folds / f"fold_{k}" / f).is_file() for f in FOLD_FILES)]
    assert 0 in done and len(done) < 4, "the run was not killed mid-way"
    # claims of unfinished folds (a kill right after a fold's rename can leave a harmless claim of a done fold)
    left = [c for c in folds.glob("*.claim") if int(c.name.split("_")[1].split(".")[0]) not in done]
    before = len((out / "toy" / "claims.log").read_text().splitlines())

    resumed = run(str(small_task), ["abmil"], RunOptions(out=out, quiet=True, folds=4, epochs=2))
    pd.testing.assert_frame_equal(reference.reset_index(drop=True), resumed.reset_index(drop=True))
    events = log_events(out)
    # the kill may land between a fold's rename and its log line: count what the restart itself trained
    after = (out / "toy" / "claims.log").read_text().splitlines()[before:]
    assert sum(line.split(" ", 4)[3] == "trained" for line in after) == 4 - len(done)
    if left:  # killed while holding a claim: that claim was recovered, not waited on
        assert any(event == "recovered" for event, _ in events)
    assert all(int(c.name.split("_")[1].split(".")[0]) in done for c in folds.glob("*.claim"))


# ------------------------------------------------------------------------------------------------- slurm


@pytest.mark.slow
def test_slurm_array_through_submitit_local_executor(small_task, tmp_path, monkeypatch, capsys):
    """The Slurm path (pickled tasks, one array, job ids printed), run by submitit's local executor."""
    opts = RunOptions(out=tmp_path, folds=2, epochs=1)
    data = prepare_task(str(small_task), opts)
    jobs = expand_jobs(str(small_task), ["abmil"], 2)
    run_job(data, jobs[0], opts)  # fold 0 is on disk already: only fold 1 is submitted
    submitted = []

    def local_submit(*args, **kwargs):
        handles = real_submit(*args, **kwargs, cluster="local")
        submitted.extend(handles)
        return handles

    real_submit = executors.submit_slurm
    monkeypatch.setattr(executors, "submit_slurm", local_submit)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    args = bench_cmd(small_task, tmp_path, "--folds", "2", "--epochs", "1")[3:]
    args += [
        "--executor",
        "slurm",
        "--slurm-partition",
        "gpu",
        "--slurm-gpus",
        "0",
        "--slurm-extra",
        "qos=high",
    ]
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    from bench.cli import main

    main()
    printed = capsys.readouterr().out
    ids = re.search(r"Submitted 1 job\(s\): (.+)", printed).group(1).split()
    assert ids == [j.job_id for j in submitted] and "bench report" in printed
    assert [j.result() for j in submitted] == ["trained"]
    assert (write_summary(tmp_path, "toy").n == 2).all()
    assert real_submit(data, jobs, opts, executors.SlurmOptions(), cluster="local") == []  # all on disk


def test_slurm_without_a_cluster_is_a_one_paragraph_error(small_task, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun or sbatch to be found
    monkeypatch.setattr(sys, "argv", ["bench", *bench_cmd(small_task, tmp_path)[3:], "--executor", "slurm"])
    from bench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--executor slurm" in err and "Traceback" not in err

"""Results on disk survive crashes and sharing: unreadable folds rerun (moved aside, never deleted), stale
temporaries are cleared, files are flushed before they are published, summaries use one fold design under a
lock, and files follow the user's umask."""

from __future__ import annotations

import os
import threading
import time

import pandas as pd
import pytest

import bench.store as store
from bench.commands import run
from bench.locks import try_claim
from bench.store import fold_status, iter_fold_dirs, write_fold, write_summary
from bench.taskdata import RunOptions


@pytest.fixture
def opts(tmp_path):
    return RunOptions(out=tmp_path / "res", quiet=True)


def _pred() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": ["s0", "s1"],
            "case_id": ["c0", "c1"],
            "label": [0, 1],
            "prob": [0.2, 0.7],
            "cohort": "test",
        }
    )


def _metrics(auc: float) -> dict:
    return {
        "cohorts": {
            "test": {"auc": auc, "acc": 0.5, "balanced_acc": 0.5, "f1": 0.5, "threshold": 0.5, "n": 2}
        }
    }


@pytest.mark.parametrize(
    ("name", "content"), [("metrics.json", ""), ("metrics.json", '{"cohorts": '), ("predictions.csv", "")]
)
def test_unreadable_fold_is_rerun_and_kept_aside(small_task, opts, name, content):
    run(str(small_task), ["abmil"], opts)
    fold = opts.out / "toy" / "abmil" / "fold_1"
    (fold / name).write_text(content)  # what a crash between open and write leaves
    assert fold_status(fold, "anything") == "corrupt"
    summary = run(str(small_task), ["abmil"], opts)  # the report side skips it, the run redoes it
    asides = list(fold.parent.glob("fold_1.corrupt-*"))
    assert len(asides) == 1 and (asides[0] / name).read_text() == content
    assert store.fold_readable(fold)
    assert (summary[summary.metric == "auc"].n == 3).all()
    log = (opts.out / "toy" / "claims.log").read_text()
    assert log.count("trained abmil fold 1") == 2 and log.count("trained") == 4


def test_stale_temporaries_of_a_killed_writer_are_removed(small_task, opts):
    run(
        str(small_task),
        ["abmil"],
        opts,
    )
    method_dir = opts.out / "toy" / "abmil"
    leftover = method_dir / ".fold_0.tmp-abc123"
    leftover.mkdir()
    (leftover / "predictions.csv").write_text("half")
    import shutil

    shutil.rmtree(method_dir / "fold_0")
    run(str(small_task), ["abmil"], opts)
    assert not leftover.exists() and store.fold_readable(method_dir / "fold_0")


def test_an_aside_is_never_overwritten(tmp_path):
    path = tmp_path / "m" / "fold_0"
    for auc in (0.1, 0.2, 0.3):
        write_fold(path, _pred(), _metrics(auc), {"folds": 5, "seed": 0}, f"h{auc}")
        (path / "config.yaml").write_text("hash: same\n")  # every old one looks like the same old config
    asides = sorted(p.name for p in path.parent.iterdir() if p.name.startswith("fold_0."))
    assert asides == ["fold_0.replaced-same", "fold_0.replaced-same-2"]


def test_files_are_flushed_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    path = tmp_path / "m" / "fold_0"
    write_fold(path, _pred(), _metrics(0.5), {"folds": 5, "seed": 0}, "h")
    publish = events.index(("rename", str(path)))
    synced = {os.path.basename(p) for kind, p in events[:publish] if kind == "fsync"}
    assert {"predictions.csv", "metrics.json", "config.yaml"} <= synced
    events.clear()
    store.atomic_write_text(tmp_path / "x.csv", "a\n")
    assert events and events[0][0] == "fsync"


def _fold(out, method: str, k: int, folds: int, seed: int, auc: float) -> None:
    write_fold(out / "t" / method / f"fold_{k}", _pred(), _metrics(auc), {"folds": folds, "seed": seed}, "h")


def test_summary_uses_one_fold_design(tmp_path):
    for k in range(5):
        _fold(tmp_path, "m", k, 5, 0, 0.8)
    for k in range(2):
        _fold(tmp_path / "other", "m", k, 2, 0, 0.1)
    # an earlier --folds 2 run left folds 0-1 of its own design, later overwritten; here: a stray 7-fold fold 6
    _fold(tmp_path, "m", 6, 7, 0, 0.0)
    s = write_summary(tmp_path, "t", (5, 0))
    auc = s[(s.metric == "auc")].iloc[0]
    assert auc["n"] == 5 and auc["mean"] == pytest.approx(0.8)
    s = write_summary(tmp_path, "t")  # no design given: the one most folds share, as the report
    assert s[(s.metric == "auc")].iloc[0]["n"] == 5
    assert [loc.fold for loc in iter_fold_dirs(tmp_path, "t")] == [0, 1, 2, 3, 4, 6]


def test_concurrent_summary_writers_take_a_lock(tmp_path, monkeypatch):
    """A slow writer holding an old view of the disk cannot replace a newer summary: collection happens
    inside the lock, so the second writer waits and collects after the first has written."""
    for k in range(3):
        _fold(tmp_path, "m", k, 5, 0, 0.5)
    real = store.collect_metrics
    order = []

    def slow(*args, **kwargs):
        order.append("collect")
        result = real(*args, **kwargs)
        time.sleep(0.3)
        order.append("collected")
        return result

    monkeypatch.setattr(store, "collect_metrics", slow)
    threads = [threading.Thread(target=write_summary, args=(tmp_path, "t", (5, 0))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["collect", "collected", "collect", "collected"]


def test_files_follow_the_users_umask(tmp_path):
    old = os.umask(0o002)  # a lab sharing --out: group-writable
    try:
        path = tmp_path / "m" / "fold_0"
        write_fold(path, _pred(), _metrics(0.5), {"folds": 5, "seed": 0}, "h")
        store.atomic_write_text(tmp_path / "summary.csv", "x\n")
        claim = try_claim(tmp_path / "m" / "fold_1.claim", "m fold 1", tmp_path / "claims.log")
        claim_mode = claim.path.stat().st_mode & 0o777
        claim.release("trained")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o775
    assert (path / "metrics.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "summary.csv").stat().st_mode & 0o777 == 0o664
    assert claim_mode == 0o664 and (tmp_path / "claims.log").stat().st_mode & 0o777 == 0o664

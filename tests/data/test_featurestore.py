"""The shared feature store: bags are views of one memory-mapped copy per file, bit-identical to the files; a
changed file gets a new entry; processes that build an entry at once all end with the one complete entry; and
a run predicts the same with the store and without it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest

from bench.commands import run
from bench.data import featurestore
from bench.data.cohort import load_cohort, read_slide_cached, slide_bag
from bench.data.formats import read_slide, write_trident_h5
from bench.data.task import load_task
from bench.locks import HOST
from bench.taskdata import RunOptions


@pytest.fixture
def store(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("BENCH_FEATURE_STORE", str(root))
    return root


def _slide(tmp_path, n: int = 30, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    coords = np.stack([np.arange(n), np.arange(n) % 5], axis=1) * 512
    path = tmp_path / "features" / "S-01.h5"
    write_trident_h5(path, feats, coords, extras={"relevance": rng.random(n).astype(np.float32)})
    return path


def test_bags_are_views_of_the_mapped_store_bit_identical_to_the_file(tmp_path, store):
    path = _slide(tmp_path)
    sf, expected = read_slide_cached(path), read_slide(path)
    assert (
        isinstance(sf.features, np.memmap) and (featurestore.entry_path(path, store) / "meta.json").is_file()
    )
    assert np.array_equal(sf.features, expected.features) and sf.features.dtype == np.float32
    assert np.array_equal(sf.coords, expected.coords) and sf.step_level0 == expected.step_level0
    assert np.array_equal(sf.extras["relevance"], expected.extras["relevance"])
    bag = slide_bag(path, 1, "S-01", "S")
    assert bag.features.data_ptr() == sf.features.ctypes.data  # the mapped pages, not a copy
    assert slide_bag(path, 1, "S-01", "S").features.data_ptr() == bag.features.data_ptr()


def test_writing_into_a_bag_changes_neither_the_store_nor_another_reader(tmp_path, store):
    path = _slide(tmp_path)
    first = featurestore.load_or_store(path, store).slide.features
    first[0, 0] = 1e6  # copy-on-write: this process's private page only
    again = featurestore.load_or_store(path, store).slide.features
    assert again[0, 0] == read_slide(path).features[0, 0] != 1e6


def test_a_changed_feature_file_gets_a_new_entry(tmp_path, store):
    path = _slide(tmp_path)
    before = featurestore.entry_path(path, store)
    read_slide_cached(path)
    sf = read_slide(path)
    write_trident_h5(path, sf.features + 1.0, sf.coords * 512)  # same size: only the mtime tells
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert featurestore.entry_path(path, store) != before
    assert np.array_equal(read_slide_cached(path).features, sf.features + 1.0)
    assert sorted(p.name for p in store.iterdir()) == sorted(
        [before.name, featurestore.entry_path(path, store).name]
    )


def test_concurrent_builders_all_end_with_the_one_complete_entry(tmp_path, store, monkeypatch):
    """Four builders read the file at the same moment, each writes its own temporary and renames it; the
    first rename wins, the others see the published entry and discard theirs."""
    path = _slide(tmp_path)
    barrier, real_read = threading.Barrier(4), featurestore.read_slide

    def read_together(p):
        barrier.wait(timeout=10)
        return real_read(p)

    monkeypatch.setattr(featurestore, "read_slide", read_together)
    got, errors = [], []

    def build():
        try:
            got.append(featurestore.load_or_store(path, store).slide.features)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 4
    assert all(np.array_equal(g, read_slide(path).features) for g in got)
    assert [p.name for p in store.iterdir()] == [featurestore.entry_path(path, store).name]


def test_a_killed_build_leaves_no_entry_and_its_temporary_is_removed(tmp_path, store):
    path = _slide(tmp_path)
    entry = featurestore.entry_path(path, store)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = store / f".{entry.name}.tmp-{HOST}-{int(dead.stdout)}-0000abcd"
    (leftover / "features.npy").parent.mkdir(parents=True)  # half written: no meta.json, never renamed
    assert not entry.exists()
    featurestore.load_or_store(path, store)
    assert not leftover.exists() and entry.is_dir()


def test_an_empty_bag_is_stored(tmp_path, store):
    path = tmp_path / "features" / "empty.h5"
    write_trident_h5(path, np.zeros((0, 8), np.float32), np.zeros((0, 2)))
    assert featurestore.load_or_store(path, store).slide.features.shape == (0, 8)


def test_nan_features_are_reported_when_stored_and_when_reused(small_task, store):
    task = load_task(small_task)
    path = load_cohort(task).slides.path[0]
    sf = read_slide(path)
    sf.features[3, 1] = np.nan
    write_trident_h5(path, sf.features, sf.coords * 512)
    for _ in range(2):  # built, then read back from the entry's record
        assert any("NaN/inf features in 1 patch(es)" in p for p in load_cohort(task).problems)


def test_an_unwritable_store_falls_back_to_reading_the_files(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("BENCH_FEATURE_STORE", str(blocker / "store"))
    path = _slide(tmp_path)
    with pytest.warns(UserWarning, match="cannot use the shared feature store"):
        sf = read_slide_cached(path)
    assert not isinstance(sf.features, np.memmap) and np.array_equal(sf.features, read_slide(path).features)


def test_the_store_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BENCH_FEATURE_STORE", "0")
    assert featurestore.store_root() is None
    assert not isinstance(read_slide_cached(_slide(tmp_path)).features, np.memmap)
    monkeypatch.setenv("BENCH_FEATURE_STORE", "")
    assert featurestore.store_root() == tmp_path / "cache" / "features"


def test_a_run_predicts_the_same_with_and_without_the_store(small_task, tmp_path, store, monkeypatch):
    outs = {}
    for setting in (str(store), "0"):
        monkeypatch.setenv("BENCH_FEATURE_STORE", setting)
        outs[setting] = tmp_path / f"out-{setting != '0'}"
        run(str(small_task), ["abmil"], RunOptions(out=outs[setting], folds=2, epochs=2, quiet=True))
    assert any(store.iterdir())
    for fold in (0, 1):
        a, b = (
            pd.read_csv(out / "toy" / "abmil" / f"fold_{fold}" / "predictions.csv") for out in outs.values()
        )
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)

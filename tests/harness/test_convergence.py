"""The convergence rule in optimiser updates (bench/convergence.py) on scripted validation scores, and
``--protocol``: the built-in tasks' rule by default, each method's published settings under ``paper``."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import bench.train as train
from bench.config import list_builtin_tasks
from bench.convergence import resolve_epochs, rule_problems, update_cap, updates_per_epoch
from bench.errors import BenchError
from bench.jobs import Job, method_config, parse_methods, plan_job, run_job
from bench.taskdata import RunOptions, prepare_task
from methods import Bag, get_method_class, list_methods, resolve_config

D = 6
RULE = {"epochs": None, "val_every": 2, "min_updates": 8, "patience_updates": 4}


def _bags(n: int) -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    return [
        Bag(
            features=torch.randn(4, D, generator=g),
            label=torch.tensor(i % 2),
            slide_id=f"s{i}",
            case_id=f"p{i}",
        )
        for i in range(n)
    ]


def _fit(monkeypatch, scores, n_bags: int = 6, **overrides) -> train.TrainResult:
    """``fit`` of a tiny ABMIL whose k-th validation check scores ``scores[k]`` (AUC)."""
    it = iter(scores)
    monkeypatch.setattr(train, "_validate", lambda *a, **k: {"val_auc": next(it)})
    cfg = get_method_class("abmil").cfg_class(
        hidden_dim=8, attn_dim=4, monitor="auc", **{**RULE, **overrides}
    )
    return train.fit("abmil", cfg, D, None, _bags(n_bags), _bags(2), torch.device("cpu"), seed=0)


def test_a_plateau_stops_only_after_the_minimum_updates(monkeypatch):
    # checks every 2 updates (3 per 6-bag epoch: mid-epoch too); best at update 2, then flat
    r = _fit(monkeypatch, [0.9] + [0.5] * 20, max_updates=40)
    assert [h["updates"] for h in r.history] == [2, 4, 6, 8]  # stop at 8: min_updates, 6 >= 4 since the best
    assert (r.stopped, r.updates, r.best_updates) == ("plateau", 8, 2)
    assert r.epochs_run == 2 and r.history[1]["epoch"] == 0 and r.history[3]["epoch"] == 1


def test_a_fold_still_improving_ends_on_the_update_cap(monkeypatch):
    r = _fit(monkeypatch, [0.1 * k for k in range(1, 10)], max_updates=15)
    assert (r.stopped, r.updates) == ("cap", 15)  # the budget, mid-epoch; a last check at the cap
    assert [h["updates"] for h in r.history][-2:] == [14, 15] and r.best_updates == 15


def test_windowed_methods_are_counted_in_updates(monkeypatch):
    # a step every 4 bags: 3 updates per 12-bag epoch, so 12 updates take 4 epochs, as the budget says
    r = _fit(monkeypatch, [0.1 * k for k in range(1, 10)], n_bags=12, max_updates=12, accumulation_steps=4)
    assert (r.updates, r.epochs_run, r.stopped) == (12, 4, "cap")
    assert r.model.cfg.epochs == 4 == math.ceil(12 / updates_per_epoch(r.model.cfg, 12))
    assert [h["updates"] for h in r.history] == [2, 4, 6, 8, 10, 12]


def test_smoothing_keeps_a_lone_spike_from_being_selected(monkeypatch):
    scores = [0.5, 0.95, 0.5, 0.7, 0.72, 0.74, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    raw = _fit(monkeypatch, scores, max_updates=24, val_smoothing=1, keep_tied_best=False)
    smooth = _fit(monkeypatch, scores, max_updates=24, val_smoothing=3, keep_tied_best=False)
    assert raw.best_updates == 4  # the spike
    assert smooth.best_updates == 12 and smooth.best_score == pytest.approx((0.7 + 0.72 + 0.74) / 3)
    assert smooth.history[1]["val_score"] == pytest.approx((0.5 + 0.95) / 2)  # recorded, never selected


def test_the_epoch_rule_is_unchanged_without_an_update_budget(monkeypatch):
    r = _fit(monkeypatch, [0.5, 0.7, 0.6, 0.6, 0.6], epochs=5, patience=2, min_epochs=0)
    assert [h["updates"] for h in r.history] == [6, 12, 18, 24]  # one check per epoch
    assert (r.best_epoch, r.epochs_run, r.stopped) == (1, 4, "plateau")


def test_budget_sets_the_epochs_an_epoch_schedule_spans():
    cfg = get_method_class("tdc").cfg_class(
        epochs=None, max_updates=1000, val_every=100, patience_updates=100
    )
    assert resolve_epochs(cfg, 210).epochs == 5  # one step per bag: 210 a epoch
    ghanet = get_method_class("ghanet").cfg_class(max_updates=1000, val_every=100, patience_updates=100)
    # G-HANet carries its partial window: at least 6 updates per 210-bag epoch; its own 20 epochs still cap
    assert updates_per_epoch(ghanet, 210) == 6 and resolve_epochs(ghanet, 210).epochs == 20
    assert resolve_epochs(ghanet.replace(epochs=None), 210).epochs == 167
    assert update_cap(resolve_epochs(ghanet, 210), 210) == 120


def test_bad_rules_are_named():
    base = get_method_class("abmil").cfg_class
    assert rule_problems(base()) == []
    assert "epochs: null needs max_updates" in rule_problems(base(epochs=None))[0]
    assert any("val_every" in p for p in rule_problems(base(max_updates=10)))
    assert any(
        "min_updates" in p
        for p in rule_problems(base(max_updates=10, val_every=1, patience_updates=1, min_updates=20))
    )


def _builtin_rule() -> dict:
    rules = [yaml.safe_load(p.read_text())["train"] for p in list_builtin_tasks()]
    assert rules and all(r == rules[0] for r in rules)  # one rule, stated the same in every built-in task
    return rules[0]


def test_builtin_tasks_state_one_update_rule_for_every_method():
    rule = _builtin_rule()
    assert rule["epochs"] is None and rule["max_updates"] >= rule["min_updates"] + rule["patience_updates"]
    for name in list_methods():
        cfg = resolve_config(name, rule)
        assert rule_problems(cfg) == [] and cfg.max_updates == rule["max_updates"]


@pytest.fixture
def her2_data(small_task, tmp_path):
    """The small task with the built-in tasks' ``train:`` block."""
    text = yaml.safe_load(small_task.read_text())
    text["train"] = _builtin_rule()
    small_task.write_text(yaml.safe_dump(text))
    return small_task


def test_protocol_paper_resolves_to_each_methods_published_settings(her2_data, tmp_path):
    data = prepare_task(her2_data, RunOptions(out=tmp_path / "res"))
    for name in parse_methods("all"):  # the compared methods (not the privileged-information ceiling)
        published = resolve_config(name)
        cfg = method_config(data, name, RunOptions(protocol="paper"))
        assert (cfg.epochs, cfg.patience, cfg.min_epochs, cfg.keep_tied_best, cfg.max_updates) == (
            published.epochs,
            published.patience,
            published.min_epochs,
            published.keep_tied_best,
            None,
        )
        builtin = method_config(data, name, RunOptions())
        assert builtin.max_updates == _builtin_rule()["max_updates"] and builtin.epochs is None
    job = Job(str(her2_data), "abmil", 0)
    default, paper = plan_job(data, job, RunOptions()), plan_job(data, job, RunOptions(protocol="paper"))
    assert default.hash != paper.hash and paper.config["protocol"] == "paper"


def test_a_paper_run_records_the_published_settings(her2_data, tmp_path):
    opts = RunOptions(out=tmp_path / "res", folds=2, epochs=1, quiet=True, protocol="paper")
    data = prepare_task(her2_data, opts)
    assert run_job(data, Job(str(her2_data), "abmil", 0), opts) == "trained"
    recorded = yaml.safe_load((tmp_path / "res" / "toy" / "abmil" / "fold_0" / "config.yaml").read_text())
    assert recorded["protocol"] == "paper"
    assert recorded["method_config"]["patience"] == 20 and recorded["method_config"]["max_updates"] is None
    assert recorded["method_config"]["monitor"] == "loss"  # CLAM's, as published


def test_an_invalid_rule_in_a_task_is_a_bench_error(small_task, tmp_path):
    text = yaml.safe_load(small_task.read_text())
    text["train"] = {"max_updates": 100}
    small_task.write_text(yaml.safe_dump(text))
    data = prepare_task(small_task, RunOptions(out=tmp_path / "res"))
    with pytest.raises(BenchError, match="val_every must be at least 1"):
        method_config(data, "abmil", RunOptions())


def test_the_budget_not_the_epoch_estimate_ends_training(monkeypatch):
    """Windows without a loss term make no step (MKD's partial window): the trainer keeps going past the
    epochs the budget was estimated to take until the budget is spent."""
    real = train.create_method

    def half_silent(*args, **kwargs):
        model = real(*args, **kwargs)
        loss = model.loss
        model.loss = lambda bag, out: {} if bag.slide_id in {"s3", "s4", "s5"} else loss(bag, out)
        return model

    monkeypatch.setattr(train, "create_method", half_silent)
    r = _fit(monkeypatch, [0.1 * k for k in range(1, 40)], max_updates=30, accumulation_steps=2)
    assert (r.updates, r.stopped) == (30, "cap") and r.epochs_run > r.model.cfg.epochs


def test_a_window_larger_than_the_training_set_ends_training(monkeypatch):
    # G-HANet's carried window of 8 over 6 bags never completes: one epoch, one check, no update
    r = _fit(monkeypatch, [0.5], max_updates=30, accumulation_steps=8, carry_partial_window=True)
    assert (r.updates, r.epochs_run, len(r.history), r.stopped) == (0, 1, 1, "cap")

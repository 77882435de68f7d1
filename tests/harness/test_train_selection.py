"""The trainer's checkpoint selection on ties and its gradient accumulation, on hand-made sequences."""

from __future__ import annotations

import pytest
import torch

import bench.train as train
from methods import Bag, get_method_class

D = 6


def _bags(n: int) -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    return [
        Bag(
            features=torch.randn(4 + i % 3, D, generator=g),
            label=torch.tensor(i % 2),
            slide_id=f"s{i}",
            case_id=f"p{i}",
        )
        for i in range(n)
    ]


def _capture_model(monkeypatch) -> list:
    """The model ``fit`` builds, appended to the returned list (``fit`` creates it itself)."""
    built: list = []
    real = train.create_method

    def capture(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train, "create_method", capture)
    return built


def _scripted_fit(
    monkeypatch, scores: list[float], key: str = "val_auc", **overrides
) -> tuple[train.TrainResult, list[torch.Tensor]]:
    """``fit`` of a tiny ABMIL whose validation score of epoch e is ``scores[e]``, with each epoch's
    classifier weights (to tell which epoch was restored)."""
    it = iter(scores)
    monkeypatch.setattr(train, "_validate", lambda *a, **k: {key: next(it)})
    built = _capture_model(monkeypatch)
    cfg = get_method_class("abmil").cfg_class(
        hidden_dim=8, attn_dim=4, epochs=len(scores), patience=2, min_epochs=0, **overrides
    )
    snapshots: list[torch.Tensor] = []
    result = train.fit(
        "abmil",
        cfg,
        D,
        None,
        _bags(4),
        _bags(2),
        torch.device("cpu"),
        seed=0,
        on_check=lambda *a: snapshots.append(built[0].classifier.weight.detach().clone()),
    )
    return result, snapshots


SCORES = [0.5, 0.7, 0.7, 0.6, 0.7, 0.6, 0.6, 0.6]


def test_a_tie_keeps_the_later_epoch_and_resets_patience(monkeypatch):
    r, snapshots = _scripted_fit(monkeypatch, SCORES, monitor="auc", keep_tied_best=True)
    # best: e1 (0.7), tied at e2 and e4; after e4 two epochs without a tie or better -> stop after e6
    assert (r.best_epoch, r.epochs_run, r.best_score) == (4, 7, 0.7)
    torch.testing.assert_close(r.model.classifier.weight, snapshots[4], rtol=0, atol=0)
    assert not torch.equal(snapshots[4], snapshots[1])


def test_strict_improvement_keeps_the_first_epoch_of_a_tie(monkeypatch):
    r, snapshots = _scripted_fit(monkeypatch, SCORES, monitor="auc", keep_tied_best=False)
    # e2 and e3 are no improvement on e1 -> stop after e3 with e1's weights
    assert (r.best_epoch, r.epochs_run) == (1, 4)
    torch.testing.assert_close(r.model.classifier.weight, snapshots[1], rtol=0, atol=0)


def test_a_tied_loss_also_counts_when_minimising(monkeypatch):
    r, _ = _scripted_fit(monkeypatch, [1.0, 0.8, 0.8, 0.9, 0.95], key="val_loss", monitor="loss")
    assert r.best_epoch == 2 and r.epochs_run == 5  # abmil's default: keep_tied_best (CLAM)


def test_each_fold_says_whether_it_stopped_on_a_plateau_or_on_the_cap(monkeypatch):
    r, _ = _scripted_fit(monkeypatch, SCORES, monitor="auc", keep_tied_best=False)
    assert r.stopped == "plateau" and r.epochs_run < len(SCORES)  # two epochs without a better score
    r, _ = _scripted_fit(monkeypatch, [0.5, 0.6, 0.7, 0.8], monitor="auc")
    assert r.stopped == "cap" and r.epochs_run == 4  # still improving when the budget ran out
    r, _ = _scripted_fit(monkeypatch, [0.5, 0.9, 0.8, 0.7], monitor="auc")
    assert r.stopped == "plateau" and r.epochs_run == 4  # the last epoch met the patience rule


@pytest.mark.parametrize(
    ("method", "tied"),
    [("abmil", True), ("wikg", True), ("momkd", True), ("mkd", False), ("ghanet", False), ("tdc", False)],
)
def test_tie_rule_follows_each_reference_code(method, tied):
    assert get_method_class(method).cfg_class().keep_tied_best is tied


def _recorded_steps(monkeypatch, **overrides) -> tuple[list[list[int]], list[torch.Tensor], object]:
    """Run 2 epochs of a dropout-free ABMIL over 6 bags whose optimiser steps only record the gradient (the
    weights never move, so per-bag gradients can be recomputed after); return the bags of each step."""
    grads: list[torch.Tensor] = []
    monkeypatch.setattr(train, "_validate", lambda *a, **k: {"val_auc": 0.5})

    def record(model, optimizer, cfg):
        grads.append(model.classifier.weight.grad.detach().clone())
        optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(train, "_step", record)
    bags = _bags(6)
    cfg = get_method_class("abmil").cfg_class(
        hidden_dim=8,
        attn_dim=4,
        dropout=0.0,
        epochs=2,
        patience=5,
        monitor="auc",
        accumulation_steps=4,
        **overrides,
    )
    result = train.fit("abmil", cfg, D, None, bags, _bags(2), torch.device("cpu"), seed=3)
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([int(b.label) for b in bags])
    order = [train.epoch_order(labels, False, gen).tolist() for _ in range(2)]
    return order, grads, (result.model, bags)


def _bag_grad(model, bag: Bag) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    sum(model.loss(bag, model(bag)).values()).backward()
    return model.classifier.weight.grad.detach().clone()


def test_mean_accumulation_with_a_carried_partial_window(monkeypatch):
    """G-HANet's ``loss / gc`` and its window carried over the epoch boundary."""
    order, grads, (model, bags) = _recorded_steps(
        monkeypatch, accumulation_mean=True, carry_partial_window=True
    )
    model.train()
    g = {i: _bag_grad(model, bags[i]) for i in range(6)}
    first = [g[i] for i in order[0][:4]]
    second = [g[i] for i in order[0][4:] + order[1][:4]]  # 2 left over + the next epoch's first 4
    assert len(grads) == 2  # the last epoch's 2 leftover bags are never applied
    torch.testing.assert_close(grads[0], torch.stack(first).mean(0))
    torch.testing.assert_close(grads[1], torch.stack(second).sum(0) / 4)


def test_summed_accumulation_steps_the_partial_window_at_the_epoch_end(monkeypatch):
    order, grads, (model, bags) = _recorded_steps(monkeypatch)
    model.train()
    g = {i: _bag_grad(model, bags[i]) for i in range(6)}
    assert len(grads) == 4  # per epoch: one full window, then the 2-bag remainder
    for k, idx in enumerate([order[0][:4], order[0][4:], order[1][:4], order[1][4:]]):
        torch.testing.assert_close(grads[k], torch.stack([g[i] for i in idx]).sum(0))


def test_last_epoch_modules_are_not_restored(monkeypatch):
    """Submodules a method names keep the last epoch's weights; the rest returns to the best epoch."""
    monkeypatch.setattr(
        get_method_class("abmil"), "last_epoch_modules", lambda self: ("classifier",), raising=False
    )
    built = _capture_model(monkeypatch)
    it = iter([0.9, 0.1, 0.1])
    monkeypatch.setattr(train, "_validate", lambda *a, **k: {"val_auc": next(it)})
    states: list[dict[str, torch.Tensor]] = []
    cfg = get_method_class("abmil").cfg_class(hidden_dim=8, attn_dim=4, epochs=3, patience=5, monitor="auc")
    r = train.fit(
        "abmil",
        cfg,
        D,
        None,
        _bags(4),
        _bags(2),
        torch.device("cpu"),
        seed=0,
        on_check=lambda *a: states.append({k: v.clone() for k, v in built[0].state_dict().items()}),
    )
    assert r.best_epoch == 0
    for k, v in r.model.state_dict().items():
        want = states[2][k] if k.startswith("classifier.") else states[0][k]
        torch.testing.assert_close(v, want, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method", ["abmil", "wikg", "tdc", "mkd", "ghanet", "momkd"])
def test_only_ghanet_averages_its_window_and_carries_it_over(method):
    cfg = get_method_class(method).cfg_class()
    want = method == "ghanet"
    assert (cfg.accumulation_mean, cfg.carry_partial_window) == (want, want)
    assert cfg.accumulation_steps == {"ghanet": 32, "mkd": 16}.get(method, 1)

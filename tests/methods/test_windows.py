"""A window of bags in one batched forward (``window_loss``) against the same bags one at a time: the same
loss terms and gradients without dropout, through the trainer too (steps, carried and dropped windows)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import train
from methods import Bag, create_method
from methods.ghanet import hyperedge_weights
from methods.packing import pack_bags, pad_segments

D, G = 16, 24
#: unequal bag sizes, down to bags smaller than G-HANet's 1 / ratio (a hyperedge of one patch)
SIZES = (3, 1, 12, 40, 7, 25, 9, 18, 2, 30)
SMALL = {
    "ghanet": {"wsi_dim": 32, "dim_head": 8, "compressed_dim": 8},
    "mkd": {"hidden_dim": 16, "attn_dim": 8, "token_size": 8},
}


def _model(name: str, **overrides):
    torch.manual_seed(0)
    model = create_method(name, in_dim=D, omics_dim=G, dropout=0.0, **SMALL[name], **overrides)
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _backward(model, terms: dict[str, torch.Tensor], bags) -> None:
    """Back-propagate the terms' sum as the trainer does (G-HANet's ``accumulation_mean``: / the window)."""
    scale = 1 / len(bags) if model.cfg.accumulation_mean else 1.0
    (sum(terms.values()) * scale).backward()


def _per_bag(model, bags) -> dict[str, torch.Tensor]:
    """Each bag's forward and ``loss``, summed over the bags, one backward: the per-bag path's gradient."""
    model.zero_grad(set_to_none=True)
    model.on_epoch_start(0)
    summed: dict[str, torch.Tensor] = {}
    for bag in bags:
        for k, v in model.loss(bag, model(bag)).items():
            summed[k] = summed[k] + v if k in summed else v
    _backward(model, summed, bags)
    return summed


@pytest.mark.parametrize("head", ["classification", "survival"])
@pytest.mark.parametrize("name", ["ghanet", "mkd"])
def test_window_gives_the_per_bag_terms_and_gradients(name, head, bag_maker):
    """Bags of unequal sizes, two without omics (the KD and reconstruction terms skip them); fp32, the
    gradient at the scale the trainer back-propagates it (G-HANet: the window's mean, ``loss / gc``); the
    survival head's likelihood summed over the window as each slide's."""
    survival = {"head": "survival", "num_classes": 4} if head == "survival" else {}
    model = _model(name, accumulation_steps=len(SIZES), **survival)
    bags = bag_maker(SIZES, D, G, seed=4, no_omics=2)
    if survival:
        bags = [
            dataclasses.replace(b, label=torch.tensor(i % 4), event=torch.tensor(i // 4 % 2))
            for i, b in enumerate(bags)
        ]
    bags[6].omics = None
    model.prepare(bags)
    want = _per_bag(model, bags)
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = model.window_loss(bags)
    assert set(got) == set(want) and len(want) > 2  # CE and the window's KD / reconstruction terms
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    _backward(model, got, bags)
    assert set(_grads(model)) == set(want_grads)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_mkd_drops_a_partial_window_as_slide_by_slide(bag_maker):
    model = _model("mkd", accumulation_steps=4)
    assert model.window_loss(bag_maker(SIZES[:3], D, G)) == {}


def test_padded_hyperedges_are_each_bags_own():
    sizes = [3, 1, 12, 40]
    packed = pack_bags([Bag(torch.zeros(n, 1), torch.tensor(0)) for n in sizes])
    sim = torch.randn(4, 6, sum(sizes))  # (H, T, all patches)
    padded = pad_segments(sim.permute(2, 0, 1), packed, float("-inf")).permute(0, 2, 3, 1)  # (B, H, T, N_max)
    together = hyperedge_weights(padded, 0.2, sizes)
    for b, s in enumerate(packed.slices()):
        alone = hyperedge_weights(sim[..., s], 0.2)
        torch.testing.assert_close(together[b, :, : sizes[b]], alone)
        assert together[b, :, sizes[b] :].eq(0).all()


def _epochs(model, bags, orders, optimizer) -> list[tuple[float, bool, int, list[int]]]:
    """Epochs of the trainer's loop; per epoch: loss sum, gradients pending, bags done, the bags done at
    each update."""
    pending, out = False, []
    for epoch, order in enumerate(orders):
        model.on_epoch_start(epoch)
        updates: list[int] = []
        loss, pending, done = train._train_epoch(
            model,
            optimizer,
            bags,
            order,
            torch.device("cpu"),
            False,
            pending,
            lambda _, n, u=updates: u.append(n),
        )
        out.append((float(loss), pending, done, updates))
    return out


@pytest.mark.parametrize(("name", "window"), [("ghanet", 4), ("mkd", 4)])
def test_trainer_windows_match_the_per_bag_loop(name, window, bag_maker):
    """Two epochs of 10 bags in windows of 4: G-HANet's partial window of 2 back-propagates and joins the
    next epoch's first window (``loss / gc`` each bag), MKD drops it; SGD, so the weights after the steps
    compare the accumulated gradients."""
    bags = bag_maker(SIZES, D, G, seed=5, no_omics=3)
    orders = [[3, 1, 4, 0, 5, 9, 2, 6, 8, 7], [7, 2, 0, 9, 8, 1, 6, 3, 5, 4]]
    runs = {}
    for batched in (False, True):
        model = _model(name, accumulation_steps=window, batched_windows=batched)
        model.prepare(bags)
        assert model.batches_windows is batched
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        runs[batched] = (_epochs(model, bags, orders, optimizer), model.state_dict())
    (per_bag, want), (batched, got) = runs[False], runs[True]
    carried = name == "ghanet"
    assert [r[1:] for r in batched] == [r[1:] for r in per_bag]
    assert [r[1] for r in batched] == [carried, carried] and batched[0][3] == [4, 8]
    for a, b in zip(batched, per_bag, strict=True):
        assert a[0] == pytest.approx(b[0], rel=1e-5)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["ghanet", "mkd"])
def test_training_with_windows_is_deterministic(name, bag_maker):
    """Dropout on: the same seed gives the same weights and history."""
    bags = bag_maker(SIZES, D, G, seed=6, no_omics=3)
    cfg = create_method(name, in_dim=D, omics_dim=G, **SMALL[name]).cfg.replace(
        epochs=2, accumulation_steps=4, monitor="auc"
    )
    runs = [train.fit(name, cfg, D, G, bags[:8], bags[8:], torch.device("cpu"), seed=7) for _ in range(2)]
    assert runs[0].history == runs[1].history
    for k, v in runs[0].model.state_dict().items():
        torch.testing.assert_close(runs[1].model.state_dict()[k], v, rtol=0, atol=0, msg=k)

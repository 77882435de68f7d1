"""Every method with the survival head: hazard logits per time bin, the discrete-time NLL (hand-computed, and
the Patch-GCN / MCAT / G-HANet form), gradients to every trained weight, prediction from H&E alone."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from methods import create_method, list_methods, resolve_config
from methods.base import discrete_time_nll, survival_curves

D, G, K = 16, 24, 4


def _survival(bags):
    return [
        dataclasses.replace(
            b, label=torch.tensor(i % K), event=torch.tensor((i // K) % 2), time=torch.tensor(1.0 + i)
        )
        for i, b in enumerate(bags)
    ]


def test_nll_hand_computed():
    z = torch.tensor([0.0, math.log(3.0), -1.0])  # hazards 1/2, 3/4, σ(-1)
    h = [0.5, 0.75, 1 / (1 + math.e)]
    event = discrete_time_nll(z, torch.tensor(1), torch.tensor(1))
    assert math.isclose(float(event), -(math.log(1 - h[0]) + math.log(h[1])), rel_tol=1e-6)
    censored = discrete_time_nll(z, torch.tensor(1), torch.tensor(0))
    assert math.isclose(float(censored), -math.log((1 - h[0]) * (1 - h[1])), rel_tol=1e-6)
    first = discrete_time_nll(z, torch.tensor(0), torch.tensor(1))  # S_{-1} = 1
    assert math.isclose(float(first), -math.log(h[0]), rel_tol=1e-6)
    batch = discrete_time_nll(torch.stack([z, z]), torch.tensor([1, 1]), torch.tensor([1, 0]), alpha=0.4)
    expected = 0.6 * (float(event) + float(censored)) / 2 + 0.4 * float(event) / 2
    assert math.isclose(float(batch), expected, rel_tol=1e-6)


def test_risk_is_minus_the_summed_survival():
    z = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    risk, s = survival_curves(z)
    torch.testing.assert_close(s[0], torch.tensor([0.5, 0.25]))
    assert float(risk[0]) == pytest.approx(-0.75) and risk[1] > risk[0]  # higher hazards: higher risk


@pytest.mark.parametrize("name", list_methods())
def test_survival_head_trains_and_predicts_from_he_alone(name, bag_maker):
    cfg = resolve_config(name, {"num_classes": K, "head": "survival"})
    bags = _survival(bag_maker([12 + i % 5 for i in range(max(16, cfg.accumulation_steps))], D, G))
    torch.manual_seed(0)
    model = create_method(name, in_dim=D, omics_dim=G if cfg.uses_omics else None, cfg=cfg)
    model.prepare(bags)
    model.train()
    for bag in bags:
        terms = model.loss(bag, model(bag))
        if terms:
            assert "nll" in terms and "ce" not in terms
            torch.stack(list(terms.values())).sum().backward()
            break
    else:
        raise AssertionError("no loss terms after a window of bags")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    model.eval()
    with torch.no_grad():
        out = model(bags[1])
        alone = model(bags[1].without_omics())
    assert out.logits.shape == (K,)
    torch.testing.assert_close(out.logits, alone.logits, rtol=0, atol=0)


def test_survival_head_needs_the_event(bag_maker):
    model = create_method(
        "abmil", in_dim=D, cfg=resolve_config("abmil", {"num_classes": K, "head": "survival"})
    )
    bag = bag_maker([10], D, G)[0]
    with pytest.raises(ValueError, match="no event indicator"):
        model.loss(bag, model(bag))

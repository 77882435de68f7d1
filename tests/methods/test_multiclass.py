"""Every method on a four-class task: C logits, gradients to every trained weight, prediction from H&E alone,
the packed prediction equal to one bag at a time, and the loss on hand-computed cases (cross-entropy over C
classes; MoMKD's soft-angle loss against the other classes' banks; G-HANet's one-vs-rest gene selection)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import create_method, list_methods, resolve_config
from methods.ghanet import welch_gene_mask
from methods.momkd.memory import soft_angle_loss

D, G, C = 16, 24, 4


def _four_class(bags):
    return [dataclasses.replace(b, label=torch.tensor(i % C)) for i, b in enumerate(bags)]


def _model(name, bags):
    cfg = resolve_config(name, {"num_classes": C})
    torch.manual_seed(0)
    model = create_method(name, in_dim=D, omics_dim=G if cfg.uses_omics else None, cfg=cfg)
    model.prepare(bags)
    return model


@pytest.mark.parametrize("name", list_methods())
def test_four_classes_train_and_predict_from_he_alone(name, bag_maker):
    cfg = resolve_config(name)
    bags = _four_class(bag_maker([12 + i % 5 for i in range(max(16, cfg.accumulation_steps))], D, G))
    model = _model(name, bags)
    model.train()
    for bag in bags:
        terms = model.loss(bag, model(bag))
        if terms:
            for term, value in terms.items():
                assert value.dim() == 0 and torch.isfinite(value), term
            torch.stack(list(terms.values())).sum().backward()
            break
    else:
        raise AssertionError("no loss terms after a window of bags")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    model.eval()
    with torch.no_grad():
        out = model(bags[1])
        alone = torch.stack([model(b.without_omics()).logits for b in bags[:5]])
        packed = model.predict_logits([b.without_omics() for b in bags[:5]])
    assert out.logits.shape == (C,)
    assert out.embedding.dim() == 1
    if out.attention is not None:
        assert out.attention.shape == (bags[1].num_patches,)
        assert math.isclose(float(out.attention.sum()), 1.0, rel_tol=1e-5)
    torch.testing.assert_close(out.logits, alone[1], rtol=0, atol=0)  # omics never reach prediction
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["abmil", "wikg", "ghanet"])
def test_cross_entropy_over_four_classes_hand_computed(name, bag_maker):
    bags = _four_class(bag_maker([15] * 8, D, G))
    model = _model(name, bags).eval()
    bag = bags[3]  # class 3
    with torch.no_grad():
        out = model(bag)
        ce = model.loss(bag, out)["ce"]
    z = out.logits.double()
    expected = math.log(sum(math.exp(float(v)) for v in z)) - float(z[3])
    assert math.isclose(float(ce), expected, rel_tol=1e-5)


def test_momkd_has_one_bank_per_class_and_per_class_attention(bag_maker):
    bags = _four_class(bag_maker([20] * 8, D, G))
    model = _model("momkd", bags).eval()
    assert model.memory.shape[0] == C
    with torch.no_grad():
        out = model(bags[2])
    per_class = out.extras["class_attention"]
    assert per_class.shape == (20, C)
    torch.testing.assert_close(per_class.sum(0), torch.ones(C))
    torch.testing.assert_close(out.attention, per_class[:, int(out.logits.argmax())])
    assert model.explain_maps(bags[2], out)["nearest memory component"].categories[:2] == ("C00", "C01")


def test_momkd_class_score_is_own_bank_minus_the_best_other_bank():
    """Patch score of class c: max cosine to bank c minus the best max cosine of the other banks."""
    model = create_method("momkd", in_dim=D, omics_dim=G, cfg=resolve_config("momkd", {"num_classes": 3}))
    with torch.no_grad():
        model.memory.copy_(F.normalize(torch.randn(3, model.cfg.memory_size, model.cfg.shared_dim), dim=-1))
    z = F.normalize(torch.randn(5, model.cfg.shared_dim), dim=-1)
    sim, score = model._memory_scores(z)
    best = sim.amax(-1)
    for c in range(3):
        others = torch.cat([best[:, :c], best[:, c + 1 :]], 1).amax(1)
        torch.testing.assert_close(score[:, c], (best[:, c] - others) / model.tau)


def test_soft_angle_loss_against_each_other_bank_hand_computed():
    """Three banks of one code each, x at angle 0 to bank 1: phi_c = <x, c>, L = mean over c != y of
    softplus(beta (m - (phi_y - phi_c)))."""
    memory = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])  # (3, 1, 2)
    x = torch.tensor([0.0, 1.0])
    loss = soft_angle_loss(x, memory, torch.tensor(1), margin=0.3, scale=5.0, beta=20.0)
    # phi = (0, 1, 0): both gaps are 1
    expected = math.log1p(math.exp(20 * (0.3 - 1.0)))
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    wrong = soft_angle_loss(x, memory, torch.tensor(0), margin=0.3, scale=5.0, beta=20.0)
    # y = 0: gaps phi_0 - phi_1 = -1, phi_0 - phi_2 = 0
    expected = (math.log1p(math.exp(20 * 1.3)) + math.log1p(math.exp(20 * 0.3))) / 2
    assert math.isclose(float(wrong), expected, rel_tol=1e-6)


def test_soft_angle_loss_with_two_banks_is_the_authors_form():
    memory = F.normalize(torch.randn(2, 3, 4), dim=-1)
    x = F.normalize(torch.randn(4), dim=0)
    phi = torch.logsumexp(5 * (memory @ x), -1) / 5
    for y, sign in ((0, -1.0), (1, 1.0)):
        expected = F.softplus(20 * (0.3 - sign * (phi[1] - phi[0])))
        torch.testing.assert_close(soft_angle_loss(x, memory, torch.tensor(y), 0.3), expected)


def test_ghanet_genes_one_vs_rest_beyond_two_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    omics = rng.standard_normal((90, 4))
    omics[labels == 2, 1] += 3.0  # gene 1 separates class 2 from the rest
    mask = welch_gene_mask(omics, labels, 0.05)
    assert mask[1]
    two = welch_gene_mask(omics[labels < 2], labels[labels < 2], 0.05)
    assert not two[1]  # classes 0 and 1 do not differ in gene 1

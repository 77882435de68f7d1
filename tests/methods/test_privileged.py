"""The privileged-information student: ABMIL's prediction, plus an auxiliary regression of the programs."""

from __future__ import annotations

import torch

from methods import create_method
from methods.base import Bag


def _bag(omics: bool) -> Bag:
    g = torch.Generator().manual_seed(0)
    return Bag(
        features=torch.randn(30, 16, generator=g),
        label=torch.tensor(1),
        omics=torch.randn(6, generator=g) if omics else None,
    )


def test_auxiliary_target_trains_the_head_and_never_the_prediction():
    torch.manual_seed(0)
    student = create_method("ceiling-privileged", in_dim=16, omics_dim=6).eval()
    torch.manual_seed(0)
    twin = create_method("abmil", in_dim=16).eval()
    bag = _bag(omics=True)
    out = student(bag)
    # the same ABMIL, from the same initial weights: same logits, with or without the target
    assert torch.allclose(out.logits, twin(bag).logits)
    assert torch.allclose(out.logits, student(bag.without_omics()).logits)
    terms = student.loss(bag, out)
    assert set(terms) == {"ce", "privileged"}
    expected = ((student.privileged_head(out.embedding) - bag.omics) ** 2).mean()
    assert torch.allclose(terms["privileged"], expected)
    terms["privileged"].backward()
    assert student.privileged_head.weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad is None  # the head is the auxiliary term's only exit
    assert set(student.loss(_bag(omics=False), student(_bag(omics=False)))) == {"ce"}

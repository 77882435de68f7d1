"""One contract test over the whole registry: every method builds, trains a step, and predicts from H&E only."""

from __future__ import annotations

import pytest
import torch

from methods import create_method, get_method_class, list_methods, resolve_config
from methods.registry import UnknownMethodError, register_method

D, G = 16, 24


def _train_step(model, bags):
    """Feed bags until the method returns loss terms (windowed methods need several), then backprop."""
    for bag in bags:
        terms = model.loss(bag, model(bag))
        if terms:
            for name, value in terms.items():
                assert value.dim() == 0 and torch.isfinite(value), name
            torch.stack(list(terms.values())).sum().backward()
            return terms
    raise AssertionError("no loss terms after a window of bags")


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, bag_maker):
    torch.manual_seed(0)
    cls = get_method_class(name)
    cfg = resolve_config(name)
    model = create_method(name, in_dim=D, omics_dim=G if cfg.uses_omics else None)
    bags = bag_maker([12 + i % 5 for i in range(max(16, cfg.accumulation_steps))], D, G)
    model.prepare(bags)
    model.train()
    _train_step(model, bags)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    model.eval()
    with torch.no_grad():
        out = model(bags[0])
        again = model(bags[0].without_omics())
    assert out.logits.shape == (cfg.num_classes,)
    assert out.embedding.dim() == 1
    if out.attention is not None:
        assert out.attention.shape == (bags[0].num_patches,)
    torch.testing.assert_close(out.logits, again.logits, rtol=0, atol=0)
    assert cls.summary, "every method needs a one-line summary for `bench methods`"


@pytest.mark.parametrize("name", list_methods())
def test_variants_build(name):
    cls = get_method_class(name)
    for variant in cls.variants:
        cfg = resolve_config(f"{name}[{variant}]")
        create_method(f"{name}[{variant}]", in_dim=D, omics_dim=G if cfg.uses_omics else None)


def test_unknown_names_suggest_the_nearest():
    with pytest.raises(UnknownMethodError, match="Did you mean abmil"):
        resolve_config("abmill")
    with pytest.raises(UnknownMethodError, match="Did you mean ilse"):
        resolve_config("abmil[ilsee]")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_method("abmil")(type("Other", (get_method_class("abmil"),), {}))


def test_unknown_config_setting_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown setting.*hidden_dim"):
        resolve_config("abmil", {"hiden_dim": 3})

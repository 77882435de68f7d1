"""Several bags per forward (``predict_logits``, ``validation_logits_batch``) give each bag's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.evaluate import predict
from methods import create_method, get_method_class, list_methods, resolve_config

D, G = 16, 24
#: bag sizes: below WiKG's top-k (6) and MKD/G-HANet's small cases, and a few ordinary ones
SIZES = (3, 1, 12, 40, 7, 25)


def _names() -> list[str]:
    """Every method and every variant (a variant may change the forward)."""
    return [n for m in list_methods() for n in (m, *(f"{m}[{v}]" for v in get_method_class(m).variants))]


def _model(name: str, **overrides):
    torch.manual_seed(0)
    cfg = resolve_config(name, overrides)
    model = create_method(name, in_dim=D, omics_dim=G if cfg.uses_omics else None, cfg=cfg)
    return model.eval()


@pytest.mark.parametrize("name", [*_names(), "momkd[fast_graph=False]"])
def test_packed_prediction_equals_one_bag_at_a_time(name, bag_maker):
    overrides = {"fast_graph": False} if name.endswith("[fast_graph=False]") else {}
    model = _model(name.split("[fast_graph")[0], **overrides)
    bags = bag_maker(SIZES, D, G, no_omics=2)
    with torch.inference_mode():
        alone = torch.stack([model(b.without_omics()).logits for b in bags])
        together = model.predict_logits([b.without_omics() for b in bags])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_predict_chunks_give_the_same_probabilities(bag_maker):
    model = _model("wikg")
    bags = bag_maker(SIZES, D, G, seed=1, no_omics=2)
    with torch.inference_mode():
        want = torch.stack([model(b).logits.softmax(-1)[1] for b in bags]).numpy()
    for max_patches in (1, 30, 10_000):  # one bag per forward, a few, all at once
        got = predict(model, bags, torch.device("cpu"), max_patches=max_patches)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model.training is False


@pytest.mark.parametrize("name", ["mkd[eval-teachers]", "abmil"])
def test_validation_logits_batch_equals_one_bag_at_a_time(name, bag_maker):
    model = _model(name)
    bags = bag_maker(SIZES, D, G, seed=2, no_omics=2)
    with torch.inference_mode():
        got = model.validation_logits_batch(bags)
        for model_name, (rows, logits) in got.items():
            want = [(i, model.validation_logits(b)) for i, b in enumerate(bags)]
            want = [(i, z[model_name]) for i, z in want if model_name in z]
            assert rows == [i for i, _ in want]
            torch.testing.assert_close(logits, torch.stack([z for _, z in want]), rtol=1e-5, atol=1e-5)
    expected = {"student", "omics_teacher", "multimodal_teacher"} if name != "abmil" else {"model"}
    assert set(got) == expected
    if name != "abmil":
        assert got["omics_teacher"][0] == [0, 1, 3, 4, 5]  # bag 2 has no omics


def test_mkd_teachers_scored_with_dropout_as_alone(bag_maker):
    """MKD's default scores its teachers in train mode (the reference): packed, they still draw dropout, the
    student does not, and every module's mode is restored."""
    model = _model("mkd")
    bags = bag_maker(SIZES, D, G, seed=3, no_omics=2)
    with torch.inference_mode():
        a, b = model.validation_logits_batch(bags), model.validation_logits_batch(bags)
    torch.testing.assert_close(a["student"][1], b["student"][1], rtol=0, atol=0)
    assert not torch.equal(a["multimodal_teacher"][1], b["multimodal_teacher"][1])
    assert not any(m.training for m in model.modules())

"""WiKG: the chunked top-k and fused aggregation equal the reference's dense form; permutation invariance
(WiKG and ABMIL); every parameter trains; variants build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import create_method
from methods.base import Bag
from methods.layers import Workspace
from methods.wikg import WiKG, knowledge_attention, topk_neighbours


def _bag(n: int = 40, d: int = 24, seed: int = 0, omics: bool = False) -> Bag:
    g = torch.Generator().manual_seed(seed)
    return Bag(
        features=torch.randn(n, d, generator=g),
        label=torch.tensor(1),
        omics=torch.randn(8, generator=g) if omics else None,
    )


def _dense_forward(model: WiKG, features: torch.Tensor) -> torch.Tensor:
    """The official model.py forward, written densely (N x N similarity under autograd), with model's weights."""
    cfg = model.cfg
    x = model.embed(features)
    x = (x + x.mean(dim=0, keepdim=True)) * 0.5
    e_h, e_t = model.w_head(x), model.w_tail(x)
    weight, index = torch.topk((e_h * model.scale) @ e_t.t(), k=min(cfg.topk, len(x)), dim=-1)
    nb = e_t[index]  # (N, k, C)
    p = F.softmax(weight, dim=-1).unsqueeze(-1)
    gate = torch.tanh(e_h.unsqueeze(1) + p * nb + (1 - p) * e_h.unsqueeze(1))
    if cfg.knowledge_score == "code":
        score = torch.einsum("nkl,nkm->nk", nb, gate)
    else:
        score = torch.einsum("nkc,nkc->nk", nb, gate)
    e_n = (F.softmax(score, dim=-1).unsqueeze(-1) * nb).sum(1)
    h = model.message_dropout(model._aggregate(e_h, e_n))
    if cfg.pool == "attn":
        pooled = model.attention(h).squeeze(-1).softmax(0) @ h
    elif cfg.pool == "max":
        pooled = h.max(0).values
    else:
        pooled = h.mean(0)
    return model.classifier(model.norm(pooled))


def _grads(model: torch.nn.Module, features: torch.Tensor, logits: torch.Tensor) -> list[torch.Tensor]:
    loss = F.cross_entropy(logits.unsqueeze(0), torch.tensor([1]))
    return torch.autograd.grad(loss, [features, *model.parameters()])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"knowledge_score": "dot"},
        {"agg_type": "gcn", "pool": "attn"},
        {"agg_type": "sage", "pool": "max"},
    ],
)
@pytest.mark.parametrize("train", [False, True])
def test_chunked_equals_dense_in_outputs_and_gradients(overrides: dict, train: bool):
    torch.manual_seed(0)
    model = create_method("wikg", in_dim=24, hidden_dim=32, dropout=0.0, chunk_elements=200, **overrides)
    model.train(train)
    bag = _bag(n=45)
    features = bag.features.clone().requires_grad_(True)
    out = model(Bag(features=features, label=bag.label))
    ref = _dense_forward(model, features)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(_grads(model, features, out.logits), _grads(model, features, ref), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_chunked_topk_finds_the_dense_neighbours():
    g = torch.Generator().manual_seed(3)
    e_h, e_t = torch.randn(37, 16, generator=g), torch.randn(37, 16, generator=g)
    chunked = topk_neighbours(e_h, e_t, 6, 0.25, chunk_elements=100)  # 2 rows per block
    dense = ((e_h * 0.25) @ e_t.t()).topk(6, dim=-1).indices
    assert torch.equal(chunked.sort(-1).values, dense.sort(-1).values)


@pytest.mark.parametrize("store", [True, False], ids=["kept-gates", "recomputed-gates"])
@pytest.mark.parametrize("score", ["code", "dot"])
def test_knowledge_attention_backward_passes_gradcheck(score: str, store: bool):
    g = torch.Generator().manual_seed(1)
    e_h = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    e_t = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    index = topk_neighbours(e_h, e_t, 3, 0.5)
    workspace = Workspace()  # shared by every call, as a model's
    fn = lambda a, b: knowledge_attention(  # noqa: E731
        a, b, index, 0.5, score, block_elements=30, store_elements=10**6 if store else 0, workspace=workspace
    )
    assert torch.autograd.gradcheck(fn, (e_h, e_t))


@pytest.mark.parametrize("name", ["wikg", "wikg[attn-pool]", "wikg[sage]", "abmil"])
def test_slide_output_is_permutation_invariant(name: str):
    torch.manual_seed(0)
    model = create_method(name, in_dim=24).eval()
    bag = _bag(n=50)
    perm = torch.randperm(50)
    with torch.no_grad():
        out = model(bag)
        out_perm = model(Bag(features=bag.features[perm], label=bag.label))
    torch.testing.assert_close(out.logits, out_perm.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.embedding, out_perm.embedding, atol=1e-5, rtol=1e-5)
    if out.attention is not None:
        torch.testing.assert_close(out.attention[perm], out_perm.attention, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["", "attn-pool", "gcn", "sage", "dot-score", "mil-lab"])
def test_gradient_reaches_every_trainable_parameter(variant: str):
    torch.manual_seed(0)
    model = create_method(f"wikg[{variant}]" if variant else "wikg", in_dim=24, hidden_dim=32).train()
    bag = _bag(n=30)
    out = model(bag)
    sum(model.loss(bag, out).values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name != "attention.2.bias":  # a constant shift of the pooling scores: softmax cancels it
            assert p.grad.abs().sum() > 0, name


def test_shapes_small_bags_and_omics_is_ignored():
    torch.manual_seed(0)
    model = create_method("wikg[attn-pool]", in_dim=24, hidden_dim=32).eval()
    bag = _bag(n=3, omics=True)  # fewer patches than top-k: k is capped at N
    out = model(bag)
    assert out.logits.shape == (2,) and out.embedding.shape == (32,) and out.attention.shape == (3,)
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))
    torch.testing.assert_close(model(bag.without_omics()).logits, out.logits)
    assert create_method("wikg", in_dim=24).eval()(bag).attention is None  # mean pooling


def test_defaults_follow_the_official_train_script():
    cfg = create_method("wikg", in_dim=1536).cfg
    assert (cfg.hidden_dim, cfg.topk, cfg.agg_type, cfg.pool, cfg.dropout) == (
        512,
        6,
        "bi-interaction",
        "mean",
        0.3,
    )
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.epochs) == ("adam", 1e-4, 1e-5, 100)
    assert not cfg.needs_graph and not cfg.uses_omics


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="pool"):
        create_method("wikg", in_dim=8, pool="sum")

"""G-HANet: SCE and Welch selection against numpy/scipy, detached hyperedges, training-only selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ttest_ind

from methods import Bag, create_method
from methods.ghanet import GHANet, hyperedge_weights, sce_loss, welch_gene_mask

D, G = 16, 30


def _bags(n: int, seed: int = 0) -> list[Bag]:
    """Genes 0..9 shift with the class (selected), the others are noise."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        omics = torch.randn(G, generator=g)
        omics[:10] += 3.0 * (i % 2)
        bags.append(
            Bag(
                features=torch.randn(10 + i % 4, D, generator=g),
                label=torch.tensor(i % 2),
                omics=omics,
                case_id=f"p{i}",
            )
        )
    return bags


def _model(**overrides) -> GHANet:
    torch.manual_seed(0)
    return create_method(
        "ghanet", in_dim=D, omics_dim=G, wsi_dim=32, dim_head=8, compressed_dim=8, **overrides
    )


def test_sce_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=7), rng.normal(size=7)
    cos = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    assert sce_loss(torch.tensor(x), torch.tensor(y)).item() == pytest.approx((1 - cos) ** 3, rel=1e-10)


def test_welch_mask_matches_scipy_per_gene():
    rng = np.random.default_rng(1)
    omics = rng.normal(size=(20, 6))
    omics[:, 5] = 1.0  # constant: undefined p-value, not selected
    labels = np.arange(20) % 2
    omics[labels == 1, :2] += 2
    want = [
        ttest_ind(omics[labels == 0, j], omics[labels == 1, j], equal_var=False).pvalue < 0.05
        for j in range(5)
    ]
    got = welch_gene_mask(omics, labels, 0.05)
    assert got[:5].tolist() == want and not got[5] and got[:2].all()
    assert not welch_gene_mask(omics[:3], labels[:3], 0.05).any()  # one patient in a class: nothing


def test_selection_sees_only_the_training_bags():
    bags = _bags(16)
    train, held_out = bags[:12], bags[12:]
    model = _model()
    model.prepare(train)
    before = [model.selected_0.clone(), model.selected_1.clone()]
    want = welch_gene_mask(torch.stack([b.omics for b in train]).numpy(), np.arange(12) % 2, 0.05)
    assert torch.cat([getattr(model, f"selected_{i}") for i in range(6)]).numpy().tolist() == want.tolist()
    for b in held_out:
        b.omics = -b.omics * 10
    again = _model()
    again.prepare(train)
    assert torch.equal(again.selected_0, before[0]) and torch.equal(again.selected_1, before[1])
    counts = again.training_report()["selected_genes_per_group"]
    assert counts[:2] == [5, 5] and sum(counts) >= 10  # contiguous groups of 5: genes 0..9 are groups 0, 1


def test_patients_counted_once():
    bags = _bags(12)
    model, twice = _model(), _model()
    model.prepare(bags)
    twice.prepare(bags + [Bag(b.features, b.label, omics=b.omics, case_id=b.case_id) for b in bags[:1]] * 5)
    for i in range(6):
        assert torch.equal(getattr(model, f"selected_{i}"), getattr(twice, f"selected_{i}"))


def test_hyperedges_are_detached_top_fraction_softmax():
    sim = torch.randn(4, 6, 20, requires_grad=True)
    e = hyperedge_weights(sim, 0.2)
    assert not e.requires_grad and e.shape == (6, 20)
    torch.testing.assert_close(e.sum(1), torch.ones(6))
    s = sim.detach().mean(0)
    top = s.topk(4, dim=1).indices
    assert torch.equal((e > 0).sum(1), torch.full((6,), 4))
    assert torch.equal(torch.gather(e, 1, top) > 0, torch.ones(6, 4, dtype=torch.bool))
    torch.testing.assert_close(torch.gather(e, 1, top), torch.gather(s, 1, top).softmax(1))
    assert (hyperedge_weights(sim[:, :, :3], 0.2) > 0).sum(1).eq(1).all()  # at least one patch


def test_loss_terms_match_numpy_and_missing_omics_keeps_ce():
    bags = _bags(12)
    model = _model(recon_weight=0.3)
    model.prepare(bags)
    model.train()
    bag = bags[0]
    out = model(bag)
    terms = model.loss(bag, out)
    assert set(terms) == {"ce", "sce", "mse"}
    sce = mse = 0.0
    for i, o_hat in enumerate(out.extras["reconstruction"]):
        sel = getattr(model, f"selected_{i}")
        if sel.any():
            x = o_hat.detach()[sel].double().numpy()
            y = bag.omics[model.groups[i][sel.numpy()]].double().numpy()
            sce += (1 - x @ y / np.linalg.norm(x) / np.linalg.norm(y)) ** 3
            mse += ((x - y) ** 2).mean()
    assert terms["sce"].item() == pytest.approx(0.3 * sce, rel=1e-5)
    assert terms["mse"].item() == pytest.approx(0.3 * mse, rel=1e-5)
    sum(terms.values()).backward()
    assert model.tokens.grad is not None
    assert set(model.loss(bag.without_omics(), model(bag))) == {"ce"}


def test_prediction_ignores_omics():
    model = _model()
    model.prepare(_bags(12))
    model.eval()
    bag = _bags(1, seed=3)[0]
    with torch.no_grad():
        a, b = model(bag), model(bag.without_omics())
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert a.attention.shape == (bag.num_patches,) and a.embedding.shape == (6 * 8,)


def test_cross_attention_shared_by_default_and_separate_as_variant():
    shared, separate = _model(), _model(**GHANet.variants["separate-cross-attention"])
    assert len(shared.cross_attention) == 1 and len(separate.cross_attention) == 2
    separate.train()
    bag = _bags(1)[0]
    separate.loss(bag, separate(bag))["ce"].backward()
    assert all(p.grad is not None for p in separate.cross_attention[1].parameters())


def test_gene_groups_from_config():
    groups = tuple(i % 6 for i in range(G))
    model = _model(gene_groups=groups)
    assert model.groups[0].tolist() == list(range(0, G, 6))
    with pytest.raises(ValueError, match="gene_groups"):
        _model(gene_groups=(0, 1))

"""MoMKD: shapes, loss terms on hand-computed cases, gradient decoupling, memory modes, k-means, variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods import Bag, create_method, resolve_config
from methods.momkd import MoMKD, _orthogonality, soft_angle_loss, spherical_kmeans
from methods.registry import get_method_class

D, G = 16, 12
SIZES = {"wsi_dim": 8, "omics_embed_dim": 8, "omics_hidden_dim": 16, "shared_dim": 4, "memory_size": 3}


def _graph(n: int, k: int = 3) -> torch.Tensor:
    """Each patch linked to its k successors on a ring (row 0 source, row 1 target)."""
    src = torch.arange(n).repeat_interleave(k)
    dst = (src + torch.arange(1, k + 1).repeat(n)) % n
    return torch.stack([src, dst])


def _bag(n: int = 20, label: int = 1, omics: bool = True, seed: int = 0, shift: float = 0.0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    return Bag(
        features=torch.randn(n, D, generator=g) + shift,
        label=torch.tensor(label),
        edge_index=_graph(n),
        omics=torch.randn(G, generator=g) if omics else None,
        slide_id=f"s{seed}",
    )


def _model(name: str = "momkd", omics_dim: int | None = G, **overrides) -> MoMKD:
    torch.manual_seed(0)
    return create_method(name, D, omics_dim, **{**SIZES, **overrides})


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


# ---------------------------------------------------------------- forward and loss


def test_forward_shapes_and_attention_sums_to_one():
    model = _model().eval()
    out = model(_bag(n=25))
    assert out.logits.shape == (2,)
    assert out.embedding.shape == (SIZES["wsi_dim"],)
    assert out.attention.shape == (25,)
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))


def test_prediction_ignores_omics():
    model = _model().eval()
    with torch.no_grad():
        with_omics, without = model(_bag()), model(_bag().without_omics())
    torch.testing.assert_close(with_omics.logits, without.logits, rtol=0, atol=0)
    torch.testing.assert_close(with_omics.attention, without.attention, rtol=0, atol=0)


def test_loss_terms_with_and_without_omics():
    model = _model().train()
    bag = _bag()
    assert set(model.loss(bag, model(bag))) == {"ce", "mem", "align_wsi", "align_omics", "recon"}
    bag = bag.without_omics()
    terms = model.loss(bag, model(bag))
    assert set(terms) == {"ce", "mem", "align_wsi"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())


def test_missing_graph_is_a_clear_error():
    bag = _bag()
    bag.edge_index = None
    with pytest.raises(ValueError, match="kNN graph"):
        _model()(bag)


def test_soft_angle_loss_hand_computed():
    x = torch.tensor([1.0, 0.0])
    memory = torch.tensor([[[0.0, 1.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 1.0]]])  # C-, C+
    phi_pos = math.log(math.exp(5 * 1.0) + math.exp(0.0)) / 5
    phi_neg = math.log(2 * math.exp(0.0)) / 5
    delta = phi_pos - phi_neg
    for label, sign in ((1, 1.0), (0, -1.0)):
        expected = math.log1p(math.exp(20 * (0.3 - sign * delta)))
        got = soft_angle_loss(x, memory, torch.tensor(label), margin=0.3)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_orthogonality_hand_computed():
    codes = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])  # cosines: 1/sqrt2, 0, 1/sqrt2
    expected = 2 * (0.5 + 0.0 + 0.5) / 9
    assert _orthogonality(codes).item() == pytest.approx(expected, rel=1e-6)


def test_commitment_is_mse_to_euclidean_nearest_raw_code():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(30, 4), dim=-1)
    codes = torch.randn(5, 4) * 0.7
    nearest = codes[torch.cdist(z, codes).argmin(dim=1)]
    torch.testing.assert_close(MoMKD._commitment(z, codes), F.mse_loss(z, nearest))


def test_loss_weights_are_the_codes():
    cfg = resolve_config("momkd")
    assert (cfg.ce_weight, cfg.mem_weight, cfg.align_omics_weight, cfg.align_wsi_weight) == (
        0.5,
        0.1,
        0.05,
        0.2,
    )
    assert (cfg.recon_weight, cfg.margin, cfg.ortho_weight) == (0.05, 0.3, 10.0)
    assert resolve_config("momkd[paper-recon]").recon_weight == 0.01


# ---------------------------------------------------------------- gradient decoupling


def test_omics_terms_never_reach_the_wsi_branch():
    model = _model().train()
    bag = _bag()
    terms = model.loss(bag, model(bag))
    grads = _grads(model, terms["align_omics"] + terms["recon"])
    wsi = [n for n in grads if n.startswith(("encoder.", "patch_proj.", "pool_proj.", "head.", "log_tau"))]
    assert wsi and not any(_nonzero(grads[n]) for n in wsi)
    assert _nonzero(grads["memory"])
    assert all(_nonzero(grads[n]) for n in grads if n.startswith("omics_encoder.") and n.endswith("weight"))


def test_classification_never_reaches_the_memory():
    model = _model().train()
    bag = _bag()
    grads = _grads(model, model.loss(bag, model(bag))["ce"])
    assert not _nonzero(grads["memory"])
    assert _nonzero(grads["encoder.gat1.lin_l.weight"]) and _nonzero(grads["log_tau"])


def test_wsi_alignment_reaches_memory_and_encoder():
    model = _model().train()
    bag = _bag()
    grads = _grads(model, model.loss(bag, model(bag))["align_wsi"])
    assert _nonzero(grads["memory"]) and _nonzero(grads["encoder.gat1.lin_l.weight"])


def test_memory_regulariser_touches_own_class_memory_only():
    model = _model().train()
    bag = _bag(label=1)
    grad = _grads(model, model.loss(bag, model(bag))["mem"])["memory"]
    assert _nonzero(grad[1]) and not _nonzero(grad[0])


# ---------------------------------------------------------------- memory modes


def _train_steps(model: MoMKD, steps: int = 3) -> None:
    opt, _ = model.configure_optimizer()
    model.train()
    model.on_epoch_start(0)
    for i in range(steps):
        bag = _bag(label=i % 2, seed=i)
        sum(model.loss(bag, model(bag)).values()).backward()
        opt.step()
        opt.zero_grad()
        model.after_step()


def test_gradient_memory_moves_with_the_optimiser():
    model = _model()
    before = model.memory.detach().clone()
    _train_steps(model)
    assert model.memory.requires_grad
    assert not torch.allclose(model.memory, before)


def test_fixed_memory_never_moves():
    model = _model("momkd[fixed-memory]")
    before = model.memory.detach().clone()
    opt, _ = model.configure_optimizer()
    assert all(p is not model.memory for group in opt.param_groups for p in group["params"])
    _train_steps(model)
    torch.testing.assert_close(model.memory, before, rtol=0, atol=0)


MODES = {
    "gradient": "momkd",
    "momentum": "momkd[momentum-memory]",
    "vq-ema": "momkd[vq-ema-memory]",
    "fixed": "momkd[fixed-memory]",
}
#: the loss terms whose gradient reaches the memory in each mode (CE never; vq-ema and fixed: none at all)
REACHES_MEMORY = {
    "gradient": {"mem", "align_wsi", "align_omics"},
    "momentum": {"mem", "align_wsi", "align_omics"},
    "vq-ema": set(),
    "fixed": set(),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_which_losses_reach_the_memory_in_each_mode(mode):
    model = _model(MODES[mode]).train()
    assert model.cfg.memory_mode == mode
    bag = _bag()
    terms = model.loss(bag, model(bag))
    assert set(terms) == {"ce", "mem", "align_wsi", "align_omics", "recon"}
    reached = set()
    for name, term in terms.items():
        model.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        if _nonzero(model.memory.grad):
            reached.add(name)
    assert reached == REACHES_MEMORY[mode]


def test_momentum_copy_is_what_attention_and_wsi_alignment_read():
    model = _model("momkd[momentum-memory]").train()
    with torch.no_grad():
        model.momentum_memory.copy_(F.normalize(torch.randn(2, 3, 4), dim=-1))
    bag = _bag(label=0)
    out = model(bag)
    z = out.extras["z"].detach()
    torch.testing.assert_close(out.extras["sim"], (z @ model.momentum_memory.view(6, 4).T).view(-1, 2, 3))
    terms = model.loss(bag, out)
    expected = soft_angle_loss(out.extras["w"], model.momentum_memory, torch.tensor(0), margin=0.3)
    torch.testing.assert_close(terms["align_wsi"], 0.2 * expected)
    grads = _grads(model, terms["align_wsi"])
    assert _nonzero(grads["memory"]) and "momentum_memory" not in grads


def test_momentum_copy_moves_by_exactly_the_decay_once_per_step():
    model = _model("momkd[momentum-memory]", ema_decay=0.9)
    with torch.no_grad():
        model.momentum_memory.copy_(F.normalize(torch.randn(2, 3, 4), dim=-1))
    before = model.momentum_memory.clone()
    _train_steps(model, steps=1)
    torch.testing.assert_close(model.memory.norm(dim=-1), torch.ones(2, 3))
    expected = F.normalize(0.9 * before + 0.1 * model.memory.detach(), dim=-1)
    torch.testing.assert_close(model.momentum_memory, expected)
    after = model.momentum_memory.clone()
    bag = _bag()
    model.loss(bag, model(bag))  # no optimiser step: the copy stays
    torch.testing.assert_close(model.momentum_memory, after, rtol=0, atol=0)


def _vq_model(**overrides) -> MoMKD:
    model = _model("momkd[vq-ema-memory]", **overrides).train()
    model.omics_encoder.eval()  # no dropout: r can be recomputed below
    with torch.no_grad():
        model.memory.copy_(F.normalize(torch.randn(2, 3, 4), dim=-1))
        model.ema_count.copy_(torch.tensor([[1.0, 2.0, 0.5], [1.5, 1.0, 2.0]]))
        model.ema_sum.copy_(model.memory * model.ema_count.unsqueeze(-1))
    return model


@pytest.mark.parametrize("omics_weight", [0.0, 1.0])
def test_vq_ema_update_hand_computed_with_the_omics_embedding_in_its_target(omics_weight):
    model = _vq_model(ema_decay=0.9, ema_epsilon=1e-5, dead_code_threshold=0.0, ema_omics_weight=omics_weight)
    assert not model.memory.requires_grad
    before, count0, sum0 = model.memory.detach().clone(), model.ema_count.clone(), model.ema_sum.clone()
    bag = _bag(label=1)
    out = model(bag)
    model.loss(bag, out)
    torch.testing.assert_close(model.memory, before, rtol=0, atol=0)  # nothing moves before the step
    z = out.extras["z"].detach()
    with torch.no_grad():
        r = F.normalize(model.omics_proj(model.omics_encoder(bag.omics)), dim=-1)
    n, s = torch.zeros(3), torch.zeros(3, 4)
    for zi in z:  # each patch weighs 1/N, at its nearest (cosine) own-class code
        k = int((before[1] @ zi).argmax())
        n[k] += 1 / len(z)
        s[k] += zi / len(z)
    k = int((before[1] @ r).argmax())  # the patient's omics embedding, mass ema_omics_weight
    n[k] += omics_weight
    s[k] += omics_weight * r
    count = 0.9 * count0[1] + 0.1 * n
    sums = 0.9 * sum0[1] + 0.1 * s
    total = count.sum()
    smoothed = (count + 1e-5) / (total + 3e-5) * total
    model.after_step()
    torch.testing.assert_close(model.memory[1], F.normalize(sums / smoothed.unsqueeze(1), dim=-1))
    torch.testing.assert_close(model.ema_count[1], count)
    torch.testing.assert_close(model.memory[0], before[0], rtol=0, atol=0)  # class 0 saw nothing
    torch.testing.assert_close(model.ema_count[0], count0[0], rtol=0, atol=0)
    model.after_step()  # nothing collected since: no change
    torch.testing.assert_close(model.ema_count[1], count)


def test_vq_ema_reseeds_a_dead_code_from_the_bags_patches():
    model = _vq_model(dead_code_threshold=0.1)
    bag = _bag(label=1)
    with torch.no_grad():
        z = model(bag).extras["z"]
        model.memory[1, 2] = -F.normalize(z.mean(0), dim=-1)  # far from every patch: never assigned
        model.ema_count[1] = torch.tensor([2.0, 2.0, 0.01])
        model.ema_sum.copy_(model.memory * model.ema_count.unsqueeze(-1))
    out = model(bag)
    model.loss(bag, out)
    model.after_step()
    z = out.extras["z"].detach()
    assert torch.cdist(model.memory[1, 2:3], z).min() < 1e-5  # moved onto one of the slide's patches
    # re-seeded with its class's mean count: (0.99 * 4.01 + 0.01 * (1 for the patches + 1 for the omics)) / 3
    assert model.ema_count[1, 2].item() == pytest.approx((0.99 * 4.01 + 0.01 * 2.0) / 3, rel=1e-5)
    assert model.ema_count[1, :2].min() > 1.9  # the codes in use were not re-seeded
    torch.testing.assert_close(model.memory.norm(dim=-1), torch.ones(2, 3))


@pytest.mark.parametrize("name", ["momkd[momentum-memory]", "momkd[vq-ema-memory]"])
def test_codes_stay_unit_norm(name):
    model = _model(name, ema_decay=0.5)
    _train_steps(model, steps=4)
    torch.testing.assert_close(model.memory.detach().norm(dim=-1), torch.ones(2, 3))
    torch.testing.assert_close(model.read_memory().norm(dim=-1), torch.ones(2, 3))


def test_old_ema_mode_name_is_a_clear_error():
    with pytest.raises(ValueError, match="'ema' is now 'vq-ema'"):
        _model(memory_mode="ema")


# ---------------------------------------------------------------- adaptive memory size


def test_adaptive_memory_prunes_components_that_stay_unused():
    model = _model("momkd[adaptive-memory]", prune_patience=2, active_threshold=0.1).train()
    usage = torch.tensor([[10.0, 0.0, 10.0], [5.0, 5.0, 0.5]])
    model.usage.copy_(usage)
    assert model.on_epoch_end(0) == {
        "memory_positive_num_active": 2,
        "memory_positive_kept": 3,
        "memory_negative_num_active": 2,
        "memory_negative_kept": 3,
    }
    model.usage.copy_(usage)
    record = model.on_epoch_end(1)  # second epoch below the threshold: pruned
    assert record["memory_positive_kept"] == record["memory_negative_kept"] == 2
    assert model.active.tolist() == [[True, False, True], [True, True, False]]
    bag = _bag(label=0)
    out = model(bag)
    assert torch.isinf(out.extras["sim"][:, 0, 1]).all() and torch.isinf(out.extras["sim"][:, 1, 2]).all()
    terms = model.loss(bag, out)
    assert all(torch.isfinite(t) for t in terms.values())
    grad = _grads(model, sum(terms.values()))["memory"]
    assert not _nonzero(grad[0, 1]) and not _nonzero(grad[1, 2])  # a pruned code takes no part
    assert _nonzero(grad[0, 0])
    assert model.training_report()["memory_negative_kept"] == 2


def test_adaptive_memory_never_prunes_the_most_used_and_splits_an_overloaded_one():
    model = _model("momkd[adaptive-memory]", prune_patience=1, active_threshold=0.2, split_threshold=0.5)
    model.usage.copy_(torch.tensor([[1.0, 1.0, 1.0], [9.0, 1.0, 0.0]]))  # class 0: all at 1/3
    before = model.memory.detach().clone()
    record = model.on_epoch_end(0)
    assert record["memory_negative_kept"] == 3  # 1/3 each: none below 0.2
    # class 1: codes 1 and 2 pruned (shares 0.1, 0.0), then code 0 (0.9 > 0.5) split into slot 1
    assert model.active[1].tolist() == [True, True, False]
    assert record["memory_positive_kept"] == 2
    torch.testing.assert_close(model.memory[1].norm(dim=-1), torch.ones(3))
    assert (model.memory[1, 0] - model.memory[1, 1]).norm() > 0.05
    assert (model.memory[1, :2] @ before[1, 0]).min() > 0.99  # both halves near the overloaded code


def test_training_history_logs_memory_use_per_epoch():
    from bench.train import fit

    cfg = resolve_config("momkd[adaptive-memory]").replace(**SIZES, epochs=2, min_epochs=0, prune_patience=1)
    train = [_bag(label=i % 2, seed=i) for i in range(4)]
    result = fit("momkd[adaptive-memory]", cfg, D, G, train, train[:2], torch.device("cpu"), seed=0)
    assert len(result.history) == 2
    for record in result.history:
        assert 1 <= record["memory_positive_kept"] <= SIZES["memory_size"]
        assert 0 <= record["memory_negative_num_active"] <= record["memory_negative_kept"]


# ---------------------------------------------------------------- k-means init, memory use, config


def test_spherical_kmeans_finds_separated_directions():
    torch.manual_seed(0)
    dirs = torch.eye(4)[:3]
    x = (dirs.repeat(50, 1) + 0.05 * torch.randn(150, 4)).float()
    centres = spherical_kmeans(x, 3, 20)
    torch.testing.assert_close(centres.norm(dim=-1), torch.ones(3))
    assert (centres @ dirs.T).amax(dim=0).min() > 0.99


def test_prepare_is_deterministic_unit_and_keeps_a_class_without_slides():
    bags = [_bag(label=1, seed=s) for s in range(3)]
    memories = []
    for _ in range(2):
        model = _model(kmeans_patches=25)
        before = model.memory.detach().clone()
        torch.manual_seed(7)
        model.prepare(bags)
        assert model.training
        memories.append(model.memory.detach().clone())
    torch.testing.assert_close(memories[0], memories[1], rtol=0, atol=0)
    torch.testing.assert_close(memories[0].norm(dim=-1), torch.ones(2, 3))
    torch.testing.assert_close(memories[0][0], before[0])
    assert not torch.allclose(memories[0][1], before[1])


def test_training_report_counts_own_class_assignments_and_resets_each_epoch():
    model = _model().train()
    model.on_epoch_start(0)
    for label, n in ((1, 20), (1, 30), (0, 10)):
        bag = _bag(n=n, label=label, seed=n)
        model.loss(bag, model(bag))
    assert model.usage.sum(dim=1).tolist() == [10.0, 50.0]
    report = model.training_report()
    assert sum(report["memory_positive_share"]) == pytest.approx(1.0, abs=1e-3)
    assert report["memory_positive_num_active"] == len(report["memory_positive_active"]) >= 1
    with torch.no_grad():
        model.eval()
        model.loss(_bag(), model(_bag()))
    assert model.usage.sum().item() == 60.0
    model.on_epoch_start(1)
    assert model.usage.sum().item() == 0.0


def test_variants_build_and_ablation_is_declared():
    cls = get_method_class("momkd")
    rows = {table: [v for _, v in entries] for table, entries in cls.ablations.items()}
    assert rows["ablation"] == ["wsi-baseline", "wsi-align-only", "omics-align-only", "no-recon", ""]
    assert rows["memory_modes"] == ["fixed-memory", "vq-ema-memory", "momentum-memory", ""]
    assert rows["memory_capacity"] == ["", "memory-16", "adaptive-memory"]
    for name in rows["ablation"] + rows["memory_modes"] + rows["memory_capacity"]:
        cfg = resolve_config(f"momkd[{name}]" if name else "momkd")
        omics_dim = G if cfg.uses_omics else None
        model = create_method(f"momkd[{name}]" if name else "momkd", D, omics_dim, cfg=cfg.replace(**SIZES))
        bag = _bag(omics=cfg.uses_omics)
        assert "ce" in model.loss(bag, model(bag))
    run = resolve_config("momkd[paper-run]")
    assert (run.wsi_dim, run.omics_embed_dim, run.shared_dim, run.memory_size) == (512, 512, 64, 16)


def test_default_needs_omics_but_the_wsi_baseline_does_not():
    with pytest.raises(ValueError, match="omics"):
        create_method("momkd", D, None, **SIZES)
    model = _model("momkd[wsi-baseline]", omics_dim=None)
    bag = _bag(omics=False)
    assert set(model.loss(bag, model(bag))) == {"ce", "mem"}


def test_fixed_tau_is_not_learned():
    model = _model("momkd[fixed-tau]")
    assert "log_tau" not in dict(model.named_parameters())
    assert model.tau.item() == pytest.approx(0.2)


def test_search_space():
    class Trial:
        def suggest_float(self, name, low, high, log=False):
            return low

        def suggest_categorical(self, name, choices):
            return choices[-1]

    space = MoMKD.search_space(Trial())
    assert space == {"margin": 0.0, "memory_size": 64, "lr": 5e-5, "adaptive_memory": True}
    resolve_config("momkd", space)


def test_saved_weights_keep_the_authors_keys_and_an_adaptive_memorys_mask():
    assert "active" not in _model().state_dict()  # gradient/fixed weights: the keys they always had
    model = _model("momkd[adaptive-memory]")
    with torch.no_grad():
        model.active[1, 2] = False
    loaded = _model("momkd[adaptive-memory]")
    loaded.load_state_dict(model.state_dict())
    assert not loaded.active[1, 2] and loaded.active.sum() == 2 * SIZES["memory_size"] - 1
    assert {"momentum_memory"} <= set(_model("momkd[momentum-memory]").state_dict())
    assert {"ema_count", "ema_sum"} <= set(_model("momkd[vq-ema-memory]").state_dict())

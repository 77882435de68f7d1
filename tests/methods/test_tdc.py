"""TDC (assumed specification): loss pieces against numpy, frozen and self-EMA teachers, gradient-guided
weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import Bag, create_method
from methods.tdc import (
    TDC,
    discrepancy_contrastive_loss,
    ema_alpha,
    gradient_refine_weights,
    kd_kl,
    mid_ranks,
    nce_contrast_loss,
)

D, G = 12, 20
TINY = {
    "hidden_dim": 16,
    "attn_dim": 8,
    "path_dim": 8,
    "omics_hidden": (8,),
    "omics_feature_dim": 8,
    "fusion_dim": 8,
    "proj_dim": 8,
    "teacher_epochs": 2,
}


def _bags(n: int, seed: int = 0) -> list[Bag]:
    g = torch.Generator().manual_seed(seed)
    return [
        Bag(
            features=torch.randn(6 + i % 3, D, generator=g) + 0.5 * (i % 2),
            label=torch.tensor(i % 2),
            omics=torch.randn(G, generator=g) + (i % 2),
            slide_id=f"s{seed}_{i}",
            case_id=f"p{i}",
        )
        for i in range(n)
    ]


def _prepared(**overrides) -> tuple[TDC, list[Bag]]:
    torch.manual_seed(0)
    model = create_method("tdc", in_dim=D, omics_dim=G, **{**TINY, **overrides})
    bags = _bags(10)
    model.prepare(bags)
    return model, bags


def test_kd_kl_matches_numpy():
    zs, zt, t = np.array([0.3, -1.0]), np.array([1.2, 0.1]), 2.0
    ps, pt = np.exp(zs / t) / np.exp(zs / t).sum(), np.exp(zt / t) / np.exp(zt / t).sum()
    want = t**2 * (pt * np.log(pt / ps)).sum()
    assert kd_kl(torch.tensor(zs), torch.tensor(zt), t).item() == pytest.approx(want, rel=1e-10)


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    k = rng.normal(size=(5, 4))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    logits = k @ q / 0.07
    log_prob = logits - np.log(np.exp(logits).sum())
    got = discrepancy_contrastive_loss(torch.tensor(q), torch.tensor(k), 2, 0.07)
    assert got.item() == pytest.approx(-log_prob[:2].mean(), rel=1e-10)


def test_refine_weights_mask_and_aekd():
    kd = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    ce = torch.tensor([1.0, 1.0])
    assert gradient_refine_weights(kd, ce, "mask").tolist() == [1.0, 0.0]
    c = 2**-0.5
    want = [2 * (1 + (-c) + c), 2 * ((-c) + 1 + 0.0)]
    torch.testing.assert_close(gradient_refine_weights(kd, ce, "aekd"), torch.tensor(want))
    assert gradient_refine_weights(torch.zeros(1, 2), ce, "mask").tolist() == [0.0]


def test_teacher_frozen_during_the_student_phase():
    model, bags = _prepared()
    teacher = {n: p.clone() for n, p in model.teacher.named_parameters()}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()  # fix_model.train(): frozen, but its dropout is active in stage 2
    assert model.teacher.training and model.student.training
    assert not _prepared(**TDC.variants["eval-teacher"])[0].train().teacher.training
    opt, sched = model.configure_optimizer()
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.teacher.parameters()}
    for bag in bags[:4]:
        terms = model.loss(bag, model(bag))
        sum(terms.values()).backward()
        opt.step()
        opt.zero_grad()
    sched.step()
    assert all(p.grad is None for p in model.teacher.parameters())
    for n, p in model.teacher.named_parameters():
        assert torch.equal(p, teacher[n]), n
    assert sched.get_last_lr()[0] == pytest.approx(5e-4 * (1 - 2 / 31))


def test_teacher_training_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, _ = _prepared()
    torch.set_rng_state(state)
    b, _ = _prepared()
    for (n, p), q in zip(a.teacher.named_parameters(), b.teacher.parameters(), strict=True):
        assert torch.equal(p, q), n
    torch.manual_seed(0)
    create_method("tdc", in_dim=D, omics_dim=G, **TINY)
    after_build = torch.get_rng_state()
    torch.manual_seed(0)
    model = create_method("tdc", in_dim=D, omics_dim=G, **TINY)
    model.prepare(_bags(10))
    assert torch.equal(torch.get_rng_state(), after_build)


def test_logit_kd_kept_only_when_the_teacher_is_more_confident():
    model, bags = _prepared(**TDC.variants["one-teacher-mask"], beta=0.0)
    model.train()
    seen = set()
    for bag in bags:
        out = model(bag)
        terms = model.loss(bag, out)
        row = model._rows[bag.slide_id]
        y = int(bag.label)
        teacher_better = F.softmax(model.bank_z[row], 0)[y] > F.softmax(out.logits.detach(), 0)[y]
        raw = kd_kl(out.logits.detach(), model.bank_z[row], 1.0)
        want = raw if teacher_better else torch.zeros(())
        torch.testing.assert_close(terms["kd_logit"].detach(), want)
        seen.add(bool(teacher_better))
    assert seen == {True, False}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _info_nce(q: np.ndarray, keys: np.ndarray, num_pos: int, tau: float) -> float:
    logits = keys @ q / tau
    log_prob = logits - np.log(np.exp(logits).sum())
    return float(-log_prob[:num_pos].mean())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def test_nce_contrast_loss_matches_numpy():
    rng = np.random.default_rng(1)
    scores, z, tau, n_data = rng.uniform(-1, 1, size=7), 3.7, 0.07, 40
    out = np.exp(scores / tau) / z
    noise = 4 / n_data  # m = 7 - 3 negatives
    want = -(
        np.log(out[:3] / (out[:3] + noise + 1e-7)).mean() + np.log(noise / (out[3:] + noise + 1e-7)).sum()
    )
    got = nce_contrast_loss(torch.tensor(scores), 3, n_data, torch.tensor(z, dtype=torch.float64), tau)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_mid_ranks_draw_from_the_10_to_33_percent_band():
    r = mid_ranks(300, 20, torch.Generator().manual_seed(0))
    assert len(set(r.tolist())) == 20 and r.min() >= 30 and r.max() < 100  # the reference's 30..99 of 300
    assert sorted(mid_ranks(40, 20).tolist()) == list(range(4, 13))  # the whole band when it is smaller
    assert mid_ranks(4, 5).tolist() == [0] and mid_ranks(0, 5).numel() == 0


@pytest.mark.parametrize("rank_by", ["code", "paper"])
def test_crd_kd_both_halves_and_both_teachers_hand_computed(rank_by):
    """``CRDLoss`` as the code runs it, by hand: relations in each CRD's projected memory space, positives and
    negatives by the ranking key, NCE with Z fixed on the first call, the student half over the teacher
    memory and the teacher half over the student memory, against both teachers."""
    model, bags = _prepared(
        refine="none",
        dropout=0.0,
        omics_dropout=0.0,
        num_pos=3,
        num_neg=3,
        select_pos="hard",
        rank_by=rank_by,
    )
    model.train()
    bag = bags[2]
    row, y = model._rows[bag.slide_id], int(bag.label)
    bank_t, bank_s, bank_e = _np(model.bank_t), _np(model.bank_s), _np(model.bank_e)
    out = model(bag)
    terms = model.loss(bag, out)
    assert set(terms) == {"ce", "kd_logit", "kd_logit_ema", "kd_feature", "kd_feature_ema"}
    f, t = _np(out.embedding), bank_t[row]  # no dropout anywhere: the teacher gives its bank row
    labels, n = np.array(model._row_class), len(model._row_class)

    def lin(layer, x):
        return x @ _np(layer.weight).T + _np(layer.bias)

    def nce(scores, num_pos):
        out = np.exp(scores / 0.07)
        out /= out.mean() * n  # Z fixed by this first call
        noise = (len(scores) - num_pos) / n
        d1 = np.log(out[:num_pos] / (out[:num_pos] + noise + 1e-7))
        return -(d1.mean() + np.log(noise / (out[num_pos:] + noise + 1e-7)).sum())

    def crd(t_k, bank_k, embed_s, embed_t):
        q_s, q_t = _unit(lin(embed_s, f)), _unit(lin(embed_t, t_k))
        mem_s, mem_t = _unit(lin(embed_s, bank_s)), _unit(lin(embed_t, bank_k))
        key = mem_s @ q_s - mem_t @ q_t
        key = key if rank_by == "code" else -key
        same = [j for j in np.flatnonzero(labels == y) if j != row]
        pos = sorted(same, key=lambda j: -key[j])[:2]  # num_pos - 1 besides the slide itself
        neg = sorted(np.flatnonzero(labels != y), key=lambda j: key[j])[:3]
        idx = [row, *pos, *neg]
        return 0.02 * (nce(mem_t[idx] @ q_s, 3) + nce(mem_s[idx] @ q_t, 3))

    e = f  # the EMA teacher is still the student's copy (no optimiser step yet; no dropout here)
    assert terms["kd_feature"].item() == pytest.approx(crd(t, bank_t, model.embed_s, model.embed_t), rel=1e-4)
    want_ema = crd(e, bank_e, model.embed_s_ema, model.embed_t_ema)
    assert terms["kd_feature_ema"].item() == pytest.approx(want_ema, rel=1e-4)
    np.testing.assert_allclose(_np(model.bank_s[row]), 0.5 * bank_s[row] + 0.5 * f, rtol=1e-6)
    np.testing.assert_allclose(_np(model.bank_e[row]), 0.5 * bank_e[row] + 0.5 * e, rtol=1e-6)
    sum(terms.values()).backward()
    for layer in (model.embed_s, model.embed_t, model.embed_s_ema, model.embed_t_ema):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.ema.parameters())


def test_the_teacher_bank_moves_only_when_the_teacher_runs_with_dropout():
    model, bags = _prepared()
    model.train()
    row = model._rows[bags[1].slide_id]
    before = model.bank_t[row].clone()
    model.loss(bags[1], model(bags[1]))
    assert not torch.equal(model.bank_t[row], before)
    fixed, bags = _prepared(**TDC.variants["eval-teacher"])
    fixed.train()
    before = fixed.bank_t.clone()
    fixed.loss(bags[1], fixed(bags[1]))
    assert torch.equal(fixed.bank_t, before)


def test_infonce_variant_is_the_one_sided_loss_with_key_gradients():
    model, bags = _prepared(
        **{**TDC.variants["one-teacher-mask"], "refine": "none"}, dropout=0.0, num_pos=3, num_neg=3
    )
    model.train()
    bag = bags[3]
    row = model._rows[bag.slide_id]
    bank_t, bank_s = _np(model.bank_t), _np(model.bank_s)
    out = model(bag)
    terms = model.loss(bag, out)
    assert set(terms) == {"ce", "kd_logit", "kd_feature"}
    f, t, y = _np(out.embedding), bank_t[row], int(bag.label)
    labels = np.array(model._row_class)
    delta = (_unit(bank_t) @ _unit(t)) - (_unit(bank_s) @ _unit(f))
    pos = sorted([j for j in np.flatnonzero(labels == y) if j != row], key=lambda j: -delta[j])[:2]
    neg = sorted(np.flatnonzero(labels != y), key=lambda j: delta[j])[:3]
    rows = np.vstack([t, bank_t[pos], bank_t[neg]])
    q = _unit(f @ _np(model.embed_s.weight).T + _np(model.embed_s.bias))
    keys = _unit(rows @ _np(model.embed_t.weight).T + _np(model.embed_t.bias))
    assert terms["kd_feature"].item() == pytest.approx(0.02 * _info_nce(q, keys, 3, 0.07), rel=1e-5)
    terms["kd_feature"].backward()
    assert model.embed_t.weight.grad.abs().sum() > 0  # through the keys


def test_self_ema_teacher_follows_update_ema_variables():
    assert [ema_alpha(k, 0.99) for k in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert ema_alpha(10_000, 0.99) == 0.99
    model, _ = _prepared()
    assert not any(p.requires_grad for p in model.ema.parameters())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    model.after_step()  # a = 0: the EMA teacher becomes the student
    for p, q in zip(model.ema.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    before = [p.clone() for p in model.ema.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.mul_(-2.0)
    model.after_step()  # a = 0.5
    for p, b, q in zip(model.ema.parameters(), before, model.student.parameters(), strict=True):
        torch.testing.assert_close(p, 0.5 * b + 0.5 * q)
    opt, _ = model.configure_optimizer()
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.ema.parameters()}


def test_default_weights_are_aekd_over_the_four_kd_terms():
    """``AEKD_loss`` (what the README's run executes): w_i = n * sum_j cos(g_i, g_j) over the n = 4 KD terms
    and CE, gradients on the student's slide feature."""
    raw_model, bags = _prepared(refine="none", select_pos="hard")
    model, _ = _prepared(select_pos="hard")
    assert model.cfg.refine == "aekd"
    raw_model.train()
    model.train()
    bag = bags[4]
    torch.manual_seed(1)
    out_raw = raw_model(bag)
    raw = raw_model.loss(bag, out_raw)
    torch.manual_seed(1)
    out = model(bag)
    terms = model.loss(bag, out)
    names = ["kd_logit", "kd_logit_ema", "kd_feature", "kd_feature_ema"]
    assert list(terms) == ["ce", *names]
    f = out_raw.embedding
    grads = [torch.autograd.grad(raw[k], f, retain_graph=True)[0] for k in [*names, "ce"]]
    unit = F.normalize(torch.stack(grads), dim=1)
    want = 4 * (unit[:-1] @ unit.T).sum(1)
    for i, k in enumerate(names):
        torch.testing.assert_close(terms[k].detach(), want[i] * raw[k].detach(), rtol=1e-4, atol=1e-7)


def test_missing_omics_trains_ce_only_and_prediction_ignores_omics():
    model, bags = _prepared()
    model.train()
    bag = bags[0]
    assert set(model.loss(bag.without_omics(), model(bag))) == {"ce"}
    model.eval()
    with torch.no_grad():
        a, b = model(bag), model(bag.without_omics())
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert model.training_report() == {"teacher_bank_slides": 10, "teacher_frozen": True, "teachers": 2}


def test_bags_without_omics_are_left_out_of_teacher_and_banks():
    torch.manual_seed(0)
    model = create_method("tdc", in_dim=D, omics_dim=G, **TINY)
    bags = _bags(6)
    bags[1].omics = None
    model.prepare(bags)
    assert model.bank_t.shape[0] == 5 and bags[1].slide_id not in model._rows
    assert "ASSUMED" in TDC.summary and "assumed specification" in (TDC.__doc__ or "").lower()

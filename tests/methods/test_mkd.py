"""MKD: window losses against numpy, window semantics, gradient equivalence with the reference's schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import Bag, create_method
from methods.mkd import MKD, coral, distill_kl, orthogonality, similarity_preserving

D, G = 16, 600  # G not a multiple of 512: zero-padded to 1024 (2 tokens)


def _bags(n: int, seed: int = 0, omics: bool = True) -> list[Bag]:
    g = torch.Generator().manual_seed(seed)
    return [
        Bag(
            features=torch.randn(8 + i % 5, D, generator=g),
            label=torch.tensor(i % 2),
            omics=torch.randn(G, generator=g) if omics else None,
        )
        for i in range(n)
    ]


def _model(**overrides) -> MKD:
    torch.manual_seed(0)
    return create_method("mkd", in_dim=D, omics_dim=G, **overrides)


def _rownorm(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_similarity_preserving_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 3))
    want = ((_rownorm(b @ b.T) - _rownorm(a @ a.T)) ** 2).sum() / 25
    got = similarity_preserving(torch.tensor(a), torch.tensor(b))
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_coral_matches_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) * 2 + 1
    want = ((x.mean(0) - y.mean(0)) ** 2).mean() + ((np.cov(x.T) - np.cov(y.T)) ** 2).mean()
    assert coral(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(want, rel=1e-10)


def test_kl_and_orthogonality_match_numpy():
    rng = np.random.default_rng(2)
    zs, zt, t = rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), 4.0

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(zs / t), softmax(zt / t)
    want = (pt * (np.log(pt) - np.log(ps))).sum() / 4 * t**2
    assert distill_kl(torch.tensor(zs), torch.tensor(zt), t).item() == pytest.approx(want, rel=1e-10)
    fs, fo, fm = (rng.normal(size=(4, 3)) for _ in range(3))
    want = sum(abs((a * b).sum(1).mean()) for a, b in ((fm, fs), (fo, fs), (fo, fm))) / 6
    got = orthogonality(torch.tensor(fs), torch.tensor(fo), torch.tensor(fm))
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_kl_targets_are_stop_gradient():
    """d L_KL / d z_s is T (p_s - p_t) / B per teacher: the reverse KL (student as target) adds nothing."""
    model = _model()
    torch.manual_seed(3)
    b, t = 4, model.cfg.temperature
    leaves = {k: torch.randn(b, 2, requires_grad=True) for k in ("z_s", "z_o", "z_m")}
    window = {"f_s": torch.randn(b, 256), "f_o": torch.randn(b, 256), "f_m": torch.randn(b, 256), **leaves}
    model._window_terms(window)["kl"].backward()
    p = {k: F.softmax(v.detach() / t, 1) for k, v in leaves.items()}
    want_s = t * (2 * p["z_s"] - p["z_m"] - p["z_o"]) / b
    torch.testing.assert_close(leaves["z_s"].grad, want_s)
    torch.testing.assert_close(leaves["z_m"].grad, t * (p["z_m"] - p["z_s"]) / b)


def test_window_returns_terms_on_its_last_bag_and_drops_a_partial_window():
    model = _model()
    model.train()
    bags = _bags(21)
    for bag in bags[:5]:
        assert model.loss(bag, model(bag)) == {}
    model.on_epoch_start(1)  # the partial window of 5 is dropped
    for bag in bags[5:20]:
        assert model.loss(bag, model(bag)) == {}
    terms = model.loss(bags[20], model(bags[20]))
    assert set(terms) == {"ce", "sp", "kl", "orthogonal", "coral"}
    assert model.cfg.accumulation_steps == 16 and model._window == []


def test_window_gradient_equals_per_slide_then_window_backward():
    """The reference's schedule: backward of each slide's CE / 16, then of the window's KD terms; summed."""
    model = _model(dropout=0.0)
    model.train()
    bags = _bags(16, seed=4)
    w = model.cfg.accumulation_steps
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in ("f_s", "f_o", "f_m", "z_s", "z_o", "z_m")}
    for bag in bags:
        tokens = F.pad(bag.omics, (0, 1024 - G)).view(2, 512)
        z_s, f_s, _ = model.student(bag.features)
        z_o, f_o = model.omics_teacher(tokens)
        z_m, f_m = model.multimodal_teacher(bag.features, tokens)
        y = bag.label.view(1)
        ce = sum(F.cross_entropy(z.unsqueeze(0), y) for z in (z_s, z_o, z_m)) / w
        ce.backward(retain_graph=True)
        for k, v in zip(feats, (f_s, f_o, f_m, z_s, z_o, z_m), strict=True):
            feats[k].append(v)
    f_s, f_o, f_m, z_s, z_o, z_m = (torch.stack(v) for v in feats.values())
    kl = sum(distill_kl(z_s, z.detach(), 4) + distill_kl(z, z_s.detach(), 4) for z in (z_m, z_o))
    sp = w * (similarity_preserving(f_s, f_m) + similarity_preserving(f_s, f_o))
    decomposition = orthogonality(f_s, f_o, f_m) + coral(f_m, f_s) + coral(f_o, f_s) + coral(f_o, f_m)
    (sp + kl + decomposition).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for bag in bags:
        terms = model.loss(bag, model(bag))
    sum(terms.values()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


def test_bags_without_omics_keep_student_ce_and_mask_kd():
    model = _model()
    model.train()
    bags = _bags(16, seed=5, omics=False)
    bags[3].omics, bags[7].omics = torch.randn(G), torch.randn(G)
    for bag in bags:
        terms = model.loss(bag, model(bag))
    assert set(terms) == {"ce", "sp", "kl", "orthogonal", "coral"}  # KD on the 2 slides with omics
    bags[7].omics = None
    for bag in bags:
        terms = model.loss(bag, model(bag))
    assert set(terms) == {"ce"}
    terms["ce"].backward()
    assert model.student.fc[0].weight.grad is not None


def test_prediction_ignores_omics_and_eval_loss_leaves_the_window_alone():
    model = _model().eval()
    bag = _bags(1, seed=6)[0]
    with torch.no_grad():
        a, b = model(bag), model(bag.without_omics())
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert a.attention.shape == (bag.num_patches,) and a.embedding.shape == (256,)
    assert set(model.loss(bag, a)) == {"ce"} and model._window == []
    assert set(model.validation_logits(bag)) == {"student", "omics_teacher", "multimodal_teacher"}


def test_omics_zero_padded_to_whole_tokens():
    model = _model()
    assert model.num_tokens == 2
    assert model.training_report() == {"omics_tokens": 2, "omics_zero_padded_genes": 1024 - G}


def test_variants_switch_terms_off():
    model = _model(sp_weight=0.0, decomposition_weight=0.0)
    model.train()
    for bag in _bags(16, seed=7):
        terms = model.loss(bag, model(bag))
    assert set(terms) == {"ce", "kl"}
    assert set(MKD.variants) == {"no-sp", "no-kl", "no-decomposition", "student-monitor", "eval-teachers"}


def test_mean_auc_monitor_averages_student_and_teachers_over_patients():
    """MKD selects epochs on the mean validation AUC of its three models (teachers: slides with omics)."""
    from sklearn.metrics import roc_auc_score

    from bench.train import mean_model_auc

    model = _model(teacher_val_dropout=False)
    assert model.cfg.monitor == "mean-auc"
    bags = _bags(12, seed=8)
    for i, b in enumerate(bags):
        b.case_id, b.slide_id = f"P{i}", f"P{i}-01"
    bags[0].omics = bags[1].omics = None  # teachers skip these two
    got = mean_model_auc(model, bags, torch.device("cpu"), autocast=False, aggregation="mean")
    model.eval()
    with torch.no_grad():
        scores = {"student": [], "omics_teacher": [], "multimodal_teacher": []}
        for b in bags:
            for name, z in model.validation_logits(b).items():
                scores[name].append((int(b.label), float(z.softmax(-1)[1])))
    want = np.mean([roc_auc_score(*zip(*pairs, strict=True)) for pairs in scores.values()])
    assert len(scores["student"]) == 12 and len(scores["omics_teacher"]) == 10
    assert got == pytest.approx(want, abs=1e-6)


def test_teachers_are_scored_with_dropout_as_the_reference_and_modes_are_restored():
    """``validate_classification_coattn`` sets only the student to eval: teacher scores vary with dropout."""
    bag = _bags(1, seed=9)[0]
    model = _model().eval()
    with torch.no_grad():
        a, b = model.validation_logits(bag), model.validation_logits(bag)
    torch.testing.assert_close(a["student"], b["student"], rtol=0, atol=0)
    assert not torch.equal(a["multimodal_teacher"], b["multimodal_teacher"])
    assert not torch.equal(a["omics_teacher"], b["omics_teacher"])
    assert not any(m.training for m in model.modules())
    plain = _model(**MKD.variants["eval-teachers"]).eval()
    with torch.no_grad():
        c, d = plain.validation_logits(bag), plain.validation_logits(bag)
    for name in c:
        torch.testing.assert_close(c[name], d[name], rtol=0, atol=0)


def test_teachers_keep_their_last_epoch_weights():
    assert _model().last_epoch_modules() == ("omics_teacher", "multimodal_teacher")
    assert _model(teachers_last_epoch=False).last_epoch_modules() == ()
    names = {n for n, _ in _model().named_children()}
    assert set(_model().last_epoch_modules()) <= names

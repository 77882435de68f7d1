"""Parity fixture of ``abmil[ilse]`` against AMLab-Amsterdam/AttentionDeepMIL's ``GatedAttention``.

    python benchmarks/parity/abmil_ilse.py --ref-dir /path/to/AttentionDeepMIL

The reference is written for MNIST bags: a convolutional extractor gives 800 features per instance, then
``Linear(800, M)``-ReLU, gated attention (V, U of width L, w), ``Linear(M, 1)``-sigmoid, and
``calculate_objective``'s Bernoulli negative log-likelihood. bench's variant starts from patch features:
``Linear(D, M)``-ReLU, the same gated attention, a 2-logit head with cross-entropy. For the fixture:

- the conv extractor is replaced by zero-padding the D = 64 features to its 800 outputs, so the
  reference's ``Linear(800, M)`` acts as bench's ``Linear(D, M)`` (its first D columns; the others meet
  zeros and get no gradient);
- the head: bench's logits are ``(0, l)`` with l the reference's pre-sigmoid output (classifier row 0 set
  to zero), so softmax = (1 - sigmoid(l), sigmoid(l)) and the cross-entropy is the reference's objective
  (whose clamp at 1e-5 does not bind here); the gradient of row 0 is minus that of row 1 (the 2-way softmax
  with l_0 = 0), the reference gives row 1;
- widths M = 24, L = 8 instead of 500 and 128, to keep the fixture small (the reference's layers are
  rebuilt at those widths); the variant's dropout is 0 as the reference's, so train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import (
    Recorder,
    bench_model,
    capture_output,
    copy_into_reference,
    import_reference,
    parse_args,
    reference_commit,
    reference_grads,
    seeded_bag,
)
from torch import nn

REPO = "AMLab-Amsterdam/AttentionDeepMIL"
DIM, HIDDEN, ATTN, CONV_OUT = 64, 24, 8, 800
CASES = (("n37_y0", 37, 0), ("n200_y1", 200, 1))
MAPPING = {
    "encoder.0.weight": None,  # first DIM columns of feature_extractor_part2.0.weight
    "encoder.0.bias": "feature_extractor_part2.0.bias",
    "attention.a.0.weight": "attention_V.0.weight",
    "attention.a.0.bias": "attention_V.0.bias",
    "attention.b.0.weight": "attention_U.0.weight",
    "attention.b.0.bias": "attention_U.0.bias",
    "attention.c.weight": "attention_w.weight",
    "attention.c.bias": "attention_w.bias",
    "classifier.weight": None,  # row 1 = classifier.0.weight, row 0 = 0
    "classifier.bias": None,
}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], REPO)
    commit = reference_commit(args.ref_dir)
    (amlab,) = import_reference(args.ref_dir, "model.py")
    overrides = {"hidden_dim": HIDDEN, "attn_dim": ATTN}
    bench = bench_model("abmil[ilse]", DIM, None, overrides, seed=0)
    with torch.no_grad():  # the reference has one logit: bench's class-0 logit is held at zero
        bench.classifier.weight[0].zero_()
        bench.classifier.bias[0].zero_()
    ref = amlab.GatedAttention()
    ref.feature_extractor_part1 = nn.ZeroPad1d((0, CONV_OUT - DIM))
    ref.feature_extractor_part2 = nn.Sequential(nn.Linear(CONV_OUT, HIDDEN), nn.ReLU())
    ref.attention_V = nn.Sequential(nn.Linear(HIDDEN, ATTN), nn.Tanh())
    ref.attention_U = nn.Sequential(nn.Linear(HIDDEN, ATTN), nn.Sigmoid())
    ref.attention_w = nn.Linear(ATTN, 1)
    ref.classifier = nn.Sequential(nn.Linear(HIDDEN, 1), nn.Sigmoid())
    w_in = torch.zeros(HIDDEN, CONV_OUT)
    w_in[:, :DIM] = bench.encoder[0].weight.detach()
    extra = {
        "feature_extractor_part2.0.weight": w_in,
        "classifier.0.weight": bench.classifier.weight.detach()[1:],
        "classifier.0.bias": bench.classifier.bias.detach()[1:],
    }
    copy_into_reference(bench, ref, MAPPING, extra=extra)
    ref.train()
    rec = Recorder(
        "abmil-ilse",
        {
            "method": "abmil[ilse]",
            "overrides": overrides,
            "in_dim": DIM,
            "omics_dim": None,
            "mode": "train",
            "reference": {"repo": REPO, "commit": commit, "files": ["model.py"]},
            "script": "benchmarks/parity/abmil_ilse.py",
            "notes": "GatedAttention forward + calculate_objective; conv extractor replaced by zero-padding "
            "D=64 to 800; bench logits (0, l) against the reference's sigmoid(l); widths 24/8.",
        },
        bench,
    )
    for i, (name, n, label) in enumerate(CASES):
        bag = seeded_bag(200 + i, n, DIM, label)
        ref.zero_grad(set_to_none=True)
        x = torch.from_numpy(bag["features"]).unsqueeze(0)  # (1, N, D): the reference's bag batch
        with capture_output(ref.classifier[0]) as pre_sigmoid:
            loss, attention = ref.calculate_objective(x, torch.tensor([float(label)]))
        loss = loss.sum()
        loss.backward()
        grads = reference_grads(ref, MAPPING)
        grads["encoder.0.weight"] = ref.feature_extractor_part2[0].weight.grad[:, :DIM]
        g_w, g_b = ref.classifier[0].weight.grad[0], ref.classifier[0].bias.grad
        grads["classifier.weight"] = torch.stack([-g_w, g_w])
        grads["classifier.bias"] = torch.cat([-g_b, g_b])
        logits = F.pad(pre_sigmoid[0].view(1), (1, 0))
        rec.case(name, [bag], [{"logits": logits, "attention": attention[0]}], {"ce": loss}, grads)
    rec.save(args.out)


if __name__ == "__main__":
    main()

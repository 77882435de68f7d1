"""Parity fixture of ``abmil`` (default: CLAM's gated attention) against mahmoodlab/CLAM's ``CLAM_SB``.

    python benchmarks/parity/abmil.py --ref-dir /path/to/CLAM

Records ``CLAM_SB(gate=True, size_arg="small")`` with ``instance_eval=False`` (bench's ABMIL is CLAM's
single-branch model without the instance-clustering loss) and the cross-entropy of ``core_utils.train_loop``
(``nn.CrossEntropyLoss``), in eval mode (dropout off). Widths: the fixture's are 32/16 instead of 512/256,
to keep it small: the reference's ``attention_net`` and ``classifiers`` are rebuilt at those widths from the
reference's own ``Attn_Net_Gated``; CLAM_SB's forward runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import (
    Recorder,
    bench_model,
    copy_into_reference,
    import_reference,
    parse_args,
    reference_commit,
    reference_grads,
    seeded_bag,
)
from torch import nn

REPO = "mahmoodlab/CLAM"
DIM, HIDDEN, ATTN = 64, 32, 16
CASES = (("n37_y0", 37, 0), ("n200_y1", 200, 1))
MAPPING = {
    "encoder.0.weight": "attention_net.0.weight",
    "encoder.0.bias": "attention_net.0.bias",
    "attention.a.0.weight": "attention_net.3.attention_a.0.weight",
    "attention.a.0.bias": "attention_net.3.attention_a.0.bias",
    "attention.b.0.weight": "attention_net.3.attention_b.0.weight",
    "attention.b.0.bias": "attention_net.3.attention_b.0.bias",
    "attention.c.weight": "attention_net.3.attention_c.weight",
    "attention.c.bias": "attention_net.3.attention_c.bias",
    "classifier.weight": "classifiers.weight",
    "classifier.bias": "classifiers.bias",
}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], REPO)
    commit = reference_commit(args.ref_dir)
    (model_clam,) = import_reference(args.ref_dir, "models/model_clam.py")
    overrides = {"hidden_dim": HIDDEN, "attn_dim": ATTN}
    bench = bench_model("abmil", DIM, None, overrides, seed=0)
    ref = model_clam.CLAM_SB(gate=True, size_arg="small", dropout=0.25, n_classes=2, embed_dim=DIM)
    ref.attention_net = nn.Sequential(
        nn.Linear(DIM, HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.25),
        model_clam.Attn_Net_Gated(L=HIDDEN, D=ATTN, dropout=True, n_classes=1),
    )
    ref.classifiers = nn.Linear(HIDDEN, 2)
    keep = [k for k in ref.state_dict() if k.startswith("instance_classifiers.")]  # instance loss: unused
    copy_into_reference(bench, ref, MAPPING, keep=keep)
    ref.eval()
    rec = Recorder(
        "abmil",
        {
            "method": "abmil",
            "overrides": overrides,
            "in_dim": DIM,
            "omics_dim": None,
            "mode": "eval",
            "reference": {
                "repo": REPO,
                "commit": commit,
                "files": ["models/model_clam.py", "utils/core_utils.py"],
            },
            "script": "benchmarks/parity/abmil.py",
            "notes": "CLAM_SB (gated, instance_eval=False) + nn.CrossEntropyLoss, eval mode (dropout off); "
            "widths 32/16 (reference layers rebuilt from its own Attn_Net_Gated).",
        },
        bench,
    )
    for i, (name, n, label) in enumerate(CASES):
        bag = seeded_bag(100 + i, n, DIM, label)
        ref.zero_grad(set_to_none=True)
        x, y = torch.from_numpy(bag["features"]), torch.from_numpy(bag["label"]).view(1)
        logits, _, _, a_raw, _ = ref(x, label=y, instance_eval=False)
        loss = nn.CrossEntropyLoss()(logits, y)
        loss.backward()
        out = {"logits": logits[0], "attention": F.softmax(a_raw, dim=1)[0]}
        rec.case(name, [bag], [out], {"ce": loss}, reference_grads(ref, MAPPING))
    rec.save(args.out)


if __name__ == "__main__":
    main()

"""Parity fixtures of ``wikg`` and its code variants against WonderLandxD/WiKG's ``model.WiKG``.

    python benchmarks/parity/wikg.py --ref-dir /path/to/WiKG

Records ``WiKG.forward`` and ``train.py``'s ``nn.CrossEntropyLoss`` for the default (``pool='mean'``,
bi-interaction, as ``train.py`` builds it) and the variants the code offers: ``attn-pool`` (``model.py``'s
class default, PyG's ``GlobalAttention``; its attention weights are the softmax of the gate network's
output), ``gcn`` and ``sage``. Eval mode (dropout off); hidden width C = 16 instead of 512 (the class
takes it as an argument), top-k 6 as the code. The paper's dot-product score (``dot-score``) is not in the
code, so there is nothing to record for it. The reference's unused ``gate_U/V/W`` keep their own values.
"""

from __future__ import annotations

import torch
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

REPO = "WonderLandxD/WiKG"
DIM, HIDDEN, TOPK = 64, 16, 6
CASES = (("n37_y0", 37, 0), ("n200_y1", 200, 1))
VARIANTS = {  # fixture name: (bench method name, reference constructor arguments)
    "wikg": ("wikg", {"agg_type": "bi-interaction", "pool": "mean"}),
    "wikg-attn-pool": ("wikg[attn-pool]", {"agg_type": "bi-interaction", "pool": "attn"}),
    "wikg-gcn": ("wikg[gcn]", {"agg_type": "gcn", "pool": "mean"}),
    "wikg-sage": ("wikg[sage]", {"agg_type": "sage", "pool": "mean"}),
}


def mapping(bench: torch.nn.Module) -> dict[str, str]:
    rename = {
        "embed.0": "_fc1.0",
        "w_head": "W_head",
        "w_tail": "W_tail",
        "classifier": "fc",
        "attention.0": "readout.gate_nn.0",
        "attention.2": "readout.gate_nn.2",
    }
    out = {}
    for name in bench.state_dict():
        module, leaf = name.rsplit(".", 1)
        out[name] = f"{rename.get(module, module)}.{leaf}"
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], REPO)
    commit = reference_commit(args.ref_dir)
    (model,) = import_reference(args.ref_dir, "model.py")
    torch.autograd.set_detect_anomaly(False)  # the module switches it on at import
    for fixture, (method, ref_args) in VARIANTS.items():
        overrides = {"hidden_dim": HIDDEN, "topk": TOPK}
        bench = bench_model(method, DIM, None, overrides, seed=0)
        ref = model.WiKG(dim_in=DIM, dim_hidden=HIDDEN, topk=TOPK, n_classes=2, dropout=0.3, **ref_args)
        names = mapping(bench)
        copy_into_reference(bench, ref, names, keep=[k for k in ref.state_dict() if k.startswith("gate_")])
        ref.eval()
        rec = Recorder(
            fixture,
            {
                "method": method,
                "overrides": overrides,
                "in_dim": DIM,
                "omics_dim": None,
                "mode": "eval",
                "reference": {"repo": REPO, "commit": commit, "files": ["model.py", "train.py"]},
                "script": "benchmarks/parity/wikg.py",
                "notes": f"WiKG({ref_args}) forward + nn.CrossEntropyLoss, eval mode (dropout off); C=16.",
            },
            bench,
        )
        for i, (name, n, label) in enumerate(CASES):
            bag = seeded_bag(300 + i, n, DIM, label)
            ref.zero_grad(set_to_none=True)
            x, y = torch.from_numpy(bag["features"]).unsqueeze(0), torch.from_numpy(bag["label"]).view(1)
            gate = ref.readout.gate_nn if ref_args["pool"] == "attn" else torch.nn.Identity()
            with capture_output(gate) as scores:
                logits = ref(x)
            loss = torch.nn.CrossEntropyLoss()(logits, y)
            loss.backward()
            out = {"logits": logits[0]}
            if ref_args["pool"] == "attn":
                out["attention"] = scores[0].view(-1).softmax(0)
            rec.case(name, [bag], [out], {"ce": loss}, reference_grads(ref, names))
        rec.save(args.out)


if __name__ == "__main__":
    main()

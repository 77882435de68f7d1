"""Parity fixture of ``ghanet`` against ZacharyWang-007/G-HANet (``G_HANet_Surv``, classification head).

    python benchmarks/parity/ghanet.py --ref-dir /path/to/G-HANet

Runs the authors' training loop itself, ``utils/coattn_train_utils.train_loop_survival_coattn``, one bag
at a time with ``gc`` = 1 (the loop then steps after each bag; the accumulation over 32 bags is the
trainer's matter), with bench's one adaptation: the survival loss is replaced by the cross-entropy of the
classifier's logits (``loss_fn`` receives the hazards, so it reads the logits from a hook on the
classifier). The reconstruction loss is the loop's own, ``0.3 * (Σ_i sce_loss + Σ_i MSE)`` over the
selected genes of each group (``omic_mask``); the optimiser is a stand-in that records the gradients when
the loop steps. Loss terms: CE as above, ``sce`` and ``mse`` = 0.3 × the sums of the reference's
``sce_loss`` and ``nn.MSELoss`` on the reconstructions the model returned.

Omics: G = 60 genes in 6 contiguous groups of 10 (bench's default without a group file); each group's
selected genes (``omic_mask``, the reference's Welch-test output) are drawn at random here and given to
bench as its ``selected_<i>`` buffers. The reference's decoders are sized to the selected genes, bench's to
whole groups: bench's last decoder rows of the selected genes are the reference's rows, the others get no
gradient.

Dropout 0 everywhere (the loop trains in train mode). Widths 16 instead of 512 (2 heads of 8 instead of
4 x 128, per-token compression to 8 instead of 256), D = 64 instead of 1024; the gated attention keeps
its hidden width 256. The layers are rebuilt at these widths from the reference's own ``Cross_Attention``,
``Self_Attention``, ``FeedForward``, ``Hyper_attention`` and ``Attn_Net_Gated``; the forward code runs
unchanged. ``recon_net.cross_attention1`` (built, never used: the code reuses ``cross_attention0``) keeps
its own values. The loop's survival metrics (``lifelines``, ``sksurv``) and ``utils.utils``'s
``torchvision`` import are stubbed: the recording never uses them; the loop's survival bookkeeping arrays
are object arrays (NumPy 2 refuses its scalar-slot assignment of a 1-element array).
"""

from __future__ import annotations

import numpy as np
import torch
from common import (
    Recorder,
    RecordingOptimizer,
    bench_model,
    capture_output,
    copy_into_reference,
    import_reference,
    no_dropout,
    parse_args,
    reference_commit,
    reference_grads,
    seeded_bag,
)
from torch import nn

REPO = "ZacharyWang-007/G-HANet"
DIM, GENES, WIDTH, HEADS, DIM_HEAD, COMPRESSED, TOKENS = 64, 60, 16, 2, 8, 8, 6
CASES = (("n37_y0", 37, 0), ("n200_y1", 200, 1))
OVERRIDES = {
    "wsi_dim": WIDTH,
    "dim_head": DIM_HEAD,
    "heads": HEADS,
    "compressed_dim": COMPRESSED,
    "dropout": 0.0,
}


def attention_names(bench: str, ref: str) -> dict[str, str]:
    return {
        f"{bench}.to_q.weight": f"{ref}.to_q.0.weight",
        f"{bench}.to_k.weight": f"{ref}.to_k.0.weight",
        f"{bench}.to_v.weight": f"{ref}.to_v.weight",
        f"{bench}.to_out.weight": f"{ref}.to_out.weight",
        f"{bench}.to_out.bias": f"{ref}.to_out.bias",
    }


def linear(bench: str, ref: str) -> dict[str, str]:
    return {f"{bench}.weight": f"{ref}.weight", f"{bench}.bias": f"{ref}.bias"}


def mapping() -> dict[str, str | None]:
    out: dict[str, str | None] = {"tokens": None}
    out |= linear("assoc_fc.0", "recon_net.wsi_net.0")
    out |= attention_names("cross_attention.0", "recon_net.cross_attention0")
    for k in (0, 1):
        out |= linear(f"ffn{k}.proj_in", f"recon_net.ffn{k}.net.0")
        out |= linear(f"ffn{k}.proj_out.0", f"recon_net.ffn{k}.net.2")
    for i in range(6):
        out |= linear(f"ln.{i}", f"recon_net.ln_{i + 1}")
        out |= linear(f"decoders.{i}.0", f"recon_net.sig_reconstruct_net.{i}.0")
        out |= linear(f"decoders.{i}.1", f"recon_net.sig_reconstruct_net.{i}.1")
        out |= {f"decoders.{i}.4.weight": None, f"decoders.{i}.4.bias": None, f"selected_{i}": None}
    out |= linear("wsi_fc.0", "wsi_net.0") | linear("wsi_fc.1", "wsi_net.1")
    out |= linear("gate.a.0", "gate.attention_a.0") | linear("gate.b.0", "gate.attention_b.0")
    out |= linear("gate.c", "gate.attention_c")
    for b, r in (("0", "linear1"), ("1", "ln1"), ("3", "linear2"), ("4", "ln2")):
        out |= linear(f"hyper.net.{b}", f"hyperconv1.{r}")
    out |= attention_names("self_attention", "attention")
    out |= linear("ffn.proj_in", "ffn.net.0") | linear("ffn.proj_out.0", "ffn.net.2")
    out |= linear("ln_fusion", "ln1") | linear("compress.0", "butter.0") | linear("compress.1", "butter.1")
    out |= linear("classifier", "classifier")
    return out


def build_reference(mc, sizes: list[int]) -> nn.Module:
    """``G_HANet_Surv`` with its layers rebuilt at the fixture's widths from the reference's own classes."""
    w = WIDTH
    ref = mc.G_HANet_Surv(omic_sizes=sizes, n_classes=2, dropout=0.0, num_tokens=TOKENS, ratio=0.2)
    rn = ref.recon_net
    rn.wsi_net = nn.Sequential(nn.Linear(DIM, w), nn.ReLU(), nn.Dropout(0.0))
    rn.sig_reconstruct_net = nn.ModuleList(
        nn.Sequential(nn.Linear(w, w), nn.LayerNorm(w), nn.ELU(), nn.Dropout(0.0), nn.Linear(w, s))
        for s in sizes
    )
    rn.tokens = nn.Parameter(torch.randn(1, TOKENS, w))
    rn.cross_attention0 = mc.Cross_Attention(query_dim=w, context_dim=w, heads=HEADS, dim_head=DIM_HEAD)
    rn.cross_attention1 = mc.Cross_Attention(query_dim=w, context_dim=w, heads=HEADS, dim_head=DIM_HEAD)
    rn.ffn0, rn.ffn1 = mc.FeedForward(dim=w, mult=4), mc.FeedForward(dim=w, mult=4)
    for i in range(1, 7):
        setattr(rn, f"ln_{i}", nn.LayerNorm(w))
    ref.gate = mc.Attn_Net_Gated(L=w)
    ref.wsi_net = nn.Sequential(nn.Linear(DIM, w), nn.LayerNorm(w), nn.ReLU(), nn.Dropout(0.0))
    ref.classifier = nn.Linear(TOKENS * COMPRESSED, 2)
    ref.hyperconv1 = mc.Hyper_attention(in_ft=w, out_ft=w)
    ref.attention = mc.Self_Attention(query_dim=w, context_dim=w, heads=HEADS, dim_head=DIM_HEAD)
    ref.ffn = mc.FeedForward(dim=w)
    ref.ln1 = nn.LayerNorm(w)
    ref.butter = nn.Sequential(
        nn.Linear(w, COMPRESSED), nn.LayerNorm(COMPRESSED), nn.ReLU(inplace=True), nn.Dropout(0.0)
    )
    no_dropout(ref)
    return ref


class _ObjectZeros:
    """The loop's ``np`` with ``zeros`` giving object arrays: its survival bookkeeping stores a 1-element
    array in a scalar slot (``all_risk_scores[i] = risk``), which NumPy 2 refuses; those arrays only feed
    the stubbed c-index."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def zeros(shape, *args, **kwargs):
        return np.zeros(shape, dtype=object)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], REPO)
    commit = reference_commit(args.ref_dir)
    stub = {
        "lifelines.utils": {"concordance_index": None},
        "sksurv.metrics": {"concordance_index_censored": lambda *a, **k: (float("nan"),)},
        "torchvision.transforms": {},
    }
    mc, loop = import_reference(args.ref_dir, "models.model_coattn", "utils/coattn_train_utils.py", stub=stub)
    loop.np = _ObjectZeros()
    bench = bench_model("ghanet", DIM, GENES, OVERRIDES, seed=0)
    rng = np.random.RandomState(7)
    masks = []
    for i, genes in enumerate(bench.groups):
        mask = rng.rand(len(genes)) < 0.5
        mask[rng.randint(len(genes))] = True  # every group reconstructs something
        getattr(bench, f"selected_{i}").copy_(torch.from_numpy(mask))
        masks.append(mask)
    ref = build_reference(mc, [int(m.sum()) for m in masks])
    names = mapping()
    extra = {"recon_net.tokens": bench.tokens.detach().unsqueeze(0)}
    for i, mask in enumerate(masks):
        last = bench.decoders[i][4]
        extra[f"recon_net.sig_reconstruct_net.{i}.4.weight"] = last.weight.detach()[mask]
        extra[f"recon_net.sig_reconstruct_net.{i}.4.bias"] = last.bias.detach()[mask]
    keep = [k for k in ref.state_dict() if k.startswith("recon_net.cross_attention1.")]
    copy_into_reference(bench, ref, names, keep=keep, extra=extra)
    rec = Recorder(
        "ghanet",
        {
            "method": "ghanet",
            "overrides": OVERRIDES,
            "in_dim": DIM,
            "omics_dim": GENES,
            "mode": "train",
            "reference": {
                "repo": REPO,
                "commit": commit,
                "files": [
                    "utils/coattn_train_utils.py",
                    "models/model_coattn.py",
                    "models/model_reconstruction.py",
                    "models/attention_modules.py",
                    "models/hyper_attention_module.py",
                ],
            },
            "script": "benchmarks/parity/ghanet.py",
            "notes": "train_loop_survival_coattn one bag at a time (gc=1), survival loss -> CE on the logits "
            "(bench's adaptation), train mode, dropout 0; random omic_mask as bench's selected_<i>; widths 16, D=64.",
        },
        bench,
    )
    mse = nn.MSELoss()
    for i, (name, n, label) in enumerate(CASES):
        bag = seeded_bag(600 + i, n, DIM, label, omics_dim=GENES)
        omics = torch.from_numpy(bag["omics"])
        groups = [omics[torch.as_tensor(g)] for g in bench.groups]
        loader = [
            (torch.from_numpy(bag["features"]), *groups, torch.tensor([label]), 1.0, torch.tensor([0.0]))
        ]
        seen = []
        forward = ref.forward
        ref.forward = lambda *a, _f=forward, _s=seen, **k: _s.append(_f(*a, **k)) or _s[-1]
        opt = RecordingOptimizer(ref)
        with capture_output(ref.classifier) as logits, capture_output(ref.gate) as gate:

            def ce(hazards, S, Y, c, _logits=logits):
                return nn.CrossEntropyLoss()(_logits[-1], Y)

            loop.train_loop_survival_coattn(0, ref, loader, opt, loss_fn=ce, gc=1, omic_mask=masks)
        ref.forward = forward
        re_omics = seen[0][4]
        with torch.no_grad():
            targets = [g[torch.from_numpy(m)] for g, m in zip(groups, masks, strict=True)]
            sce = sum(loop.sce_loss(r, t) for r, t in zip(re_omics, targets, strict=True))
            l2 = sum(mse(r, t) for r, t in zip(re_omics, targets, strict=True))
            losses = {
                "ce": nn.CrossEntropyLoss()(logits[0], torch.tensor([label])),
                "sce": 0.3 * sce,
                "mse": 0.3 * l2,
            }
        opt.restore()
        grads = reference_grads(ref, names)
        grads["tokens"] = ref.recon_net.tokens.grad[0]
        for j, mask in enumerate(masks):
            last = bench.decoders[j][4]
            g_w, g_b = torch.zeros_like(last.weight), torch.zeros_like(last.bias)
            g_w[torch.from_numpy(mask)] = ref.recon_net.sig_reconstruct_net[j][4].weight.grad
            g_b[torch.from_numpy(mask)] = ref.recon_net.sig_reconstruct_net[j][4].bias.grad
            grads[f"decoders.{j}.4.weight"], grads[f"decoders.{j}.4.bias"] = g_w, g_b
        out = {"logits": logits[0][0], "attention": gate[0].T.softmax(-1)[0]}
        rec.case(name, [bag], [out], losses, grads)
        ref.zero_grad(set_to_none=True)
    rec.save(args.out)


if __name__ == "__main__":
    main()

"""Parity fixtures of ``momkd`` (``gradient`` memory, the code) against CAIR-LAB-WFUSM/MoMKD.

    python benchmarks/parity/momkd.py --ref-dir /path/to/MoMKD

Runs the authors' training step itself, ``utils/Mkd_train_utils.mkd_train_loop`` (``MKD.forward_train``,
the two ``VectorQuantize`` memories, ``PrototypicalAlignmentLoss``, the weighted sum and its backward) on a
one-bag loader, with ``core_utils.train_mkd``'s weights (task 0.5, omics alignment 0.05, WSI alignment
0.2, reconstruction 0.05, margin 0.3; ``alpha_mem`` 0.1 is fixed in the loop) and no gradient clipping
(``gc`` 0: clipping is the trainer's). The optimiser is a stand-in that records the gradients when the loop
steps; the loop's per-term means (one bag) are the loss terms, times their weights. The graph of each bag
is the authors' own, ``graph.py``'s ``process_single_h5`` (sklearn k = 8 neighbours, directed) on the
bag's coordinates.

Dropout is set to 0 everywhere (the loop trains in train mode): the reference's dropout layers, its
``WsiEncoder.dropout`` and both ``GATv2Conv.dropout``; bench gets ``dropout``, ``attn_dropout`` and
``omics_dropout`` 0. Widths are small (Dw 32, E 16, S 8, K 4, head 8, omics hidden 16, G 48); the
omics MLPs are rebuilt at hidden width 16 from the reference's own ``RnaEncoder``/``RnaDecoder``. The
memory codes are scaled to norms in [0.5, 1.5] so that the raw-code (commitment, Euclidean nearest) and
normalised-code (alignment, attention, orthogonality) readings are both exercised.

Fixtures: ``momkd`` (default; the tests check it with both of bench's GATv2 paths, the padded one and
PyG's ``GATv2Conv``, ``fast_graph=False``) and ``momkd-paper`` (variant ``paper``: reconstruction weight
0.01 and fixed τ, the reference's ``attn_log_tau`` frozen; its k-means budget does not enter a step).
``momkd`` also records ``MKD.forward_inference`` (the code's validation and test path, eval mode) on each
bag, ``core_utils.bootstrap_codebooks`` on its two bags from a seeded RNG (the points it
clusters and the memories it leaves; its ``utils.utils`` imports ``torchvision`` for image transforms, which
is stubbed) and the reference's parameter counts at D = 1536, G = 768 (class defaults and ``paper-run``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
from common import (
    Recorder,
    RecordingOptimizer,
    bench_model,
    copy_into_reference,
    import_reference,
    no_dropout,
    parse_args,
    reference_commit,
    reference_grads,
    seeded_bag,
)

REPO = "CAIR-LAB-WFUSM/MoMKD"
DIM, GENES = 64, 48
SIZES = {"wsi_dim": 32, "omics_embed_dim": 16, "shared_dim": 8, "memory_size": 4, "cls_hidden_dim": 8}
OMICS_HIDDEN = 16
NO_DROPOUT = {"dropout": 0.0, "attn_dropout": 0.0, "omics_dropout": 0.0}
CASES = (("n37_y0", 37, 0), ("n200_y1", 200, 1))
HPARAMS = {
    "task_weight": 0.5,
    "alpha_rna": 0.05,
    "alpha_wsi": 0.2,
    "margin": 0.3,
    "gc": 0,
    "recon_weight": 0.05,
}
ALPHA_MEM = 0.1  # fixed inside mkd_train_loop
KMEANS_SEED = 11
FIXTURES = {  # name: (bench method, extra overrides, reference hparams changes, learnable tau)
    "momkd": ("momkd", {}, {}, True),
    "momkd-paper": ("momkd[paper]", {}, {"recon_weight": 0.01}, False),
}


def mapping(bench: torch.nn.Module) -> dict[str, str | None]:
    rename = {
        "encoder.res1": "wsi_encoder.res_proj1",
        "patch_proj": "wsi_patch_projector",
        "pool_proj": "wsi_pool_projector",
        "omics_proj": "rna_projector",
        "head": "wsi_classifier_proto",
        "omics_encoder": "rna_tower.encoder",
        "omics_decoder": "rna_decoder.decoder",
    }
    out: dict[str, str | None] = {"memory": None, "usage": None, "log_tau": "attn_log_tau"}
    for name in bench.state_dict():
        if name in out:
            continue
        head, rest = name.split(".", 1)
        module = next((m for m in rename if name.startswith(m + ".")), None)
        if module is not None:
            out[name] = rename[module] + name[len(module) :]
        elif head == "encoder":
            out[name] = "wsi_encoder." + rest
        else:
            raise SystemExit(f"no reference name for {name}")
    return out


def reference_graph(graph_mod, coords: np.ndarray) -> np.ndarray:
    """``graph.py``'s edge_index for these coordinates (through its own h5 round trip)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in.h5"), Path(tmp, "out.h5")
        with h5py.File(src, "w") as f:
            f["coords"] = coords
        assert graph_mod.process_single_h5(str(src), str(dst), k_neighbors=8) == "success"
        with h5py.File(dst, "r") as f:
            return f["edge_index_k8"][:].astype(np.int64)


def record_kmeans(rec: Recorder, core_utils, ref: torch.nn.Module, bags: list[dict[str, np.ndarray]]) -> None:
    """``core_utils.bootstrap_codebooks`` (20 iterations) on the fixture's bags from a seeded RNG: the
    points it clusters (its normalised patch projections, per class) and the memories it leaves."""
    loader = [
        (
            (torch.from_numpy(b["features"]), torch.from_numpy(b["edge_index"])),
            None,
            torch.tensor([int(b["label"])]),
            None,
        )
        for b in bags
    ]
    projections = []
    hook = ref.wsi_patch_projector.register_forward_hook(lambda _m, _i, out: projections.append(out))
    torch.manual_seed(KMEANS_SEED)
    core_utils.bootstrap_codebooks(loader, ref, "cpu", max_per_class=10_000, kmeans_iters=20)
    hook.remove()
    points = {
        int(b["label"]): torch.nn.functional.normalize(p, dim=-1)
        for b, p in zip(bags, projections, strict=True)
    }
    rec.meta["kmeans"] = {"seed": KMEANS_SEED, "iters": 20, "order": "positive class first, then negative"}
    rec.extra("kmeans_points_0", points[0])
    rec.extra("kmeans_points_1", points[1])
    rec.extra("kmeans_memory", torch.stack([ref.mem_neg.codebook, ref.mem_pos.codebook]))


def parameter_counts(mkd) -> dict[str, dict[str, int]]:
    """Parameter counts of the reference model at D = 1536, G = 768: class defaults and ``paper-run``."""
    sizes = {
        "momkd": {},
        "momkd[paper-run]": {
            "wsi_encoder_dim": 512,
            "rna_embedding_dim": 512,
            "shared_embedding_dim": 64,
            "num_memory_per_class": 16,
        },
    }
    out = {}
    for name, kwargs in sizes.items():
        model = mkd.MKD(rna_input_dim=768, wsi_input_dim=1536, **kwargs)
        out[name] = {"in_dim": 1536, "omics_dim": 768, "count": sum(p.numel() for p in model.parameters())}
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], REPO)
    commit = reference_commit(args.ref_dir)
    mkd, train_utils, graph, core_utils = import_reference(
        args.ref_dir,
        "models.mkd",
        "utils.Mkd_train_utils",
        "graph.py",
        "utils.core_utils",
        stub={"torchvision.transforms": {}},
    )
    bags = []
    for i, (_, n, label) in enumerate(CASES):
        bag = seeded_bag(400 + i, n, DIM, label, omics_dim=GENES, graph_k=8)
        bag["edge_index"] = reference_graph(graph, bag["coords"])
        bags.append(bag)
    for fixture, (method, extra_overrides, hp_changes, learn_tau) in FIXTURES.items():
        overrides = {**SIZES, "omics_hidden_dim": OMICS_HIDDEN, **NO_DROPOUT, **extra_overrides}
        bench = bench_model(method, DIM, GENES, overrides, seed=0)
        with torch.no_grad():
            bench.memory.mul_(torch.empty(2, SIZES["memory_size"], 1).uniform_(0.5, 1.5))
        ref = mkd.MKD(
            rna_input_dim=GENES,
            wsi_input_dim=DIM,
            wsi_encoder_dim=SIZES["wsi_dim"],
            rna_embedding_dim=SIZES["omics_embed_dim"],
            shared_embedding_dim=SIZES["shared_dim"],
            num_memory_per_class=SIZES["memory_size"],
            cls_hidden_dim=SIZES["cls_hidden_dim"],
        )
        e = SIZES["omics_embed_dim"]
        ref.rna_tower = mkd.RnaEncoder(input_dim=GENES, embedding_dim=e, hidden_dim=OMICS_HIDDEN)
        ref.rna_decoder = mkd.RnaDecoder(output_dim=GENES, embedding_dim=e, hidden_dim=OMICS_HIDDEN)
        names = mapping(bench)
        memory = bench.memory.detach()
        extra = {"mem_neg._codebook.embed": memory[0:1], "mem_pos._codebook.embed": memory[1:2]}
        vq_buffers = [k for k in ref.state_dict() if k.startswith("mem_") and not k.endswith(".embed")]
        copy_into_reference(bench, ref, names, keep=vq_buffers, extra=extra)
        no_dropout(ref)
        ref.wsi_encoder.dropout = 0.0
        ref.wsi_encoder.gat1.dropout = ref.wsi_encoder.gat2.dropout = 0.0
        ref.attn_log_tau.requires_grad_(learn_tau)
        rec = Recorder(
            fixture,
            {
                "method": method,
                "overrides": overrides,
                "in_dim": DIM,
                "omics_dim": GENES,
                "mode": "train",
                "reference": {
                    "repo": REPO,
                    "commit": commit,
                    "files": [
                        "models/mkd.py",
                        "utils/Mkd_train_utils.py",
                        "utils/core_utils.py",
                        "graph.py",
                        "vq/",
                    ],
                },
                "script": "benchmarks/parity/momkd.py",
                "notes": "mkd_train_loop on one bag (train mode, dropout 0, no clipping), gradients at its "
                "optimizer.step(); train_mkd's weights; graph.py's graph; small widths; code norms in [0.5, 1.5].",
            },
            bench,
        )
        hparams = {**HPARAMS, **hp_changes}
        weights = {
            "ce": ("loss_task", hparams["task_weight"]),
            "mem": ("mem_loss", ALPHA_MEM),
            "align_omics": ("loss_align_rna", hparams["alpha_rna"]),
            "align_wsi": ("loss_align_wsi", hparams["alpha_wsi"]),
            "recon": ("loss_recon", hparams["recon_weight"]),
        }
        forward_train = ref.forward_train
        for (name, _, label), bag in zip(CASES, bags, strict=True):
            seen = []
            ref.forward_train = lambda *a, _f=forward_train, _s=seen: _s.append(_f(*a)) or _s[-1]
            x = torch.from_numpy(bag["features"])
            edges = torch.from_numpy(bag["edge_index"])
            omics = torch.from_numpy(bag["omics"]).view(1, -1)
            loader = [((x, edges), omics, torch.tensor([label]), None)]
            opt = RecordingOptimizer(ref)
            result = train_utils.mkd_train_loop(0, ref, loader, opt, hparams, "cpu")
            out = seen[0]
            losses = {
                k: torch.tensor(w * result[key], dtype=torch.float32) for k, (key, w) in weights.items()
            }
            opt.restore()
            grads = reference_grads(ref, names)
            grads["memory"] = torch.cat(
                [opt.grads["mem_neg._codebook.embed"], opt.grads["mem_pos._codebook.embed"]]
            )
            if not learn_tau:
                grads.pop("log_tau", None)
            outputs = {"logits": out["logits"][0], "attention": out["attention"].view(-1)}
            rec.case(name, [bag], [outputs], losses, grads)
            ref.zero_grad(set_to_none=True)
            if fixture == "momkd":  # the validation/test path: forward_inference in eval mode
                ref.eval()
                logits, attention = ref.forward_inference((x, edges))
                ref.train()
                rec.extra(f"inference/{name}/logits", logits[0])
                rec.extra(f"inference/{name}/attention", attention.view(-1))
        ref.forward_train = forward_train
        if fixture == "momkd":
            record_kmeans(rec, core_utils, ref, bags)
            rec.meta["reference_parameters"] = parameter_counts(mkd)
        rec.save(args.out)


if __name__ == "__main__":
    main()

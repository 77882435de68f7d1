"""bench's train step beside the authors' own code, interleaved in one process: the ratio the speed targets name.

    python benchmarks/versus.py --refs /path/to/checkouts --methods abmil,wikg,momkd --sizes 1000,4000,16000

``--refs`` is a folder of local checkouts of the authors' repositories (never committed here), each named
``owner+name`` (as the ``fetch`` tool names them) or ``name``: mahmoodlab/CLAM, WonderLandxD/WiKG,
CAIR-LAB-WFUSM/MoMKD. Each method x size runs in a fresh subprocess (the repositories' ``models`` and
``utils`` packages share names), which builds both models at their default sizes on the same two synthetic
bags (Gaussian features of width ``--dim``, tissue-like grid coordinates and their k = 8 graph, Gaussian
omics of width ``--omics-dim``) and then alternates: one bench step, one reference step, ``--repeats``
times after ``--warmup`` of each, so that a change of load hits both alike. Reported: the median of each
and the median of the per-round ratios (bench / reference; below 1 is faster).

What one step is on each side (the whole step, optimiser included):

- bench: ``bench.train._train_epoch`` on one bag, the trainer's own code (forward, the method's loss terms,
  backward, gradient clipping where the config asks, the optimiser step, ``after_step``).
- ``abmil`` vs ``CLAM_SB`` (small, gated, dropout 0.25, ``k_sample`` 8): the body of CLAM's
  ``train_loop_clam`` (``instance_eval=True``, 0.7 bag CE + 0.3 instance CE, its per-bag ``.item()`` reads,
  Adam 1e-4 / 1e-5 as ``get_optim``).
- ``wikg`` vs ``WiKG`` (C 512, top-k 6, bi-interaction, mean pooling, dropout 0.3 as ``train.py``): the
  body of ``train_one_epoch`` (zero_grad, forward, CE, backward, Adam 1e-4 / 1e-5, its running loss and
  its ``.item()``); anomaly detection off (``model.py`` switches it on at import).
- ``momkd`` vs ``MKD`` (class defaults 256/256/128, K = 4): the body of ``mkd_train_loop``
  (``forward_train``, CE, MSE reconstruction, ``PrototypicalAlignmentLoss``, ``train_mkd``'s weights,
  backward, AdamW 1e-4 / 1e-4 as ``train_mkd``, zero_grad, its per-bag ``.item()`` reads), on bench's kNN
  graph (the same graph as ``graph.py``'s, ``tests/reference``); the memory keeps its random start (the
  k-means start is not in a step).

The loops' bodies are restated without their progress bars, prints and per-epoch metrics, so the reference
side is if anything faster than the authors' loop: the ratios are conservative for bench.

Writes ``versus.csv`` and ``versus.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: bench method -> the authors' repository it is timed against
REPOS = {"abmil": "mahmoodlab/CLAM", "wikg": "WonderLandxD/WiKG", "momkd": "CAIR-LAB-WFUSM/MoMKD"}


def checkout(refs: Path, repo: str) -> Path:
    for name in (repo.replace("/", "+"), repo.split("/")[1]):
        if (refs / name).is_dir():
            return refs / name
    raise SystemExit(f"no checkout of {repo} in {refs} (as {repo.replace('/', '+')} or {repo.split('/')[1]})")


def _import(ref_dir: Path, module: str) -> Any:
    """``pkg.mod`` from the checkout, or ``path/to/file.py`` as a file (without its package's ``__init__``,
    e.g. CLAM's, which imports feature-extractor backbones)."""
    import importlib
    import importlib.util

    sys.path.insert(0, str(ref_dir))
    if not module.endswith(".py"):
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location("ref_" + Path(module).stem, ref_dir / module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ the authors' steps


def clam_step(ref_dir: Path, dim: int, bags: list[dict[str, Any]]) -> Callable[[int], None]:
    import torch
    from torch import nn

    model_clam = _import(ref_dir, "models/model_clam.py")
    model = model_clam.CLAM_SB(
        gate=True, size_arg="small", dropout=0.25, k_sample=8, n_classes=2, embed_dim=dim
    ).train()
    opt = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-4, weight_decay=1e-5)
    loss_fn = nn.CrossEntropyLoss()

    def step(i: int) -> None:
        data, label = bags[i]["features"], bags[i]["label"].view(1)
        logits, _, _, _, instance_dict = model(data, label=label, instance_eval=True)
        loss = loss_fn(logits, label)
        loss.item()
        instance_loss = instance_dict["instance_loss"]
        instance_loss.item()
        total_loss = 0.7 * loss + 0.3 * instance_loss
        total_loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def wikg_step(ref_dir: Path, dim: int, bags: list[dict[str, Any]]) -> Callable[[int], None]:
    import torch

    wikg = _import(ref_dir, "model")
    torch.autograd.set_detect_anomaly(False)  # model.py switches it on at import
    model = wikg.WiKG(
        dim_in=dim, dim_hidden=512, topk=6, n_classes=2, agg_type="bi-interaction", dropout=0.3, pool="mean"
    ).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    criterion = torch.nn.CrossEntropyLoss()
    running = {"loss": torch.zeros(1), "i": 0}

    def step(i: int) -> None:
        opt.zero_grad()
        logits = model(bags[i]["features"].unsqueeze(0))
        loss = criterion(logits, bags[i]["label"].view(1))
        loss.backward()
        opt.step()
        k = running["i"]
        running["loss"] = (running["loss"] * k + loss.detach()) / (k + 1)
        running["i"] = k + 1
        round(running["loss"].item(), 3)

    return step


def momkd_step(ref_dir: Path, dim: int, bags: list[dict[str, Any]]) -> Callable[[int], None]:
    import torch
    from torch import nn

    mkd = _import(ref_dir, "models.mkd")
    utils = _import(ref_dir, "utils.Mkd_train_utils")
    omics_dim = bags[0]["omics"].numel()
    model = mkd.MKD(rna_input_dim=omics_dim, wsi_input_dim=dim).train()
    opt = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-4, weight_decay=1e-4)
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    aligner = utils.PrototypicalAlignmentLoss(margin=0.3)

    def step(i: int) -> None:
        b = bags[i]
        rna, label = b["omics"].view(1, -1), b["label"].view(1)
        out = model.forward_train(rna, (b["features"], b["edge_index"]), label)
        loss_task = ce(out["logits"], label)
        loss_recon = mse(out["reconstructed_rna"], rna)
        align = aligner(out["rna_proj"], out["wsi_proj"], out["pos_centers"], out["neg_centers"], label)
        mem = out["mem_loss"]
        loss = 0.5 * loss_task + 0.1 * mem + 0.05 * align["rna"] + 0.2 * align["wsi"] + 0.05 * loss_recon
        loss.backward()
        opt.step()
        opt.zero_grad()
        for value in (loss_task, align["rna"], align["wsi"], mem, loss_recon):
            float(value.item() if torch.is_tensor(value) else value)
        torch.softmax(out["logits"].detach(), dim=-1)[:, 1].cpu().item()

    return step


REFERENCE_STEPS = {"abmil": clam_step, "wikg": wikg_step, "momkd": momkd_step}


# --------------------------------------------------------------------------------------- worker


def _bags(n: int, dim: int, omics_dim: int, graph_k: int) -> list[dict[str, Any]]:
    import torch

    from bench.data.graph import knn_edge_index

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import tissue_coords

    bags = []
    for y in (0, 1):
        gen = torch.Generator().manual_seed(y)
        coords = tissue_coords(n, seed=y)
        bags.append(
            {
                "features": torch.randn(n, dim, generator=gen),
                "label": torch.tensor(y),
                "coords": torch.from_numpy(coords),
                "edge_index": torch.from_numpy(knn_edge_index(coords, graph_k)),
                "omics": torch.randn(omics_dim, generator=gen),
            }
        )
    return bags


def bench_step(method: str, dim: int, omics_dim: int, bags: list[dict[str, Any]]) -> Callable[[int], None]:
    import torch

    import methods
    from bench.train import _train_epoch
    from methods.base import Bag

    cfg = methods.resolve_config(method)
    model = methods.create_method(method, in_dim=dim, omics_dim=omics_dim if cfg.uses_omics else None)
    bench_bags = [
        Bag(
            b["features"],
            b["label"],
            b["coords"],
            b["edge_index"] if cfg.needs_graph else None,
            b["omics"] if cfg.uses_omics else None,
            f"s{i}",
            f"c{i}",
        )
        for i, b in enumerate(bags)
    ]
    model.prepare(bench_bags)
    model.train()
    optimizer, _ = model.configure_optimizer()
    device = torch.device("cpu")

    def step(i: int) -> None:
        loss, _, _ = _train_epoch(model, optimizer, bench_bags, [i], device, False, False)
        float(loss)

    return step


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bags = _bags(args.size, args.dim, args.omics_dim, 8)
    ref_dir = checkout(args.refs, REPOS[args.method])
    sides = {
        "bench": bench_step(args.method, args.dim, args.omics_dim, bags),
        "ref": REFERENCE_STEPS[args.method](ref_dir, args.dim, bags),
    }
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in sides}
    gemm_times: list[float] = []
    for r in range(args.warmup + args.repeats):
        for side, step in sides.items():
            start = now()
            step(r % 2)
            if r >= args.warmup:
                times[side].append(now() - start)
        gemm_times.append(_time_gemm(now))
    ratios = [b / r for b, r in zip(times["bench"], times["ref"], strict=True)]
    rate = GEMM_FLOP / statistics.median(gemm_times)
    flops = {side: _matmul_flops(step) for side, step in sides.items()}
    return {
        "bench_s": statistics.median(times["bench"]),
        "ref_s": statistics.median(times["ref"]),
        "ratio": statistics.median(ratios),
        "bench_gflop": flops["bench"] / 1e9,
        "ref_gflop": flops["ref"] / 1e9,
        "gemm_gflops": rate / 1e9,
        "bench_floor_s": flops["bench"] / rate,
        "load": os.getloadavg()[0],
    }


#: the machine's limit, as ``shared/reference/performance.md`` measures it: a 4096 x 1536 by 1536 x 512 product
GEMM_SHAPE = (4096, 1536, 512)
GEMM_FLOP = 2 * GEMM_SHAPE[0] * GEMM_SHAPE[1] * GEMM_SHAPE[2]


def _time_gemm(now: Callable[[], float]) -> float:
    """Seconds of one fp32 product of :data:`GEMM_SHAPE` (timed beside the steps, so at the same load)."""
    import torch

    m, k, n = GEMM_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    start = now()
    a @ b
    return now() - start


def _matmul_flops(step: Callable[[int], None]) -> int:
    """Matrix-product FLOPs of one step (the formulas of ``torch.utils.flop_counter``: mm, addmm, bmm, ...,
    forward and backward); divided by the product rate it is the fastest that step could be. (A dispatch
    mode of its own: ``FlopCounterMode``'s module tracker fails on custom autograd functions.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Count() as counter:
        step(0)
    return counter.total


# --------------------------------------------------------------------------------------- driver


def measure(args: argparse.Namespace, method: str, n: int) -> dict[str, Any]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--methods", method, "--sizes", str(n),
        "--dim", str(args.dim), "--omics-dim", str(args.omics_dim), "--threads", str(args.threads),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--refs", str(args.refs),
        "--clock", args.clock,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"status": f"failed: {tail[0][:100]}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refs", type=Path, required=True, help="folder of the authors' checkouts")
    p.add_argument("--methods", default=",".join(REPOS), help=f"comma-separated, of {', '.join(REPOS)}")
    p.add_argument("--sizes", default="1000,4000,16000", help="bag sizes N, comma-separated")
    p.add_argument("--dim", type=int, default=1536, help="patch feature width (UNI v2: 1536)")
    p.add_argument("--omics-dim", type=int, default=768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall time, or the process's CPU time"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.refs = args.refs.resolve()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(REPOS))
    if unknown:
        p.error(f"no reference step for {unknown}; choose from {', '.join(REPOS)}")
    if args.worker:
        args.method, args.size = names[0], sizes[0]
        print(json.dumps(run_worker(args)))
        return
    import pandas as pd
    import torch

    header = (
        f"torch {torch.__version__}, {args.threads} threads, fp32, D = {args.dim}, omics {args.omics_dim}, "
        f"{args.clock} clock, median of {args.repeats} interleaved after {args.warmup} warm-ups, load at start "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(header, flush=True)
    rows = []
    for method in names:
        for n in sizes:
            row = {"method": method, "reference": REPOS[method], "n": n, **measure(args, method, n)}
            rows.append(row)
            print({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "versus.csv", index=False)
    table = frame.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else frame.to_string()
    (args.out / "versus.md").write_text(f"# versus\n\n- {header}\n\n{table}\n")
    print(f"wrote {args.out / 'versus.csv'}")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()

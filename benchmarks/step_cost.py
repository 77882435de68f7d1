"""The fixed cost of a training step: bench's own epoch loop timed at small bag sizes, a line fitted.

Per method and bag size N, ``--bags`` bags of N Gaussian patches (D = ``--dim``; the kNN graph and omics
when the method needs them) go through ``bench.train._train_epoch`` (the trainer's hot loop: forward, the
method's loss terms, backward, gradient clipping and the optimiser step, ``after_step``); the time per bag
is the median over ``--repeats`` epochs after one warm-up. A least-squares line ``t(N) = a + b N`` over the
sizes gives ``a``, the cost of a step at N -> 0 (Python dispatch, autograd bookkeeping, the optimiser,
per-step allocations), and ``b``, the cost per patch. At the smallest size the step is also split into
forward + loss, backward and the optimiser step alone, beside the megabytes of weights.

A method that steps once per window of W bags (``accumulation_steps``: MKD 16, G-HANet 32) is also timed
per optimiser UPDATE (``u<N>``: the epoch's time over the updates it made; ``--bags`` a multiple of W), the
unit its convergence rule counts.

``--code DIR`` imports bench and methods from another checkout (e.g. ``git archive main | tar -x -C
/tmp/base``), so that the same script times the code before and after a change. Several checkouts,
comma-separated, are timed interleaved: ``--rounds`` rounds, each running every checkout once per method in
a fresh subprocess, in turn; the table gives each checkout's median over the rounds and its ratio to the
first checkout (``--clock cpu`` with ``--threads 1`` counts the work done, not the time spent descheduled on
a shared machine):

    python benchmarks/step_cost.py --methods mkd,ghanet --sizes 100,350,600 --dim 128 --code /tmp/base,.

Prints one row per method (and the per-size times) and appends them to ``--out``/step_cost.csv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bags(cfg: Any, n: int, count: int, dim: int, omics_dim: int, seed: int) -> list[Any]:
    import torch

    from methods.base import Bag

    gen = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(count):
        side = math.ceil(math.sqrt(n / 0.6))
        flat = torch.randperm(side * side, generator=gen)[:n]
        coords = torch.stack([flat % side, flat // side], 1).float()
        edge_index = None
        if cfg.needs_graph:
            from bench.data.graph import knn_edge_index

            edge_index = torch.from_numpy(knn_edge_index(coords.numpy(), cfg.graph_k, cfg.graph_symmetric))
        omics = torch.randn(omics_dim, generator=gen) if cfg.uses_omics else None
        features = torch.randn(n, dim, generator=gen)
        bags.append(Bag(features, torch.tensor(i % 2), coords, edge_index, omics, f"s{i}", f"c{i}"))
    return bags


def time_method(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per bag of the trainer's epoch loop at each size, and the fitted line."""
    import torch

    import methods
    from bench.train import _train_epoch

    cfg = methods.resolve_config(name)
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device("cpu")
    row: dict[str, Any] = {"method": name}
    parts: dict[str, float] = {}
    for n in args.sizes:
        torch.manual_seed(0)
        omics_dim = args.omics_dim if cfg.uses_omics else None
        model = methods.create_method(name, in_dim=args.dim, omics_dim=omics_dim, cfg=cfg)
        bags = _bags(cfg, n, args.bags, args.dim, args.omics_dim, seed=n)
        model.prepare(bags)
        model.train()
        if args.compile:  # the lever of issue 18: one compiled graph for every bag size, eager's RNG
            import torch._inductor.config

            torch._inductor.config.fallback_random = True
            model.forward = torch.compile(model.forward, dynamic=True)
        optimizer, _ = model.configure_optimizer()
        order = list(range(len(bags)))
        times, per_update = [], []
        for r in range(args.repeats + 1):
            model.on_epoch_start(r)
            updates: list[int] = []
            start = now()
            loss, _, _ = _train_epoch(
                model, optimizer, bags, order, device, False, False, lambda _, done, u=updates: u.append(done)
            )
            float(loss)  # the epoch's one host read, as the trainer does
            elapsed = now() - start
            if r:  # the first epoch is the warm-up
                times.append(elapsed / len(bags))
                per_update.append(elapsed / max(1, len(updates)))
            elif args.compile:
                row[f"warmup_s{n}"] = elapsed
        row[f"t{n}"] = statistics.median(times)
        if cfg.accumulation_steps > 1:
            row[f"u{n}"] = statistics.median(per_update)
        if (
            n == min(args.sizes) and cfg.accumulation_steps <= 1
        ):  # a windowed method's loss waits for its window
            parts = _parts(model, optimizer, bags[0], now)
    row.update(parts)
    x = np.array(args.sizes, dtype=float)
    y = np.array([row[f"t{n}"] for n in args.sizes])
    slope, intercept = np.polyfit(x, y, 1)
    row.update(fixed_ms=intercept * 1e3, per_1k_patches_ms=slope * 1e6, load=os.getloadavg()[0])
    print({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def _parts(model: Any, optimizer: Any, bag: Any, now: Any, repeats: int = 50) -> dict[str, float]:
    """Where a step's time goes at the smallest size: forward + loss, backward, the optimiser step alone
    (milliseconds, medians), and the megabytes of weights (Adam reads and writes four such arrays a step)."""
    import torch

    def forward() -> Any:
        terms = model.loss(bag, model(bag))
        return torch.stack([t.float() for t in terms.values()]).sum()

    parts: dict[str, list[float]] = {"forward_ms": [], "backward_ms": [], "optimizer_ms": []}
    for _ in range(repeats):
        start = now()
        total = forward()
        mid = now()
        total.backward()
        end = now()
        optimizer.step()
        parts["forward_ms"].append(mid - start)
        parts["backward_ms"].append(end - mid)
        parts["optimizer_ms"].append(now() - end)
        optimizer.zero_grad(set_to_none=True)
    out = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    out["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="abmil", help="comma-separated registered names (no variants)")
    p.add_argument("--sizes", default="16,64,128,256,512", help="bag sizes N, comma-separated")
    p.add_argument("--dim", type=int, default=512, help="patch feature width (the built-in tasks: 512)")
    p.add_argument("--omics-dim", type=int, default=256)
    p.add_argument("--bags", type=int, default=32, help="bags per timed epoch")
    p.add_argument("--repeats", type=int, default=7, help="timed epochs per size (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument(
        "--code",
        default=str(ROOT),
        help="checkout(s) whose bench and methods are timed; several, comma-separated: interleaved runs",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (several --code checkouts)")
    p.add_argument("--row-json", action="store_true", help=argparse.SUPPRESS)  # a child of an interleaved run
    p.add_argument("--label", default=None, help="the row's label (default: the checkout's folder name)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile(dynamic=True) the forward (warm-up s reported)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    codes = [Path(c).resolve() for c in args.code.split(",") if c.strip()]
    if len(codes) > 1:
        frame = _interleaved(codes, sys.argv[1:], args)
    else:
        frame = _one_checkout(codes[0], args)
        if args.row_json:
            print("ROW " + frame.to_json(orient="records"), flush=True)
            return
    import pandas as pd

    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=False))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "step_cost.csv"
    frame.to_csv(path, mode="a", header=not path.exists(), index=False)


def _one_checkout(code: Path, args: argparse.Namespace) -> Any:
    """Every method of ``--methods`` timed with ``code``'s bench and methods, in this process."""
    sys.path.insert(0, str(code))
    import pandas as pd
    import torch

    import methods

    torch.set_num_threads(args.threads)
    label = (args.label or code.name) + (" compiled" if args.compile else "")
    print(
        f"code {methods.__file__}, torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
        f"D = {args.dim}, {args.bags} bags x {args.repeats} epochs, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = [{"code": label, **time_method(m.strip(), args)} for m in args.methods.split(",") if m.strip()]
    return pd.DataFrame(rows)


def _interleaved(codes: list[Path], argv: list[str], args: argparse.Namespace) -> Any:
    """``--rounds`` rounds of one subprocess per checkout and method, in turn; per checkout and method the
    median of each timing over the rounds, the load average's mean, and each timing's ratio to the first
    checkout's (``<timing>/first``)."""
    import pandas as pd

    base = [a for i, a in enumerate(argv) if a != "--code" and (i == 0 or argv[i - 1] != "--code")]
    base = [a for a in base if not a.startswith("--code=")]
    rows = []
    for r in range(args.rounds):
        for method in (m.strip() for m in args.methods.split(",") if m.strip()):
            for code in codes:
                cmd = [
                    sys.executable,
                    __file__,
                    *base,
                    "--code",
                    str(code),
                    "--methods",
                    method,
                    "--row-json",
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                print(f"round {r}: " + " / ".join(out.strip().splitlines()[:-1]), flush=True)  # header, row
                line = next(x for x in reversed(out.splitlines()) if x.startswith("ROW "))
                rows.extend(json.loads(line[4:]))
    frame = pd.DataFrame(rows)
    timings = [c for c in frame.columns if (c[:1] in "tu" and c[1:].isdigit()) or c == "fixed_ms"]
    summary = frame.groupby(["method", "code"], sort=False)[timings].median()
    summary["load"] = frame.groupby(["method", "code"], sort=False)["load"].mean()
    first = summary.xs(codes[0].name if args.label is None else args.label, level="code")
    for c in timings:
        summary[f"{c}/first"] = summary[c] / first[c].reindex(summary.index.get_level_values("method")).values
    return summary.reset_index()


if __name__ == "__main__":
    main()

"""Speed and memory of every registered method on synthetic bags, next to the reference code's timings.

For each method (through the registry only) and bag size N: the train step (forward + the method's loss +
backward + optimiser step, one bag per step; a method that steps every W bags is timed per window and
reported per bag), inference (``eval()`` + ``no_grad``, no omics), both the median of repeated runs after
warm-up, and the peak RSS of a fresh subprocess per method x size (so peaks do not mix). Bags are random
features with tissue-like grid coordinates; the kNN graph (``bench.data.graph``) is attached when the
method needs it, random omics when it uses them.

    python benchmarks/speed.py --methods abmil,wikg --sizes 1000,4000,16000,64000 --dim 1536
    python benchmarks/speed.py --gatv2-layer --sizes 4000      # fast GATv2 vs PyG's GATv2Conv, one layer
    python benchmarks/speed.py --validation odx --threads 1    # validation: one bag per forward vs packed

Writes ``speed.csv`` and ``speed.md`` (or ``gatv2.csv``/``gatv2.md``) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The authors' own code on this kind of machine (``shared/reference/performance.md``): train step seconds
#: and peak RSS MB at N = 1k / 4k / 16k, inference seconds at N = 4k. Keyed by the bench method closest to
#: each reference configuration.
REFERENCE: dict[str, dict[str, Any]] = {
    "abmil": {
        "ref": "CLAM_SB small",
        "train": {1000: 0.044, 4000: 0.164, 16000: 0.671},
        "infer": {4000: 0.048},
        "rss": {1000: 362, 4000: 465, 16000: 843},
    },
    "abmil[ilse]": {
        "ref": "ABMIL (AMLab)",
        "train": {1000: 0.028, 4000: 0.097, 16000: 0.393},
        "infer": {4000: 0.040},
        "rss": {1000: 346, 4000: 394, 16000: 641},
    },
    "momkd": {
        "ref": "MoMKD 256/256/128 K=4",
        "train": {1000: 0.092, 4000: 0.552, 16000: 2.339},
        "infer": {4000: 0.243},
        "rss": {1000: 638, 4000: 935, 16000: 2251},
    },
    "wikg": {
        "ref": "WiKG official",
        "train": {1000: 0.102, 4000: 0.784, 16000: 7.210},
        "infer": {4000: 0.307},
        "rss": {1000: 564, 4000: 896, 16000: 3082},
    },
    "mkd": {
        "ref": "MKD (per bag, 16-bag window)",
        "train": {1000: 0.065, 4000: 0.178, 16000: 0.696},
        "infer": {4000: 0.020},
        "rss": {1000: 793, 4000: 1323, 16000: 3490},
    },
    "ghanet": {
        "ref": "G-HANet",
        "train": {1000: 0.173, 4000: 0.439, 16000: 1.602},
        "infer": {4000: 0.137},
        "rss": {1000: 699, 4000: 848, 16000: 1465},
    },
}

COLUMNS = [
    "method", "n", "status", "train_s", "ref_train_s", "train_ratio", "infer_s", "ref_infer_s",
    "infer_ratio", "peak_rss_mb", "ref_rss_mb", "peak_gpu_mb", "graph_s", "prepare_s", "load",
]  # fmt: skip
#: short headers for the terminal table
LABELS = {
    "train_s": "train s", "ref_train_s": "ref", "train_ratio": "x ref", "infer_s": "infer s",
    "ref_infer_s": "ref", "infer_ratio": "x ref", "peak_rss_mb": "RSS MB", "ref_rss_mb": "ref",
    "graph_s": "graph s", "prepare_s": "prep s", "fwd_bwd_s": "fwd+bwd s", "peak_gpu_mb": "GPU MB",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- bags


def tissue_coords(n: int, seed: int = 0, density: float = 0.6) -> np.ndarray:
    """``n`` distinct grid positions drawn from a square of which they fill ``density`` (a tissue-like layout)."""
    side = math.ceil(math.sqrt(n / density))
    rng = np.random.default_rng(seed)
    flat = rng.choice(side * side, size=n, replace=False)
    return np.stack([flat % side, flat // side], axis=1).astype(np.float32)


#: ``--clock``: wall time, or this process's CPU time (robust on a shared machine: time spent descheduled
#: does not count; with one thread it is the work done)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_CLOCK = {"now": time.perf_counter}


def _median_time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    now = _CLOCK["now"]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------- worker


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time one method at one bag size in this (fresh) process; returns the measurements."""
    import torch

    import methods
    from bench.train import _train_epoch
    from methods.base import Bag

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = methods.resolve_config(args.method)
    n, omics_dim = args.size, args.omics_dim if cfg.uses_omics else None
    features = torch.randn(n, args.dim)
    coords = tissue_coords(n)
    edge_index, graph_s = None, float("nan")
    if cfg.needs_graph:
        from bench.data.graph import knn_edge_index

        start = time.perf_counter()
        edge_index = torch.from_numpy(knn_edge_index(coords, cfg.graph_k, cfg.graph_symmetric))
        graph_s = time.perf_counter() - start
    omics = torch.randn(omics_dim) if omics_dim else None
    device = torch.device(args.device)
    bags = [
        Bag(features, torch.tensor(y), torch.from_numpy(coords), edge_index, omics, f"s{y}", f"c{y}").to(
            device
        )
        for y in (0, 1)
    ]
    model = methods.create_method(args.method, in_dim=args.dim, omics_dim=omics_dim, cfg=cfg).to(device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    model.prepare(bags)
    prepare_s = time.perf_counter() - start
    optimizer, _ = model.configure_optimizer()
    window = max(1, cfg.accumulation_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    window_bags = [bags[i % 2] for i in range(window)]

    def train_window() -> None:  # the trainer's own loop: one bag per pass, or the window (window_loss)
        model.train()
        _train_epoch(
            model, optimizer, window_bags, list(range(window)), device, args.bf16, False, lambda *_: False
        )
        if cuda:  # the step's kernels finish inside the timed region
            torch.cuda.synchronize(device)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast:
            model(bags[1].without_omics())
        if cuda:
            torch.cuda.synchronize(device)

    train_s = _median_time(train_window, args.warmup, args.repeats) / window
    infer_s = _median_time(infer, 1, args.repeats)
    return {
        "train_s": train_s,
        "infer_s": infer_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "graph_s": graph_s,
        "prepare_s": prepare_s,
        "load": os.getloadavg()[0],
    }


def run_gatv2_layer(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One GATv2 layer D -> 2 x 128, forward + backward: PyG's ``GATv2Conv`` vs the padded fast path; and
    the first layer's three linear maps of x (``lin_l``, ``lin_r``, the residual map) apart vs as one product."""
    import torch
    import torch.nn.functional as F

    from bench.data.graph import knn_edge_index
    from methods.graph_layers import GATv2Encoder, gatv2_padded, in_neighbour_table

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for n in args.sizes:
        encoder = GATv2Encoder(args.dim, 256).train()
        conv, res = encoder.gat1, encoder.res1
        x = torch.randn(n, args.dim)
        edge_index = torch.from_numpy(knn_edge_index(tissue_coords(n), 8))

        def pyg(conv=conv, x=x, edge_index=edge_index) -> None:
            conv(x, edge_index).sum().backward()

        def fast(conv=conv, x=x, edge_index=edge_index, n=n) -> None:
            gatv2_padded(conv, x, in_neighbour_table(edge_index, n)).sum().backward()

        def linear_maps(conv=conv, x=x, res=res) -> None:
            (conv.lin_l(x).sum() + conv.lin_r(x).sum() + res(x).sum()).backward()

        def fused_maps(conv=conv, x=x, res=res) -> None:  # the three maps of x as one product
            maps = (conv.lin_l, conv.lin_r, res)
            out = F.linear(x, torch.cat([m.weight for m in maps]), torch.cat([m.bias for m in maps]))
            sum(part.sum() for part in out.split([m.weight.shape[0] for m in maps], 1)).backward()

        paths = {
            "pyg GATv2Conv": pyg,
            "fast path": fast,
            "linear maps only": linear_maps,
            "linear maps fused": fused_maps,
        }
        for fn in paths.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):  # interleaved, so that a change of load hits every path alike
            for name, fn in paths.items():
                times[name].append(_median_time(fn, 0, 1))
        load = os.getloadavg()[0]
        rows += [
            {"n": n, "path": k, "fwd_bwd_s": statistics.median(v), "load": load} for k, v in times.items()
        ]
    return rows


def run_validation(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    """Per method on a built-in task's fold 0: validation and external-cohort prediction one bag per forward
    (as before batching) vs ``bench.evaluate.predict`` (packed), interleaved, beside a training epoch
    estimated from the median step over ``--train-bags`` training bags."""
    import torch

    from bench.config import cache_root
    from bench.data.omics import OmicsScaler
    from bench.data.splits import fold_parts
    from bench.evaluate import predict
    from bench.jobs import method_config
    from bench.taskdata import RunOptions, prepare_task
    from bench.train import mean_model_auc
    from methods import create_method

    torch.set_num_threads(args.threads)
    opts = RunOptions(out=args.out / "validation-task", quiet=True)
    data = prepare_task(args.validation, opts)
    parts = fold_parts(data.splits, 0)
    internal, cpu = data.internal, torch.device("cpu")
    omics_dim = None if internal.omics is None else internal.omics.shape[1]
    rows = []
    for name in names:
        cfg = method_config(data, name, opts)
        graph = (cfg.graph_k, cfg.graph_symmetric, cache_root() / "graphs") if cfg.needs_graph else None
        omics = None
        if internal.omics is not None and cfg.uses_omics:
            cases = internal.slides.case_id[internal.slides.slide_id.isin(parts["train"])].unique()
            omics = OmicsScaler(data.task.omics_log1p).fit(internal.omics, cases).transform(internal.omics)
        train = internal.bags(parts["train"], omics=omics, graph=graph)
        val = internal.bags(parts["val"], omics=omics if cfg.monitor == "mean-auc" else None, graph=graph)
        ext = [b for c in data.externals.values() for b in c.bags(graph=graph)]
        torch.manual_seed(0)
        model = create_method(name, in_dim=internal.dim, omics_dim=omics_dim, cfg=cfg)
        optimizer, _ = model.configure_optimizer()
        acc, steps = max(1, cfg.accumulation_steps), train[: args.train_bags]

        def train_bags(model=model, optimizer=optimizer, acc=acc, steps=steps) -> None:
            model.train()
            for i, bag in enumerate(steps):
                terms = model.loss(bag, model(bag))
                if terms:
                    torch.stack([t.float() for t in terms.values()]).sum().backward()
                if (i + 1) % acc == 0 or i + 1 == len(steps):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    model.after_step()

        @torch.inference_mode()
        def one_by_one(bags: list, monitor: bool, model=model) -> None:
            model.eval()
            for bag in bags:
                model(bag.without_omics()).logits.softmax(-1)
                if monitor:
                    model.validation_logits(bag)

        def packed(bags: list, monitor: bool, model=model) -> None:
            predict(model, bags, cpu)
            if monitor:
                mean_model_auc(model, bags, cpu, False, "mean")

        mean_auc = cfg.monitor == "mean-auc"
        paths = {
            "val_old_s": functools.partial(one_by_one, val, mean_auc),
            "val_new_s": functools.partial(packed, val, mean_auc),
            "ext_old_s": functools.partial(one_by_one, ext, False),
            "ext_new_s": functools.partial(packed, ext, False),
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        train_bags()  # warm-up
        for fn in paths.values():
            fn()
        train_times = []
        for _ in range(args.repeats):  # interleaved, so that a change of load hits every path alike
            train_times.append(_median_time(train_bags, 0, 1))
            for key, fn in paths.items():
                times[key].append(_median_time(fn, 0, 1))
        epoch = statistics.median(train_times) / len(steps) * len(train)
        row: dict[str, Any] = {"method": name, "n_train": len(train), "n_val": len(val), "n_ext": len(ext)}
        row["train_epoch_s"] = epoch
        row.update({k: statistics.median(v) for k, v in times.items()})
        row["val_speedup"] = row["val_old_s"] / row["val_new_s"]
        row["ext_speedup"] = row["ext_old_s"] / row["ext_new_s"]
        row["val_share"] = row["val_new_s"] / epoch
        row["val_share_old"] = row["val_old_s"] / epoch
        row["load"] = os.getloadavg()[0]
        rows.append(row)
        if not args.quiet:
            print({k: fmt(v) for k, v in row.items()}, flush=True)
    return rows


# ------------------------------------------------------------------------------------------- driver


def split_methods(text: str) -> list[str]:
    """Comma-separated method names; commas inside ``[...]`` belong to the variant."""
    return [m.strip() for m in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text) if m.strip()]


def available_mb() -> float:
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) / 1024


def estimate(points: list[tuple[int, float]], n: int) -> float | None:
    """Extrapolate a cost to size ``n`` from (size, cost) points, with the last two points' exponent in [1, 2]."""
    if not points:
        return None
    (n1, c1), (n2, c2) = points[-2] if len(points) > 1 else points[-1], points[-1]
    exponent = 1.0
    if n2 > n1 and c1 > 0 and c2 > 0:
        exponent = min(2.0, max(1.0, math.log(c2 / c1) / math.log(n2 / n1)))
    return c2 * (n / n2) ** exponent


def measure(args: argparse.Namespace, method: str, n: int) -> dict[str, Any]:
    """Run one method x size in a fresh subprocess; a crash or timeout becomes a status."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--methods", method, "--sizes", str(n),
        "--dim", str(args.dim), "--omics-dim", str(args.omics_dim), "--threads", str(args.threads),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--clock", args.clock,
        "--device", args.device,
    ]  # fmt: skip
    if args.bf16:
        command.append("--bf16")
    timeout = (args.warmup + 2 * args.repeats + 2) * args.max_seconds * 2 + 120
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        killed = proc.returncode < 0 or proc.returncode == 137
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"status": "killed (out of memory?)" if killed else f"failed: {tail[0][:80]}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def ratio(value: float | None, ref: float | None) -> float | None:
    return value / ref if value is not None and ref else None


def run_methods(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    from rich.progress import Progress

    rows = []
    with Progress(transient=True, disable=args.quiet) as progress:
        task = progress.add_task("benchmark", total=len(names) * len(args.sizes))
        for method in names:
            ref = REFERENCE.get(method, {})
            times: list[tuple[int, float]] = []
            peaks: list[tuple[int, float]] = []
            for n in sorted(args.sizes):
                progress.update(task, description=f"{method} N={n}")
                row: dict[str, Any] = {"method": method, "n": n}
                slow, big = estimate(times, n), estimate(peaks, n)
                if slow is not None and slow > args.max_seconds:
                    row["status"] = f"skipped: ~{slow:.0f} s per step > --max-seconds {args.max_seconds:g}"
                elif big is not None and big > available_mb():
                    row["status"] = f"skipped: ~{big:.0f} MB > {available_mb():.0f} MB available"
                else:
                    row.update(measure(args, method, n))
                if row["status"] == "ok":
                    times.append((n, row["train_s"]))
                    peaks.append((n, row["peak_rss_mb"]))
                row["ref_train_s"] = ref.get("train", {}).get(n)
                row["ref_infer_s"] = ref.get("infer", {}).get(n)
                row["ref_rss_mb"] = ref.get("rss", {}).get(n)
                row["train_ratio"] = ratio(row.get("train_s"), row["ref_train_s"])
                row["infer_ratio"] = ratio(row.get("infer_s"), row["ref_infer_s"])
                rows.append(row)
                progress.advance(task)
    return rows


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def header(args: argparse.Namespace) -> list[str]:
    import torch

    dims = (
        "the task's D and omics width" if args.validation else f"D = {args.dim}, omics width {args.omics_dim}"
    )
    return [
        f"torch {torch.__version__}, {args.threads} threads, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{dims}, median of {args.repeats} after {args.warmup} warm-ups, "
        f"{args.clock} clock",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        "reference: shared/reference/performance.md (quiet machine)",
    ]


def write_outputs(
    rows: list[dict[str, Any]], columns: list[str], out: Path, stem: str, notes: list[str]
) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows).reindex(columns=columns)
    frame.to_csv(out / f"{stem}.csv", index=False)
    lines = [f"# {stem}", "", *[f"- {note}" for note in notes], ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(
            LABELS.get(column, column), justify="left" if column in ("method", "status", "path") else "right"
        )
    for r in rows:
        table.add_row(*(fmt(r.get(c)) for c in columns))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all", help="comma-separated registered names, or 'all'")
    parser.add_argument("--sizes", default="1000,4000,16000,64000", help="bag sizes N, comma-separated")
    parser.add_argument("--dim", type=int, default=1536, help="patch feature width D (UNI v2: 1536)")
    parser.add_argument("--omics-dim", type=int, default=768, help="omics width for methods that use it")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:i (the train and inference steps)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or the process's CPU time"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="skip a size whose train step would take longer"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--gatv2-layer", action="store_true", help="time one GATv2 layer, PyG vs fast path")
    parser.add_argument(
        "--validation",
        metavar="TASK",
        help="time validation and external prediction on TASK's fold 0, one bag per forward vs packed",
    )
    parser.add_argument(
        "--train-bags", type=int, default=32, help="--validation: training bags timed for the epoch estimate"
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _CLOCK["now"] = CLOCKS[args.clock]
    if args.worker:
        args.method, args.size = args.methods, args.sizes[0]
        print(json.dumps(run_worker(args)))
        return
    notes = header(args)
    if args.gatv2_layer:
        rows = run_gatv2_layer(args)
        columns = ["n", "path", "fwd_bwd_s", "load"]
        print_table(rows, columns, f"One GATv2 layer {args.dim} -> 2 x 128, forward + backward")
        write_outputs(rows, columns, args.out, "gatv2", notes)
        return
    import methods

    names = methods.list_methods() if args.methods == "all" else split_methods(args.methods)
    for name in names:
        methods.resolve_config(name)  # an unknown name fails here, before any timing
    if args.validation:
        rows = run_validation(args, names)
        columns = [
            "method", "n_train", "n_val", "n_ext", "train_epoch_s", "val_old_s", "val_new_s", "val_speedup",
            "ext_old_s", "ext_new_s", "ext_speedup", "val_share_old", "val_share", "load",
        ]  # fmt: skip
        print_table(rows, columns, f"Validation and external prediction on {args.validation}, seconds")
        write_outputs(rows, columns, args.out, "validation", notes)
        return
    rows = run_methods(args, names)
    print_table(rows, COLUMNS, "Train step and inference, seconds per bag; peak RSS MB")
    write_outputs(rows, COLUMNS, args.out, "speed", notes)
    print(f"wrote {args.out / 'speed.csv'} and {args.out / 'speed.md'}")


if __name__ == "__main__":
    main()

"""Peak memory of ``bench run`` with one worker and with two, measured over the whole process tree.

Plain RSS counts every shared page (the feature store's mapped files, torch's libraries, the pages workers
forked from one server share) once in each process that maps it, so a tree's summed RSS overstates what N
workers cost. This script samples, every ``--interval`` seconds, each process of the tree's
``/proc/<pid>/smaps_rollup`` and reports the peak of:

- RSS: summed over the tree (what naive tools add up) and of the largest single process;
- PSS: proportional set size summed over the tree (each shared page split among the processes that map it),
  the honest total;
- USS: private pages only (Private_Clean + Private_Dirty) summed over the tree.

Each configuration runs in a fresh output folder, in the order given, so their ratios come from one run.
``--no-store`` sets ``BENCH_FEATURE_STORE=0`` (every process reads its own copy of the features, as bench did
before the shared store). A warm-up ``bench data check``, not measured, generates the cohort and fills the feature store.

    python benchmarks/memory.py --task her2 --workers 1 2
    python benchmarks/memory.py --task benchmarks/tasks/her2-large.yaml --workers 1 2   # features dominate
    python benchmarks/memory.py --task her2 --workers 1 2 --no-store   # per-process copies, for comparison
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return out


def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += _children(pid)
    return pids


def _rollup(pid: int) -> dict[str, int] | None:
    """kB of each field of ``/proc/<pid>/smaps_rollup``, or None when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0])
    return values


def measure(cmd: list[str], env: dict[str, str], interval: float) -> dict[str, float]:
    """Run ``cmd`` and return its tree's peak memory (MiB) and wall time (s)."""
    peak = {"rss_tree": 0, "pss_tree": 0, "uss_tree": 0, "rss_max_process": 0, "processes": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        rows = [r for r in map(_rollup, _tree(proc.pid)) if r]
        if rows:
            peak["rss_tree"] = max(peak["rss_tree"], sum(r["Rss"] for r in rows))
            peak["pss_tree"] = max(peak["pss_tree"], sum(r["Pss"] for r in rows))
            uss = sum(r["Private_Clean"] + r["Private_Dirty"] for r in rows)
            peak["uss_tree"] = max(peak["uss_tree"], uss)
            peak["rss_max_process"] = max(peak["rss_max_process"], max(r["Rss"] for r in rows))
            peak["processes"] = max(peak["processes"], len(rows))
        time.sleep(interval)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.read()[-4000:]}")
    return {k: (v / 1024 if k != "processes" else v) for k, v in peak.items()} | {"wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="her2")
    parser.add_argument("--method", default="abmil")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--folds", type=int, default=None, help="CV folds (default: the task's)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-store", action="store_true", help="BENCH_FEATURE_STORE=0: per-worker copies")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    args = parser.parse_args()
    bench = str(Path(sys.executable).with_name("bench"))
    env = dict(os.environ)
    if args.no_store:
        env["BENCH_FEATURE_STORE"] = "0"
    store = "off" if args.no_store else env.get("BENCH_FEATURE_STORE") or "$BENCH_CACHE/features"
    print(
        f"load average {os.getloadavg()}; task {args.task}, method {args.method}, epochs {args.epochs}, "
        f"folds {args.folds or 'as the task'}, feature store {store}"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [
            bench,
            "run",
            "--methods",
            args.method,
            "--task",
            args.task,
            "--epochs",
            str(args.epochs),
            "--quiet",
        ]
        folds = [] if args.folds is None else ["--folds", str(args.folds)]
        warm_up = [bench, "data", "check", "--task", args.task]  # generates the cohort, fills the store
        subprocess.run(warm_up, env=env, check=True, capture_output=True)
        for n in args.workers:
            out = Path(tmp) / f"workers-{n}"
            results[n] = measure([*base, *folds, "--workers", str(n), "--out", str(out)], env, args.interval)
    cols = ("processes", "rss_tree", "pss_tree", "uss_tree", "rss_max_process", "wall_s")
    print(f"{'workers':>8} " + " ".join(f"{c:>16}" for c in cols) + "   (MiB, s)")
    for n, r in results.items():
        print(f"{n:>8} " + " ".join(f"{r[c]:>16.1f}" for c in cols))
    first = results[args.workers[0]]
    for n, r in list(results.items())[1:]:
        print(
            f"workers {n} / {args.workers[0]}: RSS (tree) {r['rss_tree'] / first['rss_tree']:.2f}, "
            f"PSS (tree) {r['pss_tree'] / first['pss_tree']:.2f}, USS (tree) {r['uss_tree'] / first['uss_tree']:.2f}"
        )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

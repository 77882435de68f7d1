"""How many optimiser updates each method uses under a task's convergence rule, and whether its folds stop
on a plateau or on the cap (docs/protocol.md, "Convergence").

Runs ``bench run`` (resumable: folds already in ``--out`` are reused), then prints one row per fold from
its ``metrics.json``: updates made, the kept check's updates, epochs, how it stopped, training seconds, the
kept selection score and the test AUC; then per method the median updates and the folds that stopped on a
plateau. The load average before and after is printed with it (numbers from a shared machine).

    python benchmarks/convergence.py --task her2 --methods all --out /tmp/conv
    python benchmarks/convergence.py --task her2 --methods all --out /tmp/conv-paper --protocol paper
    python benchmarks/convergence.py --task benchmarks/tasks/her2-small.yaml --builtin-rule --out /tmp/conv-small

``--builtin-rule`` runs a copy of the task (written into ``--out``) whose ``train:`` block is the built-in
tasks' rule, e.g. on a smaller synthetic cohort than the built-in one.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import yaml

from bench.commands import run
from bench.config import builtin_task_dir
from bench.jobs import parse_methods
from bench.store import load_results
from bench.taskdata import RunOptions


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fold_rows(out: Path, task: str) -> pd.DataFrame:
    rows = []
    for r in load_results(out, task).runs:
        m = r.metrics
        rows.append(
            {
                "method": r.method,
                "fold": r.fold,
                "updates": m.get("updates"),
                "kept at": m.get("best_updates"),
                "epochs": m.get("epochs_run"),
                "stopped": m.get("stopped"),
                "seconds": m.get("train_seconds"),
                "checks": len(m.get("history", [])),
                "test AUC": m["cohorts"]["test"]["auc"],
            }
        )
    return pd.DataFrame(rows).sort_values(["method", "fold"])


def with_builtin_rule(task: str, out: Path) -> str:
    """A copy of ``task``'s YAML (a synthetic task: no paths to resolve) with the built-in tasks' ``train:``."""
    raw = yaml.safe_load(Path(task).read_text())
    raw["train"] = yaml.safe_load((builtin_task_dir() / "her2.yaml").read_text())["train"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{raw['name']}-builtin-rule.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="her2")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/convergence"))
    ap.add_argument("--folds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--protocol", default="task", choices=("task", "paper"))
    ap.add_argument(
        "--builtin-rule", action="store_true", help="the task with the built-in tasks' train: block"
    )
    args = ap.parse_args()
    task = with_builtin_rule(args.task, args.out) if args.builtin_rule else args.task
    print(f"load average before: {_load()}")
    started = time.time()
    opts = RunOptions(
        out=args.out, folds=args.folds, device="cpu", workers=args.workers, quiet=True, protocol=args.protocol
    )
    summary = run(task, parse_methods(args.methods), opts)
    print(f"wall {time.time() - started:.0f} s; load average after: {_load()}")
    folds = fold_rows(args.out, summary.task.iloc[0])
    print(folds.to_string(index=False, float_format="%.3f"))
    per_method = folds.groupby("method").agg(
        median_updates=("updates", "median"),
        plateau=("stopped", lambda s: f"{(s == 'plateau').sum()} of {len(s)}"),
        seconds=("seconds", "sum"),
        test_auc=("test AUC", "mean"),
    )
    print(per_method.to_string(float_format="%.3f"))


if __name__ == "__main__":
    main()

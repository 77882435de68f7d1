"""The reference rows of the built-in tasks without training any method: the floor (mean-feature linear probe,
C by inner CV) and the synthetic ceilings (Bayes, omics, oracle pooling), on each task's own folds and
cohorts, as `bench run` and `bench report` compute them (bench/baselines.py).

    python benchmarks/references.py --tasks her2,pr,odx --out /tmp/references

Prints, per task and row, the task's objective (patient-level AUC, macro one-vs-rest AUC or Harrell's c-index,
%) mean ± SD over folds on the test parts and on every external cohort, the same on the training patients, and
the C each fold's inner CV chose; the load average before and after.
The privileged-information student is trained, so it is not here: `bench run --methods abmil,<a KD method>`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.baselines import REFERENCES, ensure_references
from bench.store import load_results
from bench.taskdata import RunOptions, prepare_task
from bench.tasktypes import task_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="her2,pr,odx")
    parser.add_argument("--out", type=Path, default=Path("/tmp/references"))
    parser.add_argument("--folds", type=int, default=None)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}")
    for task in args.tasks.split(","):
        started = time.time()
        data = prepare_task(task, RunOptions(out=args.out, folds=args.folds, quiet=True))
        ensure_references(data, args.out, print)
        runs = [r for r in load_results(args.out, data.task.name).runs if r.method in REFERENCES]
        score = task_type(data.task).objective
        print(f"\n{data.task.name} ({time.time() - started:.0f} s)")
        print(f"| row | cohort | {score} % (mean ± SD over folds) | train {score} % | C per fold |")
        print("| --- | --- | ---: | ---: | --- |")
        for name in REFERENCES:
            mine = sorted((r for r in runs if r.method == name), key=lambda r: r.fold)
            if not mine:
                continue
            train = np.mean([r.metrics["train_auc"] for r in mine]) * 100
            cs = ", ".join(f"{r.metrics['C']:g}" for r in mine) if "C" in mine[0].metrics else "–"
            for cohort in mine[0].metrics["cohorts"]:
                if cohort == "val":
                    continue
                aucs = np.array([r.metrics["cohorts"][cohort][score] for r in mine]) * 100
                print(
                    f"| {name} | {cohort} | {aucs.mean():.1f} ± {aucs.std(ddof=1):.1f} | {train:.1f} | {cs} |"
                )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

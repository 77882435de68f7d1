"""Ground-truth ceilings of the synthetic subtype and survival outcomes (docs/synthetic.md): the macro
one-vs-rest AUC of the true class probabilities against the drawn subtypes, and Harrell's c-index of the true
log-hazard against the censored survival times; with the class shares and the censored fraction. Measured on
a large sample of the internal population and on the cohorts of the built-in task (generated if needed).

    python benchmarks/outcome_ceilings.py [--task subtype] [--population 200000]
"""

from __future__ import annotations

import argparse
import bisect

import numpy as np
import pandas as pd

from bench.config import cache_root, read_task
from bench.data.synthetic import OUTCOMES_FILE, SUBTYPES, SyntheticSpec, ensure_outcomes, materialise
from bench.data.synthetic.outcomes import TRUTH_FILE, population
from bench.evaluate import auc


def _harrell(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C in O(n log n) memory-light form, for a population of any size (torchsurv's, which bench
    uses on cohorts, compares all pairs at once): patients taken by decreasing time, each event compared with
    the risks of every patient followed longer (kept sorted), ties in risk counted half."""
    order = np.argsort(-time, kind="stable")
    later: list[float] = []
    num = den = 0.0
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and time[order[j]] == time[order[i]]:
            j += 1
        for k in order[i:j]:
            if event[k]:
                below, upto = bisect.bisect_left(later, risk[k]), bisect.bisect_right(later, risk[k])
                num += below + 0.5 * (upto - below)
                den += len(later)
        for k in order[i:j]:
            bisect.insort(later, risk[k])
        i = j
    return num / den if den else float("nan")


def _row(where: str, subtype: np.ndarray, probs: np.ndarray, eta, days, event) -> dict:
    shares = np.bincount(subtype, minlength=len(SUBTYPES)) / len(subtype)
    return {
        "cohort": where,
        "patients": len(subtype),
        "macro AUC (true probabilities)": round(auc(subtype, probs), 3),
        **{f"share {s}": round(float(v), 3) for s, v in zip(SUBTYPES, shares, strict=True)},
        "c-index (true log-hazard)": round(_harrell(days, event, eta), 3),
        "censored": round(1 - float(np.mean(event)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="subtype")
    parser.add_argument("--population", type=int, default=200_000)
    args = parser.parse_args()
    task = read_task(args.task)
    spec = SyntheticSpec.from_dict(task.synthetic or {})
    pop = population(spec, args.population)
    rows = [_row("population", pop.subtype, pop.probs, pop.log_hazard, pop.days, pop.event)]
    root = materialise(spec, cache_root() / "synthetic")
    ensure_outcomes(spec, root)
    for cohort in ["internal", *(e.name for e in spec.external)]:
        truth = pd.read_csv(root / cohort / TRUTH_FILE, dtype={"case_id": str}).set_index("case_id")
        out = pd.read_csv(root / cohort / OUTCOMES_FILE, dtype={"case_id": str}).drop_duplicates("case_id")
        out = out.set_index("case_id").loc[truth.index]
        subtype = out.subtype.map({s: i for i, s in enumerate(SUBTYPES)}).to_numpy()
        probs = truth[[f"p_{s}" for s in SUBTYPES]].to_numpy()
        rows.append(
            _row(
                cohort,
                subtype,
                probs,
                truth.log_hazard.to_numpy(),
                out.os_days.to_numpy(),
                out.os_event.to_numpy(),
            )
        )
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in header) + " |")


if __name__ == "__main__":
    main()

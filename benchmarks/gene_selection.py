"""Time of one fold's gene selection (``omics_select``) per method, on random log-expression.

The default size is TCGA-BRCA-like: about 1,000 patients, so ~640 in a 5-fold training part (80 % minus
20 % validation), and ~20,000 genes. Selection runs once per fold and process (cached for the methods that
share it), before training.

    python benchmarks/gene_selection.py --patients 640 --genes 20000 --k 768 --methods variance,univariate,gbdt

Prints a Markdown table (method, patients, genes, k, seconds) with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

from bench.data.genes import METHODS, select_genes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=640)
    parser.add_argument("--genes", type=int, default=20000)
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    cases = [f"c{i:05d}" for i in range(args.patients)]
    y = pd.Series(rng.integers(0, 2, args.patients), index=cases)
    x = rng.gamma(2.0, 2.0, size=(args.patients, args.genes))
    x[:, :50] += y.to_numpy()[:, None]  # a few informative genes
    omics = pd.DataFrame(np.log2(x + 1.0), index=cases, columns=[f"g{j:05d}" for j in range(args.genes)])
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print("| method | patients | genes | k | seconds | informative genes kept (of 50) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method in args.methods.split(","):
        start = time.perf_counter()
        sel = select_genes(omics, y, cases, method, args.k, args.seed)
        took = time.perf_counter() - start
        hits = sum(int(g[1:]) < 50 for g in sel.genes)
        print(f"| {method} | {args.patients} | {args.genes} | {args.k} | {took:.2f} | {hits} |")


if __name__ == "__main__":
    main()

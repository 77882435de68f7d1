"""The synthetic cohort's calibration (docs/synthetic.md, "Calibration"): the numbers that say whether a
built-in task can be learned, cannot be memorised, and tells methods apart.

For each task (default odx, her2, pr, all on the one built-in cohort) and each outer fold of the task's own
splits (the folds ``bench run`` makes), it fits on the fold's training and validation patients and scores
the fold's test patients, the held-out cohort and the external cohort:

- **mean pooling**: logistic regression on each patient's mean patch feature (standardised), its C chosen by
  inner 5-fold CV on those training patients (scikit-learn ``LogisticRegressionCV``, AUC), with its
  training AUC beside its test AUC: the bag-level linear probe a cohort must not let memorise;
- **oracle pooling**: the same probe on the mean of each patient's truly informative patches
  (``relevance`` > 0): ground truth no real cohort has;
- **omics only**: the same probe on log2(count + 1), on the patients with omics (internal and held-out;
  the external cohort has none);
- **latent score**: the AUC of the true latent score ``w·z`` without the label noise (the Bayes ceiling,
  from ``latent.csv``).

With ``--abmil`` it first runs ``bench run --methods abmil`` on each task (results under ``--out``; finished
folds are kept, so a rerun resumes) and reads back ABMIL's per-fold AUCs (validation, test, held-out,
external), their SD over folds and the training time per fold; with the probes it then runs the report's
paired test on the held-out cohort (DeLong contrast of fold-mean AUCs, ``bench.stats.delong_contrast``) between
ABMIL and the mean-pooling probe and prints the smallest difference it resolves: the power of the held-out
cohort (issue 16). ``--no-probes``: ABMIL only.

    BENCH_CACHE=... python benchmarks/calibrate_synthetic.py --tasks odx,her2,pr --abmil --out /tmp/calib

Prints Markdown tables with the machine's load average and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.commands import run
from bench.data.splits import fold_parts
from bench.data.synthetic import HELDOUT, PROGRAMS
from bench.data.synthetic.generator import _TASK_WEIGHTS  # the label weights w (the Bayes ceiling)
from bench.stats import delong_contrast
from bench.taskdata import RunOptions, prepare_task

DATASETS = Path(__file__).resolve().parent.parent / "datasets"


def task_path(task: str) -> Path:
    """A built-in task's YAML by name, or any synthetic task YAML by path."""
    return Path(task) if task.endswith((".yaml", ".yml")) else DATASETS / f"{task}.yaml"


def task_name(task: str) -> str:
    return yaml.safe_load(task_path(task).read_text())["name"]


def pooled(cohort) -> dict[str, pd.DataFrame]:
    """Per patient: the mean patch feature (``mean``) and the mean of its informative patches (``oracle``)."""
    rows: dict[str, dict[str, list[np.ndarray]]] = {"mean": {}, "oracle": {}}
    for path, case_id in zip(cohort.slides.path, cohort.slides.case_id, strict=True):
        with h5py.File(path) as f:
            x = f["features"][:].astype(np.float32)
            rel = f["relevance"][:]
        rows["mean"].setdefault(case_id, []).append(x.mean(0))
        rows["oracle"].setdefault(case_id, []).append(x[rel > 0].mean(0) if (rel > 0).any() else x.mean(0))
    return {k: pd.DataFrame({c: np.mean(v, 0) for c, v in r.items()}).T for k, r in rows.items()}


def probe(x: pd.DataFrame, y: pd.Series, fit_on: list[str], seed: int):
    """Standardised logistic regression, C by inner 5-fold CV (AUC) on ``fit_on`` patients."""
    fit_on = [c for c in fit_on if c in x.index]
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=np.logspace(-4, 2, 7), cv=5, scoring="roc_auc", max_iter=2000, random_state=seed
        ),
    )
    model.fit(x.loc[fit_on].to_numpy(), y.loc[fit_on].to_numpy())
    return model


def auc(model, x: pd.DataFrame, y: pd.Series, cases) -> float:
    cases = [c for c in cases if c in x.index]
    return float(roc_auc_score(y.loc[cases], model.predict_proba(x.loc[cases].to_numpy())[:, 1]))


def folder(cohort) -> Path:
    """The generated cohort's folder (labels.csv, latent.csv, omics.csv, features/)."""
    return Path(cohort.slides.path.iloc[0]).parent.parent


def log_omics(cohort) -> pd.DataFrame | None:
    """log2(count + 1) of the cohort's omics.csv (internal and held-out cohorts), or None."""
    path = folder(cohort) / "omics.csv"
    if not path.is_file():
        return None
    return np.log2(pd.read_csv(path, dtype={"case_id": str}).set_index("case_id") + 1.0)


def latent_auc(cohort, y: pd.Series, column: str) -> float:
    """AUC of the true latent score ``w·z`` (without the label noise): the Bayes ceiling."""
    latent = pd.read_csv(folder(cohort) / "latent.csv", dtype={"case_id": str}).set_index("case_id")
    return float(roc_auc_score(y, latent.loc[y.index, list(PROGRAMS)].to_numpy() @ _TASK_WEIGHTS[column]))


def ceilings(task: str, out: Path) -> list[dict]:
    """The latent-score AUC of each cohort of the task."""
    data = prepare_task(task_path(task), RunOptions(out=out, quiet=True))
    return [
        {"task": data.task.name, "fold": -1, "predictor": "latent score", "cohort": n, "auc": a}
        for n, c in {"internal": data.internal, **data.externals}.items()
        for a in [latent_auc(c, c.patients.set_index("case_id").label, data.task.label_col)]
    ]


def power(y: pd.Series, abmil: pd.DataFrame, probe_scores: dict[int, pd.Series]) -> dict:
    """The report's paired test on the held-out cohort (DeLong contrast of two fold-mean AUCs on the same
    patients, bench.stats) between ABMIL and the mean-pooling probe: the difference, its SE, and the smallest
    difference it resolves (two-sided α = 0.05: 1.96 SE; with 80 % power: 2.80 SE). ``abmil``: case_id x fold
    patient probabilities (the folds ABMIL has finished)."""
    folds = sorted(set(probe_scores) & set(abmil.columns))  # the folds both have
    cases = list(y.index)
    scores = np.stack(
        [abmil.loc[cases, k].to_numpy() for k in folds]
        + [probe_scores[k].loc[cases].to_numpy() for k in folds]
    )
    k = len(folds)
    test = delong_contrast(y.to_numpy(), scores, [1.0 / k] * k + [-1.0 / k] * k)
    alone = delong_contrast(y.to_numpy(), scores[:k], [1.0 / k] * k)
    se = abs(test.estimate / test.statistic)
    return {
        "difference": test.estimate,
        "p": test.p_value,
        "se_difference": se,
        "resolves_alpha05": 1.96 * se,
        "resolves_power80": 2.80 * se,
        "se_abmil_fold_mean": abs(alone.estimate / alone.statistic) if alone.statistic else float("nan"),
    }


def fold_dirs(method_dir: Path) -> list[Path]:
    """The folds ``fold_<k>`` of a method, in order; not the ``fold_<k>.replaced-<hash>`` folders bench moves
    aside when a fold's configuration changes, nor claims."""
    return sorted(
        (d for d in method_dir.glob("fold_*") if d.name.removeprefix("fold_").isdigit()),
        key=lambda d: int(d.name.removeprefix("fold_")),
    )


def abmil_heldout(out: Path, task: str) -> pd.DataFrame | None:
    """ABMIL's held-out patient probabilities (case_id x fold; slides averaged, as bench does), if on disk."""
    files = [d / "predictions.csv" for d in fold_dirs(out / task / "abmil")]
    if not files:
        return None
    cols = {}
    for f in files:
        pred = pd.read_csv(f, dtype={"case_id": str, "slide_id": str})
        pred = pred[pred.cohort == HELDOUT]
        cols[int(f.parent.name.split("_")[1])] = pred.groupby("case_id").prob.mean()
    return pd.DataFrame(cols)


def calibrate(task: str, out: Path) -> list[dict]:
    """One row per (fold, predictor, cohort) of the probes above; with ABMIL's folds on disk (``--abmil``),
    also the paired test on the held-out cohort (:func:`power`), printed."""
    data = prepare_task(task_path(task), RunOptions(out=out, quiet=True))
    task = data.task.name
    cohorts = {"internal": data.internal, **data.externals}
    labels = {n: c.patients.set_index("case_id").label for n, c in cohorts.items()}
    feats = {n: pooled(c) for n, c in cohorts.items()}
    omics = {n: o for n, c in cohorts.items() if (o := log_omics(c)) is not None}
    rows, heldout_scores = [], {}
    for fold in range(data.folds):
        parts = fold_parts(data.splits, fold)
        slides = data.internal.slides.set_index("slide_id").case_id
        fit_on = sorted(set(slides.loc[parts["train"] + parts["val"]]))
        test = sorted(set(slides.loc[parts["test"]]))
        for name, x in [
            ("mean pooling", {n: f["mean"] for n, f in feats.items()}),
            ("oracle pooling", {n: f["oracle"] for n, f in feats.items()}),
            ("omics only", omics),
        ]:
            model = probe(x["internal"], labels["internal"], fit_on, data.seed)
            c = float(model[-1].C_[0])
            if name == "mean pooling" and HELDOUT in x:
                h = x[HELDOUT].loc[labels[HELDOUT].index]
                heldout_scores[fold] = pd.Series(model.predict_proba(h.to_numpy())[:, 1], index=h.index)
            scored = {"train": ("internal", fit_on), "test": ("internal", test)}
            scored.update({n: (n, list(labels[n].index)) for n in x if n != "internal"})
            for where, (cohort, cases) in scored.items():
                rows.append(
                    {
                        "task": task,
                        "fold": fold,
                        "predictor": name,
                        "cohort": where,
                        "C": c,
                        "auc": auc(model, x[cohort], labels[cohort], cases),
                    }
                )
    ab = abmil_heldout(out, task)
    if ab is not None and set(heldout_scores) & set(ab.columns):
        result = power(labels[HELDOUT], ab, heldout_scores)
        print(
            f"{task}: paired test on the held-out cohort, ABMIL - mean pooling: "
            + ", ".join(f"{k} {100 * v:.2f}" if k != "p" else f"p {v:.2g}" for k, v in result.items())
            + " (AUC points)"
        )
    return rows


def abmil(task: str, out: Path) -> list[dict]:
    """``bench run --methods abmil`` on the task; one row per fold and cohort (train/val/test/held-out/...)."""
    start = time.perf_counter()
    run(str(task_path(task)), ["abmil"], RunOptions(out=out, quiet=True))
    task = task_name(task)
    wall = time.perf_counter() - start
    rows = []
    for fold_dir in fold_dirs(out / task / "abmil"):
        m = json.loads((fold_dir / "metrics.json").read_text())
        fold = int(fold_dir.name.split("_")[1])
        best = m["history"][m["best_epoch"]] if m.get("history") else {}
        extra = {"train": best.get("train_auc")} if "train_auc" in best else {}
        for cohort, value in {**extra, **{k: v["auc"] for k, v in m["cohorts"].items()}}.items():
            rows.append(
                {
                    "task": task,
                    "fold": fold,
                    "predictor": "ABMIL",
                    "cohort": cohort,
                    "auc": value,
                    "seconds": m["train_seconds"],
                    "best_epoch": m["best_epoch"],
                    "epochs_run": m["epochs_run"],
                }
            )
    print(f"{task}: bench run --methods abmil took {wall:.0f} s wall (load {os.getloadavg()[0]:.2f})")
    return rows


def markdown(df: pd.DataFrame) -> str:
    """A Markdown table of ``df`` with its index as the first columns."""
    df = df.reset_index()
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def table(rows: pd.DataFrame) -> str:
    """Mean ± SD over folds (%) per task, predictor and cohort."""
    g = rows.groupby(["task", "predictor", "cohort"], sort=False).auc
    stats = pd.DataFrame({"mean": g.mean() * 100, "sd": g.std() * 100, "n": g.size()}).reset_index()
    stats["AUC % (mean ± SD over folds)"] = [
        f"{m:.1f}" if n == 1 else f"{m:.1f} ± {s:.1f}"
        for m, s, n in zip(stats["mean"], stats.sd, stats.n, strict=True)
    ]
    wide = stats.pivot_table(
        index=["task", "predictor"],
        columns="cohort",
        values="AUC % (mean ± SD over folds)",
        aggfunc="first",
        sort=False,
    )
    return markdown(wide.fillna(""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="odx,her2,pr")
    parser.add_argument("--abmil", action="store_true", help="also run ABMIL (bench run) on each task")
    parser.add_argument("--no-probes", action="store_true", help="skip the probes (ABMIL only)")
    parser.add_argument("--out", type=Path, default=Path("results-calibration"))
    args = parser.parse_args()
    print(f"command: {' '.join(sys.argv)}")
    print(f"load average at start {', '.join(f'{v:.2f}' for v in os.getloadavg())}, {os.cpu_count()} CPUs")
    rows = []
    for task in args.tasks.split(","):
        rows += ceilings(task, args.out)
        if args.abmil:
            rows += abmil(task, args.out)
        if not args.no_probes:
            rows += calibrate(task, args.out)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "calibration.csv", index=False)
    print(table(df))
    probes = df[df.C.notna()] if "C" in df else df.iloc[:0]
    if len(probes):
        print("\nC chosen by inner CV (median over folds):")
        print(markdown(probes.groupby(["task", "predictor"]).C.median().to_frame()))
    if args.abmil:
        ab = df[df.predictor == "ABMIL"].drop_duplicates(["task", "fold"])
        print("\nABMIL per fold: seconds, best epoch / epochs run")
        print(markdown(ab.set_index(["task", "fold"])[["seconds", "best_epoch", "epochs_run"]]))
    print(f"load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

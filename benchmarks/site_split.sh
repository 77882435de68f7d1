#!/usr/bin/env bash
# Patient- vs site-level splits (issue 15) on a synthetic cohort of 8 tissue source sites that differ in stain
# (a constant feature offset per site) and case mix (so prevalence): ABMIL, 2 folds, 10 epochs, split seeds
# 0-2, each once split by patient (benchmarks/tasks/sites.yaml) and once by site (sites-by-site.yaml). Prints
# the internal test AUC and the external AUC (mean over the 2 folds) of each run, then their means. A second
# argument replaces the tasks' site_stain_scale (2.0; 0: sites differ in case mix only, no site signature: the
# control), in copies of the two YAMLs written under OUT_FOLDER/tasks. Results: docs/synthetic.md.
#   benchmarks/site_split.sh /tmp/site-split; benchmarks/site_split.sh /tmp/site-split-control 0
set -euo pipefail
out=${1:?usage: benchmarks/site_split.sh OUT_FOLDER [SITE_STAIN_SCALE]}
here=$(cd "$(dirname "$0")" && pwd)
tasks=$here/tasks
if [ $# -ge 2 ]; then
  tasks=$out/tasks
  mkdir -p "$tasks"
  for task in sites sites-by-site; do
    sed "s/^  site_stain_scale: .*/  site_stain_scale: $2/" "$here/tasks/$task.yaml" > "$tasks/$task.yaml"
  done
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for seed in 0 1 2; do
  for task in sites sites-by-site; do
    bench run --task "$tasks/$task.yaml" --methods abmil --device cpu --seed "$seed" \
      --out "$out/seed_$seed" --quiet > /dev/null
  done
done
python - "$out" <<'PY'
import sys
from pathlib import Path

import pandas as pd

rows = []
for summary in sorted(Path(sys.argv[1]).glob("seed_*/*/summary.csv")):
    s = pd.read_csv(summary)
    auc = s[s.metric == "auc"].set_index("cohort")["mean"]
    rows.append({"split_by": "site" if summary.parent.name.endswith("by-site") else "patient",
                 "seed": summary.parent.parent.name[5:], "test_auc": auc["test"], "external_auc": auc["external"]})
table = pd.DataFrame(rows).sort_values(["split_by", "seed"])
print(table.to_string(index=False, float_format="%.3f"))
print(table.groupby("split_by")[["test_auc", "external_auc"]].agg(["mean", "std"]).round(3).to_string())
PY

#!/usr/bin/env bash
# Results of a refactor must not change: run every method on the tiny task (two folds, two epochs),
# then print the SHA-256 of summary.csv, of every fold's predictions.csv and of the report's tables, and each
# fold's configuration hash (what decides whether a saved fold is reused). Run it on two commits and diff
# the outputs (same machine, same torch): equal hashes mean bit-identical results.
#   benchmarks/behaviour.sh /tmp/before > before.txt; (checkout) benchmarks/behaviour.sh /tmp/after > after.txt
# Keep BENCH_CACHE the same for both runs: the configuration hash includes the cohort's file paths.
set -euo pipefail
out=${1:?usage: benchmarks/behaviour.sh OUT_FOLDER}
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
bench run --task "$here/tasks/tiny.yaml" --methods all --device cpu --out "$out" --quiet > /dev/null
bench report --task "$here/tasks/tiny.yaml" --out "$out" --bootstrap 1000 --loc-slides 2 > /dev/null
cd "$out/tiny"
sha256sum summary.csv */fold_*/predictions.csv report/table1_internal.md report/table2_external.md \
  report/table_headline.md report/tests_tiny.md report/table_localisation.md report/operating_points_tiny.md
for f in */fold_*/config.yaml; do echo "$(grep '^hash:' "$f" | cut -d' ' -f2)  $f (configuration hash)"; done

#!/usr/bin/env bash
# Wall time of the main job, `bench run --methods all --task TASK [options]`, from an empty output folder.
#   benchmarks/main_job.sh her2 --workers 2 --epochs 3          # the options go to bench run as they are
#   PYTHONPATH=/path/to/other/checkout benchmarks/main_job.sh her2 --workers 2 --epochs 3   # that code
# (BENCH= names the bench executable, default the one on PATH.)
# A warm-up (not timed) generates the cohort, fills the feature store and builds every graph method's kNN
# graphs (one fold, one epoch, into a throwaway folder), so that two runs (e.g. before and after a change,
# same BENCH_CACHE) time the same work; WARM=0 skips it (e.g. for a second run started beside the first, so
# that both see the same load). Prints the load average before and after and the wall seconds.
# The output folder is removed at the end (KEEP=1 keeps it and prints where it is).
set -euo pipefail
task=${1:?usage: benchmarks/main_job.sh TASK [bench run options]}
shift
bench=${BENCH:-bench}
out=$(mktemp -d)
if [ "${WARM:-1}" = 1 ]; then
  warm=$(mktemp -d)
  "$bench" data check --task "$task" > /dev/null
  "$bench" run --methods all --task "$task" --folds 2 --epochs 1 --out "$warm" --quiet > /dev/null
  rm -rf "$warm"
fi
echo "bench: $(command -v "$bench")  task: $task  options: $*"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
"$bench" run --methods all --task "$task" --out "$out" --quiet "$@" > /dev/null
end=$(date +%s.%N)
echo "load after:  $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wall s: $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
if [ "${KEEP:-0}" = 1 ]; then echo "results: $out"; else rm -rf "$out"; fi

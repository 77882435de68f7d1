#!/usr/bin/env bash
# One short GPU check (about 5 minutes): train-step and inference times, peak GPU memory and GPU utilisation
# of every method at N = 4k / 16k / 64k (D = 1536, bf16 autocast as bench runs on CUDA), then the main job
# on the built-in task with whatever time is left (its wall time, or how far it got).
#
#   bash benchmarks/gpu.sh [OUT]          # OUT defaults to benchmarks/results/gpu
#
# Needs one CUDA device, nvidia-smi and the project installed (pip install -e .). Writes OUT/speed.{csv,md}
# (steps), OUT/utilisation.csv (nvidia-smi every 200 ms), OUT/run.log and OUT/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-300}
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
  > "$OUT/utilisation.csv" &
SMI=$!
trap 'kill "$SMI" 2>/dev/null || true' EXIT

# 1. every method, one bag per step, synchronised timings; a size whose step would exceed 2 s is skipped
timeout 150 python benchmarks/speed.py --device cuda --bf16 --methods all --sizes 4000,16000,64000 \
  --dim 1536 --warmup 2 --repeats 5 --max-seconds 2 --out "$OUT" --quiet || echo "speed.py: exit $?" >> "$OUT/summary.txt"
steps_end=$(date +%s)

# 2. the main job with the time that is left (each fold is written atomically: a cut run shows how far it got)
left=$((BUDGET_S - (steps_end - start)))
if [ "$left" -gt 30 ]; then
  export BENCH_CACHE=${BENCH_CACHE:-$OUT/cache}
  t0=$(date +%s)
  timeout "$left" bench run --methods all --task odx --device cuda --out "$OUT/run" --quiet > "$OUT/run.log" 2>&1 \
    && status=finished || status="stopped after ${left} s"
  folds=$(find "$OUT/run/odx" -name metrics.json 2>/dev/null | wc -l)
  echo "main job (bench run --methods all --task odx --device cuda): $status, $(( $(date +%s) - t0 )) s, $folds folds done" \
    | tee -a "$OUT/summary.txt"
fi

# 3. utilisation while the steps ran and while the main job ran
python - "$OUT" "$start" "$steps_end" <<'EOF' | tee -a "$OUT/summary.txt"
import csv, datetime, statistics, sys
out, start, steps_end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = []
for r in csv.reader(open(f"{out}/utilisation.csv")):
    try:
        t = datetime.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((t, float(r[1]), float(r[2])))
    except (ValueError, IndexError):
        continue
for name, keep in (("steps", lambda t: t < steps_end), ("main job", lambda t: t >= steps_end)):
    sel = [r for r in rows if keep(r[0])]
    if sel:
        util = [r[1] for r in sel]
        print(f"{name}: GPU utilisation median {statistics.median(util):.0f} %, mean {statistics.mean(util):.0f} %, "
              f"peak memory {max(r[2] for r in sel):.0f} MiB ({len(sel)} samples)")
EOF
cat "$OUT/speed.md" 2>/dev/null || true

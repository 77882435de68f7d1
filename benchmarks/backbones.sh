#!/usr/bin/env bash
# The two-backbone comparison on the embedded default (built-in task her2-backbones): every method given on
# both synthetic feature sets, on shared splits, then the report's method x backbone table and its paired
# tests. Usage: benchmarks/backbones.sh OUT [METHODS] [extra bench run options]   (METHODS default: all)
set -euo pipefail
out=${1:?usage: benchmarks/backbones.sh OUT [METHODS] [bench run options]}
methods=${2:-all}
shift $(( $# >= 2 ? 2 : 1 ))
bench=${BENCH:-bench}
uptime
time "$bench" run --task her2-backbones --methods "$methods" --out "$out" --quiet "$@" >/dev/null
"$bench" report --task her2-backbones --out "$out" --loc-slides 0 --format markdown >/dev/null
cat "$out/her2-backbones/report/backbones_her2-backbones.md" "$out/her2-backbones/report/backbone_tests_her2-backbones.md"
uptime

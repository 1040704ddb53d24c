#!/usr/bin/env bash
# Attention-on-label against every baseline on the built-in synthetic data, with seeds and spread:
# one call of `aol study` on the synth-cxr benchmark (docs/benchmark.md). All benchmarks: leave out
# --benchmarks, i.e. run `aol study --preset quick --out DIR` yourself.
#   scripts/synth_benchmark.sh [OUT] [PRESET] [SEEDS] [more aol study options...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study-synth}
PRESET=${2:-quick}
SEEDS=${3:-3}
exec .venv/bin/aol study --preset "$PRESET" --out "$OUT" --benchmarks synth-cxr --seeds "$SEEDS" "${@:4}"

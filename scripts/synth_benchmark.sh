#!/usr/bin/env bash
# Attention-on-label against every baseline on the built-in synthetic data, 2 CPU processes each,
# then one AUROC-vs-truth table: does aol beat each single label set?
#   scripts/synth_benchmark.sh [STEPS] [SHARDS] [OUT] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1000}
SHARDS=${2:-shards/synth-demo}
OUT=${3:-runs/benchmark}
SEED=${4:-0}
BIN=.venv/bin
mkdir -p "$OUT"
[ -f "$SHARDS/manifest.json" ] || $BIN/aol shards synth --out "$SHARDS" --train 3000 --validate 0 --test 1000 --image-size 64
runs=()
for spec in "aol-set:method.name=aol" "aol-finding:method.name=aol method.attention=per_finding" \
            "aol-set-partial:method.name=aol method.meta_scope=partial" "cm:method.name=cm" \
            "majority:method.name=majority" "single-negbio_u0:method.name=single method.single_label_set=negbio_u0" \
            "single-negbio_u1:method.name=single method.single_label_set=negbio_u1" \
            "single-chexpert_u0:method.name=single method.single_label_set=chexpert_u0" \
            "single-chexpert_u1:method.name=single method.single_label_set=chexpert_u1"; do
  name=${spec%%:*}
  if [ ! -d "$OUT/$name" ]; then
    # shellcheck disable=SC2086  # the overrides are separate words
    OMP_NUM_THREADS=1 $BIN/accelerate launch --config_file launch_configs/cpu_2proc.yaml -m aol_dist.train \
      --config configs/demo.toml data.shards="$SHARDS" train.steps="$STEPS" train.out_dir="$OUT" train.seed="$SEED" \
      train.run_name="$name" train.plots=false ${spec#*:} > "$OUT/$name.log" 2>&1
  fi
  runs+=("$OUT/$name")
done
$BIN/aol compare "${runs[@]}" --target truth

#!/usr/bin/env bash
# One command on a machine with a GPU, at most 8 minutes: the step cost of every variant (`aol bench
# step`), a short 1-GPU training run on synthetic 256 x 256 shards (throughput and data-wait share from
# its log.jsonl), the loader rate (`aol bench loader`), and one summary (summary.json, summary.md).
#
#   scripts/gpu_check.sh [OUT_DIR]         OUT_DIR also from $OUT_DIR; default ./gpu_check_out
#   DRY_RUN=1 scripts/gpu_check.sh         print what would run, run nothing (no GPU needed)
#
# Knobs (environment; the defaults are the paper's configuration, Sec. 5.1, sized to finish in time):
#   PYTHON (.venv/bin/python if present, else python3), DEVICE=cuda, ARCH=resnet50, SIZE=256, BATCH=32,
#   STEP_FLAGS="--bf16 --channels-last", REPEATS=15, STEPS=300, TRAIN_SAMPLES=3200, TEST_SAMPLES=500,
#   NUM_WORKERS=4 (loader processes of the training run), TRAIN_OVERRIDES (more section.key=value words for
#   the training run, e.g. "method.trust=attention"), SHARDS (default OUT_DIR/shards; reused if built),
#   and the time limit of each part in seconds: LIMIT_ENV=60 LIMIT_SHARDS=60 LIMIT_STEP=120
#   LIMIT_LOADER=45 LIMIT_TRAIN=180 LIMIT_SUMMARY=15 (480 in all).
# A part that fails or runs out of time is recorded (steps.tsv, logs/) and the others still run; the
# exit status is non-zero if any part failed.
set -uo pipefail
case "${1:-${OUT_DIR:-gpu_check_out}}" in
  /*) OUT_DIR=${1:-${OUT_DIR:-gpu_check_out}} ;;
  *) OUT_DIR=$PWD/${1:-${OUT_DIR:-gpu_check_out}} ;;
esac
cd "$(dirname "$0")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-resnet50}
SIZE=${SIZE:-256}
BATCH=${BATCH:-32}
STEP_FLAGS=${STEP_FLAGS---bf16 --channels-last}
REPEATS=${REPEATS:-15}
STEPS=${STEPS:-300}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-3200}
TEST_SAMPLES=${TEST_SAMPLES:-500}
NUM_WORKERS=${NUM_WORKERS:-4}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
SHARDS=${SHARDS:-$OUT_DIR/shards}
RUN_NAME=gpu-check-$(date -u +%Y%m%d-%H%M%S)
CPUS=$(nproc 2>/dev/null || echo 1)
DRY=${DRY_RUN:-}
[ "$DRY" = 0 ] && DRY=
LOGS=$OUT_DIR/logs
STATUS=$OUT_DIR/steps.tsv
failed=0

# part NAME LIMIT_S STDOUT_FILE|- CMD...: run CMD under a time limit, stderr (and stdout for "-") to
# logs/NAME.log; record "NAME exit seconds" in steps.tsv. With DRY_RUN, print the command instead.
part() {
  local name=$1 limit=$2 out=$3
  shift 3
  if [ -n "$DRY" ]; then
    printf '[%s, <= %ss]' "$name" "$limit"
    local arg
    for arg in "$@"; do
      case "$arg" in
        *$'\n'*) printf ' %s' "<inline python: ${arg%%$'\n'*}>" ;;
        *) printf ' %q' "$arg" ;;
      esac
    done
    if [ "$out" != - ]; then printf ' > %q' "$out"; fi
    echo
    return 0
  fi
  echo "== $name (limit ${limit}s)" >&2
  local t0=$SECONDS rc
  if [ "$out" = - ]; then
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$out" 2>"$LOGS/$name.log"
  fi
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STATUS"
  if [ "$rc" -ne 0 ]; then
    failed=1
    echo "!! $name failed: exit $rc (124: over its ${limit}s limit); tail of $LOGS/$name.log:" >&2
    tail -n 15 "$LOGS/$name.log" >&2
  fi
  return "$rc"
}

# Fail fast: the imports the later parts need, and the GPU they are meant for.
ENV_PY=$(cat <<'PY'
# environment check
import json, sys
import torch, tomli_w, webdataset, accelerate
import aol_dist.cli, aol_dist.train  # noqa: F401
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"DEVICE={device} but torch {torch.__version__} sees no CUDA device")
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "python": sys.version.split()[0],
        "accelerate": accelerate.__version__}
if device.startswith("cuda"):
    p = torch.cuda.get_device_properties(torch.device(device))
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
print(json.dumps(info))
PY
)

# Summary of what the parts wrote: summary.json and summary.md in OUT_DIR.
SUMMARY_PY=$(cat <<'PY'
# summary
import json, statistics, sys, tomllib
from pathlib import Path

out, run_dir, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None

parts = {}
for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
    name, rc, secs = line.split("\t")
    parts[name] = {"exit": int(rc), "seconds": int(secs)}
env, step, loader = load("env.json"), load("bench_step.json"), load("bench_loader.json")
summary = {"env": env, "parts": parts, "run_dir": str(run_dir)}
md = ["# GPU check", ""]
if env:
    md.append(f"device: {env.get('gpu', env['device'])}, torch {env['torch']} (CUDA {env['cuda']})")
    md.append("")
variants = ("plain", "reference", "fast", "fast_autograd", "partial")
if step:
    c = step["config"]
    summary["bench_step"] = {v: {"s": step[f"{v}_s"], "ratio": step[f"{v}_ratio"], "images_per_s": batch / step[f"{v}_s"]}
                             for v in variants}
    mem = {k: v / 2**20 for k, v in step.items() if "_bytes_" in k}
    summary["memory_mib"] = mem
    summary["bench_step_config"] = c
    md += [f"## aol bench step: {c['arch']} {c['size']}x{c['size']}, batch {c['batch']}, M={c['label_sets']}, "
           f"{c['device']}{' bf16' if c['bf16'] else ''}{' channels_last' if c['channels_last'] else ''}, "
           f"median of {c['repeats']} rounds", "",
           "| variant | s / step | x plain | images/s |", "| --- | --- | --- | --- |"]
    md += [f"| {v} | {step[f'{v}_s']:.4f} | {step[f'{v}_ratio']:.2f} | {batch / step[f'{v}_s']:.0f} |" for v in variants]
    md += ["", "| memory of one step (CUDA: peak allocated; CPU: activations kept) | MiB |", "| --- | --- |"] + [f"| {k} | {v:.0f} |" for k, v in mem.items()]
    gain = step["fast_autograd_s"] / step["fast_s"] - 1
    verdict = ("keep method.batched_last_stage = true here" if gain > 0.03 else
               "set method.batched_last_stage = false here" if gain < -0.03 else
               "batched_last_stage makes no difference beyond 3 % here")
    summary["fast_vs_fast_autograd"] = {"fast_faster_by": gain, "verdict": verdict}
    md += ["", f"fast vs fast_autograd: fast_autograd / fast = {1 + gain:.3f} (fast is {100 * abs(gain):.1f} % "
               f"{'faster' if gain >= 0 else 'slower'}): {verdict}", ""]
log = run_dir / "log.jsonl"
if log.exists():
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    prev, rows = 0, []
    for r in records:
        rows.append((r["step"] - prev, r))
        prev = r["step"]
    steady = rows[1:] or rows  # the first window holds start-up (cuDNN autotuning, loader workers)
    seconds = sum(n * r["step_time_s"] for n, r in steady)
    wait = sum(r["data_wait_s"] for _, r in steady)
    all_seconds = sum(n * r["step_time_s"] for n, r in rows)
    train = {"steps": records[-1]["step"], "log_records": len(records),
             "samples_per_s": sum(n for n, _ in steady) * batch / seconds,
             "samples_per_s_median_window": statistics.median(r["samples_per_s"] for _, r in steady),
             "step_time_s": seconds / sum(n for n, _ in steady),
             "data_wait_share": wait / seconds, "data_wait_share_all": sum(r["data_wait_s"] for _, r in rows) / all_seconds,
             "first_window_step_time_s": rows[0][1]["step_time_s"], "final_loss": records[-1]["loss"],
             "attention": records[-1].get("attention")}
    try:  # what the run trained: the defaults of this checkout plus the overrides
        config = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, ValueError):
        config = {}
    keys = ("name", "trust", "trust_input", "meta_scope", "fast", "batched_last_stage")
    train["method"] = {k: config.get("method", {})[k] for k in keys if k in config.get("method", {})}
    train["precision"] = config.get("train", {}).get("precision")
    train["num_workers"] = config.get("data", {}).get("num_workers")
    summary["train"] = train
    method = ", ".join(f"{k}={v}" for k, v in train["method"].items())
    md += [f"## training: {train['steps']} steps, 1 process, batch {batch} (log.jsonl, first window of "
           f"{rows[0][0]} steps left out: {train['first_window_step_time_s']:.3f} s/step)", "",
           f"- method: {method}; precision {train['precision']}, {train['num_workers']} loader workers",
           f"- throughput: {train['samples_per_s']:.1f} samples/s ({train['step_time_s']:.4f} s/step; "
           f"median window {train['samples_per_s_median_window']:.1f} samples/s)",
           f"- data-wait share: {100 * train['data_wait_share']:.1f} % of wall time "
           f"({100 * train['data_wait_share_all']:.1f} % with the first window)",
           f"- final loss {train['final_loss']:.4f}, attention {train['attention']}", ""]
if loader:
    summary["loader"] = loader
    md += ["## aol bench loader (the training shards, 1 process, 1 thread)", "",
           f"- {loader['images_per_s_per_core']:.0f} images/s per CPU core ({loader['wall_images_per_s']:.0f}/s wall), "
           f"{loader['images']} {loader['image_format']} images {'x'.join(map(str, loader['image_shape']))}",
           f"- GPU consumes {loader['gpu_images_per_s']:.0f} images/s "
           f"({'estimate' if loader['gpu_rate_is_estimate'] else 'batch / fast_s measured above'}): "
           f"{loader['cores_per_gpu']:.2f} loader cores per GPU", ""]
md += ["## parts", "", "| part | exit | seconds |", "| --- | --- | --- |"]
md += [f"| {k} | {v['exit']} | {v['seconds']} |" for k, v in parts.items()]
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
)

if [ -z "$DRY" ]; then
  mkdir -p "$OUT_DIR" "$LOGS" || exit 1
  : >"$STATUS"
else
  echo "# DRY_RUN: OUT_DIR=$OUT_DIR PYTHON=$PYTHON"
fi

part env "${LIMIT_ENV:-60}" "$OUT_DIR/env.json" "$PYTHON" -c "$ENV_PY" "$DEVICE" || {
  echo "environment check failed: nothing else can run (see $LOGS/env.log)" >&2
  exit 1
}
if [ -n "$DRY" ] || [ ! -f "$SHARDS/manifest.json" ]; then  # built shards are reused
  part shards "${LIMIT_SHARDS:-60}" - "$PYTHON" -m aol_dist.cli shards synth --out "$SHARDS" --train "$TRAIN_SAMPLES" \
    --validate 0 --test "$TEST_SAMPLES" --image-size "$SIZE" --workers "$CPUS"
fi
# shellcheck disable=SC2086  # STEP_FLAGS are separate words
part bench_step "${LIMIT_STEP:-120}" "$OUT_DIR/bench_step.json" "$PYTHON" -m aol_dist.cli bench step --arch "$ARCH" \
  --size "$SIZE" --batch "$BATCH" $STEP_FLAGS --device "$DEVICE" --repeats "$REPEATS" --json

# the loader, against the rate the GPU consumed images at in the fast step just measured
rate_flag=()
if [ -n "$DRY" ]; then
  rate_flag=(--gpu-images-per-s "$BATCH/fast_s")  # fast_s: of bench_step.json
elif [ -s "$OUT_DIR/bench_step.json" ]; then
  rate=$("$PYTHON" -c 'import json, sys; print(int(sys.argv[2]) / json.load(open(sys.argv[1]))["fast_s"])' \
    "$OUT_DIR/bench_step.json" "$BATCH" 2>/dev/null) && rate_flag=(--gpu-images-per-s "$rate")
fi
part bench_loader "${LIMIT_LOADER:-45}" "$OUT_DIR/bench_loader.json" "$PYTHON" -m aol_dist.cli bench loader \
  --shards "$SHARDS" --split train --batch-size "$BATCH" "${rate_flag[@]}" --json

# one process without a launcher: accelerate's state is a single process on the first GPU (dist.init_world)
# shellcheck disable=SC2086  # TRAIN_OVERRIDES are separate words
part train "${LIMIT_TRAIN:-180}" - "$PYTHON" -m aol_dist.train --config configs/demo.toml data.shards="$SHARDS" \
  model.arch="$ARCH" data.batch_size="$BATCH" train.steps="$STEPS" data.num_workers="$NUM_WORKERS" \
  data.shuffle_buffer=512 train.log_every=10 train.checkpoint_every=0 train.plots=false train.eval_batch_size=100 \
  train.out_dir="$OUT_DIR/runs" train.run_name="$RUN_NAME" $TRAIN_OVERRIDES

RUN_DIR=$OUT_DIR/runs/$RUN_NAME
[ -n "$DRY" ] || [ -d "$RUN_DIR" ] || RUN_DIR=$OUT_DIR/runs/$RUN_NAME.incomplete  # an unfinished run still has its log
part summary "${LIMIT_SUMMARY:-15}" - "$PYTHON" -c "$SUMMARY_PY" "$OUT_DIR" "$RUN_DIR" "$BATCH"
if [ -z "$DRY" ]; then
  cat "$OUT_DIR/summary.md" 2>/dev/null
  echo "gpu_check: ${SECONDS}s in all; outputs in $OUT_DIR"
fi
exit "$failed"

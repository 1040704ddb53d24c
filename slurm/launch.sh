#!/usr/bin/env bash
# The one place that turns a SLURM allocation into an `accelerate launch` line, for one node.
# Every sbatch script here ends in this; with DRY_RUN=1 it prints the line instead of running it.
#
#   bash slurm/launch.sh RUN_CONFIG.toml [section.key=value ...]
#
# Hyper-parameters come from RUN_CONFIG.toml (and the overrides, if you must); nothing here sets one.
# The line always adds train.run_name (stable across a SLURM requeue: it is built from the job id)
# and train.resume=auto, so a requeued job continues from its newest checkpoint by itself.
#
# Read from the environment (SLURM sets the SLURM_* ones; the others are optional):
#   SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE,
#   SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID
#   LAUNCH_CONFIG  accelerate config; default launch_configs/gpu_8_ddp.yaml on one node,
#                  launch_configs/multi_node.yaml on several (DeepSpeed: launch_configs/deepspeed_zero1.yaml ...)
#   GPUS_PER_NODE  processes per node; default SLURM_GPUS_ON_NODE, else 8
#   GPU_IDS        which GPUs of the node, e.g. 0,1 (the scaling study uses the first GPUS_PER_NODE)
#   MAIN_PORT      rendezvous port on the head node; default 20000 + job id mod 20000
#   RUN_NAME       default <config name>-<job id> (array: <config name>-<array job id>_<task id>)
#   ACCELERATE     the accelerate executable; default .venv/bin/accelerate if present, else accelerate
#   DRY_RUN=1      print the line (shell-quoted, one line) and exit 0; fake SLURM_* values may be given
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: bash slurm/launch.sh RUN_CONFIG.toml [section.key=value ...]" >&2
  exit 2
fi
config=$1
shift
if [[ ! -f $config ]]; then
  echo "slurm/launch.sh: run config $config not found (run from the repository root)" >&2
  exit 2
fi

dry=${DRY_RUN:-0}
if [[ $dry != 1 && -z ${SLURM_JOB_ID:-} ]]; then
  echo "slurm/launch.sh: not inside a SLURM job (no SLURM_JOB_ID); use sbatch, or DRY_RUN=1 to print the line" >&2
  exit 2
fi

job_id=${SLURM_JOB_ID:-0}
nnodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
gpus=${gpus%%(*}  # SLURM may write e.g. "8(x2)"

# First host of a SLURM node list: "gpu[07-08,11],cpu01" -> gpu07; "a01,a02" -> a01.
first_host() {
  local list=$1
  if [[ $dry != 1 ]] && command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list" | head -n 1
  elif [[ $list =~ ^([^,\[]+)\[([^],-]+) ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  else
    echo "${list%%,*}"
  fi
}
head_node=$(first_host "${SLURM_JOB_NODELIST:-localhost}")

if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
  job_tag="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  job_tag=$job_id
fi
config_name=$(basename "$config" .toml)
run_name=${RUN_NAME:-${config_name}-${job_tag}}
job_number=${job_id//[^0-9]/}
port=${MAIN_PORT:-$((20000 + 10#${job_number:-0} % 20000))}

if [[ -z ${LAUNCH_CONFIG:-} ]]; then
  if [[ $nnodes -gt 1 ]]; then LAUNCH_CONFIG=launch_configs/multi_node.yaml; else LAUNCH_CONFIG=launch_configs/gpu_8_ddp.yaml; fi
fi
if [[ -z ${ACCELERATE:-} ]]; then
  if [[ -x .venv/bin/accelerate ]]; then ACCELERATE=.venv/bin/accelerate; else ACCELERATE=accelerate; fi
fi

cmd=("$ACCELERATE" launch --config_file "$LAUNCH_CONFIG"
     --num_machines "$nnodes" --machine_rank "$node_rank" --num_processes "$((nnodes * gpus))"
     --main_process_ip "$head_node" --main_process_port "$port")
if [[ -n ${GPU_IDS:-} ]]; then
  cmd+=(--gpu_ids "$GPU_IDS")
fi
cmd+=(-m aol_dist.train --config "$config" "train.run_name=$run_name" train.resume=auto "$@")

if [[ $dry == 1 ]]; then
  line=""
  for arg in "${cmd[@]}"; do  # quote only what the shell would split or expand
    if [[ $arg =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then line+=" $arg"; else line+=" $(printf '%q' "$arg")"; fi
  done
  echo "${line# }"
  exit 0
fi
echo "node $node_rank/$nnodes on $(hostname), head $head_node:$port, run $run_name${SLURM_RESTART_COUNT:+, requeued $SLURM_RESTART_COUNT time(s)}" >&2
exec "${cmd[@]}"

"""slurm/: every script parses (`bash -n`), and the dry run prints the exact launch lines for 1 and 2 nodes."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from aol_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch.sh", "single_node.sbatch", "multi_node.sbatch", "scaling_array.sbatch"]
ACCELERATE = ".venv/bin/accelerate" if (ROOT / ".venv/bin/accelerate").exists() else "accelerate"


def dry(script, *args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", f"slurm/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**clean, "DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", f"slurm/{script}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_one_node_launch_line():
    lines = dry("single_node.sbatch", "configs/paper.toml", SLURM_JOB_ID="1234", SLURM_NNODES="1",
                SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu17")
    assert lines == [
        f"{ACCELERATE} launch --config_file launch_configs/gpu_8_ddp.yaml --num_machines 1 --machine_rank 0 "
        "--num_processes 8 --main_process_ip gpu17 --main_process_port 21234 -m aol_dist.train "
        "--config configs/paper.toml train.run_name=paper-1234 train.resume=auto"]


def test_two_node_launch_lines_share_the_head_node_and_differ_in_machine_rank():
    lines = dry("multi_node.sbatch", "configs/paper.toml", "data.shards=/scratch/mimic shards",
                SLURM_JOB_ID="98765", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08,11],cpu01")
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line == (
            f"{ACCELERATE} launch --config_file launch_configs/multi_node.yaml --num_machines 2 --machine_rank {rank} "
            "--num_processes 16 --main_process_ip gpu07 --main_process_port 38765 -m aol_dist.train "
            "--config configs/paper.toml train.run_name=paper-98765 train.resume=auto "
            "data.shards=/scratch/mimic\\ shards")
    # the line is what the trainer accepts: its overrides load as a valid config
    args = shlex.split(lines[0])
    tail = args[args.index("--config") + 1:]
    config = load_config(tail[0], tail[1:])
    assert (config.train.run_name, config.train.resume, config.data.shards) == ("paper-98765", "auto", "/scratch/mimic shards")


def test_scaling_array_one_line_per_gpu_count():
    lines = dry("scaling_array.sbatch", "configs/paper.toml", SLURM_ARRAY_JOB_ID="555", SLURM_JOB_NODELIST="n1",
                GPU_COUNTS="1 2 4")
    assert [shlex.split(li)[shlex.split(li).index("--num_processes") + 1] for li in lines] == ["1", "2", "4"]
    assert "--gpu_ids 0,1 " in lines[1] and "train.run_name=scale-2gpu-555" in lines[1]


def test_no_hyper_parameters_in_sbatch_files():
    for script in SCRIPTS:
        code = [li for li in (ROOT / "slurm" / script).read_text().splitlines() if not li.lstrip().startswith("#")]
        for key in ("method.", "data.", "model.", "train.steps", "lr"):
            assert not any(key in li for li in code), f"{script} sets {key}"


def test_outside_slurm_without_dry_run_is_a_clear_error():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DRY_RUN"}
    proc = subprocess.run(["bash", "slurm/launch.sh", "configs/paper.toml"], cwd=ROOT, capture_output=True, text=True,
                          env=clean)
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr

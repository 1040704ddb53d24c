"""Faults on 2 gloo processes: an injected NaN under both policies, a rank that exits mid-step and a
rank that hangs mid-step (both under ``accelerate launch``: the job ends non-zero, in bounded time,
naming the rank)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from aol_dist import dist as D
from aol_dist.config import ConfigError, config_from_dict
from aol_dist.faults import parse_fault
from aol_dist.loop import train
from helpers import free_port, run_gloo, write_fake_shards

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_fake_shards(out, {"train": [16, 16], "test": [8]})
    return out


def _overrides(shards, runs, name, **train):
    values = {"data": {"shards": str(shards), "batch_size": 4, "shuffle_buffer": 4, "num_workers": 0},
              "model": {"arch": "resnet_tiny"}, "method": {"lr": 1e-3},
              "train": {"steps": 6, "log_every": 2, "checkpoint_every": 0, "out_dir": str(runs), "run_name": name,
                        "plots": False, **train}}
    return values


def _train(rank, world_size, values):
    train(config_from_dict(values), D.world_from_process_group())


def test_nan_on_one_rank_is_skipped_on_every_rank(shard_dir, tmp_path):
    run_gloo(_train, 2, _overrides(shard_dir, tmp_path, "skip", debug_fault="nan:1:3", nan_policy="skip"))
    run = tmp_path / "skip"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in log] == [(2, 0), (4, 1), (6, 1)]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in log)
    state = torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    assert state["optimizers"]["optimizer"]["state"][0]["step"].item() == 5  # 6 steps, one update skipped
    model = torch.load(run / "model.pt", weights_only=True)
    for part in ("model", "attention"):
        for k, v in model[part].items():  # batch-norm statistics the NaN batch touched were restored
            assert torch.isfinite(v.float()).all(), f"{part}.{k}"
    # checkpoint.save compares every rank's parameter fingerprint: the ranks stayed identical
    prints = [torch.load(run / "checkpoints" / "step-00000006" / f"rank-{r:05d}.pt", weights_only=True)["fingerprint"]
              for r in range(2)]
    assert prints[0] == prints[1]


def test_nan_on_one_rank_stops_every_rank_naming_step_rank_and_samples(shard_dir, tmp_path):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as info:
        run_gloo(_train, 2, _overrides(shard_dir, tmp_path, "stop", debug_fault="nan:1:3", nan_policy="stop"))
    message = str(info.value)
    assert re.search(r"non-finite loss at step 3 on rank 1 \(loss nan, samples s\d{6}, s\d{6}, s\d{6}, s\d{6}\); "
                     r"nan_policy = stop", message), message
    assert time.monotonic() - start < 50  # both ranks stopped: nobody waited for the 60 s collective timeout


def test_fault_strings_are_validated():
    assert parse_fault("hang:0:12").kind == "hang"
    for bad in ("nan:1", "boom:0:1", "exit:-1:2", "exit:0:0", "kill:a:b"):
        with pytest.raises(ConfigError, match="train.debug_fault"):
            config_from_dict({"train": {"debug_fault": bad}})


def _launch(shards, runs, name, fault, timeout_s):
    cmd = [BIN / "accelerate", "launch", "--config_file", "launch_configs/cpu_2proc.yaml",
           "--main_process_port", str(free_port()), "-m", "aol_dist.train",
           f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=4",
           "model.arch=resnet_tiny", "train.steps=6", f"train.out_dir={runs}", f"train.run_name={name}",
           f"train.debug_fault={fault}", f"train.collective_timeout_s={timeout_s}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, proc.stdout + proc.stderr, time.monotonic() - start


def test_a_rank_that_exits_mid_step_ends_the_job_naming_it(shard_dir, tmp_path):
    proc, out, seconds = _launch(shard_dir, tmp_path, "exit", "exit:1:3", timeout_s=30)
    assert proc.returncode != 0, out[-3000:]
    assert seconds < 90, f"took {seconds:.0f} s"  # start-up included; far less than the collective timeout
    # the launcher's summary names the rank that died as the root cause (the peer that noticed waits a
    # few seconds before it exits, so that it is not taken for the first failure; it may be ended first)
    root_cause = out[out.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: 3", root_cause), out[-3000:]
    assert (tmp_path / "exit.incomplete").is_dir() and not (tmp_path / "exit").exists()


def test_a_rank_that_hangs_mid_step_ends_the_job_within_the_timeout_naming_it(shard_dir, tmp_path):
    proc, out, seconds = _launch(shard_dir, tmp_path, "hang", "hang:1:3", timeout_s=4)
    assert proc.returncode != 0, out[-3000:]
    # timeout (4 s) + which-rank-answers check (4 s) + grace (3 s) + start-up of two processes
    assert seconds < 90, f"took {seconds:.0f} s"
    line = next((li for li in out.splitlines() if li.startswith("aol_dist.train: rank 0 of 2 failed")), "")
    assert "all-reduce of the batch-norm statistics of step 3 failed" in line, out[-3000:]
    assert "Ranks 1 failed to pass monitoredBarrier" in line, out[-3000:]


def _train_cli(*overrides):
    return subprocess.run([sys.executable, "-m", "aol_dist.train", "--config", str(ROOT / "configs" / "demo.toml"),
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_input_stops_training_in_one_line(shard_dir, tmp_path):
    """Bad input is the user's to fix: one line naming the file, no traceback (a bug keeps its traceback)."""
    proc = _train_cli(f"data.shards={tmp_path / 'nowhere'}", f"train.out_dir={tmp_path / 'runs'}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"aol_dist.train: rank 0 of 1 failed: ShardError: {tmp_path}/nowhere/manifest.json: no "
                                   f"manifest; build shards with `aol shards synth|mimic|... --out {tmp_path}/nowhere`")
    # a resume with nothing to resume: refused in one line
    proc = _train_cli(f"data.shards={shard_dir}", "model.arch=resnet_tiny", f"train.out_dir={tmp_path / 'runs'}",
                      "train.run_name=r", "train.resume=latest")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"aol_dist.train: rank 0 of 1 failed: RunRefused: FileNotFoundError: train.resume = "
                                   f"latest: no checkpoint in {tmp_path}/runs/r.incomplete/checkpoints")


_FAKE_LAUNCHER = """
import os, subprocess, sys, time
env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": sys.argv[2], "TORCHELASTIC_RUN_ID": "test", "OMP_NUM_THREADS": "1"}
rank = subprocess.Popen([sys.executable, "-m", "aol_dist.train", *sys.argv[3:]], env=env, start_new_session=True)
open(sys.argv[1], "w").write(str(rank.pid))
time.sleep(600)
"""


def test_a_rank_ends_with_its_launcher_even_in_a_session_of_its_own(shard_dir, tmp_path):
    """SIGKILL of a launcher whose rank runs in its own session (as torchrun's do) ends the rank too."""
    import subprocess

    from aol_dist.lifeline import alive

    pid_file = tmp_path / "rank.pid"
    launcher = subprocess.Popen([sys.executable, "-c", _FAKE_LAUNCHER, str(pid_file), str(free_port()),
                                 f"data.shards={shard_dir}",
                                 "data.num_workers=0", "model.arch=resnet_tiny", "method.name=majority",
                                 "train.steps=100000", f"train.out_dir={tmp_path}", "train.run_name=r"])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "r.incomplete" / "config.toml").exists():  # the rank is training
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.5)
        rank = int(pid_file.read_text())
        assert alive(rank)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while alive(rank) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(rank), "the rank outlived its launcher"
        assert (tmp_path / "r.incomplete").is_dir() and not (tmp_path / "r").exists()
    finally:
        launcher.kill()
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), 9)


def test_a_refused_resume_is_not_reported_as_a_dead_peer():
    """The refusal lists train.collective_timeout_s among the keys that may change; it is the rank's own
    error, not "a collective failed: another rank died"."""
    from aol_dist.train import collective_failure

    refused = ValueError("ckpt: config differs in ['method.lr']; only ['train.collective_timeout_s', "
                         "'train.steps'] may change on resume")
    assert not collective_failure(refused)
    assert collective_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert collective_failure(RuntimeError("all-reduce of the batch-norm statistics of step 3 failed: timed out after 10 s"))

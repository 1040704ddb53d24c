"""train.precision: bf16 autocast for the step (GPU default; forced here on the CPU), float32 weights."""

import json
from contextlib import nullcontext

import pytest
import torch

from aol_dist.config import config_from_dict
from aol_dist.dist import World
from aol_dist.loop import step_autocast, train
from helpers import write_fake_shards


def run(tmp_path, precision):
    config = config_from_dict({
        "data": {"shards": str(tmp_path / "shards"), "batch_size": 4, "num_workers": 0},
        "model": {"arch": "resnet_tiny"},
        "method": {"lr": 1e-3},
        "train": {"steps": 3, "log_every": 1, "out_dir": str(tmp_path / "runs"), "run_name": precision,
                  "precision": precision, "plots": False},
    })
    run_dir = train(config, World())
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return torch.load(run_dir / "model.pt", weights_only=True)["model"], losses


def test_bf16_step_keeps_float32_weights_and_changes_the_arithmetic(tmp_path):
    write_fake_shards(tmp_path / "shards", {"train": [8, 8], "test": [4]})
    fp32, fp32_losses = run(tmp_path, "fp32")
    bf16, bf16_losses = run(tmp_path, "bf16")
    assert all(v.dtype == torch.float32 for k, v in bf16.items() if v.is_floating_point())
    assert all(map(lambda x: x == x, bf16_losses))  # finite
    assert bf16_losses != fp32_losses  # autocast really lowered the arithmetic
    # first step: attention starts uniform, so the targets agree and only bf16 rounding of the logits differs
    torch.testing.assert_close(bf16_losses[0], fp32_losses[0], rtol=0.02, atol=0.0)


def test_auto_means_bf16_on_cuda_only():
    assert isinstance(step_autocast("auto", torch.device("cpu")), type(step_autocast("fp32", torch.device("cpu"))))
    # on a machine without CUDA, torch says it will not lower anything: expected here, where no step runs
    with pytest.warns(UserWarning, match="CUDA is not available") if not torch.cuda.is_available() else nullcontext():
        assert isinstance(step_autocast("auto", torch.device("cuda")), torch.autocast)

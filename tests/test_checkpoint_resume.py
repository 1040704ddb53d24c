"""Checkpoints and exact resume: a 2-process run SIGKILLed after a checkpoint and resumed with
``train.resume=latest`` ends identical to an uninterrupted run; ``resume=auto`` for requeued jobs."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from aol_dist import checkpoint
from aol_dist import dist as D
from aol_dist.config import config_from_dict
from aol_dist.loop import train
from helpers import run_gloo

# 64 samples, 2 ranks x batch 4: 8 steps per epoch. 12 steps cross an epoch boundary; the checkpoint
# at step 5 falls inside a log window (log_every 2) and inside the epoch; the kill comes at step 7.
STEPS, CHECKPOINT_EVERY, KILL_AT = 12, 5, 7


def _config(shards, runs, name, **train):
    return config_from_dict({
        # hand-labelled studies fit the annotator model (data/gold.py): their draws resume exactly too
        "data": {"shards": str(shards), "batch_size": 4, "shuffle_buffer": 8, "num_workers": 2,
                 "gold_split": "train", "gold_samples": 24},
        "model": {"arch": "resnet_tiny"},
        "method": {"lr": 1e-3},
        "train": {"steps": STEPS, "log_every": 2, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 2,
                  "out_dir": str(runs), "run_name": name, "eval_batch_size": 8, "plots": False, **train},
    })


def _train(rank, world_size, shards, runs, name, train_overrides, ds_json=""):
    # a spawned process would start its DataLoader workers by spawn too (seconds each, every epoch);
    # under torchrun / accelerate launch they fork, as here
    mp.set_start_method("fork", force=True)
    if ds_json:  # what `accelerate launch --config_file launch_configs/deepspeed_zero2.yaml` sets
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=ds_json)
    train(_config(shards, runs, name, **train_overrides), D.world_from_process_group())


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(run_shards, tmp_path_factory):
    """The uninterrupted run (default launch) every interrupted one is compared with."""
    runs = tmp_path_factory.mktemp("whole")
    run_gloo(_train, 2, run_shards, runs, "whole", {})
    return runs / "whole"


def _deepspeed_zero2(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install 'aol_dist[deepspeed]'")
    ds = json.loads((Path(__file__).resolve().parents[1] / "launch_configs" / "deepspeed_zero2.json").read_text())
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps({**ds, "train_micro_batch_size_per_gpu": 4}))
    return str(path)


@pytest.mark.parametrize("launch", ["default", "deepspeed_zero2"])
def test_killed_run_resumed_from_latest_equals_uninterrupted_run(run_shards, whole, tmp_path, launch):
    # DeepSpeed: ZeRO-2's partitioned optimizer state goes through engine.save/load_checkpoint; the
    # uninterrupted run is the default launch, so this also shows the ZeRO-2 loop equals it
    ds_json = _deepspeed_zero2(tmp_path) if launch == "deepspeed_zero2" else ""
    runs = tmp_path / "runs"
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_gloo(_train, 2, run_shards, runs, "cut", {"debug_fault": f"kill:1:{KILL_AT}"}, ds_json)
    work = runs / "cut.incomplete"
    assert [p.name for p in checkpoint.list_checkpoints(work)] == ["step-00000005"]
    assert [r["step"] for r in _log(work)] == [2, 4, 6]  # step 6 was logged before the kill

    run_gloo(_train, 2, run_shards, runs, "cut", {"resume": "latest"}, ds_json)
    cut = runs / "cut"
    assert cut.is_dir() and not work.exists()

    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (whole, cut))
    for part in ("model", "attention"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    la, lb = _log(whole), _log(cut)
    assert [r["step"] for r in lb] == [2, 4, 6, 8, 10, 12]  # the re-logged step 6 replaced the old one
    for ra, rb in zip(la, lb):
        keys = ("step", "epoch", "loss", "attention", "estimated_accuracy")
        assert [ra[k] for k in keys] == [rb[k] for k in keys]
    assert json.loads((whole / "auc_test.json").read_text())["auc"] == json.loads((cut / "auc_test.json").read_text())["auc"]
    assert json.loads((whole / "attention.json").read_text()) == json.loads((cut / "attention.json").read_text())

    # keep_checkpoints = 2: steps 10 and 12 (the end) remain; every rank file holds the same fingerprint
    kept = checkpoint.list_checkpoints(cut)
    assert [p.name for p in kept] == ["step-00000010", "step-00000012"]
    state = torch.load(kept[-1] / "state.pt", weights_only=True)
    assert state["step"] == 12 and state["cursor"] == [1, 4] and state["world_size"] == 2
    assert state["config"]["train"]["resume"] == "latest"
    if launch == "default":
        assert set(state["optimizers"]) == {"optimizer", "attention_optimizer"}
    else:  # ZeRO's optimizer state is partitioned: one file per rank, written by DeepSpeed
        assert state["optimizers"] == {} and (kept[-1] / "deepspeed" / "zero").is_dir()
    prints = [torch.load(kept[-1] / f"rank-{r:05d}.pt", weights_only=True)["fingerprint"] for r in range(2)]
    assert prints[0] == prints[1]


def _single(shards, runs, name, **train_overrides):
    config = _config(shards, runs, name, **train_overrides)
    return config, D.World()


def test_resume_auto_starts_resumes_or_finds_the_run_finished(run_shards, tmp_path):
    runs = tmp_path / "runs"
    config, world = _single(run_shards, runs, "job-42", resume="auto", steps=3, checkpoint_every=2)
    fresh = checkpoint.open_run_dir(config, world)
    assert fresh.resume_from is None and fresh.work == runs / "job-42.incomplete" and not fresh.finished

    with pytest.raises(RuntimeError, match="simulated preemption"):
        _train_then_fail(config, world, fail_at=3)  # checkpoint at 2, dies in step 3
    again = checkpoint.open_run_dir(config, world)
    assert again.resume_from == runs / "job-42.incomplete" / "checkpoints" / "step-00000002"

    final = train(config, world)  # the requeued job: resumes by itself and finishes
    assert final == runs / "job-42" and final.is_dir()
    assert [r["step"] for r in _log(final)] == [2, 3]
    assert checkpoint.open_run_dir(config, world).finished  # requeued once more: nothing to do


def _train_then_fail(config, world, fail_at):
    from aol_dist import faults

    original = faults.StepGuard.before

    def before(self, batch, step):
        if step == fail_at:
            raise RuntimeError("simulated preemption")
        return original(self, batch, step)

    faults.StepGuard.before = before
    try:
        train(config, world)
    finally:
        faults.StepGuard.before = original


def test_resume_refuses_what_would_not_be_the_same_run(run_shards, tmp_path):
    runs = tmp_path / "runs"
    config, world = _single(run_shards, runs, "r", steps=2, checkpoint_every=1)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _train_then_fail(config, world, fail_at=2)

    with pytest.raises(checkpoint.RunRefused, match="FileExistsError: .* holds checkpoints of an unfinished run"):
        checkpoint.open_run_dir(config, world)  # resume = "": never silently on top of an unfinished run
    changed, _ = _single(run_shards, runs, "r", resume="latest", steps=2)
    changed = config_from_dict({**changed.to_dict(), "method": {**changed.to_dict()["method"], "lr": 0.5}})
    with pytest.raises(checkpoint.RunRefused, match=r"config differs in \['method.lr'\]"):
        train(changed, world)
    ckpt = checkpoint.latest(runs / "r.incomplete")
    from aol_dist.parts import build_parts
    from aol_dist.data.shards import read_manifest

    parts = build_parts(config, read_manifest(run_shards), world)
    with pytest.raises(checkpoint.RunRefused, match="written by 1 ranks; this job has 2"):
        checkpoint.load(ckpt, parts.modules(), {}, config, D.World(rank=0, world_size=2), [])
    missing, _ = _single(run_shards, runs, "nothing-here", resume="latest")
    with pytest.raises(checkpoint.RunRefused, match="no checkpoint in"):
        checkpoint.open_run_dir(missing, world)


def test_loop_state_resumed_inside_the_reported_window_reports_what_an_uninterrupted_run_does(tmp_path):
    """The end-to-end resume above restores a checkpoint from before the reported window (TRUST_FROM); here the
    loop state is saved and restored (through torch.save, as a checkpoint) in the middle of it: the sums of
    weights and estimated accuracies, their step count and the first reported step all carry on."""
    from aol_dist.loop import LoopState

    g = torch.Generator().manual_seed(0)
    outs = [{"loss": torch.rand((), generator=g), "weights": torch.rand(4, 3, 5, generator=g),
             "right": torch.rand(4, 3, 5, generator=g)} for _ in range(10)]

    def run(state, steps):
        for i in steps:
            state.step += 1
            state.add(outs[i], applied=True, reported=state.step > 4)
        return state

    whole = run(LoopState(3, 5, torch.device("cpu")), range(10))
    cut = run(LoopState(3, 5, torch.device("cpu")), range(7))
    torch.save(cut.state_dict(), tmp_path / "loop.pt")
    resumed = LoopState(3, 5, torch.device("cpu"))
    resumed.load_state_dict(torch.load(tmp_path / "loop.pt", weights_only=True))
    resumed = run(resumed, range(7, 10))
    assert (resumed.reported_from, resumed.reported_steps) == (whole.reported_from, whole.reported_steps) == (5, 6)
    torch.testing.assert_close(resumed.weight_sum, whole.weight_sum)
    torch.testing.assert_close(resumed.right_sum, whole.right_sum)
    torch.testing.assert_close(whole.right_sum, sum(o["right"].double().mean(0) for o in outs[4:]))


@pytest.mark.parametrize("launch", ["default", "deepspeed_zero2"])
def test_three_ranks_killed_and_resumed_equal_an_uninterrupted_run(tmp_path, launch):
    """Exact resume beyond two ranks: 3 ranks, 96 samples in 6 shards (8 steps an epoch at batch 4), the same
    kill after the step-5 checkpoint; every parameter, log record and attention.json as uninterrupted. The
    default launch with train.ddp_fixed_buckets: without it, DDP's bucket rebuild after the first step of the
    resumed process sums that step's gradients in another grouping, and the runs part by float rounding
    (docs/distributed.md). ZeRO-2 needs nothing: its optimizer state, partitioned unevenly over 3 ranks, comes
    back whole through DeepSpeed's checkpoint (compared with an uninterrupted ZeRO-2 run)."""
    from helpers import write_fake_shards

    shards = tmp_path / "shards"
    write_fake_shards(shards, {"train": [16] * 6, "test": [8, 8]})
    runs = tmp_path / "runs"
    ds_json = _deepspeed_zero2(tmp_path) if launch == "deepspeed_zero2" else ""
    fixed = {} if ds_json else {"ddp_fixed_buckets": True}
    run_gloo(_train, 3, shards, runs, "whole", fixed, ds_json)
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_gloo(_train, 3, shards, runs, "cut", {**fixed, "debug_fault": f"kill:2:{KILL_AT}"}, ds_json)
    run_gloo(_train, 3, shards, runs, "cut", {**fixed, "resume": "latest"}, ds_json)
    whole, cut = runs / "whole", runs / "cut"
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (whole, cut))
    for part in ("model", "attention"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    keys = ("step", "epoch", "loss", "attention", "estimated_accuracy")
    assert [[r[k] for k in keys] for r in _log(whole)] == [[r[k] for k in keys] for r in _log(cut)]
    assert json.loads((whole / "attention.json").read_text()) == json.loads((cut / "attention.json").read_text())
    state = torch.load(checkpoint.list_checkpoints(cut)[-1] / "state.pt", weights_only=True)
    assert state["world_size"] == 3 and (state["optimizers"] == {}) == bool(ds_json)

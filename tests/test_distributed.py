"""Two gloo processes on the CPU: identical ranks, equal to a single-process reference, synced AUROC,
uneven shards without hangs, and the whole training loop."""

import copy
import json
from pathlib import Path

import torch

from aol_dist import dist as D
from aol_dist.config import config_from_dict
from aol_dist.data.shards import read_manifest, split_shards
from aol_dist.data.stream import EvalStream, make_loader
from aol_dist.evaluate import evaluate
from aol_dist.loop import train
from aol_dist.method.aol import AolHyper, aol_loss, aol_step
from aol_dist.model.attention import LabelAttention
from aol_dist.model.backbone import Classifier
from helpers import FINDINGS, LABEL_SETS, run_gloo, write_fake_shards

M, N, B, STEPS = 3, 5, 4, 3
HP = AolHyper(meta_lr=0.2, k=5.0, threshold=0.5)


def make_parts():
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", N).double()
    attention = LabelAttention(model.feature_dim, M, N).double()
    torch.nn.init.normal_(attention.attn_fc.weight, std=0.1)
    return model, attention, torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(attention.parameters(), lr=0.5)


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.rand(B, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 2, (B, M, N), generator=g).double()


def _train_ranks(rank, world_size, out):
    world = D.world_from_process_group()
    model, attention, opt, att_opt = make_parts()
    params = list(model.parameters()) + list(attention.parameters())
    buffers = list(model.buffers())
    for step in range(STEPS):
        x, y = batch(rank, step)
        aol_step(model, attention, opt, att_opt, x, y, HP, lambda: D.average_gradients(params, world, buffers))
    torch.save({"model": model.state_dict(), "attention": attention.state_dict()}, Path(out) / f"rank{rank}.pt")


def test_ranks_identical_and_equal_to_single_process_gradient_averaging(tmp_path):
    run_gloo(_train_ranks, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for part in ("model", "attention"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"ranks differ in {part}.{k}"

    # single process: run each rank's half of the step on its own copy, average the gradients ourselves
    model, attention, opt, att_opt = make_parts()
    for step in range(STEPS):
        grads, buffers = [], []
        for rank in range(2):
            m, a = copy.deepcopy(model), copy.deepcopy(attention)
            x, y = batch(rank, step)
            loss, _, _ = aol_loss(m, a, x, y, HP)
            grads.append(torch.autograd.grad(loss, list(m.parameters()) + list(a.parameters())))
            buffers.append([b.clone() for b in m.buffers()])
        for p, g0, g1 in zip(list(model.parameters()) + list(attention.parameters()), *grads):
            p.grad = (g0 + g1) / 2
        with torch.no_grad():
            for b, b0, b1 in zip(model.buffers(), *buffers):
                b.copy_((b0 + b1) / 2 if b.is_floating_point() else b0)
        opt.step()
        att_opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0["model"][k], v, rtol=1e-10, atol=1e-12, msg=f"model.{k}")
    for k, v in attention.state_dict().items():
        torch.testing.assert_close(r0["attention"][k], v, rtol=1e-10, atol=1e-12, msg=f"attention.{k}")


def _evaluate_ranks(rank, world_size, shard_dir, out):
    world = D.world_from_process_group()
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", len(FINDINGS))
    manifest = read_manifest(shard_dir)
    stream = EvalStream(split_shards(shard_dir, manifest, "test"), rank, world_size, batch_size=4)
    result = evaluate(model, make_loader(stream, 0), list(LABEL_SETS), list(FINDINGS), world)
    (Path(out) / f"eval{rank}.json").write_text(json.dumps(result))


def test_synced_auroc_equals_single_process_auroc(tmp_path):
    # distinct pixel values per sample so predictions differ; 23 samples do not split evenly over 2 ranks
    write_fake_shards(tmp_path, {"test": [9, 7, 7]})
    run_gloo(_evaluate_ranks, 2, str(tmp_path), str(tmp_path))
    (tmp_path / "single").mkdir()
    _evaluate_ranks(0, 1, tmp_path, tmp_path / "single")  # no process group: the whole split in one process
    r0, r1, single = (json.loads(p.read_text()) for p in
                      (tmp_path / "eval0.json", tmp_path / "eval1.json", tmp_path / "single" / "eval0.json"))
    assert r0 == r1
    assert r0["samples"] == single["samples"] == 23
    for target in single["auc"]:
        torch.testing.assert_close(torch.tensor(r0["auc"][target]), torch.tensor(single["auc"][target]), equal_nan=True)


def _train_loop(rank, world_size, shard_dir, out, method=None):
    config = config_from_dict({
        "data": {"shards": shard_dir, "batch_size": 4, "shuffle_buffer": 4, "num_workers": 0, "eval_splits": ["test"]},
        "model": {"arch": "resnet_tiny"},
        "method": {"lr": 1e-3, **(method or {})},
        "train": {"steps": 7, "log_every": 2, "out_dir": out, "run_name": "r", "eval_batch_size": 8},
    })
    train(config, D.world_from_process_group())


def test_uneven_shards_train_loop_finishes_on_both_ranks(tmp_path):
    # rank 0 or 1 may draw the 30-sample shard: the other has 6 samples and must re-read them
    write_fake_shards(tmp_path / "shards", {"train": [30, 2, 2, 2], "test": [6, 6]})
    run_gloo(_train_loop, 2, str(tmp_path / "shards"), str(tmp_path / "runs"))
    run = tmp_path / "runs" / "r"
    assert run.is_dir() and not (tmp_path / "runs" / "r.incomplete").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 7]
    assert set(log[0]["attention"]) == set(LABEL_SETS)
    auc = json.loads((run / "auc_test.json").read_text())
    assert auc["samples"] == 12 and set(auc["auc"]) == {"truth", *LABEL_SETS}
    assert (run / "model.pt").is_file() and (run / "attention.json").is_file() and (run / "config.toml").is_file()


def test_eval_and_audit_without_a_launcher_use_the_gpu(monkeypatch):
    """``aol eval`` / ``aol audit`` in one process: the first GPU where there is one, as training picks (they
    ran on the CPU beside an idle H200 before); no process group is started."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    world = D.command_world()
    assert world.device == torch.device("cuda", 0) and world.world_size == 1 and world.is_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.command_world().device == torch.device("cpu")


def test_regime_network_statistics_are_the_same_on_every_rank(tmp_path):
    """method.regimes = 2 adds a network on the image with batch norm of its own: its running statistics are
    averaged with the classifier's, or the ranks' checkpoint fingerprints differ and the save refuses."""
    write_fake_shards(tmp_path / "shards", {"train": [8, 8, 8, 8], "test": [4, 4]})
    run_gloo(_train_loop, 2, str(tmp_path / "shards"), str(tmp_path / "runs"), {"regimes": 2})
    state = torch.load(tmp_path / "runs" / "r" / "model.pt", weights_only=True)["attention"]
    assert any(k.startswith("regime_net.") and k.endswith("running_mean") for k in state)

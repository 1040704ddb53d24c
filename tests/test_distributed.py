"""Two gloo processes on the CPU: identical ranks, equal to a single-process reference, synced AUROC,
uneven shards without hangs, and the whole training loop."""

import copy
import json
from dataclasses import replace
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
from helpers import FINDINGS, LABEL_SETS, outer_step_tools, run_gloo, write_fake_shards

M, N, B, STEPS, TEXT = 3, 5, 4, 3, 6
HP = AolHyper(meta_lr=0.2, k=5.0, threshold=0.5)
VARIANTS = {  # name: (hyper-parameters, gradient checkpointing, image+text mode)
    "reference": (replace(HP, fast=False), False, False),
    "reference_checkpointed": (replace(HP, fast=False), True, False),
    "fast": (replace(HP, batched=False), False, False),
    "fast_checkpointed": (replace(HP, batched=False), True, False),
    "batched": (HP, False, False),
    "batched_checkpointed": (HP, True, False),
    "batched_text": (HP, False, True),
}


def make_parts(checkpointing=False, text=False):
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", N, text_dim=TEXT if text else 0, checkpointing=checkpointing).double()
    attention = LabelAttention(model.feature_dim, M, N).double()
    torch.nn.init.normal_(attention.attn_fc.weight, std=0.1)
    return model, attention, torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(attention.parameters(), lr=0.5)


def batch(rank, step, text=False):
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.rand(B, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 2, (B, M, N), generator=g).double()
    return x, y, (torch.randn(B, TEXT, generator=g, dtype=torch.float64) if text else None)


def _train_ranks(rank, world_size, out):
    world = D.world_from_process_group()
    results = {}
    for name, (hp, checkpointing, text) in VARIANTS.items():
        model, attention, opt, att_opt = make_parts(checkpointing, text)
        forward, guard = outer_step_tools(world, model, attention)
        for step in range(STEPS):
            x, y, t = batch(rank, step, text)
            aol_step(model, attention, opt, att_opt, x, y, hp, guard, t, forward=forward)
        results[name] = {"model": model.state_dict(), "attention": attention.state_dict()}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _single_process(hp, checkpointing, text):
    """Each rank's half of every step on its own copy, the gradients and statistics averaged by hand, on one
    thread as the ranks (another thread count sums the text layers' products in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _averaged_by_hand(hp, checkpointing, text)
    finally:
        torch.set_num_threads(threads)


def _averaged_by_hand(hp, checkpointing, text):
    model, attention, opt, att_opt = make_parts(checkpointing, text)
    for step in range(STEPS):
        grads, buffers = [], []
        for rank in range(2):
            m, a = copy.deepcopy(model), copy.deepcopy(attention)
            x, y, t = batch(rank, step, text)
            loss, _, _ = aol_loss(m, a, x, y, hp, t)
            grads.append(torch.autograd.grad(loss, list(m.parameters()) + list(a.parameters())))
            buffers.append([b.clone() for b in m.buffers()])
        for p, g0, g1 in zip(list(model.parameters()) + list(attention.parameters()), *grads):
            p.grad = (g0 + g1) / 2
        with torch.no_grad():
            for b, b0, b1 in zip(model.buffers(), *buffers):
                b.copy_((b0 + b1) / 2 if b.is_floating_point() else b0)
        opt.step()
        att_opt.step()
    return {"model": model.state_dict(), "attention": attention.state_dict()}


def test_ddp_ranks_identical_and_equal_to_single_process_gradient_averaging(tmp_path):
    """DDP's outer step (reference, fast, batched last stage; checkpointing on and off; image+text) gives
    the parameters, attention and batch-norm statistics of one process that averages both ranks' gradients."""
    run_gloo(_train_ranks, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    start = make_parts()[0].state_dict()
    for name, variant in VARIANTS.items():
        for part in ("model", "attention"):
            for k in r0[name][part]:
                assert torch.equal(r0[name][part][k], r1[name][part][k]), f"{name}: ranks differ in {part}.{k}"
        assert not torch.equal(r0[name]["model"]["stages.0.bn1.running_mean"], start["stages.0.bn1.running_mean"])
        single = _single_process(*variant)
        for part in ("model", "attention"):
            for k, v in single[part].items():
                torch.testing.assert_close(r0[name][part][k], v, rtol=1e-10, atol=1e-12, msg=f"{name}: {part}.{k}")


def _count_collectives(counts):
    """Count every collective called from Python (DDP's comm hooks call them too)."""
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier"):
        def counted(*args, _call=getattr(dist, name), **kwargs):
            counts["collectives"] += 1
            return _call(*args, **kwargs)
        setattr(dist, name, counted)


def _counted_bucket(counts, state, bucket):
    """DDP's default reduction of one bucket (average by all-reduce), counted."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counts["buckets"] += 1
    return default_hooks.allreduce_hook(state, bucket)


def _watch_meta_passes(rank, world_size, out):
    """Each step's forward (the M meta passes inside it) under DDP: what it sends, what it leaves in .grad;
    the paper's attention (reference, fast, batched; checkpointing off and on) and the trust head on meta features."""
    from aol_dist.method import aol, trust

    world = D.world_from_process_group()
    counts, seen = {"collectives": 0, "buckets": 0}, []
    _count_collectives(counts)

    def record(phase, params, before):
        seen.append({"phase": phase, "sent": {k: counts[k] - before[k] for k in counts},
                     "grads": [p.grad is not None for p in params]})

    def watch(name, model, head, step, module, loss_name):
        """``step(i, forward, guard)`` STEPS times, ``module``'s meta passes and loss computation watched."""
        forward, guard = outer_step_tools(world, model, head)
        forward.register_comm_hook(None, lambda state, bucket: _counted_bucket(counts, state, bucket))
        params = [*model.parameters(), *head.parameters()]
        originals = {f: getattr(module, f) for f in ("meta_features_reference", "meta_features_fast",
                                                     "meta_features_batched", loss_name) if hasattr(module, f)}

        def watched(fn, phase):
            def run(*args, **kwargs):
                before = dict(counts)
                result = fn(*args, **kwargs)
                record(phase, params, before)
                return result
            return run
        for f, fn in originals.items():
            setattr(module, f, watched(fn, f"{name}: {'forward' if f == loss_name else 'meta'}"))
        try:
            for i in range(STEPS):
                before = dict(counts)
                step(i, forward, guard)
                record(f"{name}: step", params, before)
        finally:
            for f, fn in originals.items():
                setattr(module, f, fn)

    for name, (hp, checkpointing, text) in VARIANTS.items():
        if not text:
            model, attention, opt, att_opt = make_parts(checkpointing)
            watch(name, model, attention, lambda i, forward, guard: aol_step(
                model, attention, opt, att_opt, *batch(rank, i)[:2], hp, guard, forward=forward), aol, "aol_loss")
    model = make_parts()[0]
    head = trust.LabelTrust(model.feature_dim, M, N, input="meta").double()
    opt, head_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(head.parameters(), lr=1e-2)
    watch("trust_meta", model, head, lambda i, forward, guard: trust.trust_step(
        model, head, opt, head_opt, *batch(rank, i)[:2], trust.TrustHyper(input="meta"), guard, forward=forward),
        trust, "trust_loss")
    (Path(out) / f"seen{rank}.json").write_text(json.dumps(seen))


def test_meta_passes_stay_outside_ddps_reduction(tmp_path):
    """Eq. 1's meta-gradients stay on their rank: during the forward, M meta passes included, DDP reduces
    no bucket, no collective runs and no .grad is filled; the step's backward then reduces every bucket
    (reference, fast and batched steps, checkpointing off and on; the trust head on meta features)."""
    run_gloo(_watch_meta_passes, 2, str(tmp_path))
    for rank in range(2):
        seen = json.loads((tmp_path / f"seen{rank}.json").read_text())
        meta = [s for s in seen if s["phase"].endswith(": meta")]
        forwards = [s for s in seen if s["phase"].endswith(": forward")]
        steps = [s for s in seen if s["phase"].endswith(": step")]
        assert len(forwards) == len(steps) == len(meta) == STEPS * len(VARIANTS)  # 6 image-only + trust
        for s in meta + forwards:
            assert s["sent"] == {"collectives": 0, "buckets": 0}, s
            assert not any(s["grads"]), s
        for s in steps:  # DDP's buckets in backward, and the guard's one all-reduce of the statistics
            assert s["sent"]["buckets"] >= 1 and s["sent"]["collectives"] == s["sent"]["buckets"] + 1, s
            assert all(s["grads"]), s


def _compressed_ranks(rank, world_size, out):
    world = D.world_from_process_group()
    results = {}
    for compression in ("none", "bf16", "fp16"):
        model, attention, opt, att_opt = make_parts()
        model, attention = model.float(), attention.float()
        forward, guard = outer_step_tools(world, model, attention, compression)
        params, losses = [*model.parameters(), *attention.parameters()], []
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 * step + rank)  # 16 samples of 32 x 32: batch norm less erratic
            x, y = torch.rand(16, 1, 32, 32, generator=g), torch.randint(0, 2, (16, M, N), generator=g).float()
            losses.append(float(aol_step(model, attention, opt, att_opt, x, y, HP, guard, forward=forward)["loss"]))
            if step == 0:
                first = torch.cat([p.grad.flatten() for p in params])  # averaged over the ranks, as applied
        results[compression] = {"grad": first, "losses": losses, "params": torch.cat([p.detach().flatten() for p in params])}
    torch.save(results, Path(out) / f"compressed{rank}.pt")


def test_grad_compression_stays_close_to_the_uncompressed_run(tmp_path):
    """bf16 / fp16 gradients (DDP compression hooks): ranks identical; the first averaged gradient within the
    format's rounding of the float32 one but not equal to it (the hook is in use); after 3 Adam steps the
    losses within 2 % and the parameters within a quarter of how far the float32 run moved them (Adam's
    normalised step turns the rounding of near-zero gradients into whole steps, docs/distributed.md)."""
    run_gloo(_compressed_ranks, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"compressed{r}.pt") for r in range(2))
    model, attention = (m.float() for m in make_parts()[:2])
    start = torch.cat([p.detach().flatten() for p in (*model.parameters(), *attention.parameters())])
    exact = r0["none"]
    for compression, rounding in (("bf16", 2 ** -8), ("fp16", 2 ** -11)):
        run = r0[compression]
        assert torch.equal(run["params"], r1[compression]["params"]), f"{compression}: ranks differ"
        grad_error = float((run["grad"] - exact["grad"]).norm() / exact["grad"].norm())
        assert 0 < grad_error < rounding, f"{compression}: first gradient off by {grad_error:.2e}"
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(exact["losses"]), rtol=0.02, atol=0)
        drift = float((run["params"] - exact["params"]).norm() / (exact["params"] - start).norm())
        assert 0 < drift < 0.25, f"{compression}: parameters {drift:.2e} of the float32 run's movement apart"


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


def _train_loop(rank, world_size, shard_dir, out, methods=({},), steps=7):
    for i, method in enumerate(methods):
        config = config_from_dict({
            "data": {"shards": shard_dir, "batch_size": 4, "shuffle_buffer": 4, "num_workers": 0, "eval_splits": ["test"]},
            "model": {"arch": "resnet_tiny"},
            "method": {"lr": 1e-3, **method},
            "train": {"steps": steps, "log_every": 2, "out_dir": out, "run_name": f"r{i or ''}", "eval_batch_size": 8,
                      "plots": False},
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
    # the default's regime network has batch norm of its own: the end's checkpoint is written only if its
    # running statistics, averaged with the classifier's, are the same on both ranks (fingerprints)
    state = torch.load(run / "model.pt", weights_only=True)["attention"]
    assert any(k.startswith("regime_net.") and k.endswith("running_mean") for k in state)


LOOP_METHODS = ({"name": "aol", "trust": "attention"}, {"name": "cm"}, {"name": "majority"},
                {"name": "aol", "trust_input": "meta", "meta_scope": "partial"})


def test_every_method_trains_through_ddp(tmp_path):
    """The loop on 2 ranks with the paper's attention, CM (its matrices wrapped with the classifier), a plain
    baseline (the classifier alone: the unused attention is not wrapped) and the trust head on meta features."""
    write_fake_shards(tmp_path / "shards", {"train": [8, 8], "test": [4]})
    run_gloo(_train_loop, 2, str(tmp_path / "shards"), str(tmp_path / "runs"), LOOP_METHODS, 3)
    for i, method in enumerate(LOOP_METHODS):
        run = tmp_path / "runs" / f"r{i or ''}"
        # the checkpoint at the end is written only if the ranks' parameter fingerprints agree
        assert (run / "model.pt").is_file(), method
        assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2, 3]


def test_eval_and_audit_without_a_launcher_use_the_gpu(monkeypatch):
    """``aol eval`` / ``aol audit`` in one process: the first GPU where there is one, as training picks (they
    ran on the CPU beside an idle H200 before); no process group is started."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    world = D.command_world()
    assert world.device == torch.device("cuda", 0) and world.world_size == 1 and world.is_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.command_world().device == torch.device("cpu")


"""DeepSpeed ZeRO-1/2 on 2 gloo processes (CPU): the same parameters as the default path (gradients
averaged by DDP, aol_dist.dist.data_parallel) after 3 steps from the same start, and identical ranks. The training loop
under a DeepSpeed launch, killed and resumed, is in test_checkpoint_resume.py."""

from pathlib import Path

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install 'aol_dist[deepspeed]'")

from aol_dist import dist as D  # noqa: E402
from aol_dist.faults import StepGuard  # noqa: E402
from aol_dist.method.aol import AolHyper, aol_step  # noqa: E402
from aol_dist.model.attention import LabelAttention  # noqa: E402
from aol_dist.model.backbone import Classifier  # noqa: E402
from aol_dist.zero import build_engine, make_step, read_deepspeed_config  # noqa: E402
from helpers import outer_step_tools, run_gloo  # noqa: E402

M, N, B, STEPS = 3, 5, 4, 3
HP = AolHyper(meta_lr=0.2, k=5.0, threshold=0.5)
ROOT = Path(__file__).resolve().parents[1]


def _parts():
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", N)  # float32: ZeRO keeps float32 master partitions whatever the model's dtype
    attention = LabelAttention(model.feature_dim, M, N)
    torch.nn.init.normal_(attention.attn_fc.weight, std=0.1)
    return model, attention, torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(attention.parameters(), lr=0.5)


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"image": torch.rand(B, 1, 16, 16, generator=g), "labels": torch.randint(0, 2, (B, M, N), generator=g).float()}


def _state(model, attention):
    return {**{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
            **{f"attention.{k}": v.clone() for k, v in attention.state_dict().items()}}


def _compare(rank, world_size, out):
    world = D.world_from_process_group()
    model, attention, opt, att_opt = _parts()
    forward, guard = outer_step_tools(world, model, attention)
    for step in range(STEPS):
        b = _batch(rank, step)
        aol_step(model, attention, opt, att_opt, b["image"], b["labels"], HP, guard, forward=forward)
    results = {"default": _state(model, attention)}
    for stage in (1, 2):
        model, attention, opt, att_opt = _parts()
        ds = {"train_micro_batch_size_per_gpu": B, "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        engine = build_engine(model, attention, opt, att_opt, HP, ds)
        step = make_step(engine, lambda batch: None)
        guard = StepGuard([], list(model.buffers()), world, "stop", 1)
        for i in range(STEPS):
            b = _batch(rank, i)
            guard.before(b, i + 1)
            out_ = step(b, guard)
            assert guard.after(out_, [])
        results[f"zero{stage}"] = _state(model, attention)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_zero1_and_zero2_equal_the_default_path_after_3_steps(tmp_path):
    run_gloo(_compare, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for path in ("default", "zero1", "zero2"):
        for k in r0[path]:
            assert torch.equal(r0[path][k], r1[path][k]), f"{path}: ranks differ in {k}"
    moved = [k for k in r0["default"] if "running" not in k and not torch.equal(r0["default"][k], _state(*_parts()[:2])[k])]
    assert moved, "the default path did not train"
    for stage in ("zero1", "zero2"):
        for k, v in r0["default"].items():
            torch.testing.assert_close(r0[stage][k], v, rtol=1e-5, atol=1e-6, msg=f"{stage} vs default: {k}")


def test_deepspeed_config_checks():
    path = ROOT / "launch_configs" / "deepspeed_zero2.json"
    assert read_deepspeed_config(path, 32)["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="must be the run config's data.batch_size"):
        read_deepspeed_config(path, 16)


def test_grad_compression_is_refused_under_deepspeed(monkeypatch):
    """A DDP communication hook has no place in a ZeRO launch: a start-up error naming the key."""
    from aol_dist.config import config_from_dict
    from aol_dist.zero import maybe_deepspeed

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "launch_configs" / "deepspeed_zero2.json"))
    config = config_from_dict({"train": {"grad_compression": "bf16", "nan_policy": "stop"}})
    with pytest.raises(ValueError, match="train.grad_compression = 'bf16' is a DDP communication hook"):
        maybe_deepspeed(None, config, D.World())

"""Tiny shard fixtures shared by the tests (module-level functions, so worker processes can pickle them)."""

from pathlib import Path

import numpy as np

from aol_dist.data import shards
from aol_dist.dist import free_port, run_gloo  # noqa: F401 (the tests import them from here)

FINDINGS = ("A", "B", "C")
LABEL_SETS = ("s0", "s1")


def fake_sample(index: int, size: int = 8, tokens: int = 0) -> dict:
    rng = np.random.default_rng(index)
    truth = rng.integers(0, 2, len(FINDINGS)).astype(np.uint8)
    sample = {"key": f"s{index:06d}", "image": np.full((size, size), index % 256, np.uint8),
              "labels": np.stack([truth, 1 - truth]), "truth": truth, "report": f"study {index}",
              "ids": {"study_id": index}}
    if tokens:
        sample["tokens"] = rng.integers(1, 40, tokens).astype(np.int32)
    return sample


def write_fake_shards(out: Path, shard_sizes: dict[str, list[int]], workers: int = 1, tokens: int = 0,
                      tokenizer: dict | None = None) -> dict:
    """Shards with the given sample counts per split; sample keys are global indices."""
    import functools
    records, start = {}, 0
    for split, sizes in shard_sizes.items():
        jobs = []
        for i, n in enumerate(sizes):
            jobs.append(shards.ShardJob(f"{split}-{i:06d}.tar", tuple(range(start, start + n))))
            start += n
        records[split], _ = shards.write_split(out, jobs, functools.partial(fake_sample, tokens=tokens), workers)
    return shards.write_manifest(out, dataset="fake", findings=FINDINGS, label_sets=LABEL_SETS, splits=records,
                                 image_size=8, has_truth={s: True for s in records}, tokenizer=tokenizer)


def outer_step_tools(world, model, attention, compression: str = "none"):
    """What the training loop injects into a step on 2+ ranks, for tests that call ``aol_step`` themselves:
    ``forward`` (DDP over the classifier and attention) and ``average_gradients`` (a StepGuard)."""
    from aol_dist import dist as D
    from aol_dist.faults import StepGuard

    forward = D.data_parallel({"model": model, "attention": attention}, world, compression)
    guard = StepGuard(list(model.parameters()) + list(attention.parameters()), list(model.buffers()), world, "stop", 1)
    return forward, guard

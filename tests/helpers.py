"""Tiny shard fixtures shared by the tests (module-level functions, so worker processes can pickle them)."""

from pathlib import Path

import numpy as np

from aol_dist.data import shards

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world_size: int, port: int, fn, args) -> None:
    import datetime
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes on the CPU; raises if one fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="spawn")


def outer_step_tools(world, model, attention, compression: str = "none"):
    """What the training loop injects into a step on 2+ ranks, for tests that call ``aol_step`` themselves:
    ``forward`` (DDP over the classifier and attention) and ``average_gradients`` (a StepGuard)."""
    from aol_dist import dist as D
    from aol_dist.faults import StepGuard

    forward = D.data_parallel({"model": model, "attention": attention}, world, compression)
    guard = StepGuard(list(model.parameters()) + list(attention.parameters()), list(model.buffers()), world, "stop", 1)
    return forward, guard

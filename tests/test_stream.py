"""The reader without a process group: disjoint coverage, determinism, equal steps, resume cursor."""

import itertools

import pytest
import torch

from aol_dist.data.shards import read_manifest, split_shards
from aol_dist.data.stream import EvalStream, TrainStream, in_order, make_loader, rank_shards, worker_quota, worker_shards
from helpers import write_fake_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_fake_shards(out, {"train": [10, 7, 12, 9, 11, 8, 10, 13], "test": [5, 6, 4]})
    return out


def keys(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)])
def test_rank_worker_shards_are_disjoint_and_cover_the_split(shard_dir, world, workers):
    shards = split_shards(shard_dir, read_manifest(shard_dir), "train")
    for epoch in range(3):
        seen = []
        for rank, worker in itertools.product(range(world), range(workers)):
            seen += worker_shards(rank_shards(shards, rank, world, seed=7, epoch=epoch), worker, workers)
        assert sorted(seen) == sorted(shards)


def test_same_seed_and_epoch_same_order_other_epoch_other_order(shard_dir):
    shards = split_shards(shard_dir, read_manifest(shard_dir), "train")
    s = TrainStream(shards, rank=0, world_size=2, batch_size=4, seed=3, shuffle_buffer=8)
    s.set_epoch(1)
    a, b = keys(s.iter_worker(0, 1)), keys(s.iter_worker(0, 1))
    s.set_epoch(2)
    c = keys(s.iter_worker(0, 1))
    assert a == b and a != c
    assert len(a) == s.steps_per_epoch * 4


def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(tmp_path):
    write_fake_shards(tmp_path, {"train": [40, 3, 5, 2]})  # rank 0 can get 40 samples, rank 1 only 5
    shards = split_shards(tmp_path, read_manifest(tmp_path), "train")
    counts = []
    for rank in range(2):
        s = TrainStream(shards, rank=rank, world_size=2, batch_size=4, seed=0, shuffle_buffer=4)
        for epoch in range(3):
            s.set_epoch(epoch)
            batches = list(s.iter_worker(0, 1))
            assert all(len(b["key"]) == 4 for b in batches)
            counts.append(len(batches))
    assert set(counts) == {50 // 8}


def test_dataloader_workers_give_the_rank_quota_in_a_fixed_order(shard_dir):
    shards = split_shards(shard_dir, read_manifest(shard_dir), "train")
    s = TrainStream(shards, rank=1, world_size=2, batch_size=3, seed=5, shuffle_buffer=4, num_workers=2)
    s.set_epoch(0)
    first = keys(make_loader(s, 2))
    second = keys(make_loader(s, 2))
    assert first == second
    assert len(first) == s.steps_per_epoch * 3
    assert sum(worker_quota(s.steps_per_epoch, w, 2) for w in range(2)) == s.steps_per_epoch


def test_resume_cursor_continues_exactly(shard_dir):
    shards = split_shards(shard_dir, read_manifest(shard_dir), "train")
    s = TrainStream(shards, rank=0, world_size=1, batch_size=4, seed=1, shuffle_buffer=8, num_workers=2)
    s.set_epoch(4)
    full = [b["key"] for b in in_order(make_loader(s, 2))]
    assert len(full) == s.steps_per_epoch
    for start in (1, 5, 6):
        s.set_epoch(4, start_batch=start)
        resumed = [b["key"] for b in in_order(make_loader(s, 2), start)]
        assert resumed == full[start:]


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(shard_dir):
    shards = split_shards(shard_dir, read_manifest(shard_dir), "test")
    with pytest.raises(ValueError, match="3 shards cannot feed 2 ranks x 2 workers"):
        TrainStream(shards, rank=0, world_size=2, batch_size=2, num_workers=2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_stream_covers_each_sample_exactly_once(shard_dir, world):
    shards = split_shards(shard_dir, read_manifest(shard_dir), "test")
    seen = []
    for rank in range(world):
        seen += keys(EvalStream(shards, rank, world, batch_size=4))
    assert sorted(seen) == sorted(f"s{i:06d}" for i in range(80, 95))


def test_batches_hold_decoded_arrays_and_selected_label_sets(shard_dir):
    shards = split_shards(shard_dir, read_manifest(shard_dir), "test")
    batch = next(iter(EvalStream(shards, 0, 1, batch_size=4, label_index=[1])))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 1, 8, 8)
    assert batch["labels"].shape == (4, 1, 3)
    torch.testing.assert_close(batch["labels"][:, 0], 1 - batch["truth"])

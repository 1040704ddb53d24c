"""Streaming reader of tar shards: explicit (rank, world, worker), deterministic, equal steps per rank.

Training order for epoch ``e``: the split's shard list is permuted by ``(seed, e)``, rank ``r`` takes
``shards[r::world]``, worker ``w`` of that rank takes ``[w::num_workers]`` of those, reads them in
order through a shuffle buffer seeded by ``(seed, e, r, w)`` and cuts batches. Every rank yields
exactly ``steps_per_epoch = total_samples // (world * batch_size)`` batches: a rank whose shards hold
fewer samples re-reads them (next pass, new shuffle), one with more stops early. So no rank waits in
a collective for a batch that never comes, and the same (seed, epoch) always gives the same batches.

Nothing here reads global distributed state: rank and world size are arguments; the worker id comes
from the DataLoader worker this code runs in (or is passed explicitly in tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aol_dist.data.shards import ShardError, check_count, check_labels, decode_array, decode_image, image_entry, iter_tar_samples


def rank_shards(shards: Sequence[Any], rank: int, world_size: int, seed: int, epoch: int) -> list[Any]:
    """The shards rank ``rank`` reads in ``epoch``: a (seed, epoch) permutation, then every world_size-th."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order[rank::world_size]]


def worker_shards(shards: Sequence[Any], worker: int, num_workers: int) -> list[Any]:
    return list(shards[worker::num_workers])


def worker_quota(steps: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` yields so the DataLoader's round-robin gives ``steps`` batches in all."""
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> batch. Images stay uint8 (B, C, H, W), C = 1 (grey) or 3 (RGB): 4x less to
    move between processes than float."""
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    batch = {
        "image": images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous(),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples])),
        "key": [s["key"] for s in samples],
    }
    for name in ("truth", "tokens"):  # a split's samples all have one or none: a deleted member is named
        have = [name in s for s in samples]
        if any(have) and not all(have):
            s = samples[have.index(False)]
            raise ShardError(f"{s.get('shard', '?')}: sample {s['key']} has no {name}.npy, other samples of its "
                             f"split do (a damaged shard: `aol shards verify` checks them all)")
    if all("truth" in s for s in samples):
        batch["truth"] = torch.from_numpy(np.stack([s["truth"] for s in samples]))
    if all("tokens" in s for s in samples):
        batch["tokens"] = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
    if any("ids" in s for s in samples):  # the study ids (subject, study, dicom), for the label audit
        batch["ids"] = [s.get("ids", {}) for s in samples]
    return batch


def decode_sample(raw: dict[str, bytes], label_index: Sequence[int] | None, shard: Path,
                  label_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """Raw tar sample -> arrays; ``label_index`` picks and orders the label sets the method uses. The label
    array must have ``label_shape`` (the manifest's M x N) and, with the truth, hold only 0 and 1
    (:func:`~aol_dist.data.shards.check_labels`): a bad sample is named with its shard."""
    try:
        labels = decode_array(raw["labels.npy"])
        truth = decode_array(raw["truth.npy"]) if "truth.npy" in raw else None
        out = {"key": raw["__key__"], "shard": str(shard), "image": decode_image(image_entry(raw))}
        if "tokens.npy" in raw:
            out["tokens"] = decode_array(raw["tokens.npy"])
        if "ids.json" in raw:
            out["ids"] = json.loads(raw["ids.json"])
    except KeyError as e:
        raise ValueError(f"{shard}: sample {raw.get('__key__')} has no {e.args[0]!r} entry") from None
    except Exception as e:  # noqa: BLE001 - name the sample whatever failed
        raise ValueError(f"{shard}: sample {raw.get('__key__')} cannot be decoded ({e})") from None
    check_labels(labels, truth, label_shape, f"{shard}: sample {raw['__key__']}")
    out["labels"] = labels if label_index is None else labels[list(label_index)]
    if truth is not None:
        out["truth"] = truth
    return out


@dataclass
class TrainStream(IterableDataset):
    """The training split as an endless-per-epoch stream of equal-length batch sequences per rank."""

    shards: Sequence[tuple[Path, int]]
    rank: int
    world_size: int
    batch_size: int
    seed: int = 0
    shuffle_buffer: int = 512
    num_workers: int = 1
    label_index: Sequence[int] | None = None
    epoch: int = 0
    start_batch: int = 0
    label_shape: tuple[int, int] | None = None
    """The manifest's (M, N): every decoded sample's label array is checked against it."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        readers = self.world_size * max(1, self.num_workers)
        if len(self.shards) < readers:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} ranks x "
                             f"{max(1, self.num_workers)} workers: re-shard with more, smaller shards "
                             f"(--samples-per-shard) or use fewer workers")
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.total_samples} samples make no batch of {self.batch_size} on {self.world_size} ranks")

    @property
    def total_samples(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def steps_per_epoch(self) -> int:
        return self.total_samples // (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to read and the batch to start from (a resume cursor)."""
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_worker(worker, num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Batches of (rank, worker); the DataLoader interleaves workers round-robin in worker order."""
        mine = worker_shards(rank_shards(self.shards, self.rank, self.world_size, self.seed, self.epoch),
                             worker, num_workers)
        quota = worker_quota(self.steps_per_epoch, worker, num_workers)
        # Round-robin means this worker's j-th batch is the loader's batch j * num_workers + worker.
        first = sum(1 for j in range(quota) if j * num_workers + worker < self.start_batch)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        samples = self._shuffled(mine, rng)
        for j in range(quota):
            chunk = [next(samples) for _ in range(self.batch_size)]
            if j >= first:  # skipped batches are read but never decoded
                batch = collate([decode_sample(raw, self.label_index, shard, self.label_shape) for shard, raw in chunk])
                batch["index"] = j * num_workers + worker
                yield batch

    def _shuffled(self, shards: list[tuple[Path, int]], rng: np.random.Generator) -> Iterator[tuple[Path, dict]]:
        buffer: list[tuple[Path, dict]] = []
        while True:  # passes over this worker's shards until the quota is met
            for path, listed in shards:
                seen = 0
                for raw in iter_tar_samples(path):
                    seen += 1
                    buffer.append((path, raw))
                    if len(buffer) >= self.shuffle_buffer:
                        i = int(rng.integers(len(buffer)))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        yield buffer.pop()
                check_count(path, seen, listed)  # the epoch's length comes from the manifest's counts
            if not any(n for _, n in shards):
                raise ValueError(f"rank {self.rank} worker has only empty shards: {[str(p) for p, _ in shards]}")
            order = rng.permutation(len(buffer))
            for i in order:
                yield buffer[i]
            buffer = []


@dataclass
class EvalStream(IterableDataset):
    """An evaluation split, every sample exactly once across ranks: rank r keeps global sample i with
    ``i % world_size == r`` (no padding, no duplicates, so synced metrics count each sample once)."""

    shards: Sequence[tuple[Path, int]]
    rank: int
    world_size: int
    batch_size: int
    label_index: Sequence[int] | None = None
    label_shape: tuple[int, int] | None = None
    """The manifest's (M, N), as in :class:`TrainStream`."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        offsets = np.cumsum([0] + [n for _, n in self.shards])
        chunk: list[dict[str, Any]] = []
        for s, (path, listed) in enumerate(self.shards):
            if s % num_workers != worker:
                continue
            seen = 0
            for j, raw in enumerate(iter_tar_samples(path)):
                seen += 1
                if (offsets[s] + j) % self.world_size == self.rank:
                    chunk.append(decode_sample(raw, self.label_index, path, self.label_shape))
                    if len(chunk) == self.batch_size:
                        yield collate(chunk)
                        chunk = []
            check_count(path, seen, listed)  # rank r keeps i = r mod W of the manifest's numbering
        if chunk:
            yield collate(chunk)


def in_order(batches: Iterable[dict[str, Any]], start: int = 0) -> Iterator[dict[str, Any]]:
    """Batches sorted by their ``index`` within the epoch.

    The DataLoader's round-robin always starts at worker 0; after a resume from batch ``start`` the
    next batch may belong to another worker, so a few batches (at most one per worker) wait here.
    """
    pending: dict[int, dict[str, Any]] = {}
    expected = start
    for batch in batches:
        pending[batch["index"]] = batch
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    if pending:
        raise RuntimeError(f"reader lost batch {expected} of the epoch (have {sorted(pending)})")


def make_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader over a stream that batches itself (batch_size=None)."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """uint8 -> float on the device: images in [0, 1] (Sec. 5.1), labels and truth as 0./1."""
    out = dict(batch)
    out["image"] = batch["image"].to(device, non_blocking=True).float().div_(255.0)
    out["labels"] = batch["labels"].to(device, non_blocking=True).float()
    if "truth" in batch:
        out["truth"] = batch["truth"].to(device, non_blocking=True).float()
    if "tokens" in batch:
        out["tokens"] = batch["tokens"].to(device, non_blocking=True)
    return out

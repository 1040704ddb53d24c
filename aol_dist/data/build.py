"""``aol shards synth``: the built-in synthetic dataset (SPEC 5.4) written as shards."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from aol_dist.data import shards
from aol_dist.data.convert.common import write_splits
from aol_dist.data.convert.tokenize import tokenize, tokenizer_record
from aol_dist.data.findings import FINDINGS, LABEL_SETS, label_sets_from_raw
from aol_dist.data.synth import synth_split_indices, synth_study

SPLITS = ("train", "validate", "test")


def synth_sample(index: int, seed: int, image_size: int, tokenizer: str = "", max_length: int = 128) -> dict[str, Any]:
    """One synthetic study as a canonical shard sample with the four label sets, ``truth`` and, with a
    tokenizer, the report's token ids."""
    study = synth_study(index, seed, image_size)
    sets = label_sets_from_raw(study["raw"])
    sample = {"key": study["key"], "image": study["image"], "labels": np.stack([sets[n] for n in LABEL_SETS]),
              "truth": study["truth"], "report": study["report"], "ids": study["ids"]}
    if tokenizer:
        sample["tokens"] = tokenize(study["report"], tokenizer, max_length)
    return sample


def build_synth(out: str | Path, n_train: int = 4000, n_validate: int = 500, n_test: int = 1000,
                image_size: int = 64, seed: int = 0, samples_per_shard: int = 250, workers: int = 1,
                tokenizer: str = "", max_length: int = 128) -> dict[str, Any]:
    """Write train / validate / test shards and the manifest; resumable, one process per shard."""
    record = tokenizer_record(tokenizer, max_length) if tokenizer else None
    make = functools.partial(synth_sample, seed=seed, image_size=image_size, tokenizer=record and record["path"],
                             max_length=max_length)
    sizes = {"train": n_train, "validate": n_validate, "test": n_test}
    head = dict(findings=FINDINGS, label_sets=LABEL_SETS, image_size=image_size, tokenizer=record)
    items = {split: list(synth_split_indices(split, n_train, n_validate, n_test)) for split in SPLITS}
    records, reused = write_splits(out, items, make, samples_per_shard, workers, head)
    manifest = shards.write_manifest(
        out, dataset="synth", splits=records, **head,
        source={"generator": "aol_dist.data.synth", "seed": seed, "sizes": sizes},
        has_truth={s: True for s in records})
    manifest["reused_shards"] = reused
    return manifest

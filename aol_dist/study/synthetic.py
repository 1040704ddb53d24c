"""Label sets of the synthetic benchmarks ``one-clean`` and ``instance``, on the built-in generator's images
and hidden truth (:func:`aol_dist.data.synth.synth_study`); the generator's own NLP label sets are not used.

Both are pure functions of (index, seed, options): a fourth random stream ``[seed, index, 3]`` draws the
corruption, so the images and the truth are those of ``synth-cxr`` at the same seed and size.

- one-clean: the truth itself as one label set among ``corrupted`` sets that flip every entry with
  probability ``flip`` (the learning test's case, tests/test_learning.py). The clean set sits at position
  ``clean_position``, not first, so that no tie-break towards the first set can pass for trust in it.
- instance: two label sets whose reliability depends on the image. A visible cue (a bright square in the
  top-left corner, where the generator's images are dark) marks a fraction ``cue_fraction`` of the images.
  Set ``A`` is right on the marked images and ``B`` on the others; where a set is wrong it makes
  systematic errors: it misses each positive with probability ``miss`` and calls each negative positive
  with probability ``false_positive``. Neither set is better overall; the only way to the truth is to
  choose per image (Sec. 3.2), which a vote over the sets cannot do.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from aol_dist.data import shards
from aol_dist.data.convert.common import write_splits
from aol_dist.data.findings import FINDINGS
from aol_dist.data.synth import synth_split_indices, synth_study

SPLITS = ("train", "test")
INSTANCE_SETS = ("A", "B")


def one_clean_names(corrupted: int, clean_position: int) -> list[str]:
    names = [f"noisy{i + 1}" for i in range(corrupted)]
    names.insert(clean_position, "clean")
    return names


def cue_side(image_size: int) -> int:
    """Side of the instance benchmark's cue square: an eighth of the image, at least 2 pixels."""
    return max(2, image_size // 8)


def one_clean_sample(index: int, seed: int, image_size: int, flip: float, corrupted: int,
                     clean_position: int) -> dict[str, Any]:
    study = synth_study(index, seed, image_size)
    truth = study["truth"]
    rng = np.random.default_rng([seed, index, 3])
    sets = [truth ^ (rng.random(truth.shape) < flip).astype(np.uint8) for _ in range(corrupted)]
    sets.insert(clean_position, truth)
    return {"key": study["key"], "image": study["image"], "labels": np.stack(sets).astype(np.uint8),
            "truth": truth, "ids": study["ids"]}


def systematic_errors(truth: np.ndarray, rng: np.random.Generator, miss: float, false_positive: float) -> np.ndarray:
    """A wrong reader's labels: each positive missed with probability ``miss``, each negative called positive
    with probability ``false_positive``."""
    u = rng.random(truth.shape)
    return np.where(truth == 1, u >= miss, u < false_positive).astype(np.uint8)


def instance_sample(index: int, seed: int, image_size: int, cue_fraction: float, miss: float,
                    false_positive: float) -> dict[str, Any]:
    study = synth_study(index, seed, image_size)
    truth = study["truth"]
    rng = np.random.default_rng([seed, index, 3])
    cue = bool(rng.random() < cue_fraction)
    wrong = systematic_errors(truth, rng, miss, false_positive)
    image = study["image"].copy()
    if cue:
        side = cue_side(image_size)
        image[:side, :side] = 255
    a, b = (truth, wrong) if cue else (wrong, truth)
    return {"key": study["key"], "image": image, "labels": np.stack([a, b]), "truth": truth,
            "ids": {**study["ids"], "cue": int(cue)}}


def build_derived(out: str | Path, kind: str, options: dict[str, Any], image_size: int, n_train: int, n_test: int,
                  seed: int, samples_per_shard: int, workers: int) -> dict[str, Any]:
    """Write the train / test shards and manifest of ``kind`` (one_clean or instance); resumable."""
    if kind == "one_clean":
        make = functools.partial(one_clean_sample, seed=seed, image_size=image_size, **options)
        names = one_clean_names(options["corrupted"], options["clean_position"])
    elif kind == "instance":
        make = functools.partial(instance_sample, seed=seed, image_size=image_size, **options)
        names = list(INSTANCE_SETS)
    else:
        raise ValueError(f"unknown synthetic benchmark kind {kind!r}")
    head = dict(findings=FINDINGS, label_sets=names, image_size=image_size)
    items = {split: list(synth_split_indices(split, n_train, 0, n_test)) for split in SPLITS}
    records, _ = write_splits(out, items, make, samples_per_shard, workers, head)
    return shards.write_manifest(
        out, dataset=kind.replace("_", "-"), splits=records, **head, has_truth={s: True for s in records},
        source={"generator": f"aol_dist.study.synthetic.{kind}_sample", "seed": seed, "options": options,
                "sizes": {"train": n_train, "test": n_test}})

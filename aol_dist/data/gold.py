"""Hand-labelled studies that fit the annotator model: ``data.gold_split``.

Which way an uncertain mention goes is not identifiable from the noisy labels (docs/quality.md, "What does
identify a hedge"), and only partly from the image. A few studies whose truth is known settle it: their
labels and truth fit the annotator model directly, -log P(Y | t, x) at the known t, beside the noisy labels'
marginal likelihood (:func:`aol_dist.method.trust.gold_loss`). MIMIC-CXR and CheXpert users have such a set
(a radiologist-labelled validation split); the study measures it with 300 of the synthetic training studies
(``aol:gold``).

The gold studies are few (hundreds), so every rank holds all of them in memory, as stored (uint8 images), and
draws its gold batch of each step from ``(seed, step, rank)`` alone: no reader state, so a resumed run draws
the same batches as an uninterrupted one, and the ranks draw different ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from aol_dist.data.shards import ShardError, label_shape, split_shards
from aol_dist.data.stream import EvalStream

GOLD_MEMORY = 4 << 30
"""Bytes of gold images every rank may hold; more is refused before reading (a whole MIMIC-CXR training split
named as the gold split would be some 15 GB per rank at 256 x 256)."""

GOLD_STREAM = 0x601D
"""Mixed into the gold draws' seed, so that they are not the training stream's shuffle."""


@dataclass
class GoldSet:
    """The gold studies of one split: images (G, C, H, W) uint8, labels (G, M, N), truth (G, N)."""

    image: torch.Tensor
    labels: torch.Tensor
    truth: torch.Tensor
    split: str

    def __len__(self) -> int:
        return self.image.shape[0]

    def draw(self, seed: int, step: int, rank: int, batch_size: int) -> dict[str, Any]:
        """The gold batch of ``step`` on ``rank``: ``batch_size`` studies drawn with replacement, a function of
        ``(seed, step, rank)`` only."""
        rng = np.random.default_rng([GOLD_STREAM, seed, step, rank])
        index = torch.from_numpy(rng.integers(len(self), size=batch_size))
        return {"image": self.image[index], "labels": self.labels[index], "truth": self.truth[index]}


def load_gold(shard_dir: str | Path, manifest: dict[str, Any], split: str, label_index: Sequence[int],
              samples: int = 0) -> GoldSet:
    """The first ``samples`` studies of ``split`` (0: all) with their truth; an error names the split when it has
    no truth or fewer studies than asked for."""
    where = f"{Path(shard_dir) / 'manifest.json'}: data.gold_split {split!r}"
    shards = split_shards(shard_dir, manifest, split)
    if not manifest["splits"][split].get("has_truth"):
        raise ShardError(f"{where} has no truth: the gold split must be hand-labelled (truth.npy in every sample)")
    total = sum(n for _, n in shards)
    if samples > total:
        raise ShardError(f"{where} holds {total} studies; data.gold_samples asks for {samples}")
    wanted = samples or total
    size = wanted * int(manifest.get("channels", 1)) * int(manifest["image_size"]) ** 2
    if size > GOLD_MEMORY:
        raise ShardError(f"{where}: {wanted} studies would hold {size / 2**30:.1f} GiB of images in memory on every "
                         f"rank (at most {GOLD_MEMORY / 2**30:.1f}); set data.gold_samples (a few hundred studies "
                         f"settle the trust: docs/quality.md)")
    images, labels, truth, read = [], [], [], 0
    for batch in EvalStream(shards, 0, 1, 256, label_index, label_shape(manifest)):
        if "truth" not in batch:
            raise ShardError(f"{where}: sample {batch['key'][0]} has no truth.npy")
        images.append(batch["image"])
        labels.append(batch["labels"])
        truth.append(batch["truth"])
        read += len(batch["truth"])
        if read >= wanted:
            break
    return GoldSet(torch.cat(images)[:wanted], torch.cat(labels)[:wanted], torch.cat(truth)[:wanted], split)

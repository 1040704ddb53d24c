"""Simulated annotators for multi-class data, each a K x K confusion matrix (paper 000 Sec. 4 and A.2.1,
after paper 002 Sec. 3.1), and annotators drawn from real per-image human votes (CIFAR-10H).

``C[i, j]`` = probability that an annotator labels an image of true class ``i`` as ``j``; rows sum to 1.
Noise level = 1 - accuracy of the matrix under a uniform class prior = 1 - mean(diag C): "noise-levels
are computed in (1 - Accuracy) using corresponding confusion matrices" (Sec. 5). Each image's noisy
label is drawn from the row of its true class, so whether an image is mislabelled is random while the
overall noisy distribution follows the matrix (A.2.1).

- hammer-spammer (HS): correct with probability 1 - noise, otherwise uniform over the other classes.
- structured flips (SF): correct with probability 1 - noise, otherwise the class's pre-defined
  confusable partner. A.2.1 lists airplane -> bird, cat -> dog, deer -> cat, horse -> deer,
  ship -> airplane, truck -> automobile for CIFAR-10; classes the list leaves without a partner take
  the reverse of a listed pair (automobile -> truck, bird -> airplane, dog -> cat), and a class in no
  pair at all (frog) errs uniformly like HS, so the matrix's noise level is exactly ``noise``.
- ordered confusion (OC): correct with probability 1 - noise, otherwise a neighbouring class in class
  order (half to each side; all to the one neighbour at either end).
- adversarial (AD): a fixed derangement of the classes: groups images perfectly but always names the
  wrong class; noise level 1, not adjustable (A.2.2).
- average (AVG): the mean of the HS, SF, OC and AD matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                    "ship", "truck")
#: Structured-flip pairs of A.2.1 (source -> confusable target), for CIFAR-10.
CIFAR10_FLIPS: tuple[tuple[str, str], ...] = (("airplane", "bird"), ("cat", "dog"), ("deer", "cat"),
                                              ("horse", "deer"), ("ship", "airplane"), ("truck", "automobile"))
KINDS = ("hs", "sf", "oc", "ad", "avg")


def _check(k: int, noise: float) -> None:
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {k}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise level must be in [0, 1], got {noise}")


def hammer_spammer(k: int, noise: float) -> np.ndarray:
    _check(k, noise)
    c = np.full((k, k), noise / (k - 1))
    np.fill_diagonal(c, 1.0 - noise)
    return c


def flip_targets(classes: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[int | None]:
    """Each class's flip partner: the listed pair, else the reverse of a listed pair, else None."""
    index = {c: i for i, c in enumerate(classes)}
    for a, b in pairs:
        for c in (a, b):
            if c not in index:
                raise ValueError(f"flip pair ({a!r}, {b!r}): {c!r} is not a class ({list(classes)})")
    target: list[int | None] = [None] * len(classes)
    for a, b in pairs:
        target[index[a]] = index[b]
    for a, b in pairs:
        if target[index[b]] is None:
            target[index[b]] = index[a]
    return target


def structured_flips(classes: Sequence[str], noise: float, pairs: Sequence[tuple[str, str]] = CIFAR10_FLIPS) -> np.ndarray:
    k = len(classes)
    c = hammer_spammer(k, noise)  # rows without a partner stay uniform
    for i, j in enumerate(flip_targets(classes, pairs)):
        if j is not None:
            c[i] = 0.0
            c[i, i], c[i, j] = 1.0 - noise, noise
    return c


def ordered_confusion(k: int, noise: float) -> np.ndarray:
    _check(k, noise)
    c = np.zeros((k, k))
    for i in range(k):
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < k]
        c[i, i] = 1.0 - noise
        for j in neighbours:
            c[i, j] = noise / len(neighbours)
    return c


def adversarial(k: int, seed: int = 0) -> np.ndarray:
    """A permutation matrix without fixed points (a derangement drawn from ``seed``)."""
    _check(k, 1.0)
    rng = np.random.default_rng([seed, 1701])
    while True:
        perm = rng.permutation(k)
        if not np.any(perm == np.arange(k)):
            break
    return np.eye(k)[perm]


def noise_level(c: np.ndarray) -> float:
    """1 - accuracy under a uniform class prior."""
    return float(1.0 - np.mean(np.diag(c)))


@dataclass(frozen=True)
class Annotator:
    """A named simulated annotator: its confusion matrix and the noise level that defines it."""

    name: str
    matrix: np.ndarray

    @property
    def noise(self) -> float:
        return noise_level(self.matrix)


def parse_annotators(specs: Sequence[str], classes: Sequence[str], pairs: Sequence[tuple[str, str]] | None = None,
                     seed: int = 0) -> list[Annotator]:
    """``["hs:0.3", "sf:0.4", "oc:0.5", "ad", "avg"]`` -> annotators (paper Fig. 4 uses these levels).

    ``avg`` averages the HS, SF, OC and AD matrices listed with it; ``avg:NOISE`` averages HS, SF and OC
    at NOISE with AD. Structured flips need ``pairs`` unless the classes are CIFAR-10's.
    """
    k = len(classes)
    if pairs is None and tuple(classes) == CIFAR10_CLASSES:
        pairs = CIFAR10_FLIPS

    def make(kind: str, noise: float | None) -> np.ndarray:
        if kind == "ad":
            if noise not in (None, 1.0):
                raise ValueError("the adversarial annotator's noise level is 1 and cannot be set (A.2.2)")
            return adversarial(k, seed)
        if noise is None:
            raise ValueError(f"annotator {kind!r} needs a noise level, e.g. {kind}:0.3")
        if kind == "hs":
            return hammer_spammer(k, noise)
        if kind == "oc":
            return ordered_confusion(k, noise)
        if pairs is None:
            raise ValueError("structured flips (sf) need flip pairs for these classes (--flip-pairs a:b,c:d); "
                             "the A.2.1 pairs apply to the CIFAR-10 class names only")
        return structured_flips(classes, noise, pairs)

    parsed = []
    for spec in specs:
        kind, _, level = spec.partition(":")
        if kind not in KINDS:
            raise ValueError(f"annotator {spec!r}: kind must be one of {KINDS}")
        try:
            parsed.append((kind, float(level) if level else None))
        except ValueError:
            raise ValueError(f"annotator {spec!r}: noise level {level!r} is not a number") from None
    out, seen = [], []
    for kind, noise in parsed:
        if kind == "avg":
            parts = ([make(kd, nz) for kd, nz in parsed if kd != "avg"] if noise is None
                     else [make(kd, None if kd == "ad" else noise) for kd in ("hs", "sf", "oc", "ad")])
            if not parts:
                raise ValueError("annotator 'avg' without a noise level averages the others listed: list some")
            matrix = np.mean(parts, axis=0)
        else:
            matrix = make(kind, noise)
        name = kind if kind not in seen else f"{kind}{seen.count(kind) + 1}"
        seen.append(kind)
        out.append(Annotator(name, matrix))
    return out


def draw_labels(matrix: np.ndarray, true: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """One noisy label per image: class ``j`` with probability ``matrix[true[i], j]``.

    Seeded by (seed, stream): every annotator has its own stream, so adding one changes no other.
    """
    rng = np.random.default_rng([seed, stream, 42])
    cdf = np.cumsum(matrix, axis=1)
    cdf[:, -1] = 1.0  # guard against rounding leaving a sliver above the last class
    u = rng.random(len(true))
    return (u[:, None] >= cdf[np.asarray(true)]).sum(1).astype(np.int64)


def draw_from_votes(counts: np.ndarray, n_annotators: int, seed: int) -> np.ndarray:
    """(n_annotators, n_images) labels, each drawn from an image's human vote distribution (CIFAR-10H):
    annotator ``a`` is a random one of the humans who labelled that image."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or (counts < 0).any() or (counts.sum(1) <= 0).any():
        raise ValueError(f"vote counts must be (images, classes) with at least one vote per image, got {counts.shape}")
    cdf = np.cumsum(counts / counts.sum(1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    out = np.empty((n_annotators, len(counts)), dtype=np.int64)
    for a in range(n_annotators):
        u = np.random.default_rng([seed, 10_000 + a, 42]).random(len(counts))
        out[a] = (u[:, None] >= cdf).sum(1)
    return out

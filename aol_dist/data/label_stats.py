"""``aol shards inspect``: what a shard directory's label sets look like, per split: counts, prevalence per
label set and finding, agreement between sets and, where the split has it, accuracy against the truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aol_dist.data.shards import (check_count, check_labels, decode_array, iter_tar_samples, label_kind, label_shape,
                                  read_manifest, split_shards)


def inspect(shard_dir: str | Path) -> dict[str, Any]:
    """Counts, prevalence per label set and finding, and agreement between label sets, per split.

    Per finding, ``agreement`` and ``accuracy_vs_truth`` count matching entries. On multi-class data, where
    those per-class figures hide how often an image's class is wrong (a 17 % per-image noise reads as 0.97
    per class with K = 10), ``per_image`` adds, per split, each label set's noise rate against the truth
    (fraction of images whose class differs from the true class) and the per-image agreement: the
    fraction of images on which all label sets name the same class, and each pair's.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    names = list(manifest["label_sets"])
    kind = label_kind(manifest)
    out: dict[str, Any] = {"dataset": manifest["dataset"], "label_sets": names, "findings": manifest["findings"],
                           "label_kind": kind, "image_size": manifest["image_size"],
                           "tokenizer": manifest["tokenizer"], "splits": {}}
    for split, info in manifest["splits"].items():
        labels, truths = [], []
        for path, count in split_shards(shard_dir, manifest, split):
            seen = 0
            for raw in iter_tar_samples(path):
                labels.append(decode_array(raw["labels.npy"]))
                truth = decode_array(raw["truth.npy"]) if "truth.npy" in raw else None
                check_labels(labels[-1], truth, label_shape(manifest), f"{path}: sample {raw['__key__']}")
                if truth is not None:
                    truths.append(truth)
                seen += 1
            check_count(path, seen, count)
        summary: dict[str, Any] = {"samples": len(labels), "shards": len(info["shards"]), "skipped": info.get("skipped", 0)}
        if labels:
            y = np.stack(labels).astype(np.float64)  # (S, M, N)
            summary["prevalence"] = {name: y[:, i].mean(0).round(4).tolist() for i, name in enumerate(names)}
            summary["agreement"] = {f"{a}|{b}": float((y[:, i] == y[:, j]).mean().round(4))
                                    for i, a in enumerate(names) for j, b in enumerate(names) if i < j}
            if truths and len(truths) == len(labels):
                t = np.stack(truths).astype(np.float64)
                summary["prevalence"]["truth"] = t.mean(0).round(4).tolist()
                summary["accuracy_vs_truth"] = {name: (y[:, i] == t).mean(0).round(4).tolist()
                                                for i, name in enumerate(names)}
            if kind == "multiclass" and names:
                summary["per_image"] = _per_image(y, np.stack(truths) if truths and len(truths) == len(labels)
                                                  else None, names)
        out["splits"][split] = summary
    return out


def _per_image(y: np.ndarray, truth: np.ndarray | None, names: list[str]) -> dict[str, Any]:
    """Multi-class label sets (S, M, K) one-hot -> per-image noise vs truth and per-image agreement."""
    classes = y.argmax(-1)  # (S, M)
    out: dict[str, Any] = {
        "all_agree": float((classes == classes[:, :1]).all(1).mean().round(4)),
        "agreement": {f"{a}|{b}": float((classes[:, i] == classes[:, j]).mean().round(4))
                      for i, a in enumerate(names) for j, b in enumerate(names) if i < j},
    }
    if truth is not None:
        true_class = truth.argmax(-1)
        out["noise_vs_truth"] = {name: float((classes[:, i] != true_class).mean().round(4))
                                 for i, name in enumerate(names)}
    return out

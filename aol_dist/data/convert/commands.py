"""Command-line options of ``aol shards mimic|openi|generic`` (registered by :mod:`aol_dist.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable


def _common(p: argparse.ArgumentParser, image_size: int | None = 256, tokens: bool = True) -> None:
    p.add_argument("--out", required=True, help="output directory (resumable: a re-run finishes what is missing)")
    p.add_argument("--image-size", type=int, default=image_size,
                   help="side of the square shard images" + (f" (default {image_size})" if image_size else
                                                              " (default: the npz images' side, else 256)"))
    p.add_argument("--aspect", choices=("stretch", "pad", "crop"), default="stretch",
                   help="stretch (the paper's resize, default), pad (letterbox) or crop (centre); docs/data.md")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png",
                   help="png (lossless, default) or jpg (quality 95, ~4x faster to decode: docs/data.md)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel shard writers")
    if tokens:
        p.add_argument("--tokenizer", help="LOCAL Hugging Face tokenizer directory: report token ids are stored")
        p.add_argument("--max-length", type=int, default=256, help="token ids per report (truncated / padded)")


def _run(fn: Callable[..., Any], **kwargs: Any) -> int:
    from aol_dist.data.convert.common import ConversionError
    from aol_dist.data.shards import ShardError

    try:
        fn(**kwargs)
    except (ConversionError, ShardError, FileNotFoundError) as e:  # ShardError: a folder another conversion wrote
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _mimic(a: argparse.Namespace) -> int:
    from aol_dist.data.convert.mimic import convert_mimic

    return _run(convert_mimic, root=a.root, out=a.out, reports=a.reports, image_size=a.image_size, aspect=a.aspect,
                image_format=a.image_format, tokenizer=a.tokenizer, max_length=a.max_length,
                samples_per_shard=a.samples_per_shard, workers=a.workers, hand_labels=a.hand_labels,
                hand_split=a.hand_split, hand_gold=a.hand_gold, gold_split=a.gold_split)


def _openi(a: argparse.Namespace) -> int:
    from aol_dist.data.convert.openi import convert_openi

    return _run(convert_openi, reports=a.reports, images=a.images, out=a.out, projections=a.projections,
                split=a.split, image_size=a.image_size, aspect=a.aspect, image_format=a.image_format,
                tokenizer=a.tokenizer, max_length=a.max_length, samples_per_shard=a.samples_per_shard,
                workers=a.workers)


def _pairs(text: str | None) -> list[tuple[str, str]] | None:
    return [tuple(p.split(":", 1)) for p in text.split(",")] if text else None  # type: ignore[misc]


def _generic(a: argparse.Namespace) -> int:
    from aol_dist.data.convert.generic import convert_generic

    return _run(convert_generic, out=a.out, images=a.images, npz=a.npz, npz_images=a.npz_images,
                npz_truth=a.npz_truth, npz_labels=a.npz_labels, labels_csv=a.labels, id_column=a.id_column,
                label_columns=a.label_column, truth_column=a.truth_column, multi_label=a.multi_label,
                separator=a.separator, label_from_folder=a.label_from_folder, classes=a.classes,
                annotators=a.annotators, flip_pairs=_pairs(a.flip_pairs), votes=a.votes,
                vote_annotators=a.vote_annotators, split=a.split, split_column=a.split_column,
                split_from_folder=a.split_from_folder, npz_split=a.npz_split, validate_fraction=a.validate_fraction,
                test_fraction=a.test_fraction, image_size=a.image_size, color=a.color, aspect=a.aspect,
                image_format=a.image_format, samples_per_shard=a.samples_per_shard, workers=a.workers,
                seed=a.seed, dataset=a.name)


def add_converters(shards: Any) -> None:
    """Add ``mimic``, ``openi`` and ``generic`` to the ``aol shards`` sub-command group."""
    m = shards.add_parser("mimic", help="MIMIC-CXR-JPG -> train/validate/test shards (SPEC 5.1)")
    m.add_argument("--root", required=True, help="MIMIC-CXR-JPG root: the four CSVs (.csv or .csv.gz) and files/")
    m.add_argument("--reports", help="root holding files/p1X/pXXXXXXXX/sXXXXXXXX.txt (default: --root)")
    m.add_argument("--hand-labels", help="CSV of hand labels (study_id + 14 findings) -> an extra split with truth")
    m.add_argument("--hand-split", default="test_hand", help="name of that split")
    m.add_argument("--hand-gold", type=int, default=0, metavar="N",
                   help="of the hand-labelled studies, at least N (whole patients, a fixed pseudo-random choice) go to "
                        "--gold-split instead, to fit the trust (data.gold_split); the rest stay to evaluate on")
    m.add_argument("--gold-split", default="gold", help="name of that split")
    _common(m)
    m.set_defaults(func=_mimic)

    o = shards.add_parser("openi", help="OpenI XML reports + PNG images -> evaluation shards with truth")
    o.add_argument("--reports", required=True, help="NLMCXR_reports.tgz or a directory of ecgen-radiology XML")
    o.add_argument("--images", required=True, help="directory of the PNG images (searched recursively)")
    o.add_argument("--projections", help="CSV with filename,projection columns (indiana_projections.csv)")
    o.add_argument("--split", default="test", help="split name of the shards")
    _common(o)
    o.set_defaults(func=_openi)

    g = shards.add_parser("generic", help="image folder or .npz + label columns or simulated annotators")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image folder (searched recursively)")
    src.add_argument("--npz", help=".npz holding an (n, H, W[, C]) uint8 image array")
    g.add_argument("--npz-images", default="x", help="image array key in the npz")
    g.add_argument("--npz-truth", help="npz key of the true classes (n,) or 0/1 vectors (n, K)")
    g.add_argument("--npz-labels", nargs="+", default=[], help="npz keys, one label set each")
    g.add_argument("--labels", help="CSV with one row per image")
    g.add_argument("--id-column", help="CSV column naming the image (relative path or file name)")
    g.add_argument("--label-column", nargs="+", default=[], help="CSV columns, one label set each")
    g.add_argument("--truth-column", help="CSV column of true labels")
    g.add_argument("--multi-label", action="store_true", help="cells hold separated class names (multi-label)")
    g.add_argument("--separator", default="|", help="separator of multi-label cells")
    g.add_argument("--label-from-folder", action="store_true", help="a label set from each image's folder name")
    g.add_argument("--classes", help="class names a,b,c or 'cifar10' (default: inferred from the labels)")
    g.add_argument("--annotators", nargs="+", default=[], help="simulated: hs:0.3 sf:0.4 oc:0.5 ad avg (A.2.1)")
    g.add_argument("--flip-pairs", help="structured-flip pairs a:b,c:d (default: A.2.1's, CIFAR-10 classes)")
    g.add_argument("--votes", help=".npy (images, classes) human vote counts, aligned with --npz")
    g.add_argument("--vote-annotators", type=int, default=3, help="annotators drawn from --votes")
    g.add_argument("--split", default="train", help="split of images not assigned otherwise")
    g.add_argument("--split-column", help="CSV column naming each image's split")
    g.add_argument("--split-from-folder", action="store_true", help="first folder names the split (train/valid/test)")
    g.add_argument("--npz-split", help="npz key of an (n,) array of split names (train / validate / test), per image")
    g.add_argument("--validate-fraction", type=float, default=0.0)
    g.add_argument("--test-fraction", type=float, default=0.0)
    g.add_argument("--color", choices=("grey", "rgb"), default="grey", help="shard image mode")
    g.add_argument("--seed", type=int, default=0, help="seeds simulated annotators, vote draws, random splits")
    g.add_argument("--name", help="dataset name in the manifest (default: the input's name)")
    _common(g, image_size=None, tokens=False)
    g.set_defaults(func=_generic)

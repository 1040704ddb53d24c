"""``aol shards generic``: any image folder or ``.npz`` of images plus label columns -> the shard format.

Sources: ``--images DIR`` (every png/jpg/jpeg/bmp/tif/webp file under DIR, sorted by relative path) or
``--npz FILE`` (an ``(n, H, W[, C])`` uint8 array; key ``--npz-images``, default ``x``).

Label sets (each becomes one row of ``labels``; the findings are the classes). The manifest's
``label_kind`` is ``multiclass`` (every label set and the truth one-hot, checked) unless ``--multi-label``:

- CSV columns (``--labels CSV --id-column COL --label-column COL ...``): multi-class values (a class
  name or index -> one-hot) or, with ``--multi-label``, ``|``-separated class names -> 0/1 vector. The
  id column names the image by relative path or file name; an unknown value is an error naming the
  file, row and column.
- npz arrays (``--npz-labels KEY ...``): ``(n,)`` class indices or ``(n, K)`` 0/1 vectors.
- the parent folder's name (``--label-from-folder``), as in an ImageFolder tree.
- simulated annotators (``--annotators hs:0.3 sf:0.4 oc:0.5 ad avg``, see :mod:`.annotators`) drawn
  from the true class, and ``--votes FILE.npy --vote-annotators N``: N annotators drawn from per-image
  human vote counts (CIFAR-10H), aligned with the npz order.

``truth`` (optional): ``--truth-column`` or ``--npz-truth``; required by the simulated annotators.
Splits: ``--split-column``, ``--split-from-folder`` (first folder: train / valid(ate) / val / test),
``--npz-split KEY`` (an (n,) array of split names in the npz), or random ``--validate-fraction`` /
``--test-fraction`` (seeded), the rest ``--split`` (default train). A split with truth and no label set
(only ``--npz-truth`` or ``--truth-column``) is an evaluation-only split.

Bad values end in one line naming the file, the image index or row, and the column; images without a label
row and rows without an image are dropped, counted and named in the report's ``failed``.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aol_dist.data import shards
from aol_dist.data.convert import annotators as ann
from aol_dist.data.convert import common
from aol_dist.data.convert.images import from_array, load_image
from aol_dist.writes import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
SPLIT_NAMES = {"train": "train", "training": "train", "valid": "validate", "val": "validate",
               "validate": "validate", "validation": "validate", "test": "test"}


@dataclass(frozen=True)
class Item:
    """One image: where it comes from (a file path or an npz index) and its label sets."""

    source: str | int
    key: str
    split: str
    labels: bytes  # (M, K) uint8, as bytes: small, hashable, pickles fast
    truth: bytes | None

    def __str__(self) -> str:
        return str(self.source) if isinstance(self.source, str) else f"npz[{self.source}]"


@functools.lru_cache(maxsize=2)
def _npz_array(path: str, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        if key not in data.files:
            raise common.ConversionError(f"{path}: no array {key!r}; has {data.files}")
        return data[key]


def make_sample(item: Item, npz: str | None, npz_images: str, k: int, image_size: int, color: str, aspect: str,
                image_format: str) -> dict[str, Any]:
    if isinstance(item.source, int):
        image = from_array(_npz_array(npz, npz_images)[item.source], image_size, color, aspect)
    else:
        image = load_image(item.source, image_size, color, aspect)
    labels = np.frombuffer(item.labels, dtype=np.uint8).reshape(-1, k)
    sample = {"key": item.key, "image": image, "image_format": image_format, "labels": labels,
              "ids": {"source": str(item)}}
    if item.truth is not None:
        sample["truth"] = np.frombuffer(item.truth, dtype=np.uint8).copy()
    return sample


def resolve_classes(classes: str | Sequence[str] | None, values: Sequence[str]) -> list[str]:
    """``--classes a,b,c`` or ``cifar10``; else inferred: 0..max for integer values, sorted names otherwise."""
    if isinstance(classes, str):
        return list(ann.CIFAR10_CLASSES) if classes.lower() == "cifar10" else [c.strip() for c in classes.split(",")]
    if classes:
        return list(classes)
    found = sorted({v for v in values if v != ""})
    if found and all(v.lstrip("-").isdigit() for v in found):
        return [str(i) for i in range(max(int(v) for v in found) + 1)]
    return found


def encode(value: str, classes: list[str], multi_label: bool, separator: str, where: str) -> np.ndarray:
    """One cell -> a 0/1 vector over ``classes`` (one-hot for multi-class)."""
    out = np.zeros(len(classes), dtype=np.uint8)
    names = [v.strip() for v in value.split(separator)] if multi_label else [value.strip()]
    for name in names:
        if name == "" and multi_label:
            continue
        if name in classes:
            out[classes.index(name)] = 1
        elif name.isdigit() and int(name) < len(classes) and not multi_label:
            out[int(name)] = 1
        else:
            raise common.ConversionError(f"{where}: unknown label value {name!r}; classes are {classes}")
    return out


def check_npz_labels(a: np.ndarray, n: int, what: str) -> np.ndarray:
    """An npz label or truth array: one row per image, (n,) class indices or (n, K) 0/1 vectors, finite whole
    numbers >= 0; else a ConversionError naming the array, the image index and the value."""
    a = np.asarray(a)
    if a.ndim not in (1, 2) or len(a) != n:
        raise common.ConversionError(f"{what}: shape {a.shape}, expected ({n},) class indices or ({n}, K) 0/1 "
                                     f"vectors, one row per image of the npz ({n} images)")
    if a.dtype.kind not in "biuf":
        raise common.ConversionError(f"{what}: dtype {a.dtype}, expected numbers")
    with np.errstate(invalid="ignore"):  # NaN compares unequal to everything: a bad value like any other
        bad = (a < 0) | (np.round(a) != a) | (~np.isfinite(a) if a.dtype.kind == "f" else False)
    if bad.any():
        first = np.argwhere(bad)[0]
        at = f"index {first[0]}" + (f", column {first[1]}" if a.ndim == 2 else "")
        raise common.ConversionError(f"{what}: {at} holds {a[tuple(first)].item()!r}, expected a whole number >= 0")
    return a.astype(np.int64)


def _one_hot(indices: np.ndarray, k: int, what: str) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim == 2:  # already (n, K) 0/1 vectors
        if indices.shape[1] != k:
            raise common.ConversionError(f"{what}: expected (n, {k}) 0/1 vectors, got shape {indices.shape}")
        bad = np.argwhere(indices > 1)
        if bad.size:
            raise common.ConversionError(f"{what}: index {bad[0][0]}, column {bad[0][1]} holds {indices[tuple(bad[0])]}, "
                                         f"expected 0/1 vectors")
        return indices.astype(np.uint8)
    bad = np.flatnonzero((indices < 0) | (indices >= k))
    if bad.size:
        raise common.ConversionError(f"{what}: index {bad[0]} has class {indices[bad[0]]}, outside 0..{k - 1}")
    return np.eye(k, dtype=np.uint8)[indices]


def _sources(images: str | None, npz: str | None, npz_images: str) -> tuple[list[str | int], list[str], int | None]:
    """Sources, their ids (relative path or index) and the npz image side (None for folders)."""
    if (images is None) == (npz is None):
        raise common.ConversionError("give exactly one of --images DIR and --npz FILE")
    if npz is not None:
        x = _npz_array(str(npz), npz_images)
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise common.ConversionError(f"{npz}[{npz_images!r}]: expected (n, H, W[, C]) uint8 images, got {x.dtype} {x.shape}")
        return list(range(len(x))), [str(i) for i in range(len(x))], x.shape[1] if x.shape[1] == x.shape[2] else None
    root = Path(images)
    if not root.is_dir():
        raise common.ConversionError(f"{images}: image directory not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [str(p) for p in files], [p.relative_to(root).as_posix() for p in files], None


def convert_generic(out: str | Path, *, images: str | None = None, npz: str | None = None, npz_images: str = "x",
                    npz_truth: str | None = None, npz_labels: Sequence[str] = (), labels_csv: str | None = None,
                    id_column: str | None = None, label_columns: Sequence[str] = (), truth_column: str | None = None,
                    multi_label: bool = False, separator: str = "|", label_from_folder: bool = False,
                    classes: str | Sequence[str] | None = None, annotators: Sequence[str] = (),
                    flip_pairs: Sequence[tuple[str, str]] | None = None, votes: str | None = None,
                    vote_annotators: int = 0, split: str = "train", split_column: str | None = None,
                    split_from_folder: bool = False, npz_split: str | None = None, validate_fraction: float = 0.0,
                    test_fraction: float = 0.0,
                    image_size: int | None = None, color: str = "grey", aspect: str = "stretch",
                    image_format: str = "png", samples_per_shard: int = 1000, workers: int = 1, seed: int = 0,
                    dataset: str | None = None) -> dict[str, Any]:
    """Convert, write the manifest and ``conversion_report.json``; returns the report."""
    # resolved: the shards' records name the images by path, and a resumed conversion given the same folder
    # by another path must reuse its finished shards (shards.made_with)
    images = str(Path(images).resolve()) if images else None
    sources, ids, native = _sources(images, npz, npz_images)
    size = image_size or native or 256
    dropped: Counter = Counter()
    n = len(sources)
    keep = np.ones(n, dtype=bool)
    sets: dict[str, np.ndarray] = {}  # name -> (n, K) uint8
    truth: np.ndarray | None = None
    splits = [split] * n

    rows: list[dict[str, str] | None] = [None] * n
    unmatched: list[dict[str, str]] = []  # named in the report's "failed"
    if labels_csv:
        if not id_column:
            raise common.ConversionError("--labels needs --id-column (the column naming each image)")
        wanted = [id_column, *label_columns, *([truth_column] if truth_column else []),
                  *([split_column] if split_column else [])]
        table = common.read_table(labels_csv, wanted)
        by_id = {i: j for j, i in enumerate(ids)}
        by_name = Counter(Path(i).name for i in ids)
        by_name_index = {Path(i).name: j for j, i in enumerate(ids) if by_name[Path(i).name] == 1}
        matched = set()
        for r, row in enumerate(table, start=1):
            ident = row[id_column].strip()
            j = by_id.get(ident, by_name_index.get(Path(ident).name))
            if j is None:
                dropped["label_rows_without_image"] += 1
                unmatched.append({"file": f"{common.where(Path(labels_csv), r, id_column)}: {ident!r}",
                                  "reason": "label_rows_without_image: no image of that name"})
                continue
            rows[j] = {"__row__": str(r), **row}
            matched.add(j)
        keep &= np.array([j in matched for j in range(n)])
        dropped["images_without_label_row"] += int(n - len(matched))
        unmatched += [{"file": str(sources[j]), "reason": "images_without_label_row: no row in " + str(labels_csv)}
                      for j in range(n) if j not in matched]
    columns = [*label_columns, *([truth_column] if truth_column else [])]
    values = [v.strip() for row in rows if row for c in columns
              for v in (row[c].split(separator) if multi_label else [row[c]])]
    if label_from_folder and images is None:
        raise common.ConversionError("--label-from-folder needs --images DIR")
    folder = [(Path(images) / i).parent.name for i in ids] if label_from_folder else []
    npz_arrays = {key: check_npz_labels(_npz_array(str(npz), key), n, f"{npz}[{key!r}]")
                  for key in (*([npz_truth] if npz_truth else []), *npz_labels)}
    if npz is not None and classes is None and npz_arrays:
        k_npz = max(a.shape[1] if a.ndim == 2 else int(a.max()) + 1 for a in npz_arrays.values())
        classes = [str(i) for i in range(k_npz)]
    names = resolve_classes(classes, values + folder)
    k = len(names)
    if k < 1:
        raise common.ConversionError("no classes: give --classes or label columns with values")

    def add(name: str, labels: np.ndarray) -> None:
        if name in sets:
            raise common.ConversionError(f"two label sets named {name!r}: rename a column or an annotator")
        sets[name] = labels

    def column(c: str) -> np.ndarray:
        out = np.zeros((n, k), dtype=np.uint8)
        for j, row in enumerate(rows):
            if row is not None:
                out[j] = encode(row[c], names, multi_label, separator, common.where(Path(labels_csv), int(row["__row__"]), c))
        return out

    for c in label_columns:
        add(c, column(c))
    if truth_column:
        truth = column(truth_column)
    for key in npz_labels:
        add(key, _one_hot(npz_arrays[key], k, f"{npz}[{key!r}]"))
    if npz_truth:
        truth = _one_hot(npz_arrays[npz_truth], k, f"{npz}[{npz_truth!r}]")
    if label_from_folder:
        add("folder", np.stack([encode(f, names, False, separator, f"{ids[j]}: folder") for j, f in enumerate(folder)]))

    simulated = {}
    if annotators:
        if truth is None or multi_label or (truth[keep].sum(1) != 1).any():
            raise common.ConversionError("simulated annotators need a multi-class truth (--npz-truth or --truth-column)")
        true_class = truth.argmax(1)
        for a, annotator in enumerate(ann.parse_annotators(annotators, names, flip_pairs, seed)):
            drawn = ann.draw_labels(annotator.matrix, true_class, seed, a)
            add(annotator.name, np.eye(k, dtype=np.uint8)[drawn])
            simulated[annotator.name] = {"noise_level": round(annotator.noise, 4),
                                         "observed_noise": round(float((drawn != true_class)[keep].mean()), 4),
                                         "confusion_matrix": np.round(annotator.matrix, 6).tolist()}
    if votes:
        counts = np.load(votes, allow_pickle=False)
        if npz is None or len(counts) != n or counts.shape[1:] != (k,):
            raise common.ConversionError(f"{votes}: vote counts {counts.shape} must be (images, classes) = ({n}, {k}) "
                                         f"aligned with an --npz source")
        for a, drawn in enumerate(ann.draw_from_votes(counts, vote_annotators, seed)):
            add(f"human{a + 1}", np.eye(k, dtype=np.uint8)[drawn])
            if truth is not None:
                simulated[f"human{a + 1}"] = {"observed_noise": round(float((drawn != truth.argmax(1))[keep].mean()), 4)}
    if not sets and truth is None:
        raise common.ConversionError("no label set: give --label-column, --npz-labels, --label-from-folder, "
                                     "--annotators or --votes (or only a truth, for an evaluation-only split)")

    if npz_split:
        names_ = _npz_array(str(npz), npz_split) if npz is not None else None
        if names_ is None or names_.shape != (n,):
            raise common.ConversionError(f"--npz-split {npz_split!r}: needs an --npz source and an (n,) = ({n},) array "
                                         f"of split names")
        for j, value in enumerate(names_):
            name_ = str(value).strip().lower()
            if name_ not in SPLIT_NAMES:
                raise common.ConversionError(f"{npz}[{npz_split!r}]: index {j} names split {name_!r}; expected one of "
                                             f"{sorted(SPLIT_NAMES)}")
            splits[j] = SPLIT_NAMES[name_]
    elif split_column:
        for j, row in enumerate(rows):
            if row is not None:
                value = row[split_column].strip().lower()
                if value not in SPLIT_NAMES:
                    raise common.ConversionError(f"{common.where(Path(labels_csv), int(row['__row__']), split_column)}: "
                                                 f"unknown split {value!r}; expected one of {sorted(SPLIT_NAMES)}")
                splits[j] = SPLIT_NAMES[value]
    elif split_from_folder:
        for j, i in enumerate(ids):
            first = i.split("/")[0].lower()
            if first not in SPLIT_NAMES or "/" not in i:
                raise common.ConversionError(f"{images}/{i}: first folder {first!r} names no split ({sorted(SPLIT_NAMES)})")
            splits[j] = SPLIT_NAMES[first]
    elif validate_fraction or test_fraction:
        if validate_fraction < 0 or test_fraction < 0 or validate_fraction + test_fraction >= 1:
            raise common.ConversionError("--validate-fraction and --test-fraction must be >= 0 and sum below 1")
        order = np.random.default_rng([seed, 7]).permutation(n)
        n_test, n_val = int(round(n * test_fraction)), int(round(n * validate_fraction))
        for j in order[:n_test]:
            splits[j] = "test"
        for j in order[n_test:n_test + n_val]:
            splits[j] = "validate"

    label_sets = list(sets)
    stacked = (np.stack([sets[s] for s in label_sets], axis=1) if sets
               else np.zeros((n, 0, k), np.uint8))  # (n, M, K); M = 0: an evaluation-only split (truth only)
    if not multi_label:  # multi-class: the manifest promises one-hot label sets and truth
        for what, vectors in [*sets.items(), *([("truth", truth)] if truth is not None else [])]:
            bad = np.flatnonzero(keep & (vectors.sum(1) != 1))
            if bad.size:
                raise common.ConversionError(f"{what}: image {ids[bad[0]]} has {int(vectors[bad[0]].sum())} classes, "
                                             f"a multi-class label set needs exactly one (give --multi-label for 0/1 "
                                             f"vectors)")
    items: dict[str, list[Item]] = {}
    for j in np.flatnonzero(keep):
        key = f"{j:08d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", ids[j].rsplit(".", 1)[0])[-80:]
        items.setdefault(splits[j], []).append(
            Item(sources[j], key, splits[j], stacked[j].tobytes(), None if truth is None else truth[j].tobytes()))
    items = dict(sorted(items.items(), key=lambda kv: (list(SPLIT_NAMES.values()).index(kv[0])
                                                       if kv[0] in SPLIT_NAMES.values() else 99, kv[0])))
    make = functools.partial(make_sample, npz=str(Path(npz).resolve()) if npz else None, npz_images=npz_images, k=k,
                             image_size=size, color=color, aspect=aspect, image_format=image_format)
    head = dict(findings=names, label_sets=label_sets, image_size=size, channels=3 if color == "rgb" else 1,
                image_format=image_format, label_kind="multilabel" if multi_label else "multiclass")
    records, reused = common.write_splits(out, items, make, samples_per_shard, workers, head)
    name = dataset or Path(images or npz).name.split(".")[0]
    source = {"images": str(Path(images).resolve()) if images else None, "aspect": aspect,
              "npz": str(Path(npz).resolve()) if npz else None, "npz_sha256": sha256_file(npz) if npz else None,
              "labels_csv_sha256": sha256_file(labels_csv) if labels_csv else None,
              "multi_label": multi_label, "seed": seed, "simulated_annotators": simulated,
              "votes_sha256": sha256_file(votes) if votes else None}
    shards.write_manifest(out, dataset=name, splits=records, **head, source=source,
                          has_truth={s: truth is not None for s in records})
    extra = {"annotators": {a: {k2: v for k2, v in d.items() if k2 != "confusion_matrix"} for a, d in simulated.items()}}
    report = common.build_report(name, records, reused, Counter({a: b for a, b in dropped.items() if b}), extra, unmatched)
    return common.finish(out, report)

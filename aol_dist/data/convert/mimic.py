"""``aol shards mimic``: MIMIC-CXR-JPG (SPEC 5.1) -> train / validate / test shards by the official split.

Input layout (``--root``; CSVs plain or .gz; reports under ``--reports``, default the same root)::

    mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv[.gz]
    files/p1X/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
    files/p1X/pXXXXXXXX/sXXXXXXXX.txt                      (from mimic-cxr-reports.zip)

One frontal image per study (PA preferred, else AP; the smallest dicom_id among equals, so the choice
does not depend on CSV order); lateral and other views are dropped and counted. The four label sets
negbio_u0/u1, chexpert_u0/u1 come from :func:`aol_dist.data.findings.label_sets_from_raw`. A study
whose report file is missing is KEPT with an empty report (its image and labels are still good
training data) and listed in the conversion report as ``missing_report``. Optional ``--hand-labels``:
a CSV of hand labels (study_id + the 14 findings; 1, 0 or blank) whose studies also form an extra
split with a ``truth`` vector, such as the MIMIC 1k test set.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aol_dist.data import shards
from aol_dist.data.convert import common
from aol_dist.data.convert.images import load_image
from aol_dist.data.findings import FINDINGS, LABEL_SETS, LABELERS, label_sets_from_raw
from aol_dist.writes import sha256_file

TABLES = {"chexpert": "mimic-cxr-2.0.0-chexpert", "negbio": "mimic-cxr-2.0.0-negbio",
          "metadata": "mimic-cxr-2.0.0-metadata", "split": "mimic-cxr-2.0.0-split"}
SPLITS = ("train", "validate", "test")
FRONTAL = ("PA", "AP")  # preference order
LATERAL = ("LATERAL", "LL", "XTABLE LATERAL")


@dataclass(frozen=True)
class Study:
    """One study to convert: its chosen frontal image and both labelers' raw mentions."""

    subject_id: str
    study_id: str
    dicom_id: str
    view: str
    split: str
    raw: tuple[tuple[float, ...], ...]  # per labeler in LABELERS order, 14 values each (NaN = blank)
    truth: tuple[int, ...] | None = None

    def __str__(self) -> str:  # what a failed-sample record names: the image file
        return f"files/p{self.subject_id[:2]}/p{self.subject_id}/s{self.study_id}/{self.dicom_id}.jpg"


def _id(value: str | None, path: Path, row: int, column: str) -> str:
    text = (value or "").strip()
    if not text.isdigit():
        raise common.ConversionError(f"{common.where(path, row, column)}: {text!r} is not a numeric id")
    return text


def read_labeler(path: Path) -> dict[str, tuple[str, tuple[float, ...]]]:
    """study_id -> (subject_id, 14 raw mentions) of one labeler's CSV."""
    out: dict[str, tuple[str, tuple[float, ...]]] = {}
    for r, row in enumerate(common.read_table(path, ("subject_id", "study_id", *FINDINGS)), start=1):
        study = _id(row["study_id"], path, r, "study_id")
        if study in out:
            raise common.ConversionError(f"{common.where(path, r, 'study_id')}: study {study} listed twice")
        raw = tuple(common.parse_mention(row[f], path, r, f) for f in FINDINGS)
        out[study] = (_id(row["subject_id"], path, r, "subject_id"), raw)
    return out


def read_hand_labels(path: Path) -> dict[str, tuple[int, ...]]:
    """study_id -> 14 hand labels (1, 0; blank -> 0). Uncertain (-1) is not a truth: an error."""
    out = {}
    for r, row in enumerate(common.read_table(path, ("study_id", *FINDINGS)), start=1):
        values = []
        for f in FINDINGS:
            v = common.parse_mention(row[f], path, r, f)
            if v == -1.0:
                raise common.ConversionError(f"{common.where(path, r, f)}: hand label -1 (uncertain); truth must be 1, 0 or blank")
            values.append(0 if math.isnan(v) else int(v))
        out[_id(row["study_id"], path, r, "study_id")] = tuple(values)
    return out


def plan(root: str | Path, hand_labels: str | Path | None = None, hand_split: str = "test_hand",
         hand_gold: int = 0, gold_split: str = "gold") -> tuple[dict[str, list[Study]], Counter, dict[str, str]]:
    """Join the four CSVs; choose one frontal image per study. Returns studies per split, drop counts
    and the sha256 of every CSV read (recorded in the manifest as the source checksums). With ``hand_gold``,
    that many hand-labelled studies go to ``gold_split`` instead of ``hand_split`` (:func:`split_gold`)."""
    root = Path(root)
    paths = {k: common.find_table(root, stem) for k, stem in TABLES.items()}
    labels = {name: read_labeler(paths[name]) for name in LABELERS}
    split_of: dict[str, str] = {}
    for r, row in enumerate(common.read_table(paths["split"], ("dicom_id", "study_id", "subject_id", "split")), start=1):
        if row["split"] not in SPLITS:
            raise common.ConversionError(f"{common.where(paths['split'], r, 'split')}: unknown split {row['split']!r}; "
                                         f"expected one of {SPLITS}")
        split_of[row["dicom_id"].strip()] = row["split"]
    images: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    meta = paths["metadata"]
    for r, row in enumerate(common.read_table(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition")), start=1):
        key = (_id(row["subject_id"], meta, r, "subject_id"), _id(row["study_id"], meta, r, "study_id"))
        images[key].append((row["dicom_id"].strip(), (row["ViewPosition"] or "").strip().upper()))

    dropped: Counter = Counter()
    out: dict[str, list[Study]] = {s: [] for s in SPLITS}
    by_study: dict[str, Study] = {}
    for (subject, study), dicoms in sorted(images.items()):
        views = Counter("frontal" if v in FRONTAL else "lateral" if v in LATERAL else "other" for _, v in dicoms)
        dropped["lateral_view_images"] += views["lateral"]
        dropped["other_view_images"] += views["other"]
        frontal = next(([d for d in dicoms if d[1] == v] for v in FRONTAL if any(d[1] == v for d in dicoms)), [])
        if not frontal:
            dropped["studies_without_frontal_image"] += 1
            continue
        dicom, view = min(frontal)
        dropped["extra_frontal_images"] += views["frontal"] - 1
        if dicom not in split_of:
            dropped["studies_not_in_split_csv"] += 1
            continue
        missing = [name for name in LABELERS if study not in labels[name]]
        if missing:
            dropped[f"studies_without_{missing[0]}_labels"] += 1
            continue
        s = Study(subject, study, dicom, view, split_of[dicom], tuple(labels[n][study][1] for n in LABELERS))
        out[s.split].append(s)
        by_study[study] = s
    if hand_labels:
        truth = read_hand_labels(Path(hand_labels))
        paths["hand_labels"] = Path(hand_labels)
        out[hand_split] = []
        for study, t in sorted(truth.items()):
            if study in by_study:
                s = by_study[study]
                out[hand_split].append(Study(s.subject_id, s.study_id, s.dicom_id, s.view, hand_split, s.raw, t))
            else:
                dropped["hand_labelled_studies_not_converted"] += 1
        if hand_gold:
            out[gold_split], out[hand_split] = split_gold(out[hand_split], hand_gold, Path(hand_labels))
    checksums = {p.name: sha256_file(p) for p in paths.values()}
    return out, Counter({k: v for k, v in dropped.items() if v}), checksums


def split_gold(studies: list[Study], n: int, where: Path) -> tuple[list[Study], list[Study]]:
    """(gold, rest): whole patients, in a fixed pseudo-random order (sha256 of the subject id), go to the gold
    split until it holds at least ``n`` studies; so no patient is on both sides (``data.gold_split``: the
    studies whose truth fits the trust, the rest to evaluate on)."""
    if n > len(studies):
        raise common.ConversionError(f"{where}: --hand-gold {n}, but only {len(studies)} hand-labelled studies "
                                     f"were converted")
    per_subject = Counter(s.subject_id for s in studies)
    chosen: set[str] = set()
    for subject in sorted(per_subject, key=lambda subject: hashlib.sha256(subject.encode()).hexdigest()):
        if sum(per_subject[c] for c in chosen) >= n:
            break
        chosen.add(subject)
    return [s for s in studies if s.subject_id in chosen], [s for s in studies if s.subject_id not in chosen]


def make_sample(study: Study, root: str, reports: str, image_size: int, aspect: str, image_format: str,
                tokenizer: str | None, max_length: int) -> dict[str, Any]:
    """One study -> canonical shard sample (runs in a worker process)."""
    image = load_image(Path(root) / str(study), image_size, "grey", aspect, name=str(Path(root) / str(study)))
    report_file = Path(reports) / "files" / f"p{study.subject_id[:2]}" / f"p{study.subject_id}" / f"s{study.study_id}.txt"
    notes = []
    try:
        report = report_file.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:  # the image and labels are still good training data: keep, and say so
        report = ""
        notes.append(f"missing_report: {report_file}" if isinstance(e, FileNotFoundError)
                     else f"unreadable_report: {report_file} ({e})")
    sets = label_sets_from_raw({name: np.asarray(raw, dtype=np.float64) for name, raw in zip(LABELERS, study.raw)})
    sample = {"key": f"s{study.study_id}", "image": image, "image_format": image_format,
              "labels": np.stack([sets[n] for n in LABEL_SETS]), "report": report, "notes": notes,
              "ids": {"subject_id": int(study.subject_id), "study_id": int(study.study_id), "dicom_id": study.dicom_id,
                      "view": study.view}}
    if study.truth is not None:
        sample["truth"] = np.asarray(study.truth, dtype=np.uint8)
    if tokenizer:
        from aol_dist.data.convert.tokenize import tokenize

        sample["tokens"] = tokenize(report, tokenizer, max_length)
    return sample


def convert_mimic(root: str | Path, out: str | Path, *, reports: str | Path | None = None, image_size: int = 256,
                  aspect: str = "stretch", image_format: str = "png", tokenizer: str | None = None,
                  max_length: int = 256, samples_per_shard: int = 1000, workers: int = 1,
                  hand_labels: str | Path | None = None, hand_split: str = "test_hand", hand_gold: int = 0,
                  gold_split: str = "gold") -> dict[str, Any]:
    """Convert, write the manifest and ``conversion_report.json``; returns the report."""
    from aol_dist.data.convert.tokenize import tokenizer_record

    token_info = tokenizer_record(tokenizer, max_length) if tokenizer else None  # fails fast on a bad path
    if hand_gold and not hand_labels:
        raise common.ConversionError("--hand-gold needs --hand-labels (the hand-labelled studies to take them from)")
    items, dropped, checksums = plan(root, hand_labels, hand_split, hand_gold, gold_split)
    # resolved: a resumed conversion given the same folders by another path reuses its finished shards
    make = functools.partial(make_sample, root=str(Path(root).resolve()), reports=str(Path(reports or root).resolve()),
                             image_size=image_size, aspect=aspect, image_format=image_format,
                             tokenizer=token_info and token_info["path"], max_length=max_length)
    head = dict(findings=FINDINGS, label_sets=LABEL_SETS, image_size=image_size, tokenizer=token_info,
                image_format=image_format)
    records, reused = common.write_splits(out, items, make, samples_per_shard, workers, head)
    shards.write_manifest(out, dataset="mimic-cxr-jpg", splits=records, **head,
                          source={"root": str(Path(root).resolve()), "csv_sha256": checksums, "aspect": aspect,
                                  "view_preference": list(FRONTAL)},
                          has_truth={hand_split: True, **({gold_split: True} if hand_gold else {})} if hand_labels else None)
    return common.finish(out, common.build_report("mimic-cxr-jpg", records, reused, dropped))

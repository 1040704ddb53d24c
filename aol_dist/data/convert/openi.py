"""``aol shards openi``: OpenI / Indiana University chest X-rays -> evaluation shards with ``truth``.

Reports: ``ecgen-radiology/*.xml`` (a directory, or NLMCXR_reports.tgz as published). ``truth`` comes
from the hand-assigned MeSH major terms through :data:`MESH_RULES` (documented in docs/data.md); terms
no rule maps are counted in the conversion report (``unmapped_mesh_terms``). A report indexed only as
"No Indexing" (or with no MeSH term at all) has no truth and is dropped, counted.

Images: one sample per image the report lists (``parentImage id``), found under ``--images`` as
``<id>.png`` (NLMCXR_png) or ``<number>_IM-....dcm.png`` (the Kaggle copy, :func:`image_stem`).
Views: frontal images only where the view is identifiable -- from ``--projections`` (a CSV with
``filename`` and ``projection`` columns, as in indiana_projections.csv) or from a caption naming one
view. OpenI captions usually describe the whole study ("PA and lateral"): such images have an unknown
view and are KEPT, counted in ``image_views_listed``; pass ``--projections`` to drop laterals reliably.
A missing image is a counted skip naming the image id, never fatal.

Label sets: none. OpenI is evaluation-only, so every sample's ``labels`` is a (0, 14) array and the
manifest's ``label_sets`` is empty; AUCs are against ``truth`` only.
"""

from __future__ import annotations

import functools
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from aol_dist.data import shards
from aol_dist.data.convert import common
from aol_dist.data.convert.images import load_image
from aol_dist.data.findings import FINDINGS
from aol_dist.writes import sha256_file

#: Rules in order, first match wins: (MeSH heading, findings, qualifiers of which one is required,
#: qualifiers that exclude the rule). A major term is "Heading/qualifier/qualifier/..."; matching is
#: case-insensitive. Non-lung locations keep nodules, masses and opacities of bone, breast or soft
#: tissue out of the lung findings.
NON_LUNG = ("ribs", "thoracic vertebrae", "lumbar vertebrae", "cervical vertebrae", "clavicle", "sternum", "humerus",
            "shoulder", "breast", "mediastinum", "heart", "adipose tissue", "mitral valve", "abdomen", "thorax",
            "pleura", "diaphragm", "supracardiac", "paratracheal", "cardiophrenic angle")
MESH_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("normal", ("No Finding",), (), ()),
    ("Pulmonary Atelectasis", ("Atelectasis",), (), ()),
    ("Atelectasis", ("Atelectasis",), (), ()),
    ("Cardiomegaly", ("Cardiomegaly",), (), ()),
    ("Cardiac Shadow", ("Cardiomegaly",), ("enlarged",), ()),
    ("Consolidation", ("Consolidation",), (), ()),
    ("Pulmonary Edema", ("Edema",), (), ()),
    ("Pulmonary Congestion", ("Edema",), (), ()),
    ("Mediastinum", ("Enlarged Cardiomediastinum",), ("enlarged", "prominent", "widened"), ()),
    ("Fractures, Bone", ("Fracture",), (), ()),
    ("Nodule", ("Lung Lesion",), (), NON_LUNG),
    ("Mass", ("Lung Lesion",), (), NON_LUNG),
    ("Opacity", ("Lung Opacity",), (), NON_LUNG),
    ("Density", ("Lung Opacity",), (), NON_LUNG),
    ("Airspace Disease", ("Lung Opacity",), (), ()),
    ("Infiltrate", ("Lung Opacity",), (), ()),
    ("Pleural Effusion", ("Pleural Effusion",), (), ()),
    ("Costophrenic Angle", ("Pleural Effusion",), ("blunted",), ()),
    ("Hemothorax", ("Pleural Effusion",), (), ()),
    ("Hydropneumothorax", ("Pneumothorax", "Pleural Effusion"), (), ()),
    ("Hemopneumothorax", ("Pneumothorax", "Pleural Effusion"), (), ()),
    ("Thickening", ("Pleural Other",), ("pleura",), ()),
    ("Pneumonia", ("Pneumonia",), (), ()),
    ("Pneumothorax", ("Pneumothorax",), (), ()),
    ("Catheters, Indwelling", ("Support Devices",), (), ()),
    ("Implanted Medical Device", ("Support Devices",), (), ()),
    ("Medical Device", ("Support Devices",), (), ()),
    ("Tube, Inserted", ("Support Devices",), (), ()),
    ("Stents", ("Support Devices",), (), ()),
    ("Surgical Instruments", ("Support Devices",), (), ()),
    ("Pacemaker, Artificial", ("Support Devices",), (), ()),
)
NOT_INDEXED = "no indexing"
NO_FINDING = FINDINGS.index("No Finding")
SUPPORT_DEVICES = FINDINGS.index("Support Devices")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def map_term(term: str) -> tuple[str, ...] | None:
    """One MeSH major term -> the findings it asserts, or None when no rule maps it."""
    head, *quals = [_norm(p) for p in term.split("/")]
    for rule_head, findings, require, exclude in MESH_RULES:
        if head == _norm(rule_head) and (not require or any(q in require for q in quals)) \
                and not any(q in exclude for q in quals):
            return findings
    return None


def truth_from_mesh(terms: list[str]) -> tuple[np.ndarray, list[str]]:
    """MeSH major terms -> (14-vector truth, unmapped terms).

    No Finding is 1 only for a report indexed "normal" with no mapped pathology (Support Devices do not
    count, as in CheXpert); a report that is "normal" and also lists a pathology gets No Finding 0.
    """
    truth = np.zeros(len(FINDINGS), dtype=np.uint8)
    unmapped = []
    for term in terms:
        found = map_term(term)
        if found is None:
            if _norm(term) != NOT_INDEXED:
                unmapped.append(re.sub(r"\s+", " ", term).strip())
            continue
        for f in found:
            truth[FINDINGS.index(f)] = 1
    pathology = np.delete(truth, [NO_FINDING, SUPPORT_DEVICES]).any()
    if pathology:
        truth[NO_FINDING] = 0
    return truth, unmapped


def image_stem(name: str) -> str:
    """Match key of an image id or file name: ``<report number>_IM-<series>-<image>``.

    The XML says ``CXR10_IM-0002-1001`` (sometimes ``CXR1_1_IM-0001-3001``), NLMCXR_png files are the
    id + ``.png``, the Kaggle copy names the same image ``10_IM-0002-1001.dcm.png`` / ``1_IM-0001-3001.dcm.png``.
    """
    stem = Path(name).name.split(".")[0]
    m = re.match(r"^(?:CXR)?(\d+)(?:_\d+)?_(IM-\d+-\d+)$", stem, flags=re.IGNORECASE)
    return f"{m.group(1)}_{m.group(2).upper()}" if m else stem


def view_from_caption(caption: str) -> str:
    """"frontal" or "lateral" when the caption names one view only, else "unknown". OpenI captions mostly
    describe the study ("PA and lateral", "2 views", anonymised "Chest XXXX and lateral"): unknown."""
    c = caption.lower()
    if re.search(r"\band\b|&|/|\bviews\b|\b2\b|\btwo\b|\bboth\b", c):
        return "unknown"
    lateral = "lateral" in c or re.search(r"\blat\b", c) is not None
    frontal = re.search(r"\b(pa|ap|frontal)\b", c) is not None
    return "lateral" if lateral and not frontal else "frontal" if frontal and not lateral else "unknown"


@dataclass(frozen=True)
class OpenIImage:
    report_id: str
    image_id: str
    view: str
    report: str
    truth: tuple[int, ...]
    path: str | None

    def __str__(self) -> str:
        return self.image_id


def iter_reports(reports: str | Path) -> Iterator[tuple[str, bytes]]:
    """(file name, XML bytes) of every ``*.xml`` in a directory or a .tgz, in numeric file order."""
    reports = Path(reports)
    order = lambda name: (int(m.group()) if (m := re.search(r"\d+", Path(name).stem)) else 1 << 62, name)  # noqa: E731
    if reports.is_dir():
        for path in sorted(reports.rglob("*.xml"), key=lambda p: order(p.name)):
            yield path.name, path.read_bytes()
        return
    try:
        with tarfile.open(reports, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                             key=lambda m: order(m.name))
            for m in members:
                yield Path(m.name).name, tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise common.ConversionError(f"{reports}: not a readable directory or tar of XML reports ({e})") from None


def read_projections(path: Path) -> dict[str, str]:
    rows = common.read_table(path, ("filename", "projection"))
    return {image_stem(r["filename"]): ("lateral" if "lat" in r["projection"].lower() else
                                        "frontal" if r["projection"].strip().lower() in ("frontal", "pa", "ap") else "other")
            for r in rows}


def plan(reports: str | Path, images: str | Path,
         projections: str | Path | None = None) -> tuple[list[OpenIImage], dict[str, Any]]:
    """Parse every report; list the frontal-or-unknown images with their truth. Returns the images and
    statistics: ``dropped`` (Counter), ``failed`` report files, ``views`` (Counter of kept images) and
    ``unmapped`` MeSH terms (Counter)."""
    index = {image_stem(p.name): str(p) for p in Path(images).rglob("*")
             if p.suffix.lower() in (".png", ".jpg", ".jpeg")} if Path(images).is_dir() else {}
    views = read_projections(Path(projections)) if projections else {}
    out: list[OpenIImage] = []
    dropped, failed, unmapped, kept_views = Counter(), [], Counter(), Counter()
    for name, data in iter_reports(reports):
        try:
            root = ET.fromstring(data)
        except ET.ParseError as e:
            dropped["unreadable_reports"] += 1
            failed.append({"item": name, "reason": f"unreadable_report: {name} ({e})"})
            continue
        report_id = (root.find("uId").get("id") if root.find("uId") is not None else Path(name).stem)
        terms = [m.text or "" for m in root.findall("MeSH/major")]
        if not [t for t in terms if _norm(t) != NOT_INDEXED]:
            dropped["reports_without_mesh_index"] += 1
            continue
        parents = root.findall("parentImage")
        if not parents:
            dropped["reports_without_images"] += 1
            continue
        truth, missed = truth_from_mesh(terms)
        unmapped.update(missed)
        text = "\n".join(f"{a.get('Label')}: {a.text.strip()}" for a in root.iter("AbstractText")
                         if a.text and a.text.strip())
        for parent in parents:
            image_id = parent.get("id", "")
            stem = image_stem(image_id)
            view = views.get(stem) or view_from_caption(parent.findtext("caption") or "")
            if view != "frontal" and view != "unknown":
                dropped[f"{view}_view_images"] += 1
                continue
            kept_views[view] += 1
            out.append(OpenIImage(report_id, image_id, view, text, tuple(int(v) for v in truth), index.get(stem)))
    return out, {"dropped": dropped, "failed": failed, "unmapped": unmapped, "views": kept_views}


def make_sample(image: OpenIImage, image_size: int, aspect: str, image_format: str, tokenizer: str | None,
                max_length: int) -> dict[str, Any]:
    if image.path is None:
        raise shards.SkipSample(f"missing_image: {image.image_id} (no {image.image_id}.png or "
                                f"{image_stem(image.image_id)}.dcm.png under the image directory)")
    sample = {"key": "openi-" + re.sub(r"[^A-Za-z0-9_-]", "_", image.image_id),
              "image": load_image(image.path, image_size, "grey", aspect), "image_format": image_format,
              "labels": np.zeros((0, len(FINDINGS)), dtype=np.uint8), "truth": np.asarray(image.truth, np.uint8),
              "report": image.report, "ids": {"report_id": image.report_id, "image_id": image.image_id, "view": image.view}}
    if tokenizer:
        from aol_dist.data.convert.tokenize import tokenize

        sample["tokens"] = tokenize(image.report, tokenizer, max_length)
    return sample


def convert_openi(reports: str | Path, images: str | Path, out: str | Path, *, projections: str | Path | None = None,
                  split: str = "test", image_size: int = 256, aspect: str = "stretch", image_format: str = "png",
                  tokenizer: str | None = None, max_length: int = 256, samples_per_shard: int = 1000,
                  workers: int = 1) -> dict[str, Any]:
    """Convert, write the manifest and ``conversion_report.json``; returns the report."""
    from aol_dist.data.convert.tokenize import tokenizer_record

    if not Path(images).is_dir():
        raise common.ConversionError(f"{images}: image directory not found")
    token_info = tokenizer_record(tokenizer, max_length) if tokenizer else None
    # resolved: a resumed conversion given the same folders by another path reuses its finished shards
    items, stats = plan(reports, Path(images).resolve(), projections)
    make = functools.partial(make_sample, image_size=image_size, aspect=aspect, image_format=image_format,
                             tokenizer=token_info and token_info["path"], max_length=max_length)
    head = dict(findings=FINDINGS, label_sets=(), image_size=image_size, tokenizer=token_info, image_format=image_format)
    records, reused = common.write_splits(out, {split: items}, make, samples_per_shard, workers, head)
    source = {"reports": str(Path(reports).resolve()), "images": str(Path(images).resolve()), "aspect": aspect,
              "mesh_rules": len(MESH_RULES)}
    if Path(reports).is_file():
        source["reports_sha256"] = sha256_file(reports)
    shards.write_manifest(out, dataset="openi", splits=records, **head, source=source, has_truth={split: True})
    extra = {"image_views_listed": dict(stats["views"]),
             "unmapped_mesh_terms": dict(stats["unmapped"].most_common())}
    report = common.build_report("openi", records, reused, stats["dropped"], extra, stats["failed"])
    return common.finish(out, report)

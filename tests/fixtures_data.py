"""Miniature raw datasets in their real layouts, built in a tmp dir: MIMIC-CXR-JPG, OpenI XML, a local
tokenizer. Nothing here reads ../shared/data (tests/test_real_data.py does, and skips without it)."""

from __future__ import annotations

import csv
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from aol_dist.data.findings import FINDINGS
from aol_dist.data.synth import synth_study

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Views of each study, cycled: what real MIMIC metadata holds (PA, AP, LATERAL, LL, blank, oblique).
VIEW_PATTERNS = (("PA", "LATERAL"), ("AP",), ("AP", "PA", "LATERAL"), ("LATERAL",), ("AP", "LL"), ("PA", ""),
                 ("AP", "AP AXIAL"), ("PA", "PA"))
MENTIONS = ("1.0", "0.0", "-1.0", "")


def radiograph(index: int, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    """A small non-square grey image (w x h = size) from the synthetic dataset."""
    image = Image.fromarray(synth_study(index, 0, 48)["image"], mode="L")
    return np.asarray(image.resize(size))


def save_jpeg(path: Path, image: np.ndarray, orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(image)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(path, format="JPEG", quality=90, exif=exif.tobytes())


def _write_csv(path: Path, header: list[str], rows: list[list], gz: bool) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wt", encoding="utf-8") as f:
            f.write(buf.getvalue())
    else:
        path.write_text(buf.getvalue())


def build_mimic_tree(root: Path, n_studies: int = 32, seed: int = 0) -> dict:
    """A MIMIC-CXR-JPG tree in the exact layout of SPEC 5.1; returns what a correct conversion yields.

    chexpert and metadata CSVs are gzipped, negbio and split plain. Study 0's report is missing, the
    chosen image of study 9 is a truncated JPEG and that of study 10 is absent.
    """
    rng = np.random.default_rng(seed)
    subjects = [str(10_000_000 + int(x)) for x in rng.choice(9_999_999, size=max(2, n_studies // 3), replace=False)]
    meta, split_rows, labels = [], [], {"chexpert": [], "negbio": []}
    expect = {"chosen": {}, "split": {}, "raw": {}, "kept": {"train": 0, "validate": 0, "test": 0},
              "dropped": {"lateral_view_images": 0, "other_view_images": 0, "extra_frontal_images": 0,
                          "studies_without_frontal_image": 0, "unreadable_image": 1, "missing_image": 1}}
    for i in range(n_studies):
        subject = subjects[i % len(subjects)]
        study = str(50_000_000 + 1_000 * i + int(rng.integers(1000)))
        split = ("train", "train", "validate", "test")[i % 4]
        views = VIEW_PATTERNS[i % len(VIEW_PATTERNS)]
        dicoms = ["-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, 5)) for _ in views]
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        for j, (dicom, view) in enumerate(zip(dicoms, views)):
            meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 48, 40, 21800101, 120000.0, "", "", ""])
            split_rows.append([dicom, study, subject, split])
            save_jpeg(study_dir / f"{dicom}.jpg", radiograph(7 * i + j))
        frontal = [(d, v) for d, v in zip(dicoms, views) if v in ("PA", "AP")]
        expect["dropped"]["lateral_view_images"] += sum(v in ("LATERAL", "LL") for v in views)
        expect["dropped"]["other_view_images"] += sum(v in ("", "AP AXIAL") for v in views)
        raw = {name: [MENTIONS[int(k)] for k in rng.integers(0, 4, len(FINDINGS))] for name in labels}
        for name in labels:
            labels[name].append([subject, study, *raw[name]])
        if not frontal:
            expect["dropped"]["studies_without_frontal_image"] += 1
            continue
        expect["dropped"]["extra_frontal_images"] += len(frontal) - 1
        best = [f for f in frontal if f[1] == "PA"] or frontal
        chosen = min(best)[0]
        expect["chosen"][study], expect["split"][study], expect["raw"][study] = chosen, split, raw
        if i == 9:
            data = (study_dir / f"{chosen}.jpg").read_bytes()
            (study_dir / f"{chosen}.jpg").write_bytes(data[: len(data) // 3])
            expect["corrupt"] = f"{chosen}.jpg"
        elif i == 10:
            (study_dir / f"{chosen}.jpg").unlink()
            expect["missing"] = f"{chosen}.jpg"
        else:
            expect["kept"][split] += 1
        if i != 0:
            study_dir.with_suffix(".txt").write_text(f"FINAL REPORT\n FINDINGS: study {study}, no acute process.\n")
        else:
            expect["missing_report_study"] = study
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id",
               "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
               "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
               "PatientOrientationCodeSequence_CodeMeaning"], meta, gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=False)
    for name, gz in (("chexpert", True), ("negbio", False)):
        _write_csv(root / f"mimic-cxr-2.0.0-{name}.csv", ["subject_id", "study_id", *FINDINGS], labels[name], gz=gz)
    return expect


def rewrite_csv(path: Path, edit) -> None:
    """Apply ``edit(header, rows) -> (header, rows)`` to a plain or gzipped CSV in place."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header, body = edit(rows[0], rows[1:])
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *body])


def make_tokenizer(directory: Path, extra: tuple[str, ...] = ()) -> Path:
    """A tiny BERT WordPiece tokenizer saved locally (never downloaded)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "final", "report", "findings", ":", ",", ".", "no",
             "acute", "process", "study", "effusion", "normal", "heart", "size", *extra]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(directory)
    return directory


OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <MedlineCitation><Article><Abstract>
      <AbstractText Label="COMPARISON">None.</AbstractText>
      <AbstractText Label="FINDINGS">{findings}</AbstractText>
      <AbstractText Label="IMPRESSION">{impression}</AbstractText>
   </Abstract></Article></MedlineCitation>
   <MeSH>{mesh}</MeSH>
   {images}
</eCitation>
"""


def openi_xml(n: int, mesh: list[str], images: list[tuple[str, str]], findings: str = "Heart size normal.",
              impression: str = "No acute disease.") -> str:
    """One ecgen-radiology report; ``images`` are (image id, caption)."""
    parents = "\n".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>{c}</caption></parentImage>'
                        for i, c in images)
    return OPENI_XML.format(n=n, findings=findings, impression=impression, images=parents,
                            mesh="".join(f"<major>{m}</major>" for m in mesh))


def write_openi(reports: Path, images: Path, cases: list[tuple[int, list[str], list[tuple[str, str]]]],
                missing: set[str] = frozenset(), tgz: bool = False) -> Path:
    """Reports (a directory or NLMCXR_reports.tgz) and small grey PNGs for every image not in ``missing``."""
    files = {f"ecgen-radiology/{n}.xml": openi_xml(n, mesh, imgs) for n, mesh, imgs in cases}
    images.mkdir(parents=True, exist_ok=True)
    for k, (_, _, imgs) in enumerate(cases):
        for image_id, _ in imgs:
            if image_id not in missing:
                Image.fromarray(radiograph(k, (36, 30))).save(images / f"{image_id}.png")
    if tgz:
        reports.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(reports, "w:gz") as tar:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return reports
    for name, text in files.items():
        (reports / name).parent.mkdir(parents=True, exist_ok=True)
        (reports / name).write_text(text)
    return reports

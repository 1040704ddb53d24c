"""`aol shards openi`: MeSH -> 14 findings table, views, missing images, evaluation-only shards (no label
sets) through verify, inspect, EvalStream and evaluate."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from aol_dist.cli import main as cli
from aol_dist.data.convert.openi import MESH_RULES, convert_openi, map_term, truth_from_mesh, view_from_caption
from aol_dist.data.findings import FINDINGS
from aol_dist.data.label_stats import inspect
from aol_dist.data.shards import read_manifest, split_shards, verify
from aol_dist.data.stream import EvalStream, make_loader
from fixtures_data import write_openi

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"
PA_LAT = "Xray Chest PA and Lateral"
CASES = [
    (1, ["normal"], [("CXR1_1_IM-0001-3001", PA_LAT), ("CXR1_1_IM-0001-4001", PA_LAT)]),
    (2, ["Cardiomegaly/borderline", "Pulmonary Atelectasis/base/left/mild", "Opacity/ribs/right"],
     [("CXR2_1_IM-0652-1001", "PA chest"), ("CXR2_1_IM-0652-2001", "Lateral chest")]),
    (3, ["Pleural Effusion/bilateral/small", "Catheters, Indwelling/right", "Calcified Granuloma/lung/upper lobe"],
     [("CXR3_1_IM-1384-1001", PA_LAT)]),
    (4, ["No Indexing"], [("CXR4_1_IM-2050-1001", PA_LAT)]),
    (5, ["normal", "Cardiac Shadow/enlarged"], [("CXR5_1_IM-2117-1001", "AP portable chest")]),
    (6, ["Hydropneumothorax/right"], []),
    (7, ["Technical Quality of Image Unsatisfactory "], [("CXR7_1_IM-2263-1001", PA_LAT)]),
]


def f(*names):
    v = np.zeros(len(FINDINGS), np.uint8)
    for n in names:
        v[FINDINGS.index(n)] = 1
    return v


@pytest.mark.parametrize("term,expected", [
    ("normal", ("No Finding",)), ("Pulmonary Atelectasis/base/left/mild", ("Atelectasis",)),
    ("Cardiomegaly/mild", ("Cardiomegaly",)), ("Cardiac Shadow/enlarged", ("Cardiomegaly",)),
    ("Cardiac Shadow/obscured", None), ("Mediastinum/prominent", ("Enlarged Cardiomediastinum",)),
    ("Mediastinum/lymph nodes", None), ("Fractures, Bone/ribs/right", ("Fracture",)),
    ("Nodule/lung/upper lobe/right", ("Lung Lesion",)), ("Mass/breast/left", None),
    ("Opacity/lung/base/left", ("Lung Opacity",)), ("Opacity/ribs", None), ("Airspace Disease/lung/bilateral", ("Lung Opacity",)),
    ("Pulmonary Edema/interstitial/mild", ("Edema",)), ("Consolidation/lung/lower lobe/left", ("Consolidation",)),
    ("Pleural Effusion/right/small", ("Pleural Effusion",)), ("Costophrenic Angle/left/blunted", ("Pleural Effusion",)),
    ("Costophrenic Angle/bilateral", None), ("Thickening/pleura/apex", ("Pleural Other",)),
    ("Pneumonia/lower lobe/right", ("Pneumonia",)), ("Pneumothorax/apex/right/small", ("Pneumothorax",)),
    ("Hydropneumothorax", ("Pneumothorax", "Pleural Effusion")), ("Implanted Medical Device/left", ("Support Devices",)),
    ("PULMONARY  EDEMA", ("Edema",)), ("Calcified Granuloma/lung", None), ("Lung/hypoinflation", None),
])
def test_mesh_terms_map_to_findings(term, expected):
    assert map_term(term) == expected


def test_no_finding_only_without_a_pathology():
    assert (truth_from_mesh(["normal"])[0] == f("No Finding")).all()
    assert (truth_from_mesh(["normal", "Cardiomegaly"])[0] == f("Cardiomegaly")).all()
    assert (truth_from_mesh(["normal", "Stents"])[0] == f("No Finding", "Support Devices")).all()
    assert truth_from_mesh(["Aorta/tortuous", "No Indexing"])[1] == ["Aorta/tortuous"]


def test_every_mapping_rule_is_in_the_docs_table():
    text = DOCS.read_text()
    for head, findings, require, _ in MESH_RULES:
        row = next((line for line in text.splitlines() if line.startswith(f"| {head}")), None)
        assert row is not None, f"docs/data.md has no table row for MeSH heading {head!r}"
        assert all(x in row for x in findings) and all(q in row for q in require), row


def test_captions_give_a_view_only_when_they_name_one():
    assert view_from_caption("PA and lateral chest x-XXXX") == "unknown"
    assert view_from_caption("Chest XXXX and lateral") == "unknown"
    assert view_from_caption("AP portable chest") == "frontal"
    assert view_from_caption("Lateral chest") == "lateral"
    assert view_from_caption("Chest, 2 views") == "unknown"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openi")
    reports = write_openi(tmp / "NLMCXR_reports.tgz", tmp / "png", CASES, missing={"CXR7_1_IM-2263-1001"}, tgz=True)
    out = tmp / "shards"
    report = convert_openi(reports, tmp / "png", out, image_size=24, samples_per_shard=2, workers=2)
    return out, report, tmp


def test_conversion_report_counts_and_lists(converted):
    _, report, _ = converted
    assert report["kept"] == {"test": 5}  # 1: two images, 2: frontal only, 3, 5; 7's image is missing
    assert report["dropped"] == {"lateral_view_images": 1, "missing_image": 1, "reports_without_images": 1,
                                 "reports_without_mesh_index": 1}
    assert "CXR7_1_IM-2263-1001" in report["failed"][0]["reason"]
    assert report["unmapped_mesh_terms"] == {"Opacity/ribs/right": 1, "Calcified Granuloma/lung/upper lobe": 1,
                                             "Technical Quality of Image Unsatisfactory": 1}
    assert report["image_views_listed"] == {"unknown": 4, "frontal": 2}


def test_eval_only_shards_have_truth_and_zero_label_sets(converted):
    out, _, _ = converted
    assert verify(out) == {"test": 5}
    manifest = read_manifest(out)
    assert manifest["label_sets"] == [] and manifest["splits"]["test"]["has_truth"]
    batches = list(EvalStream(split_shards(out, manifest, "test"), 0, 1, batch_size=8))
    truth = {k: t for b in batches for k, t in zip(b["key"], b["truth"].numpy())}
    assert batches[0]["labels"].shape == (5, 0, 14)
    assert (truth["openi-CXR2_1_IM-0652-1001"] == f("Cardiomegaly", "Atelectasis")).all()
    assert (truth["openi-CXR3_1_IM-1384-1001"] == f("Pleural Effusion", "Support Devices")).all()
    assert (truth["openi-CXR5_1_IM-2117-1001"] == f("Cardiomegaly")).all()
    s = inspect(out)["splits"]["test"]
    assert s["samples"] == 5 and s["prevalence"]["truth"][FINDINGS.index("No Finding")] == pytest.approx(0.4)


@pytest.mark.filterwarnings("ignore:No positive samples")  # 5 samples: some findings have no positive
def test_evaluate_runs_with_zero_label_sets(converted):
    from aol_dist.dist import World
    from aol_dist.evaluate import evaluate
    from aol_dist.model.backbone import Classifier

    out, _, _ = converted
    manifest = read_manifest(out)
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", 14)
    stream = EvalStream(split_shards(out, manifest, "test"), 0, 1, batch_size=4, label_index=[])
    result = evaluate(model, make_loader(stream, 0), [], manifest["findings"], World())
    assert list(result["auc"]) == ["truth"] and result["samples"] == 5


def test_projections_csv_drops_laterals_and_cli_reads_a_directory(converted, tmp_path, capsys):
    _, _, tmp = converted
    reports = write_openi(tmp_path / "xml", tmp_path / "png", CASES[:1])
    proj = tmp_path / "indiana_projections.csv"
    proj.write_text("uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Frontal\n1,1_IM-0001-3001.dcm.png,Lateral\n")
    code = cli(["shards", "openi", "--reports", str(reports), "--images", str(tmp_path / "png"), "--projections",
                str(proj), "--out", str(tmp_path / "out"), "--image-size", "16", "--workers", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and re.search(r"kept test 1\b", printed) and "lateral_view_images 1" in printed

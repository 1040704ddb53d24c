"""Real files through the converters and `verify`: NIH ChestX-ray14 (64 px, one NLP labeler), the varied
raw radiographs (JPEG with/without EXIF, grey/RGB/RGBA PNG, up to 2,563 px), the OpenI XML reports with
synthetic images, and CIFAR-10 test with simulated and CIFAR-10H human annotators.

The data live outside the repository (../shared/data, as in CI); without them these tests skip."""

import numpy as np
import pytest
from PIL import Image

from aol_dist.data.convert import openi
from aol_dist.data.convert.generic import IMAGE_SUFFIXES, convert_generic
from aol_dist.data.convert.images import load_image
from aol_dist.data.findings import FINDINGS
from aol_dist.data.label_stats import inspect
from aol_dist.data.shards import read_manifest, verify
from fixtures_data import SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                reason=f"real-data tests need {SHARED_DATA} (../shared/data next to the repository)")


def need(*parts):
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} absent")
    return path


def test_nih1000_as_a_single_labeler_dataset(tmp_path):
    images, labels = need("cxr-images", "nih1000"), need("cxr-images", "nih1000_labels.csv")
    report = convert_generic(tmp_path, images=str(images), labels_csv=str(labels), id_column="Image Index",
                             label_columns=["Finding Labels"], multi_label=True, split_from_folder=True,
                             image_size=64, samples_per_shard=200, workers=2)
    assert report["kept"] == {"train": 600, "validate": 200, "test": 200} and not report["failed"]
    assert verify(tmp_path) == report["kept"]
    summary = inspect(tmp_path)
    assert len(summary["findings"]) == 15 and "No Finding" in summary["findings"]
    # the folders split normal / abnormal evenly: "No Finding" prevalence is one half in every split
    nf = summary["findings"].index("No Finding")
    for split in ("train", "validate", "test"):
        assert summary["splits"][split]["prevalence"]["Finding Labels"][nf] == pytest.approx(0.5, abs=0.01)


def test_varied_radiographs_decode_and_convert(tmp_path):
    varied = need("cxr-images", "varied")
    files = sorted(p for p in varied.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    assert files
    for p in files:
        grey = load_image(p, 256)
        assert grey.shape == (256, 256) and grey.dtype == np.uint8 and grey.std() > 10, p.name
    report = convert_generic(tmp_path, images=str(varied), label_from_folder=True, image_size=128,
                             samples_per_shard=8, workers=2)
    assert report["kept"] == {"train": len(files)} and not report["failed"]
    assert verify(tmp_path) == {"train": len(files)}


def test_openi_reports_with_synthetic_images(tmp_path):
    reports = need("openi-reports", "NLMCXR_reports.tgz")
    listed, _ = openi.plan(reports, tmp_path / "no-images")
    assert len({i.report_id for i in listed}) > 3500
    images = tmp_path / "png"
    images.mkdir()
    tile = Image.fromarray(np.tile(np.arange(12, dtype=np.uint8) * 20, (12, 1)))
    for item in listed[1:]:  # the first image stays missing: reported, not fatal
        tile.save(images / f"{item.image_id}.png", compress_level=1)
    report = openi.convert_openi(reports, images, tmp_path / "out", image_size=16, samples_per_shard=1000, workers=2)
    assert report["kept"] == {"test": len(listed) - 1}
    assert report["dropped"]["missing_image"] == 1 and listed[0].image_id in report["failed"][0]["reason"]
    assert "Lung/hypoinflation" in report["unmapped_mesh_terms"]
    assert verify(tmp_path / "out") == {"test": len(listed) - 1}
    truth = np.array([i.truth for i in listed[1:]])
    assert truth[:, FINDINGS.index("No Finding")].mean() > 0.3
    assert truth[:, FINDINGS.index("Cardiomegaly")].sum() > 300
    assert read_manifest(tmp_path / "out")["label_sets"] == []


def test_cifar10_with_simulated_and_human_annotators(tmp_path):
    npz, votes = need("cifar10-test", "cifar10_test.npz"), need("cifar10-test", "cifar10h-counts.npy")
    report = convert_generic(tmp_path, npz=str(npz), npz_truth="y", classes="cifar10",
                             annotators=["hs:0.3", "sf:0.4", "oc:0.5", "ad", "avg"], votes=str(votes),
                             vote_annotators=2, validate_fraction=0.2, color="rgb", samples_per_shard=2000, workers=2)
    assert report["kept"] == {"train": 8000, "validate": 2000}
    for name, noise in (("hs", 0.3), ("sf", 0.4), ("oc", 0.5), ("ad", 1.0)):
        assert report["annotators"][name]["observed_noise"] == pytest.approx(noise, abs=0.02)
    assert report["annotators"]["human1"]["observed_noise"] < 0.1  # CIFAR-10H raters are ~95% right
    assert verify(tmp_path) == report["kept"]
    assert read_manifest(tmp_path)["channels"] == 3

"""`aol shards generic`, the simulated annotators of A.2.1 as confusion matrices, and raw image decoding."""


import numpy as np
import pytest
from PIL import Image

from aol_dist.cli import main as cli
from aol_dist.data.convert import annotators as ann
from aol_dist.data.convert.common import ConversionError
from aol_dist.data.convert.generic import convert_generic
from aol_dist.data.convert.images import from_array, load_image
from aol_dist.data.label_stats import inspect
from aol_dist.data.shards import SkipSample, read_manifest, split_shards, verify
from aol_dist.data.stream import EvalStream
from fixtures_data import radiograph, save_jpeg

C10 = ann.CIFAR10_CLASSES


# --------------------------------------------------------------------------- annotators


@pytest.mark.parametrize("make", [lambda: ann.hammer_spammer(10, 0.3), lambda: ann.structured_flips(C10, 0.4),
                                  lambda: ann.ordered_confusion(10, 0.5)])
def test_matrices_are_row_stochastic_with_the_stated_noise(make):
    c = make()
    np.testing.assert_allclose(c.sum(1), 1.0)
    assert ann.noise_level(c) == pytest.approx({0.7: 0.3, 0.6: 0.4, 0.5: 0.5}[round(c[0, 0], 1)])


def test_structured_flips_use_the_pairs_of_a21():
    c = ann.structured_flips(C10, 0.4)
    i = C10.index
    for a, b in ann.CIFAR10_FLIPS:
        assert c[i(a), i(b)] == pytest.approx(0.4)
    assert c[i("automobile"), i("truck")] == pytest.approx(0.4)  # reverse of truck -> automobile
    assert c[i("frog"), i("cat")] == pytest.approx(0.4 / 9)      # in no pair: uniform


def test_ordered_confusion_goes_to_neighbours_and_adversarial_is_always_wrong():
    c = ann.ordered_confusion(4, 0.5)
    np.testing.assert_allclose(c[0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(c[2], [0, 0.25, 0.5, 0.25])
    ad = ann.adversarial(10, seed=3)
    assert np.diag(ad).sum() == 0 and (ad.sum(0) == 1).all() and ann.noise_level(ad) == 1.0


def test_average_and_spec_parsing():
    got = ann.parse_annotators(["hs:0.3", "sf:0.4", "oc:0.5", "ad", "avg"], C10)
    assert [a.name for a in got] == ["hs", "sf", "oc", "ad", "avg"]
    np.testing.assert_allclose(got[4].matrix, np.mean([a.matrix for a in got[:4]], axis=0))
    assert got[4].noise == pytest.approx((0.3 + 0.4 + 0.5 + 1.0) / 4)
    with pytest.raises(ValueError, match="need flip pairs"):
        ann.parse_annotators(["sf:0.2"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="cannot be set"):
        ann.parse_annotators(["ad:0.3"], C10)


def test_drawn_labels_follow_the_confusion_matrix():
    c = ann.structured_flips(C10, 0.4)
    true = np.repeat(np.arange(10), 3000)
    drawn = ann.draw_labels(c, true, seed=0, stream=1)
    empirical = np.stack([np.bincount(drawn[true == i], minlength=10) / 3000 for i in range(10)])
    np.testing.assert_allclose(empirical, c, atol=0.03)
    assert (drawn == ann.draw_labels(c, true, seed=0, stream=1)).all()


def test_vote_annotators_follow_each_images_votes():
    counts = np.array([[50, 1, 0], [0, 0, 51], [25, 26, 0]])
    drawn = ann.draw_from_votes(np.repeat(counts, 2000, axis=0), 1, seed=0)[0].reshape(3, 2000)
    assert (drawn[0] != 2).all() and (drawn[1] == 2).all()
    assert np.mean(drawn[2] == 1) == pytest.approx(26 / 51, abs=0.03)


# --------------------------------------------------------------------------- images


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((20, 40), np.uint8)
    image[:, :10] = 255  # bright left edge
    save_jpeg(tmp_path / "rot.jpg", image, orientation=6)  # stored landscape, displayed rotated 90 degrees
    out = load_image(tmp_path / "rot.jpg", 40, aspect="pad")
    assert out.shape == (40, 40) and out[:10, 20].mean() > 200 and out[30:, 20].mean() < 50


def test_modes_rgba_16bit_and_aspect_policies(tmp_path):
    rgba = np.zeros((30, 60, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[:, :30, 3] = 0  # transparent half: composited over black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    grey = load_image(tmp_path / "a.png", 30, aspect="stretch")
    assert grey[:, :10].max() == 0 and grey[:, 20:].min() > 150
    assert load_image(tmp_path / "a.png", 30, color="rgb").shape == (30, 30, 3)
    deep = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert load_image(tmp_path / "d.png", 64).max() == 255
    padded = load_image(tmp_path / "a.png", 30, aspect="pad")
    assert padded[:7].max() == 0 and padded[23:].max() == 0  # 2:1 image letterboxed
    assert load_image(tmp_path / "a.png", 30, aspect="crop")[:, 20:].min() > 150
    assert from_array(np.zeros((8, 8, 3), np.uint8), 16, color="rgb").shape == (16, 16, 3)


def test_corrupt_truncated_and_missing_images_are_skips_naming_the_file(tmp_path):
    save_jpeg(tmp_path / "ok.jpg", radiograph(1))
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"nonsense" * 20)
    for name, kind in (("cut.jpg", "unreadable_image"), ("junk.png", "unreadable_image"), ("gone.png", "missing_image")):
        with pytest.raises(SkipSample, match=rf"^{kind}: .*{name}"):
            load_image(tmp_path / name, 16)


# --------------------------------------------------------------------------- converter


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    y = np.arange(60) % 10
    np.savez(tmp / "tiny.npz", x=x, y=y)
    votes = np.eye(10, dtype=np.int64)[y] * 40 + rng.integers(0, 3, (60, 10))
    np.save(tmp / "votes.npy", votes)
    return tmp


def test_npz_with_simulated_and_human_annotators_makes_rgb_shards(npz, tmp_path):
    report = convert_generic(tmp_path / "out", npz=str(npz / "tiny.npz"), npz_truth="y", classes="cifar10",
                             annotators=["hs:0.3", "sf:0.4", "oc:0.5", "ad", "avg"], votes=str(npz / "votes.npy"),
                             vote_annotators=2, test_fraction=0.25, color="rgb", samples_per_shard=10, workers=2)
    assert report["kept"] == {"train": 45, "test": 15} and report["annotators"]["ad"]["observed_noise"] == 1.0
    assert verify(tmp_path / "out") == {"train": 45, "test": 15}
    manifest = read_manifest(tmp_path / "out")
    assert manifest["label_sets"] == ["hs", "sf", "oc", "ad", "avg", "human1", "human2"]
    assert manifest["findings"] == list(ann.CIFAR10_CLASSES) and manifest["channels"] == 3
    assert manifest["source"]["simulated_annotators"]["sf"]["confusion_matrix"][0][2] == pytest.approx(0.4)
    batch = next(iter(EvalStream(split_shards(tmp_path / "out", manifest, "test"), 0, 1, batch_size=5)))
    assert batch["image"].shape == (5, 3, 8, 8) and batch["labels"].shape == (5, 7, 10)
    assert (batch["labels"].sum(-1) == 1).all() and (batch["truth"].sum(-1) == 1).all()
    assert (batch["labels"][:, 3] * batch["truth"]).sum() == 0  # the adversary is never right


def test_npz_pixels_survive_unresized(npz, tmp_path):
    convert_generic(tmp_path / "out", npz=str(npz / "tiny.npz"), npz_labels=["y"], color="rgb", image_format="png")
    manifest = read_manifest(tmp_path / "out")
    batch = next(iter(EvalStream(split_shards(tmp_path / "out", manifest, "train"), 0, 1, batch_size=60)))
    x = np.load(npz / "tiny.npz")["x"]
    assert manifest["image_size"] == 8 and manifest["label_sets"] == ["y"]
    np.testing.assert_array_equal(batch["image"].permute(0, 2, 3, 1).numpy(), x)


@pytest.fixture()
def folder(tmp_path):
    """An NIH-style tree: split folders, multi-label '|' cells, one corrupt file, one image without a row."""
    rows = ["Image Index,Finding Labels,Reader B"]
    for k, (split, name, labels, b) in enumerate([
            ("train", "00000001_000.png", "Cardiomegaly", "Cardiomegaly"),
            ("train", "00000001_001.png", "Cardiomegaly|Effusion", "Effusion"),
            ("train", "00000002_000.png", "No Finding", "No Finding"),
            ("valid", "00000003_000.png", "Effusion", ""),
            ("test", "00000004_000.png", "No Finding", "Cardiomegaly"),
            ("test", "00000005_000.png", "Effusion|Cardiomegaly", "Effusion")]):
        (tmp_path / "img" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(radiograph(k, (24, 20))).convert("RGB").save(tmp_path / "img" / split / name)
        rows.append(f"{name},{labels},{b}")
    (tmp_path / "img" / "test" / "00000004_000.png").write_bytes(b"broken")
    Image.fromarray(radiograph(9)).save(tmp_path / "img" / "train" / "unlisted.png")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_image_folder_with_multi_label_columns(folder, monkeypatch):
    report = convert_generic(folder / "out", images=str(folder / "img"), labels_csv=str(folder / "labels.csv"),
                             id_column="Image Index", label_columns=["Finding Labels", "Reader B"], multi_label=True,
                             split_from_folder=True, image_size=16, workers=1)
    assert report["kept"] == {"train": 3, "validate": 1, "test": 1}
    assert report["dropped"] == {"images_without_label_row": 1, "unreadable_image": 1}
    assert any("00000004_000.png" in f["reason"] for f in report["failed"])
    # the dropped image is named, not only counted
    assert {"file": str(folder / "img" / "train" / "unlisted.png"),
            "reason": f"images_without_label_row: no row in {folder / 'labels.csv'}"} in report["failed"]
    s = inspect(folder / "out")
    assert s["findings"] == ["Cardiomegaly", "Effusion", "No Finding"]
    assert s["splits"]["train"]["prevalence"]["Finding Labels"] == pytest.approx([2 / 3, 1 / 3, 1 / 3], abs=1e-3)
    assert s["splits"]["train"]["agreement"]["Finding Labels|Reader B"] == pytest.approx(8 / 9, abs=1e-3)
    # a re-run naming the same folder by a relative path reuses every finished shard (shards.made_with)
    monkeypatch.chdir(folder)
    again = convert_generic(folder / "out", images="img", labels_csv=str(folder / "labels.csv"), id_column="Image Index",
                            label_columns=["Finding Labels", "Reader B"], multi_label=True, split_from_folder=True,
                            image_size=16, workers=1)
    assert again["reused_shards"] == 3 and again["kept"] == report["kept"]


def test_unknown_class_and_missing_column_name_where(folder):
    text = (folder / "labels.csv").read_text().replace("No Finding,Cardiomegaly", "No Finding,Pneumo")
    (folder / "labels.csv").write_text(text)
    kw = dict(images=str(folder / "img"), labels_csv=str(folder / "labels.csv"), id_column="Image Index",
              multi_label=True, classes="Cardiomegaly,Effusion,No Finding")
    with pytest.raises(ConversionError, match=r"labels.csv: row 5 \(line 6\), column 'Reader B': unknown label value 'Pneumo'"):
        convert_generic(folder / "out", label_columns=["Reader B"], **kw)
    with pytest.raises(ConversionError, match=r"labels.csv: missing column 'Reader C'"):
        convert_generic(folder / "out", label_columns=["Reader C"], **kw)


def test_rerun_reuses_finished_shards(npz, tmp_path, capsys):
    kw = dict(npz=str(npz / "tiny.npz"), npz_truth="y", annotators=["hs:0.2", "oc:0.2"], samples_per_shard=20)
    convert_generic(tmp_path / "out", **kw)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")}
    (tmp_path / "out" / "train-000002.tar").unlink()
    assert convert_generic(tmp_path / "out", **kw)["reused_shards"] == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")} == first
    # the same command at another image size: refused in one line, the shards untouched
    assert cli(["shards", "generic", "--out", str(tmp_path / "out"), "--npz", kw["npz"], "--npz-truth", "y",
                "--annotators", "hs:0.2", "oc:0.2", "--samples-per-shard", "20", "--image-size", "16",
                "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}/out/train-000000.tar: a finished shard that another conversion wrote "
                          "(") and "image_size: " in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")} == first


def test_a_label_row_without_an_image_is_named(folder):
    (folder / "labels.csv").write_text((folder / "labels.csv").read_text() + "ghost.png,Effusion,Effusion\n")
    report = convert_generic(folder / "out", images=str(folder / "img"), labels_csv=str(folder / "labels.csv"),
                             id_column="Image Index", label_columns=["Finding Labels"], multi_label=True, image_size=16)
    assert report["dropped"]["label_rows_without_image"] == 1
    assert any(f["file"].endswith("labels.csv: row 7 (line 8), column 'Image Index': 'ghost.png'") for f in report["failed"])


@pytest.mark.parametrize("arrays,message", [
    ({"y": np.where(np.arange(60) == 4, np.nan, np.arange(60) % 10)}, r"\['y'\]: index 4 holds nan, expected a whole"),
    ({"y": np.arange(60) % 10, "t": np.arange(59) % 10}, r"\['t'\]: shape \(59,\), expected \(60,\) class indices"),
    ({"y": np.eye(5, dtype=np.uint8)[np.arange(60) % 5] * np.where(np.arange(60) == 3, 2, 1)[:, None]},
     r"\['y'\]: index 3, column 3 holds 2, expected 0/1 vectors"),
])
def test_bad_npz_label_values_are_one_line_naming_the_index(tmp_path, arrays, message):
    x = np.zeros((60, 8, 8), np.uint8)
    np.savez(tmp_path / "bad.npz", x=x, **arrays)
    with pytest.raises(ConversionError, match=message):
        convert_generic(tmp_path / "out", npz=str(tmp_path / "bad.npz"), npz_labels=["y"],
                        npz_truth="t" if "t" in arrays else None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_npz_split_and_an_evaluation_only_split_with_truth(npz, tmp_path):
    data = dict(np.load(npz / "tiny.npz"))
    split = np.where(np.arange(60) < 40, "train", "test")
    np.savez(tmp_path / "split.npz", **data, split=split)
    report = convert_generic(tmp_path / "out", npz=str(tmp_path / "split.npz"), npz_labels=["y"], npz_split="split")
    assert report["kept"] == {"train": 40, "test": 20}
    report = convert_generic(tmp_path / "eval", npz=str(npz / "tiny.npz"), npz_truth="y", split="test")
    manifest = read_manifest(tmp_path / "eval")
    assert report["kept"] == {"test": 60} and manifest["label_sets"] == [] and manifest["splits"]["test"]["has_truth"]
    assert verify(tmp_path / "eval") == {"test": 60}
    np.savez(tmp_path / "badsplit.npz", **data, split=np.where(np.arange(60) < 40, "train", "holdout"))
    with pytest.raises(ConversionError, match=r"\['split'\]: index 40 names split 'holdout'"):
        convert_generic(tmp_path / "bad", npz=str(tmp_path / "badsplit.npz"), npz_labels=["y"], npz_split="split")

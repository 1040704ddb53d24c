"""Shard writing is atomic and resumable; verify and inspect read what was written."""

import json
import os
import subprocess
import sys

import pytest
import webdataset as wds

from aol_dist.data import shards
from aol_dist.data.label_stats import inspect
from aol_dist.data.shards import ShardError, verify
from helpers import write_fake_shards


def test_manifest_counts_and_verify(tmp_path):
    m = write_fake_shards(tmp_path, {"train": [5, 4], "test": [3]}, workers=2)
    assert m["splits"]["train"]["samples"] == 9
    assert verify(tmp_path) == {"train": 9, "test": 3}
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_shards_are_readable_by_webdataset(tmp_path):
    write_fake_shards(tmp_path, {"train": [4]})
    samples = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"s{i:06d}" for i in range(4)]
    assert set(samples[0]) >= {"png", "labels.npy", "truth.npy", "txt", "ids.json"}


def test_rerun_skips_finished_shards_and_redoes_unrecorded_ones(tmp_path):
    write_fake_shards(tmp_path, {"train": [5, 4]})
    first = (tmp_path / "train-000001.tar").read_bytes()
    os.remove(tmp_path / "train-000001.tar.json")  # as if killed between the shard's rename and its record
    mtime0 = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    # temporary files of writers killed in the first run: of a shard, and of a record (killed before its rename)
    stale = [tmp_path / ".train-000001.tar.tmp4242", tmp_path / ".train-000000.tar.json.tmp4243"]
    for p in stale:
        p.write_bytes(b"partial")
    write_fake_shards(tmp_path, {"train": [5, 4]})
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == mtime0
    assert (tmp_path / "train-000001.tar").read_bytes() == first  # deterministic bytes
    assert not any(p.exists() for p in stale)


def test_sigkill_mid_write_leaves_no_shard_under_its_final_name(tmp_path):
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from aol_dist.data import shards
from helpers import fake_sample
def dying(i):
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_sample(i)
shards.write_split({str(tmp_path)!r}, [shards.ShardJob("train-000000.tar", tuple(range(6)))], dying)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert not (tmp_path / "train-000000.tar").exists()
    assert not (tmp_path / "train-000000.tar.json").exists()


def test_verify_names_a_truncated_shard(tmp_path):
    write_fake_shards(tmp_path, {"train": [5, 4]})
    path = tmp_path / "train-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="train-000001.tar"):
        verify(tmp_path)
    with pytest.raises(ShardError, match="train-000001.tar: unreadable or truncated"):
        list(shards.iter_tar_samples(path))


def test_verify_names_a_shard_whose_count_differs(tmp_path):
    write_fake_shards(tmp_path, {"train": [5]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = 6
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="train-000000.tar: 5 samples, manifest says 6"):
        verify(tmp_path)


def test_missing_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(ShardError, match="no manifest"):
        verify(tmp_path)


def test_inspect_reports_counts_prevalence_agreement(tmp_path):
    write_fake_shards(tmp_path, {"train": [6, 6]})
    s = inspect(tmp_path)
    train = s["splits"]["train"]
    assert train["samples"] == 12 and s["label_sets"] == ["s0", "s1"]
    assert train["agreement"]["s0|s1"] == 0.0  # s1 = 1 - s0 in the fake data
    assert train["accuracy_vs_truth"]["s0"] == [1.0, 1.0, 1.0]


def test_cli_verify_exit_code_names_bad_shard(tmp_path):
    write_fake_shards(tmp_path, {"train": [3]})
    (tmp_path / "train-000000.tar").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "aol_dist.cli", "shards", "verify", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "train-000000.tar" in proc.stderr


@pytest.mark.parametrize("mode,shape", [("L", (13, 9)), ("RGB", (7, 11, 3)), ("P", (6, 6)), ("RGBA", (5, 4, 4)),
                                        ("I;16", (6, 5))])
def test_the_fast_png_decoder_equals_pil(mode, shape):
    """8-bit grey and RGB PNGs take torchvision's decoder; every other PNG PIL's path, read as grey."""
    import io

    import numpy as np
    from PIL import Image

    from aol_dist.data.images import decode_image, decode_image_pil, encode_image

    rng = np.random.default_rng(0)
    if mode in ("L", "RGB"):
        data = encode_image(rng.integers(0, 256, shape, dtype=np.uint8))
    else:
        array = rng.integers(0, 200, shape).astype(np.uint16 if mode == "I;16" else np.uint8)
        buf = io.BytesIO()
        image = Image.fromarray(array) if mode == "I;16" else Image.fromarray(array, mode=mode)
        assert image.mode == mode
        image.save(buf, format="PNG")
        data = buf.getvalue()
    fast, reference = decode_image(data), decode_image_pil(data)
    assert fast.dtype == np.uint8 and fast.shape == reference.shape == (shape if mode in ("L", "RGB") else shape[:2])
    assert np.array_equal(fast, reference)
    jpeg = encode_image(rng.integers(0, 256, (8, 8), dtype=np.uint8), "jpg")
    assert np.array_equal(decode_image(jpeg), decode_image_pil(jpeg))


def test_a_conversion_with_other_settings_is_refused_before_it_writes_and_never_reuses_their_shards(tmp_path, capsys):
    from aol_dist.data.build import build_synth

    out = tmp_path / "synth"
    assert build_synth(out, 8, 0, 0, image_size=16, samples_per_shard=4)["reused_shards"] == 0
    assert build_synth(out, 8, 0, 0, image_size=16, samples_per_shard=4)["reused_shards"] == 2  # a re-run: resumed
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # another split at another image size: refused before its first shard (it used to be after the last one)
    with pytest.raises(ShardError, match=r"holds split\(s\) train converted with other image_size"):
        build_synth(out, 0, 0, 4, image_size=32, samples_per_shard=4)
    # the same split at another size: its finished 16 px shards were reused under a 32 px manifest; now refused
    with pytest.raises(ShardError, match=r"train-000000.tar: a finished shard that another conversion wrote "
                                         r"\(image_size: 16 -> 32\); convert into another directory"):
        build_synth(out, 8, 0, 0, image_size=32, samples_per_shard=4)
    with pytest.raises(ShardError, match=r"\(the samples it holds \(other source files, split or --samples-per-shard\)"):
        build_synth(out, 8, 0, 0, image_size=16, samples_per_shard=3)
    # the command says it in one line, no traceback
    from aol_dist.cli import main
    assert main(["shards", "synth", "--out", str(out), "--train", "8", "--validate", "0", "--test", "0",
                 "--image-size", "32", "--samples-per-shard", "4", "--workers", "1"]) == 1
    assert capsys.readouterr().err.strip() == (f"aol shards: {out}/train-000000.tar: a finished shard that another "
                                               f"conversion wrote (image_size: 16 -> 32); convert into another "
                                               f"directory, or delete {out}/train-* to rewrite that split")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a record written before `made_with` existed is reused as before
    record = json.loads((out / "train-000000.tar.json").read_text())
    del record["made_with"]
    (out / "train-000000.tar.json").write_text(json.dumps(record))
    assert build_synth(out, 8, 0, 0, image_size=16, samples_per_shard=4)["reused_shards"] == 2
    assert verify(out) == {"train": 8}

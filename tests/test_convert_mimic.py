"""`aol shards mimic` on a miniature MIMIC-CXR-JPG tree: join, view choice, label sets, reports, tokens,
bad input, and a SIGKILLed conversion that resumes to byte-identical shards."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aol_dist.cli import main as cli
from aol_dist.data.convert.common import ConversionError
from aol_dist.data.convert.mimic import convert_mimic
from aol_dist.data.convert.tokenize import TokenizerMismatch, check_tokenizer
from aol_dist.data.findings import FINDINGS, LABEL_SETS
from aol_dist.data.label_stats import inspect
from aol_dist.data.shards import ShardError, decode_array, iter_tar_samples, read_manifest, split_shards, verify
from aol_dist.data.stream import EvalStream, TrainStream
from fixtures_data import build_mimic_tree, make_tokenizer, rewrite_csv


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    return root, build_mimic_tree(root)


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    root, expect = tree
    out = tmp_path_factory.mktemp("shards")
    tok = make_tokenizer(tmp_path_factory.mktemp("tok") / "tiny-bert")
    report = convert_mimic(root, out, image_size=32, tokenizer=str(tok), max_length=24, samples_per_shard=4, workers=2)
    return out, report, expect, tok


def samples(out):
    manifest = read_manifest(out)
    return {raw["__key__"]: raw for split in manifest["splits"] for path, _ in split_shards(out, manifest, split)
            for raw in iter_tar_samples(path)}


def test_counts_and_drop_reasons_match_the_tree(converted):
    out, report, expect, _ = converted
    assert report["kept"] == expect["kept"]
    assert report["dropped"] == {k: v for k, v in expect["dropped"].items() if v}
    reasons = [f["reason"] for f in report["failed"]]
    assert any(r.startswith("unreadable_image:") and expect["corrupt"] in r for r in reasons)
    assert any(r.startswith("missing_image:") and expect["missing"] in r for r in reasons)
    assert report["notes"] == {"missing_report": 1}
    on_disk = json.loads((out / "conversion_report.json").read_text())
    assert on_disk["kept"] == report["kept"] and verify(out) == expect["kept"]


def test_one_frontal_per_study_pa_preferred_labels_and_reports(converted):
    out, _, expect, _ = converted
    got = samples(out)
    for study, dicom in expect["chosen"].items():
        if dicom + ".jpg" in (expect["corrupt"], expect["missing"]):
            assert f"s{study}" not in got
            continue
        raw = got[f"s{study}"]
        ids = json.loads(raw["ids.json"])
        assert ids["dicom_id"] == dicom and ids["study_id"] == int(study)
        labels = decode_array(raw["labels.npy"])
        assert labels.shape == (4, 14)
        for s, name in enumerate(LABEL_SETS):
            labeler, u = name.split("_u")
            for f, text in enumerate(expect["raw"][study][labeler]):
                want = {"1.0": 1, "0.0": 0, "": 0, "-1.0": int(u)}[text]
                assert labels[s, f] == want, (study, name, FINDINGS[f])
        text = raw["txt"].decode()
        assert text == "" if study == expect["missing_report_study"] else f"study {study}" in text


def test_splits_follow_the_official_split(converted):
    out, _, expect, _ = converted
    manifest = read_manifest(out)
    for split in manifest["splits"]:
        for path, _ in split_shards(out, manifest, split):
            for raw in iter_tar_samples(path):
                assert expect["split"][raw["__key__"][1:]] == split


def test_tokens_and_tokenizer_record(converted):
    out, _, _, tok = converted
    manifest = read_manifest(out)
    assert manifest["tokenizer"]["name"] == "tiny-bert" and manifest["tokenizer"]["max_length"] == 24
    assert len(manifest["tokenizer"]["vocab_sha256"]) == 64
    batch = next(iter(EvalStream(split_shards(out, manifest, "train"), 0, 1, batch_size=3)))
    assert batch["tokens"].dtype == torch.int32 and batch["tokens"].shape == (3, 24)
    assert batch["image"].shape == (3, 1, 32, 32)
    check_tokenizer(manifest, tok)  # same tokenizer: fine
    check_tokenizer(manifest, "")   # image-only run: fine


def test_tokenizer_mismatch_is_a_clear_error(converted, tmp_path):
    out, _, _, _ = converted
    manifest = read_manifest(out)
    other = make_tokenizer(tmp_path / "other-bert", extra=("pneumothorax",))
    with pytest.raises(TokenizerMismatch, match="tiny-bert.*other-bert.*rebuild the shards"):
        check_tokenizer(manifest, other)
    with pytest.raises(TokenizerMismatch, match="shards hold no report tokens"):
        check_tokenizer({**manifest, "tokenizer": None}, other)


def test_inspect_and_stream_read_the_shards(converted):
    out, _, _, _ = converted
    s = inspect(out)
    assert s["label_sets"] == list(LABEL_SETS) and s["splits"]["train"]["samples"] > 0
    manifest = read_manifest(out)
    stream = TrainStream(split_shards(out, manifest, "train"), rank=0, world_size=1, batch_size=2)
    assert next(iter(stream.iter_worker(0, 1)))["labels"].shape == (2, 4, 14)


def test_missing_column_names_file_and_column(tree, tmp_path):
    root, _ = tree
    bad = tmp_path / "root"
    bad.mkdir()
    for p in root.glob("*.csv*"):  # the CSVs are read, and fail, before any image
        (bad / p.name).write_bytes(p.read_bytes())
    rewrite_csv(bad / "mimic-cxr-2.0.0-negbio.csv", lambda h, rows: ([c for c in h if c != "Edema"],
                                                                     [r[:5] + r[6:] for r in rows]))
    with pytest.raises(ConversionError, match=r"mimic-cxr-2.0.0-negbio.csv: missing column 'Edema'"):
        convert_mimic(bad, tmp_path / "out")


def test_unknown_label_value_names_row_and_column(tree, tmp_path, capsys):
    root, _ = tree
    bad = tmp_path / "root"
    bad.mkdir()
    for p in root.glob("*.csv*"):
        (bad / p.name).write_bytes(p.read_bytes())

    def edit(h, rows):
        rows[4][h.index("Pneumonia")] = "2.0"
        return h, rows

    rewrite_csv(bad / "mimic-cxr-2.0.0-chexpert.csv.gz", edit)
    code = cli(["shards", "mimic", "--root", str(bad), "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mimic-cxr-2.0.0-chexpert.csv.gz: row 5 (line 6), column 'Pneumonia': unknown label value '2.0'" in err


KILL_SCRIPT = """
import os, signal, sys
from aol_dist.data.convert import mimic
real = mimic.load_image
def dying(path, *a, **k):
    if os.path.basename(str(path)) == sys.argv[3]:
        os.killpg(os.getpgrp(), signal.SIGKILL)  # the whole conversion dies at once, workers included
    return real(path, *a, **k)
mimic.load_image = dying
mimic.convert_mimic(sys.argv[1], sys.argv[2], image_size=32, samples_per_shard=3, workers=2)
"""


def test_sigkill_then_rerun_gives_the_shards_of_an_uninterrupted_run(tree, tmp_path):
    root, expect = tree
    train = sorted(s for s, sp in expect["split"].items() if sp == "train")
    victim = expect["chosen"][train[len(train) // 2 + 1]] + ".jpg"  # a shard in the middle of train
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), str(out), victim], start_new_session=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "manifest.json").exists()
    # finished = shard and its record; a kill between the shard's rename and its record (another worker may be
    # there when the victim kills the group) leaves a shard that the re-run rightly redoes
    finished_before = {p.name for p in out.glob("*.tar") if (out / f"{p.name}.json").is_file()}
    assert finished_before, "the kill came before any shard was finished"
    report = convert_mimic(root, out, image_size=32, samples_per_shard=3, workers=2)
    assert report["reused_shards"] == len(finished_before)
    reference = tmp_path / "reference"
    convert_mimic(root, reference, image_size=32, samples_per_shard=3, workers=1)
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert names == sorted(p.name for p in out.glob("*.tar"))
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.glob(".*tmp*"))
    assert read_manifest(out)["splits"] == read_manifest(reference)["splits"]
    verify(out)


def test_truncated_shard_fails_verify_and_the_reader_naming_it(converted, tmp_path):
    out, _, _, _ = converted
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    victim = copy / "train-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # as a copy or a crashed disk leaves it
    with pytest.raises(ShardError, match="train-000001.tar"):
        verify(copy)
    manifest = read_manifest(copy)
    stream = EvalStream(split_shards(copy, manifest, "train"), 0, 1, batch_size=2)
    with pytest.raises(ShardError, match="train-000001.tar: unreadable or truncated"):
        list(stream)


def test_nan_is_blank(tmp_path):
    from aol_dist.data.convert.common import parse_mention

    assert math.isnan(parse_mention("nan", Path("x.csv"), 1, "Edema"))
    assert parse_mention(" -1.0 ", Path("x.csv"), 1, "Edema") == -1.0


def test_hand_labels_make_a_test_split_and_a_gold_split_of_whole_patients(tree, tmp_path):
    root, expect = tree
    bad = {expect["corrupt"], expect["missing"]}
    studies = [s for s, d in sorted(expect["chosen"].items()) if d + ".jpg" not in bad][:9]
    rows = [[s, *[str(int(v)) for v in np.random.default_rng(int(s)).integers(0, 2, len(FINDINGS))]] for s in studies]
    csv = tmp_path / "hand.csv"
    csv.write_text("\n".join(",".join(r) for r in [["study_id", *FINDINGS], *rows]) + "\n")
    out = tmp_path / "shards"
    convert_mimic(root, out, image_size=16, samples_per_shard=4, hand_labels=csv, hand_gold=4)
    manifest = read_manifest(out)
    assert manifest["splits"]["gold"]["has_truth"] and manifest["splits"]["test_hand"]["has_truth"]
    assert not manifest["splits"]["train"]["has_truth"]

    def read(split):
        return {raw["__key__"]: raw for path, _ in split_shards(out, manifest, split) for raw in iter_tar_samples(path)}
    gold, test = read("gold"), read("test_hand")
    assert len(gold) >= 4 and len(test) >= 1 and set(gold) | set(test) == {f"s{s}" for s in studies}
    assert not set(gold) & set(test)
    subjects = {name: {json.loads(r["ids.json"])["subject_id"] for r in raws.values()} for name, raws in
                (("gold", gold), ("test", test))}
    assert not subjects["gold"] & subjects["test"]  # whole patients: none on both sides
    truth = {f"s{r[0]}": [int(v) for v in r[1:]] for r in rows}
    for key, raw in {**gold, **test}.items():
        assert decode_array(raw["truth.npy"]).tolist() == truth[key]
    # the same choice every time; more than there are: one line naming the file
    again = tmp_path / "again"
    convert_mimic(root, again, image_size=16, samples_per_shard=4, hand_labels=csv, hand_gold=4)
    assert read_manifest(again)["splits"]["gold"]["samples"] == len(gold)
    with pytest.raises(ConversionError, match=r"hand.csv: --hand-gold 10, but only 9 hand-labelled studies"):
        convert_mimic(root, tmp_path / "too-many", image_size=16, hand_labels=csv, hand_gold=10)
    with pytest.raises(ConversionError, match="--hand-gold needs --hand-labels"):
        convert_mimic(root, tmp_path / "none", image_size=16, hand_gold=2)

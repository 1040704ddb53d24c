"""Bad shard content is named where it is read (issue: nothing wrong gets through silently).

Each mutation of a small valid shard directory, and what `verify`, `inspect`, the training reader (in the
main process and in a DataLoader worker) and evaluation must do: a ShardError (or a ValueError naming the
shard and the sample), never a silent pass and never an unnamed shape error from a batch.
"""

import dataclasses
import functools
import json
from unittest import mock

import numpy as np
import pytest

from aol_dist import dist as D
from aol_dist.data import shards
from aol_dist.data.label_stats import inspect
from aol_dist.data.shards import ShardError, label_shape, read_manifest, split_shards, verify
from aol_dist.data.stream import EvalStream, TrainStream, make_loader
from helpers import FINDINGS, LABEL_SETS, fake_sample

BAD_INDEX = 7


def _mutated(index, mutation):
    sample = fake_sample(index)
    if index == BAD_INDEX:
        if mutation == "label_value":
            sample["labels"] = sample["labels"].copy()
            sample["labels"][0, 1] = 7
        elif mutation == "truth_value":
            sample["truth"] = np.array([0, 2, 1], np.uint8)
        elif mutation == "label_length":
            sample["labels"] = sample["labels"][:, :2]
        elif mutation == "truth_length":
            sample["truth"] = sample["truth"][:2]
    return sample


def _write(out, mutation):
    jobs = [shards.ShardJob("train-000000.tar", tuple(range(0, 6))), shards.ShardJob("train-000001.tar", tuple(range(6, 12)))]
    records, _ = shards.write_split(out, jobs, functools.partial(_mutated, mutation=mutation))
    return shards.write_manifest(out, dataset="fake", findings=FINDINGS, label_sets=LABEL_SETS,
                                 splits={"train": records, "test": records}, image_size=8,
                                 has_truth={"train": True, "test": True})


MESSAGES = {"label_value": r"label values \[7\] outside \{0, 1\}", "truth_value": r"truth values \[2\] outside",
            "label_length": r"labels shape \(2, 2\), manifest says \(2, 3\)",
            "truth_length": r"truth shape \(2,\), manifest says \(3,\)"}
WHERE = "train-000001.tar: sample s000007"


@pytest.mark.parametrize("mutation", list(MESSAGES))
def test_bad_label_content_is_named_by_verify_inspect_and_the_readers(tmp_path, mutation):
    manifest = _write(tmp_path, mutation)
    with pytest.raises(ShardError, match=f"{WHERE}: {MESSAGES[mutation]}"):
        verify(tmp_path)
    with pytest.raises(ShardError, match=f"{WHERE}: {MESSAGES[mutation]}"):
        inspect(tmp_path)
    train = TrainStream(split_shards(tmp_path, manifest, "train"), 0, 1, batch_size=4, shuffle_buffer=2,
                        label_shape=label_shape(manifest))
    with pytest.raises(ShardError, match=f"{WHERE}: {MESSAGES[mutation]}"):
        list(train.iter_worker(0, 1))
    with pytest.raises(Exception, match=f"{WHERE}: {MESSAGES[mutation]}"):  # from a DataLoader worker too
        list(make_loader(train, 1))
    test = EvalStream(split_shards(tmp_path, manifest, "test"), 0, 1, batch_size=4, label_shape=label_shape(manifest))
    with pytest.raises(ShardError, match=f"{WHERE}: {MESSAGES[mutation]}"):
        list(test)


def test_a_manifest_count_that_differs_from_the_shard_stops_the_readers(tmp_path):
    _write(tmp_path, "none")
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = 9  # 6 in the shard
    path.write_text(json.dumps(manifest))
    manifest = read_manifest(tmp_path)
    message = r"train-000000.tar: 6 samples, manifest says 9"
    with pytest.raises(ShardError, match=message):
        inspect(tmp_path)
    train = TrainStream(split_shards(tmp_path, manifest, "train"), 0, 1, batch_size=3, shuffle_buffer=2)
    with pytest.raises(ShardError, match=message):
        list(train.iter_worker(0, 1))
    with pytest.raises(ShardError, match=message):
        list(EvalStream(split_shards(tmp_path, manifest, "train"), 0, 1, batch_size=4))


def test_training_on_a_shard_with_a_label_of_7_stops_naming_it(tmp_path):
    from aol_dist.config import config_from_dict
    from aol_dist.loop import train

    _write(tmp_path / "shards", "label_value")
    config = config_from_dict({
        "data": {"shards": str(tmp_path / "shards"), "batch_size": 4, "shuffle_buffer": 4, "num_workers": 0},
        "model": {"arch": "resnet_tiny"}, "method": {"name": "majority", "lr": 1e-3},
        "train": {"steps": 6, "log_every": 3, "out_dir": str(tmp_path / "runs"), "run_name": "r", "plots": False,
                  "checkpoint_every": 0}})
    with pytest.raises(ShardError, match=f"{WHERE}: {MESSAGES['label_value']}"):
        train(config, D.World())
    assert not (tmp_path / "runs" / "r").exists()  # no run directory under its final name


def _config(tmp_path, **data):
    from aol_dist.config import config_from_dict

    return config_from_dict({
        "data": {"shards": str(tmp_path / "shards"), "batch_size": 4, "shuffle_buffer": 4, "num_workers": 0, **data},
        "model": {"arch": "resnet_tiny"}, "method": {"name": "majority", "lr": 1e-3},
        "train": {"steps": 2, "log_every": 2, "out_dir": str(tmp_path / "runs"), "run_name": "r", "plots": False,
                  "checkpoint_every": 0, "eval_batch_size": 8}})


def test_a_missing_eval_split_stops_training_before_the_first_step(tmp_path):
    from aol_dist.loop import train

    _write(tmp_path / "shards", "none")
    with pytest.raises(ShardError, match="no split 'validate'"):
        train(_config(tmp_path, eval_splits=["validate"]), D.World())
    assert not (tmp_path / "runs").exists()  # no step ran, no run directory


def test_eval_names_an_unfinished_run_a_missing_model_and_another_image_size(tmp_path, capsys):
    from aol_dist.cli import main
    from aol_dist.loop import train

    _write(tmp_path / "shards", "none")
    run = train(_config(tmp_path), D.World())
    assert main(["eval", str(run), "--split", "test"]) == 0
    capsys.readouterr()
    unfinished = tmp_path / "runs" / "u.incomplete"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((run / "config.toml").read_text())
    for target, message in ((unfinished, "the run has not finished"), (tmp_path / "runs" / "u", "the run has not finished"),
                            (tmp_path / "nothing", "no config.toml")):
        assert main(["eval", str(target)]) == 2
        assert message in capsys.readouterr().err
    jobs = [shards.ShardJob("test-000000.tar", tuple(range(5)))]
    records, _ = shards.write_split(tmp_path / "big", jobs, functools.partial(fake_sample, size=16))
    shards.write_manifest(tmp_path / "big", dataset="fake", findings=FINDINGS, label_sets=LABEL_SETS,
                          splits={"test": records}, image_size=16, has_truth={"test": True})
    assert main(["eval", str(run), "--shards", str(tmp_path / "big")]) == 2
    assert "images of image_size 16, the run trained on 8" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")  # an --out that cannot be made: before the evaluation, one line
    with mock.patch("aol_dist.evaluate.evaluate", side_effect=AssertionError("evaluated before the check")):
        assert main(["eval", str(run), "--out", str(tmp_path / "a_file" / "out")]) == 1
    assert capsys.readouterr().err.strip() == (f"aol eval: cannot make the output folder {tmp_path}/a_file/out: "
                                               "a part of the path is a file, not a folder")


def test_an_output_path_that_cannot_be_made_is_one_line(tmp_path, capsys):
    from aol_dist.cli import main

    (tmp_path / "a_file").write_text("")
    assert main(["shards", "synth", "--out", str(tmp_path / "a_file" / "x"), "--train", "4", "--validate", "0",
                 "--test", "0", "--image-size", "8", "--workers", "1"]) == 1
    assert capsys.readouterr().err.strip() == f"aol shards: Not a directory: {tmp_path}/a_file/x"


def test_converting_another_split_into_a_directory_adds_it_and_never_drops_one(tmp_path):
    jobs = [shards.ShardJob("train-000000.tar", tuple(range(6)))]
    records, _ = shards.write_split(tmp_path, jobs, fake_sample)
    shards.write_manifest(tmp_path, dataset="fake", findings=FINDINGS, label_sets=LABEL_SETS,
                          splits={"train": records}, image_size=8, has_truth={"train": True})
    jobs = [shards.ShardJob("test-000000.tar", tuple(range(6, 10)))]
    records, _ = shards.write_split(tmp_path, jobs, fake_sample)
    manifest = shards.write_manifest(tmp_path, dataset="fake", findings=FINDINGS, label_sets=LABEL_SETS,
                                     splits={"test": records}, image_size=8, has_truth={"test": True})
    assert sorted(manifest["splits"]) == ["test", "train"] and verify(tmp_path) == {"train": 6, "test": 4}
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(ShardError, match=r"holds split\(s\) train converted with other image_size \(image_size=8, "
                                         r"this conversion: image_size=16\).*manifest is unchanged"):
        shards.write_manifest(tmp_path, dataset="fake", findings=FINDINGS, label_sets=LABEL_SETS,
                              splits={"test": records}, image_size=16, has_truth={"test": True})
    assert (tmp_path / "manifest.json").read_text() == before
    again = shards.write_manifest(tmp_path, dataset="fake", findings=FINDINGS, label_sets=LABEL_SETS,  # a re-run
                                  splits={"test": records}, image_size=8, has_truth={"test": True})
    assert again == json.loads(before)


# ----------------------------------------------------------------------------- a full disk

def _full_disk(monkeypatch):
    """Every temporary file the shard writers open goes to /dev/full (writes fail with ENOSPC)."""
    import builtins

    real = builtins.open

    def fake(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp" in str(path):
            real(path, mode).close()  # the temporary file exists, as after a real failed write
            return real("/dev/full", mode, *args, **kwargs)
        return real(path, mode, *args, **kwargs)
    monkeypatch.setattr(shards, "open", fake, raising=False)


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    from aol_dist.cli import main
    from aol_dist.writes import WriteError

    _full_disk(monkeypatch)
    with pytest.raises(WriteError, match=f"no space left on device while writing {tmp_path}/train-000000.tar$"):
        _write(tmp_path, "none")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the shard nor its temporary file
    assert main(["shards", "synth", "--out", str(tmp_path / "synth"), "--train", "4", "--validate", "0",
                 "--test", "0", "--image-size", "8", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"aol shards: no space left on device while writing {tmp_path}/synth/train-000000.tar"
    assert not [p for p in (tmp_path / "synth").iterdir() if p.name.startswith(".")]


def test_a_full_disk_while_saving_a_checkpoint_names_it_and_removes_the_temporary_directory(tmp_path, monkeypatch):
    import shutil

    from aol_dist import checkpoint, writes
    from aol_dist.loop import train
    from aol_dist.writes import WriteError

    _write(tmp_path / "shards", "none")
    config = _config(tmp_path)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_every=1, steps=3))
    real_save, calls = checkpoint.torch.save, []

    def save(obj, path, *args, **kwargs):  # the step-2 checkpoint hits a full disk, as torch reports it
        calls.append(path)
        if "step-00000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr(writes.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    work = tmp_path / "runs" / "r.incomplete" / "checkpoints"
    with pytest.raises(WriteError, match=f"no space left on device \\(0 bytes free\\) while writing {work}/step-00000002$"):
        train(config, D.World())
    assert sorted(p.name for p in work.iterdir()) == ["step-00000001"]  # the last whole checkpoint, no .tmp

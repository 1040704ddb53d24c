"""Image + report text (Sec. 3.3) through the whole trainer, for attention-on-label and a baseline."""

import json

import pytest
import torch

from aol_dist.config import config_from_dict
from aol_dist.dist import World
from aol_dist.loop import train
from helpers import write_fake_shards


def text_config(tmp_path, tiny_bert, steps, log_every=10, method=None):
    """Image+text run on ``tmp_path/shards`` with the tiny BERT as the frozen report encoder."""
    return config_from_dict({
        "data": {"shards": str(tmp_path / "shards"), "batch_size": 4, "num_workers": 0},
        "model": {"arch": "resnet_tiny", "text_encoder": str(tiny_bert)},
        "method": method or {},
        "train": {"steps": steps, "log_every": log_every, "out_dir": str(tmp_path / "runs"), "run_name": "t"},
    })


@pytest.mark.parametrize("method", ["aol", "cm"])
def test_image_text_training_runs_and_evaluates(tmp_path, tiny_bert, method):
    from aol_dist.data.convert.tokenize import tokenizer_record

    write_fake_shards(tmp_path / "shards", {"train": [8, 8], "test": [6]}, tokens=12,
                      tokenizer=tokenizer_record(tiny_bert, 12))
    config = text_config(tmp_path, tiny_bert, steps=3, log_every=1, method={"name": method, "lr": 1e-3})
    run = train(config, World())
    state = torch.load(run / "model.pt", weights_only=True)
    assert ("cm" in state) == (method == "cm")
    assert any(k.startswith("text.layers") for k in state["model"])  # the two FC layers are part of theta
    assert state["model"]["text.layers.0.weight"].shape == (512, 16)
    assert json.loads((run / "auc_test.json").read_text())["samples"] == 6


def test_text_encoder_without_tokens_in_shards_is_a_clear_error(tmp_path, tiny_bert):
    write_fake_shards(tmp_path / "shards", {"train": [8], "test": [4]})
    config = text_config(tmp_path, tiny_bert, steps=1)
    with pytest.raises(ValueError, match="shards hold no report tokens"):
        train(config, World())


def test_synth_shards_with_report_tokens_train_image_text(tmp_path, tiny_bert):
    from aol_dist.data.build import build_synth
    from aol_dist.data.shards import read_manifest, verify

    manifest = build_synth(tmp_path / "shards", 16, 0, 8, image_size=32, samples_per_shard=8, tokenizer=str(tiny_bert),
                           max_length=24)
    assert manifest["tokenizer"]["max_length"] == 24 and verify(tmp_path / "shards")["train"] == 16
    config = text_config(tmp_path, tiny_bert, steps=2, method={"lr": 1e-3})
    run = train(config, World())
    assert json.loads((run / "auc_test.json").read_text())["samples"] == 8
    assert read_manifest(tmp_path / "shards")["tokenizer"]["vocab_sha256"]


def test_shards_from_another_tokenizer_stop_training_before_it_starts(tmp_path, tiny_bert):
    from aol_dist.data.convert.tokenize import TokenizerMismatch, tokenizer_record
    from fixtures_data import make_tokenizer

    other = make_tokenizer(tmp_path / "other-tokenizer", extra=("cardiomegaly",))
    write_fake_shards(tmp_path / "shards", {"train": [8], "test": [4]}, tokens=12,
                      tokenizer=tokenizer_record(other, 12))
    config = text_config(tmp_path, tiny_bert, steps=1)
    with pytest.raises(TokenizerMismatch, match="vocabulary sha256"):
        train(config, World())
    assert not (tmp_path / "runs").exists()  # stopped before the run directory was made

"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    from fixtures_data import make_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    make_tokenizer(path, extra=("pleural", "pneumothorax", "mild", "edema", "pulmonary", "impression", "lungs",
                                "clear", "possible", "of", "the", "and", "is", "are"))  # 33 words < vocab 40
    return path


@pytest.fixture(scope="session")
def run_shards(tmp_path_factory):
    """Fake shards for training runs: 64 training samples in 4 shards (truth in every split), 16 test samples."""
    from helpers import write_fake_shards

    out = tmp_path_factory.mktemp("run-shards")
    write_fake_shards(out, {"train": [16, 16, 16, 16], "test": [8, 8]})
    return out

"""The last stage batched over label sets (last_stage.py) against the reference meta forwards."""

import copy

import pytest
import torch

from aol_dist.method import last_stage
from aol_dist.method.aol import bce_cotangents, meta_features_batched, meta_features_reference
from aol_dist.model.backbone import Classifier
from aol_dist.model.text import ReportEncoder

B, M, N, ALPHA = 5, 3, 4, 0.7


def setup(arch, size=40, text_encoder=None, dtype=torch.float64):
    torch.manual_seed(0)
    model = Classifier(arch, N, text_dim=text_encoder.out_dim if text_encoder else 0).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 1, size, size, generator=g, dtype=dtype)
    labels = torch.randint(0, 2, (B, M, N), generator=g).to(dtype)
    text = text_encoder(torch.randint(1, 40, (B, 12), generator=g)).to(dtype) if text_encoder else None
    return model, x, labels, text


def both(model, x, labels, text, scope="partial"):
    """(batched, reference) meta-features, on two copies of the same model."""
    twin = copy.deepcopy(model)
    trunk = model.trunk(x)
    logits, tape = last_stage.recorded_top(model, trunk, text)
    got = meta_features_batched(model, x, trunk, tape, bce_cotangents(logits, labels), ALPHA, scope)
    trunk = twin.trunk(x)
    twin_logits = twin(trunk, text, from_trunk=True)
    want = meta_features_reference(twin, x, trunk, twin_logits, labels, ALPHA, text, scope)
    torch.testing.assert_close(logits, twin_logits)
    return got, want, model, twin


@pytest.mark.parametrize("scope", ["partial", "full"])
@pytest.mark.parametrize("low_rank", [True, False])
@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet18", "resnet50", "timm/resnet18"])
def test_batched_meta_features_equal_reference(arch, low_rank, scope, monkeypatch):
    monkeypatch.setattr(last_stage, "LOW_RANK", low_rank)
    model, x, labels, text = setup(arch)
    assert last_stage.supported(model)
    got, want, model, twin = both(model, x, labels, text, scope)
    assert got.shape == (B, M, model.feature_dim)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # running statistics: one forward's update only


@pytest.mark.parametrize("scope", ["partial", "full"])
@pytest.mark.parametrize("low_rank", [True, False])
def test_batched_meta_features_with_text_layers(low_rank, scope, monkeypatch, tiny_bert):
    monkeypatch.setattr(last_stage, "LOW_RANK", low_rank)
    model, x, labels, text = setup("resnet_tiny", text_encoder=ReportEncoder(tiny_bert, cache=False))
    got, want, *_ = both(model, x, labels, text, scope)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("low_rank", [True, False])
def test_batched_meta_features_channels_last(low_rank, monkeypatch):
    # what `aol bench step --channels-last` runs on the GPU: weights not (C_out, K)-contiguous (the formed
    # W_m once failed there with a view error)
    monkeypatch.setattr(last_stage, "LOW_RANK", low_rank)
    model, x, labels, text = setup("resnet18")
    model = model.to(memory_format=torch.channels_last)
    x = x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
    got, want, *_ = both(model, x, labels, text, "full")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_cost_rule_picks_low_rank_only_for_small_batches():
    # ResNet-18's last 3x3 convolution (512 -> 512, K = 4608) at 2 x 2 maps
    assert last_stage._low_rank(16 * 4, 4608, 512)  # the CPU benchmark: batch 16
    assert not last_stage._low_rank(32 * 64, 4608, 512)  # ResNet-50 at 256 x 256, batch 32: 8 x 8 maps


@pytest.mark.parametrize("scope", ["partial", "full"])
def test_bf16_autocast_error_is_that_of_the_reference(scope):
    # bf16 itself moves these features a lot against float32 (batch norm over 5 x 2 x 2 values: a mean
    # absolute error of 0.08 partial, 0.3 full); the batched passes must add only a fraction of that
    model, x, labels, text = setup("resnet18", dtype=torch.float32)
    exact = both(copy.deepcopy(model), x, labels, text, scope)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want, *_ = both(model, x, labels, text, scope)
    assert got.dtype == torch.bfloat16
    bf16_error = (want.float() - exact).abs().mean()
    assert (got.float() - want.float()).abs().mean() < 0.25 * bf16_error
    assert (got.float() - exact).abs().mean() < 1.1 * bf16_error


def test_unsupported_last_stages_fall_back():
    assert not last_stage.supported(Classifier("timm/resnet18d", N))  # average-pool shortcut
    assert not last_stage.supported(Classifier("timm/seresnet18", N))  # squeeze-and-excitation
    assert not last_stage.supported(Classifier("resnet18", N).eval())  # meta forwards use batch statistics

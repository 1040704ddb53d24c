"""The fast meta step and gradient checkpointing against the reference: same parameters after 3 steps."""

import pytest
import torch

from aol_dist.method import last_stage
from aol_dist.method.aol import AolHyper, aol_step
from aol_dist.model.attention import LabelAttention
from aol_dist.model.backbone import Classifier
from aol_dist.model.text import ReportEncoder

B, M, N, L = 6, 3, 5, 12


def run_steps(hp, text_encoder=None, per_finding=False, checkpointing=False, steps=3):
    torch.manual_seed(0)
    dim = text_encoder.out_dim if text_encoder else 0
    model = Classifier("resnet_tiny", N, text_dim=dim, checkpointing=checkpointing).double()
    attention = LabelAttention(model.feature_dim, M, N, per_finding).double()
    torch.nn.init.normal_(attention.attn_fc.weight, std=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    att_opt = torch.optim.SGD(attention.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.rand(B, 1, 24, 24, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (B, M, N), generator=g).double()
        tokens = torch.randint(1, 40, (B, L), generator=g)
        text = text_encoder(tokens).double() if text_encoder else None
        losses.append(aol_step(model, attention, opt, att_opt, x, y, hp, text=text)["loss"])
    return model, attention, torch.stack(losses)


def assert_same(a, b, rtol=1e-8):
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=1e-10, msg=na)


@pytest.mark.parametrize("scope", ["full", "partial"])
@pytest.mark.parametrize("combine,threshold", [("text", 0.5), ("listing", 0.1)])
@pytest.mark.parametrize("per_finding", [False, True])
@pytest.mark.parametrize("with_text", [False, True])
def test_fast_step_equals_reference(scope, combine, threshold, per_finding, with_text, tiny_bert):
    encoder = ReportEncoder(tiny_bert, cache=False) if with_text else None
    common = dict(meta_lr=0.2, k=5.0, threshold=threshold, combine=combine, scope=scope)
    ref = run_steps(AolHyper(fast=False, **common), encoder, per_finding)
    fast = run_steps(AolHyper(fast=True, **common), encoder, per_finding)
    assert_same(ref[0], fast[0])
    assert_same(ref[1], fast[1])
    torch.testing.assert_close(ref[2], fast[2])


@pytest.mark.parametrize("scope", ["full", "partial"])
def test_autograd_fast_path_equals_reference(scope, monkeypatch, tiny_bert):
    """The fast path for backbones last_stage.py does not write out (meta_features_fast)."""
    encoder = ReportEncoder(tiny_bert, cache=False)
    ref = run_steps(AolHyper(fast=False, k=5.0, scope=scope), encoder, per_finding=True)
    monkeypatch.setattr("aol_dist.method.last_stage.supported", lambda model: False)
    fast = run_steps(AolHyper(fast=True, k=5.0, scope=scope), encoder, per_finding=True)
    assert_same(ref[0], fast[0])
    assert_same(ref[1], fast[1])


def test_batched_last_stage_follows_the_config(monkeypatch):
    from aol_dist.config import load_config

    calls = []
    real = last_stage.recorded_top
    monkeypatch.setattr(last_stage, "recorded_top", lambda *a: calls.append(1) or real(*a))
    for setting, used in (("true", True), ("false", False)):
        hp = AolHyper.from_method(load_config(None, [f"method.batched_last_stage={setting}", "method.k=5"]).method)
        calls.clear()
        run_steps(hp, steps=1)
        assert bool(calls) == used


def test_partial_scope_differs_from_full():
    full = run_steps(AolHyper(k=5.0, scope="full"))
    partial = run_steps(AolHyper(k=5.0, scope="partial"))
    assert not torch.allclose(full[1].attn_fc.weight, partial[1].attn_fc.weight)


@pytest.mark.parametrize("fast,scope", [(False, "full"), (True, "full"), (True, "partial")])
def test_gradient_checkpointing_changes_nothing(fast, scope):
    hp = AolHyper(k=5.0, fast=fast, scope=scope)
    plain = run_steps(hp)
    checkpointed = run_steps(hp, checkpointing=True)
    assert_same(plain[0], checkpointed[0])  # parameters and batch-norm running statistics
    assert_same(plain[1], checkpointed[1])


def test_report_encoder_is_frozen_and_cached(tiny_bert):
    enc = ReportEncoder(tiny_bert)
    enc.train()
    assert not enc.encoder.training and not any(p.requires_grad for p in enc.parameters())
    tokens = torch.randint(1, 40, (3, L))
    first = enc(tokens, ["a", "b", "c"])
    assert set(enc.cache) == {"a", "b", "c"}
    torch.testing.assert_close(enc(tokens, ["a", "b", "c"]), first)
    torch.testing.assert_close(first, enc.encode(tokens), atol=1e-2, rtol=1e-2)  # cache holds float16
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ReportEncoder("/nonexistent/biobert")


@pytest.mark.parametrize("arch", ["resnet18", "timm/resnet18d"])
def test_other_backbones_by_name_run_the_fast_step(arch):
    torch.manual_seed(0)
    model = Classifier(arch, N, checkpointing=True)
    attention = LabelAttention(model.feature_dim, M, N)
    out = aol_step(model, attention, torch.optim.Adam(model.parameters()), torch.optim.SGD(attention.parameters(), 0.1),
                   torch.rand(4, 1, 32, 32), torch.randint(0, 2, (4, M, N)).float(), AolHyper())
    assert torch.isfinite(out["loss"]) and out["weights"].shape == (4, M, 1)


def test_pretrained_weights_load_from_a_local_torchvision_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    model = Classifier("resnet18", N, pretrained=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(model.stem[0].weight, state["conv1.weight"])
    torch.testing.assert_close(model.stages[3][1].bn2.running_var, state["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("per_finding", [False, True])
def test_fast_step_equals_reference_at_the_papers_k(per_finding):
    """k = 50 (Sec. 5.1): Eq. 3 is nearly a step there, so any difference in y_bar would show."""
    common = dict(meta_lr=0.2, k=50.0, threshold=0.5)
    ref = run_steps(AolHyper(fast=False, **common), per_finding=per_finding)
    fast = run_steps(AolHyper(fast=True, **common), per_finding=per_finding)
    assert_same(ref[0], fast[0])
    assert_same(ref[1], fast[1])
    torch.testing.assert_close(ref[2], fast[2])


@pytest.mark.parametrize("scope", ["full", "partial"])
def test_trust_with_meta_features_fast_equals_reference(scope):
    """method.trust = posterior with trust_input = meta: the head reads the meta features F_m of Eq. 1."""
    from aol_dist.method.trust import LabelTrust, TrustHyper, trust_step

    def run(fast):
        torch.manual_seed(0)
        model = Classifier("resnet_tiny", N).double()
        trust = LabelTrust(model.feature_dim, M, N, input="meta").double()
        torch.nn.init.normal_(trust.head.weight, std=0.05)
        opt, trust_opt = torch.optim.Adam(model.parameters(), 1e-3), torch.optim.Adam(trust.parameters(), 1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.rand(B, 1, 24, 24, generator=g, dtype=torch.float64)
            y = torch.randint(0, 2, (B, M, N), generator=g).double()
            trust_step(model, trust, opt, trust_opt, x, y, TrustHyper(input="meta", scope=scope), fast=fast)
        return model, trust

    ref, fast = run(False), run(True)
    assert_same(ref[0], fast[0])
    assert_same(ref[1], fast[1])

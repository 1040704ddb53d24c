"""The math of the meta step against hand-written references (Eq. 1-5, Theorem 1 of A.1)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aol_dist.method.aol import (AolHyper, aol_loss, aol_step, attended_labels, bce, meta_features_fast,
                                 meta_features_reference)
from aol_dist.method.baselines import majority_target, soft_average_target
from aol_dist.model.attention import LabelAttention, binarize, combine_labels
from aol_dist.model.backbone import Classifier



@pytest.fixture(autouse=True)
def float64():
    """Finite differences and closed forms want float64; restore the default for other test modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class TinyNet(nn.Module):
    """x -> relu(bn(fc1 x)) = F -> head: small enough for finite differences, with batch norm.
    Has the Classifier interface the meta step uses (trunk / from_trunk / last_stage_parameters)."""

    def __init__(self, d_in=3, d=4, n=2):
        super().__init__()
        self.fc1, self.bn, self.head = nn.Linear(d_in, d), nn.BatchNorm1d(d), nn.Linear(d, n)

    def trunk(self, x):
        return x

    def last_stage_parameters(self):
        return ["bn.weight", "bn.bias", "head.weight", "head.bias"]

    def forward(self, x, text=None, features_only=False, from_trunk=False):
        f = torch.relu(self.bn(self.fc1(x)))
        return f if features_only else self.head(f)


def manual_features(w1, b1, gamma, beta, x):
    h = x @ w1.T + b1
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta
    return torch.relu(h)


def test_theorem1_weighted_label_bce_equals_weighted_bce():
    """A.1: without binarization, BCE(p, sum_m w_m y_m) = sum_m w_m BCE(p, y_m), per set and per finding."""
    g = torch.Generator().manual_seed(0)
    b, m, n = 7, 4, 5
    z = torch.randn(b, n, generator=g)
    y = torch.randint(0, 2, (b, m, n), generator=g).double()
    for shape in ((b, m, 1), (b, m, n)):
        w = torch.softmax(torch.randn(*shape, generator=g), dim=1)
        left = F.binary_cross_entropy_with_logits(z, combine_labels(w, y, "text"), reduction="none")
        right = sum(w[:, i] * F.binary_cross_entropy_with_logits(z, y[:, i], reduction="none") for i in range(m))
        torch.testing.assert_close(left, right)


def test_listing_combination_is_text_over_m_and_binarize_is_eq3():
    w = torch.softmax(torch.randn(3, 4, 1), 1)
    y = torch.randint(0, 2, (3, 4, 6)).double()
    torch.testing.assert_close(combine_labels(w, y, "listing"), combine_labels(w, y, "text") / 4)
    y_bar = torch.tensor([0.0, 0.49, 0.5, 0.51, 1.0])
    expected = 1.0 / (1.0 + torch.exp(-50.0 * (y_bar - 0.5)))
    torch.testing.assert_close(binarize(y_bar, 50.0, 0.5), expected)
    assert binarize(torch.tensor(1.0)) > 0.999 and binarize(torch.tensor(0.0)) < 1e-3


def test_meta_features_match_finite_difference_reference():
    """Eq. 1 with a finite-difference gradient, then F_m by a hand-written forward in train mode."""
    torch.manual_seed(1)
    net = TinyNet()
    x = torch.randn(6, 3)
    labels = torch.randint(0, 2, (6, 3, 2)).double()
    alpha = 0.2
    logits = net(x)
    got = meta_features_reference(net, x, x, logits, labels, alpha)
    torch.testing.assert_close(meta_features_fast(net, x, x, logits, labels, alpha), got)
    assert got.shape == (6, 3, 4) and not got.requires_grad

    names = ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"]
    base = {k: v.detach().clone() for k, v in net.named_parameters()}

    def loss_at(params, target):
        f = manual_features(params["fc1.weight"], params["fc1.bias"], params["bn.weight"], params["bn.bias"], x)
        return F.binary_cross_entropy_with_logits(f @ params["head.weight"].T + params["head.bias"], target)

    eps = 1e-6
    for m in range(3):
        theta_m = {}
        for k in names:
            grad = torch.zeros_like(base[k])
            for idx in range(base[k].numel()):
                plus = {kk: vv.clone() for kk, vv in base.items()}
                minus = {kk: vv.clone() for kk, vv in base.items()}
                plus[k].view(-1)[idx] += eps
                minus[k].view(-1)[idx] -= eps
                grad.view(-1)[idx] = (loss_at(plus, labels[:, m]) - loss_at(minus, labels[:, m])) / (2 * eps)
            theta_m[k] = base[k] - alpha * grad
        expected = manual_features(theta_m["fc1.weight"], theta_m["fc1.bias"], theta_m["bn.weight"], theta_m["bn.bias"], x)
        torch.testing.assert_close(got[:, m], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("meta", [meta_features_reference, meta_features_fast])
def test_meta_forwards_leave_batchnorm_running_statistics_alone(meta):
    torch.manual_seed(2)
    model = Classifier("resnet_tiny", 5)
    x = torch.rand(4, 1, 32, 32)
    labels = torch.randint(0, 2, (4, 3, 5)).double()
    trunk = model.trunk(x)
    logits = model(trunk, from_trunk=True)  # the one real forward updates the statistics, as in plain training
    before = {k: v.clone() for k, v in model.named_buffers()}
    for scope in ("full", "partial"):
        feats = meta(model, x, trunk, logits, labels, 0.2, scope=scope)
        assert feats.shape == (4, 3, model.feature_dim)
        for k, v in model.named_buffers():
            assert torch.equal(v, before[k]), (scope, k)
    # the meta forwards used batch statistics: different labels -> different updated weights -> different F_m
    assert not torch.allclose(feats[:, 0], feats[:, 1]) or torch.equal(labels[:, 0], labels[:, 1])


@pytest.mark.parametrize("per_finding", [False, True])
@pytest.mark.parametrize("combine", ["text", "listing"])
def test_attention_gradient_matches_closed_form(per_finding, combine):
    """grad_{W,b} L of Eq. 5 written out by the chain rule through Eq. 3 and Eq. 2."""
    torch.manual_seed(3)
    b, m, n, d = 5, 3, 4, 6
    k, t = 5.0, 0.4 if combine == "text" else 0.15  # a soft k keeps every term away from saturation
    att = LabelAttention(d, m, n, per_finding)
    nn.init.normal_(att.attn_fc.weight, std=0.3)
    nn.init.normal_(att.attn_fc.bias, std=0.3)
    feats = torch.randn(b, m, d)
    labels = torch.randint(0, 2, (b, m, n)).double()
    z = torch.randn(b, n)
    hp = AolHyper(k=k, threshold=t, combine=combine)
    y_tilde, w = attended_labels(att, feats, labels, hp)
    bce(z, y_tilde).backward()

    # by hand
    with torch.no_grad():
        dl_dy = -z / (b * n)                                   # d BCE / d target
        dy_dbar = k * y_tilde * (1 - y_tilde)                  # Eq. 3
        scale = 1.0 if combine == "text" else 1.0 / m
        g_bar = dl_dy * dy_dbar * scale                        # (B, N)
        dl_dw = labels * g_bar[:, None, :]                     # (B, M, N)
        if not per_finding:
            dl_dw = dl_dw.sum(2, keepdim=True)                 # one weight for all findings
        dl_ds = w * (dl_dw - (w * dl_dw).sum(1, keepdim=True))  # softmax Jacobian over m
        dl_ds = dl_ds.reshape(b, -1)                           # matches attn_fc's output layout
        grad_w = dl_ds.T @ feats.reshape(b, -1)
        grad_b = dl_ds.sum(0)
    torch.testing.assert_close(att.attn_fc.weight.grad, grad_w)
    torch.testing.assert_close(att.attn_fc.bias.grad, grad_b)


def test_attention_starts_uniform_and_sums_to_one():
    att = LabelAttention(8, 4, 14, per_finding=True)
    w = att(torch.randn(3, 4, 8))
    assert w.shape == (3, 4, 14)
    torch.testing.assert_close(w, torch.full_like(w, 0.25))
    nn.init.normal_(att.attn_fc.weight)
    torch.testing.assert_close(att(torch.randn(3, 4, 8)).sum(1), torch.ones(3, 14))


def test_aol_step_updates_follow_eq4_and_eq5():
    """The outer update is Adam on grad L(y_hat, y_tilde); attention is SGD on the same loss; meta steps
    leave no trace in the parameters."""
    torch.manual_seed(4)
    net = TinyNet()
    att = LabelAttention(4, 3, 2)
    nn.init.normal_(att.attn_fc.weight, std=0.5)
    x = torch.randn(8, 3)
    labels = torch.randint(0, 2, (8, 3, 2)).double()
    hp = AolHyper(meta_lr=0.2, k=5.0, threshold=0.5)

    ref_net, ref_att = copy.deepcopy(net), copy.deepcopy(att)
    loss, _, _ = aol_loss(ref_net, ref_att, x, labels, hp)
    g_net = torch.autograd.grad(loss, list(ref_net.parameters()), retain_graph=True)
    g_att = torch.autograd.grad(loss, list(ref_att.parameters()))

    opt, att_opt = torch.optim.Adam(net.parameters(), lr=1e-3), torch.optim.SGD(att.parameters(), lr=0.1)
    out = aol_step(net, att, opt, att_opt, x, labels, hp)
    torch.testing.assert_close(out["loss"], loss.detach())
    # first Adam step: bias-corrected m = g, v = g^2, so the move is lr * g / (|g| + eps)
    for p0, p1, g in zip(ref_net.parameters(), net.parameters(), g_net):
        torch.testing.assert_close(p1, p0 - 1e-3 * g / (g.abs() + 1e-8), atol=1e-12, rtol=0)
    for p0, p1, g in zip(ref_att.parameters(), att.parameters(), g_att):
        torch.testing.assert_close(p1, p0 - 0.1 * g)


def test_baseline_targets():
    y = torch.tensor([[[1, 0], [1, 1], [0, 1], [1, 1]]]).double()  # (1, M=4, N=2)
    torch.testing.assert_close(soft_average_target(y), torch.tensor([[0.75, 0.75]]))
    torch.testing.assert_close(majority_target(y), torch.tensor([[1.0, 1.0]]))
    tie = torch.tensor([[[1.0], [0.0]]])
    torch.testing.assert_close(majority_target(tie), torch.tensor([[0.5]]))


def test_best_choice_is_the_truth_where_a_label_set_gives_it_else_the_vote():
    from aol_dist.method.baselines import best_choice_target

    # (B=1, M=3, N=4): sets disagree (truth 1, truth 0), agree and right, agree and wrong
    y = torch.tensor([[[1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]]]).float()
    truth = torch.tensor([[1, 0, 1, 1]]).float()
    torch.testing.assert_close(best_choice_target(y, truth, multiclass=False), torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float32))
    # multi-class (B=2, M=3, K=3): image 0, one set names the true class 2; image 1, none does (plurality: 0)
    one_hot = torch.nn.functional.one_hot
    y = one_hot(torch.tensor([[0, 0, 2], [0, 0, 1]]), 3).float()
    truth = one_hot(torch.tensor([2, 2]), 3).float()
    torch.testing.assert_close(best_choice_target(y, truth, multiclass=True), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float32))


def test_cm_matrices_row_stochastic_near_identity():
    from aol_dist.method.baselines import ConfusionMatrices

    a = ConfusionMatrices(4, 14).matrices()
    assert a.shape == (4, 14, 2, 2)
    torch.testing.assert_close(a.sum(-1), torch.ones(4, 14, 2))
    assert (a.diagonal(dim1=-2, dim2=-1) > 0.99).all()


def test_cm_with_identity_and_no_trace_term_is_plain_bce():
    from aol_dist.method.baselines import cm_loss

    z = torch.randn(6, 5)
    y = torch.randint(0, 2, (6, 2, 5)).double()
    eye = torch.eye(2).expand(2, 5, 2, 2)
    torch.testing.assert_close(cm_loss(z, y, eye, 0.0), bce(z, y[:, 0]) + bce(z, y[:, 1]))


def test_cm_trace_term_gradient():
    """d/d raw of lambda * mean trace(softmax rows): for a row r with entries a, the diagonal entry's
    gradient is a_rr (delta - a_r.) / (M N) * lambda."""
    from aol_dist.method.baselines import ConfusionMatrices, cm_loss

    cm = ConfusionMatrices(2, 3)
    with torch.no_grad():
        cm.raw.add_(torch.randn_like(cm.raw))
    z = torch.randn(4, 3)
    y = torch.randint(0, 2, (4, 2, 3)).double()
    lam = 0.7
    g_with = torch.autograd.grad(cm_loss(z, y, cm.matrices(), lam), cm.raw)[0]
    g_without = torch.autograd.grad(cm_loss(z, y, cm.matrices(), 0.0), cm.raw)[0]
    a = cm.matrices().detach()
    expected = torch.zeros_like(a)
    for r in range(2):
        onehot = torch.nn.functional.one_hot(torch.tensor(r), 2).double()
        expected[..., r, :] = a[..., r, r, None] * (onehot - a[..., r, :]) / (2 * 3)
    torch.testing.assert_close(g_with - g_without, lam * expected)

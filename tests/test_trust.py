"""The likelihood-trained trust (method/trust.py): Bayes by hand, the EM gradient, recovery of known
annotator accuracies, per-sample choice on instance-dependent labels, and the paper preset's vote at rest."""

import itertools

import pytest
import torch
from torch import nn

from aol_dist.method.baselines import majority_target
from aol_dist.method.trust import LabelTrust, posterior_trust, set_right
from aol_dist.model.attention import LabelAttention, binarize, combine_labels


def test_posterior_is_bayes_by_hand():
    torch.manual_seed(0)
    trust = LabelTrust(4, 3, 2, annotator="independent", input="none")
    with torch.no_grad():
        trust.log_table.normal_()
    logits = torch.randn(5, 2)
    labels = torch.randint(0, 2, (5, 3, 2)).float()
    loss, q, w = posterior_trust(logits, labels, trust, trust.scores(None, 5))
    c = torch.softmax(trust.log_table, -1)  # (M, N, truth, label)
    for b, n in itertools.product(range(5), range(2)):
        p1 = torch.sigmoid(logits[b, n])
        like = [torch.prod(torch.stack([c[m, n, t, int(labels[b, m, n])] for m in range(3)])) for t in (0, 1)]
        post = p1 * like[1] / (p1 * like[1] + (1 - p1) * like[0])
        assert q[b, n].item() == pytest.approx(post.item(), abs=1e-6)
        right = [post if labels[b, m, n] else 1 - post for m in range(3)]
        assert w[b, :, n].tolist() == pytest.approx([(r / sum(right)).item() for r in right], abs=1e-6)


@pytest.mark.parametrize("annotator", ["joint", "independent"])
def test_classifier_gradient_is_bce_against_the_posterior(annotator):
    """d(-log P(Y|x))/dz = (sigmoid(z) - q) / (B N): the E-step target, as in EM."""
    torch.manual_seed(1)
    trust = LabelTrust(4, 3, 5, annotator=annotator, input="none")
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.randint(0, 2, (6, 3, 5)).float()
    loss, q, _ = posterior_trust(logits, labels, trust, trust.scores(None, 6))
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, (torch.sigmoid(logits) - q).detach() / logits.numel())


@pytest.mark.parametrize("multiclass", [False, True])
@pytest.mark.parametrize("tau", [0.0, 0.5, 2.0])
def test_a_powered_prior_gives_the_posterior_of_sigmoid_tau_z_and_trains_the_classifier_toward_it(tau, multiclass):
    """method.prior_power tau: the posterior's prior is P(t | x)^tau renormalised (sigmoid / softmax of tau z);
    the classifier's gradient is that of cross-entropy against it, (P(t | x) - q) / (B N); tau = 1 is the
    likelihood, whose gradients the branch for tau != 1 reproduces as tau -> 1."""
    torch.manual_seed(3)
    n = 3
    trust = LabelTrust(4, 2, n, multiclass=multiclass, annotator="independent", input="none", prior_power=tau)
    with torch.no_grad():
        trust.log_table.normal_()
    logits = torch.randn(5, n, requires_grad=True)
    labels = (torch.nn.functional.one_hot(torch.randint(0, n, (5, 2)), n) if multiclass
              else torch.randint(0, 2, (5, 2, n))).float()
    _, q, _ = posterior_trust(logits, labels, trust, trust.scores(None, 5))
    plain = LabelTrust(4, 2, n, multiclass=multiclass, annotator="independent", input="none")
    plain.load_state_dict(trust.state_dict())
    _, expected, _ = posterior_trust(tau * logits.detach(), labels, plain, plain.scores(None, 5))
    torch.testing.assert_close(q, expected)
    loss, q, _ = posterior_trust(logits, labels, trust, trust.scores(None, 5))
    (grad,) = torch.autograd.grad(loss, logits)
    prior = torch.softmax(logits, -1) if multiclass else torch.sigmoid(logits)
    torch.testing.assert_close(grad, (prior - q).detach() / (5 if multiclass else logits.numel()))
    near, one = (LabelTrust(4, 2, n, multiclass=multiclass, annotator="independent", input="none", prior_power=p)
                 for p in (1 - 1e-9, 1.0))
    near.load_state_dict(trust.state_dict())
    one.load_state_dict(trust.state_dict())
    grads = [torch.autograd.grad(posterior_trust(logits, labels, t, t.scores(None, 5))[0], [logits, t.log_table])
             for t in (near, one)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_multiclass_posterior_and_gradient():
    torch.manual_seed(2)
    trust = LabelTrust(4, 2, 3, multiclass=True, input="none")
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.nn.functional.one_hot(torch.randint(0, 3, (4, 2)), 3).float()
    loss, q, w = posterior_trust(logits, labels, trust, trust.scores(None, 4))
    c = torch.softmax(trust.log_table, -1)
    prior = torch.softmax(logits, -1)
    y = labels.argmax(-1)
    joint = prior * c[0][:, y[:, 0]].T * c[1][:, y[:, 1]].T
    torch.testing.assert_close(q, (joint / joint.sum(1, keepdim=True)).detach())
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, (prior - q).detach() / 4)
    assert w.shape == (4, 2, 1) and torch.allclose(w.sum(1), torch.ones(4, 1))


def _controlled(n=6000, d=8, findings=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    truth = (x @ torch.randn(d, findings, generator=g) > 0.3).float()
    return x, truth, g


def _fit(trust, x, labels, steps=600, batch=500, lr=0.05, features=None):
    torch.manual_seed(0)
    classifier = nn.Linear(x.shape[1], trust.num_findings)
    opt = torch.optim.Adam([*classifier.parameters(), *trust.parameters()], lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        f = None if features is None else features[idx].unsqueeze(1)
        loss, _, _ = posterior_trust(classifier(x[idx]), labels[idx], trust, trust.scores(f, batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return classifier


@pytest.mark.parametrize("annotator", ["independent", "joint"])
def test_recovers_known_sensitivity_and_specificity(annotator):
    x, truth, g = _controlled()
    sens, spec = torch.tensor([0.9, 0.7, 0.6]), torch.tensor([0.8, 0.95, 0.65])
    labels = []
    for m in range(3):
        u = torch.rand(truth.shape, generator=g)
        labels.append(torch.where(truth == 1, (u < sens[m]).float(), (u > spec[m]).float()))
    labels = torch.stack(labels, 1)
    trust = LabelTrust(1, 3, 3, annotator=annotator, input="none")
    classifier = _fit(trust, x, labels, steps=1500)
    c = trust.estimated_confusion().detach()  # (M, N, truth, label)
    pos = truth.unsqueeze(1) == 1
    drawn_sens = (labels * pos).sum(0) / pos.sum(0)  # the rates as drawn in this sample, (M, N)
    drawn_spec = ((1 - labels) * ~pos).sum(0) / (~pos).sum(0)
    for m in range(3):
        assert c[m, :, 1, 1] == pytest.approx(drawn_sens[m].tolist(), abs=0.05), (annotator, m, c[m, :, 1, 1])
        assert c[m, :, 0, 0] == pytest.approx(drawn_spec[m].tolist(), abs=0.05), (annotator, m, c[m, :, 0, 0])
    # the trust a run reports: each set's estimated accuracy, the mean of P(t = y_m | x, Y) over the data
    with torch.no_grad():
        _, q, _ = posterior_trust(classifier(x), labels, trust, trust.scores(None, len(x)))
    estimated = set_right(q, labels, multiclass=False).mean(0)  # (M, N)
    accuracy = (labels == truth.unsqueeze(1)).float().mean(0)
    torch.testing.assert_close(estimated, accuracy, atol=0.03, rtol=0)
    assert drawn_sens.sub(sens[:, None]).abs().max() < 0.03  # and those are the rates asked for


def test_recovers_a_multiclass_confusion_matrix_including_an_adversary():
    g = torch.Generator().manual_seed(3)
    k, n = 4, 8000
    x = torch.randn(n, 6, generator=g)
    true = (x @ torch.randn(6, k, generator=g)).argmax(1)
    noisy = [0.2, 0.35, 1.0]  # the last names a fixed wrong class every time (paper A.2.2, adversarial)
    labels = []
    for rate in noisy[:2]:
        flip = torch.rand(n, generator=g) < rate
        other = (true + torch.randint(1, k, (n,), generator=g)) % k
        labels.append(torch.where(flip, other, true))
    labels.append((true + 1) % k)
    onehot = torch.nn.functional.one_hot(torch.stack(labels, 1), k).float()
    trust = LabelTrust(1, 3, k, multiclass=True, input="none")
    _fit(trust, x, onehot, steps=800)
    c = trust.estimated_confusion().detach()
    for m, rate in enumerate(noisy[:2]):
        assert c[m].diagonal().tolist() == pytest.approx([1 - rate] * k, abs=0.05), (m, c[m])
    assert c[2][torch.arange(k), (torch.arange(k) + 1) % k].min() > 0.9, c[2]


def test_the_weights_choose_per_sample_on_instance_dependent_labels():
    """Set A is right on images with a cue and wrong on 40 % of entries elsewhere; set B the other way round."""
    x, truth, g = _controlled(n=6000, d=8, findings=2, seed=4)
    cue = (torch.rand(len(x), generator=g) < 0.5).float()
    flips = [(torch.rand(truth.shape, generator=g) < 0.4).float() for _ in range(2)]
    a = torch.where(cue[:, None] == 1, truth, (truth + flips[0]) % 2)
    b = torch.where(cue[:, None] == 0, truth, (truth + flips[1]) % 2)
    labels = torch.stack([a, b], 1)
    features = torch.cat([cue[:, None], x], 1)
    trust = LabelTrust(features.shape[1], 2, 2, annotator="joint", input="features")
    classifier = _fit(trust, x, labels, steps=800, features=features)
    with torch.no_grad():
        s = trust.scores(features.unsqueeze(1), len(x))  # (B, M, N): log-odds bonus of each set being right
        _, _, w = posterior_trust(classifier(x), labels, trust, s)
    on, off = s[cue == 1].mean((0, 2)), s[cue == 0].mean((0, 2))
    assert on[0] - on[1] > 0.5 and off[1] - off[0] > 0.5, (on, off)
    # and the posterior trust follows: on cue images A carries the weight where A and B disagree
    disagree = labels[:, 0] != labels[:, 1]
    wa = w[:, 0]
    assert wa[(cue[:, None] == 1) & disagree].mean() > 0.8 and wa[(cue[:, None] == 0) & disagree].mean() < 0.2, (
        wa[(cue[:, None] == 1) & disagree].mean(), wa[(cue[:, None] == 0) & disagree].mean())


@pytest.mark.parametrize("num_sets", [3, 4, 5])
def test_paper_attention_at_rest_is_the_majority_vote(num_sets):
    """attention_lr = 0 keeps W_attn = 0: uniform weights, y_bar = the mean, and Eq. 3 gives the majority
    vote up to the binarization's softness sigmoid(-k |y_bar - T|) <= sigmoid(-50 / (2M)) (ties: 0.5 both)."""
    torch.manual_seed(5)
    attention = LabelAttention(7, num_sets, 4)
    labels = torch.randint(0, 2, (64, num_sets, 4)).float()
    weights = attention(torch.randn(64, num_sets, 7))
    y_tilde = binarize(combine_labels(weights, labels), 50.0, 0.5)
    bound = torch.sigmoid(torch.tensor(-50.0 / (2 * num_sets))).item()
    torch.testing.assert_close(y_tilde, majority_target(labels), atol=bound + 1e-7, rtol=0)


def test_refuses_joint_for_multiclass_and_too_many_sets():
    with pytest.raises(ValueError, match="annotator = joint"):
        LabelTrust(4, 3, 10, multiclass=True, annotator="joint")
    with pytest.raises(ValueError, match="annotator = joint"):
        LabelTrust(4, 9, 2, annotator="joint")
    assert LabelTrust(4, 9, 2).annotator == "independent" and LabelTrust(4, 4, 2).annotator == "joint"


def test_monotone_penalty_forbids_an_inverted_label_set():
    """Multi-label data: a set that says 'present' less often when the finding is present is penalised."""
    from aol_dist.method.trust import MONOTONE_MARGIN, monotone_penalty

    good = LabelTrust(1, 2, 1, annotator="independent", input="none")
    assert monotone_penalty(good).item() == 0.0
    with torch.no_grad():  # set 0 inverted: P(y=1 | t=1) = 0.2 < P(y=1 | t=0) = 0.8
        good.log_table[0, 0] = torch.tensor([[0.2, 0.8], [0.8, 0.2]]).log()
    penalty = monotone_penalty(good)
    assert penalty.item() == pytest.approx(10.0 * (0.8 - 0.2 + MONOTONE_MARGIN), rel=1e-5)
    penalty.backward()
    assert good.log_table.grad[1].abs().sum() == 0  # the good set is left alone
    assert LabelTrust(1, 2, 1, annotator="independent", input="none", monotone=False).monotone is False
    assert monotone_penalty(LabelTrust(1, 2, 3, multiclass=True, input="none")).item() == 0.0  # AD stays learnable


def test_monotone_penalty_with_regimes_holds_the_mixture_not_each_regime():
    """A set may be worse than chance in one regime (the instance benchmark's wrong reader) if it is better
    than chance over the regimes together; a set inverted on average is still penalised."""
    from aol_dist.method.trust import MONOTONE_MARGIN, monotone_penalty

    trust = LabelTrust(1, 2, 1, annotator="independent", input="none", regimes=2)
    inverted, exact = torch.tensor([[0.6, 0.4], [0.8, 0.2]]).log(), torch.tensor([[0.99, 0.01], [0.01, 0.99]]).log()
    with torch.no_grad():
        trust.log_table[:] = exact
        trust.log_table[0, 1, 0] = inverted  # set 1: worse than chance in regime 0, exact in regime 1
    assert monotone_penalty(trust).item() == 0.0  # on average P(y=1 | t=1) 0.595 > P(y=1 | t=0) 0.205 + 0.1
    with torch.no_grad():
        trust.log_table[1, 1, 0] = inverted  # inverted in both: inverted overall
    assert monotone_penalty(trust).item() == pytest.approx(10.0 * (0.4 - 0.2 + MONOTONE_MARGIN), rel=1e-5)



def _instance_images(n, g, cue):
    """Noise images, 16 x 16, with a bright 4 x 4 corner mark on the cue images (the instance benchmark's cue)."""
    images = 0.2 * torch.rand(n, 1, 16, 16, generator=g)
    images[cue == 1, :, :4, :4] = 1.0
    return images


def test_regimes_choose_the_right_set_per_image_from_the_image_itself():
    """The instance benchmark's case (aol_dist/study/synthetic.py): A right on marked images, B elsewhere, and
    the wrong one misses 80 % of positives and calls 40 % of negatives positive. Nothing says which image is
    which but the mark, seen by the regime network: the targets where A and B disagree follow the right set.
    One global annotator model (regimes = 1) has only the classifier's prior there (here a good one, linear
    in x) and makes several times as many errors."""
    x, truth, g = _controlled(n=2000, d=8, findings=2, seed=5)
    cue = (torch.rand(len(x), generator=g) < 0.5).float()
    u = torch.rand(2, *truth.shape, generator=g)
    wrong = [torch.where(truth == 1, (u[i] >= 0.8).float(), (u[i] < 0.4).float()) for i in range(2)]
    a = torch.where(cue[:, None] == 1, truth, wrong[0])
    b = torch.where(cue[:, None] == 0, truth, wrong[1])
    labels, images = torch.stack([a, b], 1), _instance_images(len(x), g, cue)
    disagree = labels[:, 0] != labels[:, 1]
    accuracy = {}
    for regimes in (1, 2):
        torch.manual_seed(0)
        trust = LabelTrust(1, 2, 2, annotator="joint", input="none", regimes=regimes)
        classifier = nn.Linear(x.shape[1], 2)
        fast = [trust.log_table, *classifier.parameters()]
        if regimes > 1:
            fast += list(trust.regime_net.head.parameters())
        slow = [p for p in trust.parameters() if all(p is not f for f in fast)]
        opt = torch.optim.Adam([{"params": fast, "lr": 0.05}, {"params": slow, "lr": 2e-3}])
        order = torch.Generator().manual_seed(1)
        for _ in range(150):
            idx = torch.randint(0, len(x), (64,), generator=order)
            log_pi = trust.regime_net(images[idx]) if regimes > 1 else None
            loss, _, _ = posterior_trust(classifier(x[idx]), labels[idx], trust, trust.scores(None, 64), log_pi)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            log_pi = trust.regime_net(images) if regimes > 1 else None
            _, q, w = posterior_trust(classifier(x), labels, trust, trust.scores(None, len(x)), log_pi)
        accuracy[regimes] = ((q > 0.5).float() == truth)[disagree].float().mean().item()
        if regimes > 1:
            pi = log_pi.exp()[:, 0]
            assert (pi[cue == 1].mean() - pi[cue == 0].mean()).abs() > 0.8, "the regimes did not part by the mark"
            wa = w[:, 0]  # the weight on set A, where the sets disagree: high on marked images, low elsewhere
            on, off = wa[(cue[:, None] == 1) & disagree].mean(), wa[(cue[:, None] == 0) & disagree].mean()
            assert on > 0.8 and off < 0.2, (on, off)
    assert accuracy[2] > 0.98 and 1 - accuracy[2] < (1 - accuracy[1]) / 3, accuracy

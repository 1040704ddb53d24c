"""Attention-on-label trained by the likelihood of the labels: whom to believe, per sample and finding.

The paper's attention (Eq. 2-5) is trained by the outer loss BCE(y_hat, y_tilde), whose gradient moves the
weights toward whichever label set agrees with the model's current predictions (docs/quality.md shows it
collapsing onto a low-prevalence set). Here the weights over the label sets come from an annotator model
trained jointly with the classifier by the marginal likelihood of the observed labels (Dawid and Skene
1979; Raykar et al. 2010, "Learning from crowds"):

    P(Y | x) = sum_t P(t | x) P(Y | t, x)                                   (t: the hidden truth)
    q(t)     = P(t | x) P(Y | t, x) / P(Y | x)                              (the posterior: the target)
    w_m      = P(y_m = t | x, Y) / sum_m' P(y_m' = t | x, Y)                (the trust in label set m)

P(t | x) is the classifier itself, so the image decides where the labels leave the truth open (an
uncertain mention mapped to 0 by one set and 1 by another). The loss -log P(Y | x) gives the classifier
the gradient of BCE(y_hat, q) (softmax cross-entropy for multi-class data) and trains the annotator
model by its likelihood: a label set earns trust by being right where the others and the image agree,
never by agreeing with the model alone.

Two annotator models:
- ``independent`` (Dawid-Skene): per label set a confusion matrix over classes, per finding (2 x 2) for
  multi-label data, K x K for multi-class data; label sets independent given the truth.
- ``joint`` (multi-label data, M <= 8): per finding one distribution over the 2^M patterns of the M labels
  given the truth. No independence: u0 and u1 of one labeler differ only on uncertain mentions, and two
  labelers' errors are correlated, which makes a Dawid-Skene posterior count one mention four times.

Labelling regimes (``regimes = R > 1``, the default 2): the annotator model is a mixture of R such models,
P(Y | t, x) = sum_r pi_r(x) P(Y | t, regime r), with pi(x) from a small network of its own on the image
(:class:`RegimeNet`): a label set can be right on one kind of image and wrong on another (which hospital,
which scanner, a mark on the film), and the image says which kind it is (docs/quality.md, "Labelling
regimes": on the instance benchmark the only setting that chose per image).

Either takes an optional per-sample term s_mn(x) from a linear head on the normalised image features
(``input = features``) or on the meta features Cat(F_1..F_M) of Eq. 1 (``input = meta``): P(y | t, x) is
proportional to P(y | t) exp(sum_m s_mn [y_m = t]), with s centred over the sets: on this image, believe
set m more than the others. The head starts at zero, so training starts from a global annotator model.
Why centred (GPU probe, synth-cxr, 4 seeds, docs/quality.md): with a free or a bounded common part (believe
all sets less on this image), the head learned to discount or invert every set together on some images,
a per-sample label switch that a saturated pattern model fits as well as the truth; the estimated
accuracy of every set fell from about 0.96 to 0.4-0.8 and the truth AUROC to 0.2-0.78 in most seeds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aol_dist.method.aol import Forward, grad_norm, local_forward, meta_features_fast, meta_features_reference

INIT_ACCURACY = 0.8
"""Every label set starts out believed right 80 % of the time: better than chance, so the truth is not
label-switched, and far from certain, so the image and the other sets can overrule it."""
MAX_JOINT_SETS = 8
MONOTONE_MARGIN, MONOTONE_WEIGHT = 0.1, 10.0
"""Multi-label data: every label set must say "present" more often when the finding is present than when it
is absent, by at least the margin (P(y_m = 1 | t = 1) - P(y_m = 1 | t = 0) >= 0.1, a hinge penalty of this
weight). Without it, two sets that disagree systematically were fitted as one good and one inverted set
(instance benchmark, Dawid-Skene: sensitivity 0.03 with specificity 0.49; the posterior's accuracy 0.55,
joint 0.69, against 0.76 for either set), and the truth AUROC fell below majority vote's (docs/quality.md)."""


MAX_REGIMES = 8
REGIME_NOISE = 0.1
"""Regimes start as the same annotator model plus this much noise on its log table: identical regimes would
get identical gradients and never part."""
REGIME_BALANCE = 1.0
"""Default weight of :func:`regime_balance` (``method.regime_balance``)."""


REGIME_SIZE = 64
"""The regime network sees the image average-pooled to at most this many pixels a side: a regime is a property
of the whole film (which hospital, scanner, mark), not of a finding's detail."""
REGIME_WIDTHS = (8, 16, 32)
"""Channels of the regime network's three stride-2 convolutions."""


class RegimeNet(nn.Module):
    """log pi_r(x): which labelling regime an image belongs to, from the image itself, by a network of its own.

    Why its own (CPU probe on instance, docs/quality.md): from the classifier's detached features the regimes
    parted only partly (the classifier has no reason to encode a corner mark that says nothing about the
    findings), and with the classifier's trunk trained by this head they sometimes parted the wrong way; a
    network of its own found the mark in every seed. Why this small (three convolutions of 8-32 channels on
    the image pooled to <= 64 px): a ResNet-tiny here parted the regimes no better (instance, 3 seeds: test
    AUROC 0.800 against 0.799) and doubled the cost of a quick-study step. Its last layer starts at zero:
    every image starts in every regime alike.
    """

    def __init__(self, regimes: int) -> None:
        super().__init__()
        layers, cin = [], 3
        for width in REGIME_WIDTHS:
            layers += [nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, regimes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        factor = math.ceil(max(x.shape[-2:]) / REGIME_SIZE)
        if factor > 1:
            x = F.avg_pool2d(x, factor, ceil_mode=True)
        f = self.features(x).mean((2, 3))
        return torch.log_softmax(self.head(F.layer_norm(f, f.shape[-1:])).float(), dim=-1)


@dataclass(frozen=True)
class TrustHyper:
    """Hyper-parameters of the likelihood-trained attention (config ``method``)."""

    annotator: str = "auto"
    """``joint``, ``independent``, or ``auto`` (joint for multi-label data with M <= 8)."""
    input: str = "features"
    """What the per-sample head sees: ``features`` (normalised GAP features), ``meta`` (the meta features
    F_m of Eq. 1, the paper's attention input), or ``none`` (a global annotator model)."""
    meta_lr: float = 0.2
    scope: str = "full"
    gold_weight: float = 0.3
    """Weight of :func:`gold_loss` beside the noisy labels' -log P(Y | x) (``method.gold_weight``)."""


class LabelTrust(nn.Module):
    """The annotator model and the per-sample head: log P(Y | t, x) for every t.

    ``multiclass``: the N "findings" are K classes and each label set gives one class (a one-hot row).
    """

    def __init__(self, feature_dim: int, num_label_sets: int, num_findings: int, multiclass: bool = False,
                 annotator: str = "auto", input: str = "features", monotone: bool = True,
                 regimes: int = 1, regime_balance: float = REGIME_BALANCE, prior_power: float = 1.0) -> None:
        super().__init__()
        if not 1 <= regimes <= MAX_REGIMES:
            raise ValueError(f"method.regimes must be 1 to {MAX_REGIMES}, got {regimes}")
        self.monotone, self.regimes, self.regime_balance = monotone, regimes, regime_balance
        self.prior_power = prior_power
        m, n = num_label_sets, num_findings
        if annotator == "auto":
            annotator = "joint" if not multiclass and m <= MAX_JOINT_SETS else "independent"
        if annotator == "joint" and (multiclass or m > MAX_JOINT_SETS):
            raise ValueError(f"method.annotator = joint needs multi-label data and at most {MAX_JOINT_SETS} "
                             f"label sets (got {'multi-class' if multiclass else 'multi-label'}, M = {m})")
        self.num_label_sets, self.num_findings, self.multiclass = m, n, multiclass
        self.annotator, self.input = annotator, input
        classes = n if multiclass else 2
        right, wrong = torch.tensor(INIT_ACCURACY).log(), torch.tensor((1 - INIT_ACCURACY) / (classes - 1)).log()
        if annotator == "joint":
            patterns = torch.tensor(list(itertools.product((0, 1), repeat=m)), dtype=torch.float32)  # (P, M)
            self.register_buffer("patterns", patterns, persistent=False)
            per_truth = torch.stack([(patterns == t).float() * right + (patterns != t).float() * wrong
                                     for t in (0, 1)]).sum(-1)  # (2, P)
            table = per_truth.expand(n, 2, -1)  # (N, 2, P): log P(pattern | t)
        else:
            eye = torch.eye(classes)
            init = eye * right + (1 - eye) * wrong
            table = init.expand(*((m, classes, classes) if multiclass else (m, n, 2, 2)))  # rows truth, columns label
        if regimes == 1:
            self.log_table = nn.Parameter(table.clone())
            self.regime_net = None
        else:  # (R, ...): one annotator model per regime, apart by a little noise so that they can differ
            self.log_table = nn.Parameter(table.expand(regimes, *table.shape) + REGIME_NOISE * torch.randn(regimes, *table.shape))
            self.regime_net = RegimeNet(regimes)
        self.head = None
        if input != "none":
            blocks = m if input == "meta" else 1
            self.head = nn.Linear(blocks * feature_dim, m * (1 if multiclass else n))
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def scores(self, features: torch.Tensor | None, batch: int) -> torch.Tensor:
        """s_mn(x): (B, M, N) for multi-label data, (B, M, 1) for multi-class; zeros without a head."""
        width = 1 if self.multiclass else self.num_findings
        if self.head is None or features is None:
            return self.log_table.new_zeros(batch, self.num_label_sets, width)
        f = F.layer_norm(features.to(self.head.weight.dtype), features.shape[-1:])  # post-ReLU features share a large mean
        s = self.head(f.reshape(batch, -1)).view(batch, self.num_label_sets, width)
        # centred over the sets: the head moves trust between them on this image, and cannot make them all
        # less (or wrong) together: see the module docstring for what that did
        return s - s.mean(1, keepdim=True)

    def tables(self) -> list[torch.Tensor]:
        """The annotator model's log table of every regime."""
        return [self.log_table] if self.regime_net is None else list(self.log_table.unbind(0))

    def log_likelihood(self, labels: torch.Tensor, s: torch.Tensor, log_pi: torch.Tensor | None = None) -> torch.Tensor:
        """log P(Y | t, x): (B, N, 2) for multi-label data (t = 0, 1 per finding), (B, K) for multi-class.

        With regimes, the mixture sum_r pi_r(x) P(Y | t, regime r), ``log_pi`` (B, R) from :class:`RegimeNet`.
        """
        if log_pi is None:
            return self._log_likelihood(self.log_table, labels, s)
        per_regime = torch.stack([self._log_likelihood(t, labels, s) for t in self.tables()], dim=1)  # (B, R, ...)
        return torch.logsumexp(per_regime + log_pi.view(*log_pi.shape, *[1] * (per_regime.dim() - 2)), dim=1)

    def _log_likelihood(self, table: torch.Tensor, labels: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.multiclass:
            y = labels.argmax(-1)  # (B, M)
            logits = table.unsqueeze(0) + s.unsqueeze(-1) * torch.eye(self.num_findings, device=s.device)
            log_p = torch.log_softmax(logits, dim=-1)  # (B, M, K truth, K label)
            picked = log_p.gather(-1, y[:, :, None, None].expand(-1, -1, self.num_findings, 1)).squeeze(-1)
            return picked.sum(1)  # (B, K)
        if self.annotator == "independent":
            logits = table.unsqueeze(0) + s[..., None, None] * torch.eye(2, device=s.device)
            log_p = torch.log_softmax(logits, dim=-1)  # (B, M, N, truth, label)
            said = torch.stack([1 - labels, labels], dim=-1).unsqueeze(-2)  # (B, M, N, 1, label): one-hot
            return (log_p * said).sum(-1).sum(1)  # (B, N, 2)
        # joint: log softmax over patterns of log P(pattern | t) + sum_m s_m [pattern_m = t]
        bonus = torch.stack([torch.einsum("bmn,pm->bnp", s, (self.patterns == t).to(s.dtype)) for t in (0, 1)], dim=2)
        log_p = torch.log_softmax(table.unsqueeze(0) + bonus, dim=-1)  # (B, N, 2, P)
        index = (labels.long() * (2 ** torch.arange(self.num_label_sets - 1, -1, -1, device=labels.device))
                 .view(1, -1, 1)).sum(1)  # (B, N): the observed pattern's index
        return log_p.gather(-1, index[:, :, None, None].expand(-1, -1, 2, 1)).squeeze(-1)  # (B, N, 2)

    def estimated_confusion(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """The global model as per-set confusion: (M, N, 2, 2) multi-label or (M, K, K) multi-class,
        rows the truth, columns the set's label (the joint model's pattern table marginalised per set).
        With regimes: the mean over the regimes, or one regime's ``table``."""
        if table is None and self.regime_net is not None:
            return torch.stack([self.estimated_confusion(t) for t in self.tables()]).mean(0)
        table = self.log_table if table is None else table
        if self.annotator == "independent":
            return torch.softmax(table, dim=-1)
        p = torch.softmax(table, dim=-1)  # (N, 2, P)
        says_one = torch.einsum("ntp,pm->mnt", p, self.patterns)  # (M, N, t): P(y_m = 1 | t)
        return torch.stack([1 - says_one, says_one], dim=-1)


def monotone_penalty(trust: LabelTrust) -> torch.Tensor:
    """sum over sets and findings of MONOTONE_WEIGHT * relu(P(y=1 | t=0) - P(y=1 | t=1) + MONOTONE_MARGIN);
    zero for multi-class data (an annotator that always names the wrong class is informative, A.2.2).

    With regimes, on the mean of the regimes' confusions (the mixture, with the batch's use of the regimes held
    near uniform by :func:`regime_balance`): a set must be better than chance overall, and may be anything in
    one regime; that is what a regime is for. Held in every regime (instance, 3 seeds), it forbade the very
    tables the benchmark is made of (the wrong reader misses 80 % of positives and calls 40 % of negatives
    positive: worse than chance), and the targets where the sets disagree were right on 0.79-0.85 against 0.97."""
    if trust.multiclass or not trust.monotone:
        return trust.log_table.new_zeros(())
    c = trust.estimated_confusion()  # (M, N, truth, label)
    return MONOTONE_WEIGHT * torch.relu(c[..., 0, 1] - c[..., 1, 1] + MONOTONE_MARGIN).sum()


def class_log_prior(logits: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """log P(t | x) from the classifier: (B, N, 2) per finding (sigmoid) or (B, K) (softmax)."""
    z = logits if logits.dtype == torch.float64 else logits.float()  # bf16 autocast logits: the likelihood in fp32
    if multiclass:
        return torch.log_softmax(z, dim=-1)
    return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=-1)


def regime_balance(log_pi: torch.Tensor | None, weight: float) -> torch.Tensor | float:
    """weight * KL(mean_b pi(x_b) || uniform): every regime is used by the batch as a whole, while each image
    may sit in one. Without it, one regime can take every image early and the others, given no image, never
    learn (tests/test_trust.py's regime case: every image in one regime)."""
    if log_pi is None or weight == 0:
        return 0.0
    mean = log_pi.exp().mean(0)
    return weight * ((mean * mean.clamp_min(1e-12).log()).sum() + math.log(log_pi.shape[1]))


def posterior_trust(logits: torch.Tensor, labels: torch.Tensor, trust: LabelTrust, s: torch.Tensor,
                    log_pi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, q, w): -mean log P(Y | x), the posterior of the truth and the trust weights over label sets.

    ``trust.prior_power`` tau != 1 (``method.prior_power``): the E-step's prior is P(t | x)^tau, renormalised
    (a sigmoid or softmax of tau z); the annotator model is fitted against it and the classifier learns by
    cross-entropy against the posterior it gives (tau -> 1: the gradients of the likelihood). Why it was
    tried: a classifier that has memorised its training images returns, as its prior, the posterior it was
    trained on, and the E-step multiplies the labels' likelihood in once more every epoch; with tau < 1 the
    posterior logit settles at the labels' log-likelihood ratio / (1 - tau) instead of growing. Measured, it
    does not help: tau = 0.5 and 0 lose AUROC and u0/u1 picks, 2 collapses (docs/quality.md, "A longer budget").

    q: (B, N) P(t_n = 1 | x, Y) multi-label, (B, K) P(t = k | x, Y) multi-class.
    w: (B, M, N) or (B, M, 1): P(label set m is right | x, Y), normalised over m.
    """
    tau = trust.prior_power  # != 1: the prior P(t | x)^tau (renormalised), the classifier learns against its posterior
    prior_logits = logits if tau == 1.0 else tau * logits.detach()
    joint = class_log_prior(prior_logits, trust.multiclass) + trust.log_likelihood(labels, s, log_pi)
    log_evidence = torch.logsumexp(joint, dim=-1)
    post = torch.exp(joint - log_evidence.unsqueeze(-1)).detach()
    fit = -log_evidence.mean()
    if tau != 1.0:
        fit = fit - (post * class_log_prior(logits, trust.multiclass)).sum(-1).mean()
    loss = fit + monotone_penalty(trust) + regime_balance(log_pi, trust.regime_balance)
    q = post if trust.multiclass else post[..., 1]
    right = set_right(q, labels, trust.multiclass)
    w = right / right.sum(1, keepdim=True).clamp_min(1e-12)
    return loss, q, w


def set_right(q: torch.Tensor, labels: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """P(t = y_m | x, Y): the posterior belief that label set m is right on this sample, (B, M, N) multi-label
    ((B, M, 1) multi-class) from the posterior q of :func:`posterior_trust`. Its mean over the training data
    is the annotator model's estimate of each set's accuracy, E[P(y_m = t)]: the trust a run reports."""
    if multiclass:
        return (labels * q.unsqueeze(1)).sum(-1, keepdim=True)
    return labels * q.unsqueeze(1) + (1 - labels) * (1 - q.unsqueeze(1))


def trust_features(model: nn.Module, x: torch.Tensor, trunk: torch.Tensor, logits: torch.Tensor,
                   features: torch.Tensor, labels: torch.Tensor, hp: TrustHyper, text: torch.Tensor | None,
                   fast: bool = True) -> torch.Tensor | None:
    """The head's input: detached image features (B, 1, D), or the meta features F_m (B, M, D) of Eq. 1."""
    if hp.input == "none":
        return None
    if hp.input == "features":
        return features.detach().unsqueeze(1)
    meta = meta_features_fast if fast else meta_features_reference
    return meta(model, x, trunk, logits, labels, hp.meta_lr, text, hp.scope)


def gold_loss(trust: LabelTrust, gold: dict[str, torch.Tensor]) -> torch.Tensor:
    """-mean log P(Y | t, x) at the known truth t of hand-labelled studies (``data.gold_split``, data/gold.py):
    the annotator model fitted where the truth is known, which settles what the labels leave open (which way
    an uncertain mention goes). The tables and the regime network learn from it; the per-sample head does not
    (it reads the classifier's features, which the gold studies do not pass through), and the classifier
    learns from the gold studies only through the annotator model."""
    image, labels, truth = gold["image"], gold["labels"], gold["truth"]
    log_pi = trust.regime_net(image) if trust.regime_net is not None else None
    ll = trust.log_likelihood(labels, trust.scores(None, image.shape[0]), log_pi)  # (B, N, 2) or (B, K)
    if trust.multiclass:  # truth one-hot over the K classes
        return -(ll * truth).sum(-1).mean()
    return -ll.gather(-1, truth.long().unsqueeze(-1)).mean()


def trust_loss(model: nn.Module, trust: LabelTrust, x: torch.Tensor, labels: torch.Tensor, hp: TrustHyper,
               text: torch.Tensor | None = None, fast: bool = True,
               gold: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-log P(Y | x), q, w) of one batch: backward trains the classifier and the annotator model together;
    with a ``gold`` batch, plus :func:`gold_loss`."""
    trunk = model.trunk(x)
    features = model.top(trunk, text)
    logits = model.head(features)
    head_input = trust_features(model, x, trunk, logits, features, labels, hp, text, fast)
    s = trust.scores(head_input, x.shape[0])
    log_pi = trust.regime_net(x) if trust.regime_net is not None else None
    loss, q, w = posterior_trust(logits, labels, trust, s, log_pi)
    return (loss if gold is None else loss + hp.gold_weight * gold_loss(trust, gold)), q, w


def trust_step(model: nn.Module, trust: LabelTrust, optimizer: torch.optim.Optimizer,
               trust_optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor, hp: TrustHyper,
               average_gradients: Callable[[], bool | None] = lambda: None,
               text: torch.Tensor | None = None, fast: bool = True,
               forward: Forward = local_forward, gold: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One step: classifier and annotator model by -log P(Y | x) (and :func:`gold_loss` on a ``gold`` batch);
    returns loss, trust weights, targets q. ``forward`` and ``average_gradients`` as in
    :func:`aol_dist.method.aol.aol_step`."""
    optimizer.zero_grad(set_to_none=True)
    trust_optimizer.zero_grad(set_to_none=True)
    loss, q, w = forward(lambda: trust_loss(model, trust, x, labels, hp, text, fast, gold))
    loss.backward()
    attention_grad_norm = grad_norm(trust.parameters())
    if average_gradients() is not False:  # False: non-finite gradients on some rank; every rank skips the update
        optimizer.step()
        trust_optimizer.step()
    return {"loss": loss.detach(), "weights": w, "targets": q, "right": set_right(q, labels, trust.multiclass),
            "attention_grad_norm": attention_grad_norm}

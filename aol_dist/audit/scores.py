"""Scores of the label audit, per sample: which studies a radiologist should re-read first.

Multi-label data (N findings, each a yes/no question, p_n = sigmoid(logit_n)), M label sets y_m:

- Phi = CE(l, p) - H(p), paper 003 Eq. 2-4, with l the normalised label counts. Over the M label vectors
  of a sample, and findings independent given the image, the cross-entropy from the counts to the model's
  joint distribution is sum_n CE(y_bar_n, p_n) (y_bar_n = mean_m y_mn) and the entropy is sum_n H(p_n).
  So ``phi`` = sum_n [CE(y_bar_n, p_n) - H(p_n)]: noisy labels up, ambiguous images down. Per entry,
  ``phi_entry`` = CE(y_mn, p_n) - H(p_n) says which label set and finding is the suspect.
- C(x) = |E[p(i | x)] - 1/2| per finding, i the model's call, and U(x) = Var(p(i | x)) over T Monte-Carlo
  batch-norm passes (paper 004 Eq. 1-2, N = 2 classes per finding).

Multi-class data (K classes, p = softmax(logits), label sets one-hot): Phi = CE(counts / M, p) - H(p) and
C(x) = |E[p_i] - 1/K|, U(x) = Var(p_i), i = argmax E[p], as in the papers.

Ranking scores (highest first) of the relabelling curve: ``phi``; ``expected_wrong``: the wrong labels the
sample holds if the run's consensus is the truth (:func:`expected_wrong`); ``confidence``: the model's confidence
summed over what the labels contradict (sum_n C_n |y_bar_n - call_n|; multi-class C times the share of sets
not naming i): paper 004 finds mislabels where a confident model disagrees with the label; ``uncertainty``:
sum_n U_n (multi-class U): paper 004's flag for samples the model is unsure of.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-7


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) of a Bernoulli, in nats (Eq. 4 for one finding)."""
    p = p.clamp(EPS, 1 - EPS)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def binary_cross_entropy(target: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """CE(target, p) = -(t log p + (1 - t) log(1 - p)) for soft or hard targets t (Eq. 3 for one finding)."""
    p = p.clamp(EPS, 1 - EPS)
    return -(target * p.log() + (1 - target) * (1 - p).log())


@dataclass
class Scores:
    """One batch's audit scores (B samples)."""

    phi: torch.Tensor
    """(B,): Eq. 2 over the sample's label vectors, the relabelling priority."""
    phi_entry: torch.Tensor
    """(B, M, N) multi-label, (B, M, 1) multi-class: Eq. 2 with one label set's label: the suspect entries."""
    confidence: torch.Tensor
    """(B, N) multi-label (per finding), (B, 1) multi-class: C(x) of paper 004 Eq. 1."""
    uncertainty: torch.Tensor
    """Same shape as ``confidence``: U(x) of paper 004 Eq. 2 (0 when T = 1 or without batch norm)."""
    contradiction: torch.Tensor
    """(B,): the ``confidence`` ranking score, C summed over what the labels contradict."""

    @property
    def uncertainty_score(self) -> torch.Tensor:
        """(B,): the ``uncertainty`` ranking score."""
        return self.uncertainty.sum(-1)


def multilabel_scores(p: torch.Tensor, mc: torch.Tensor, labels: torch.Tensor) -> Scores:
    """p: (B, N) the model's probabilities; mc: (T, B, N) the Monte-Carlo batch-norm passes; labels (B, M, N)."""
    labels = labels.to(p.dtype)
    h = binary_entropy(p)  # (B, N)
    phi_entry = binary_cross_entropy(labels, p.unsqueeze(1)) - h.unsqueeze(1)  # (B, M, N)
    phi = (binary_cross_entropy(labels.mean(1), p) - h).sum(-1)  # = phi_entry.mean(1).sum(-1): CE is linear in t
    mean = mc.mean(0)
    confidence = (mean - 0.5).abs()  # |max(E p, 1 - E p) - 1/2|
    uncertainty = mc.var(0, unbiased=False)  # Var(p) = Var(1 - p): the called class's either way
    call = (mean > 0.5).to(p.dtype)
    contradiction = (confidence * (labels.mean(1) - call).abs()).sum(-1)
    return Scores(phi, phi_entry, confidence, uncertainty, contradiction)


def multiclass_scores(p: torch.Tensor, mc: torch.Tensor, labels: torch.Tensor) -> Scores:
    """p: (B, K) softmax probabilities; mc: (T, B, K); labels (B, M, K) one-hot."""
    labels = labels.to(p.dtype)
    log_p = p.clamp_min(EPS).log()
    h = -(p * log_p).sum(-1)  # (B,)
    phi_entry = (-(labels * log_p.unsqueeze(1)).sum(-1) - h.unsqueeze(1)).unsqueeze(-1)  # (B, M, 1)
    phi = -(labels.mean(1) * log_p).sum(-1) - h
    mean = mc.mean(0)
    call = mean.argmax(-1)  # (B,)
    picked = mc.gather(-1, call.view(1, -1, 1).expand(mc.shape[0], -1, 1)).squeeze(-1)  # (T, B): p_i per pass
    confidence = (picked.mean(0) - 1 / p.shape[-1]).abs().unsqueeze(-1)
    uncertainty = picked.var(0, unbiased=False).unsqueeze(-1)
    disagree = 1 - labels.gather(-1, call.view(-1, 1, 1).expand(-1, labels.shape[1], 1)).squeeze(-1).mean(1)
    return Scores(phi, phi_entry, confidence, uncertainty, confidence.squeeze(-1) * disagree)


def wrong_entries(consensus: torch.Tensor, labels: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """(B, M, N) multi-label, (B, M, 1) multi-class: P(label y_mn is wrong) if the consensus c (a probability
    of the truth) is right: |y_mn - c_n| (multi-class: 1 - c[y_m])."""
    labels = labels.to(consensus.dtype)
    if multiclass:
        return (1 - (labels * consensus.unsqueeze(1)).sum(-1)).unsqueeze(-1)
    return (labels - consensus.unsqueeze(1)).abs()


def expected_wrong(consensus: torch.Tensor, labels: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """(B,): the number of wrong labels a sample holds if the consensus is right, the sum of
    :func:`wrong_entries`. With a calibrated consensus, ranking by it maximises the wrong labels expected per
    sample relabelled."""
    return wrong_entries(consensus, labels, multiclass).sum((1, 2))


def audit_scores(p: torch.Tensor, mc: torch.Tensor, labels: torch.Tensor, multiclass: bool) -> Scores:
    return (multiclass_scores if multiclass else multilabel_scores)(p, mc, labels)

"""The attention-on-label meta step (Algorithm 1, Eq. 1-5), reference implementation.

It reads like Algorithm 1 and is the oracle every faster variant is tested against. It knows
nothing about ranks: the caller injects ``average_gradients``, called once per step between the
backward pass and the optimizer steps (outer and attention gradients only; the M meta-gradients
stay local to the rank, SPEC 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from aol_dist.model.attention import LabelAttention, binarize, combine_labels


@dataclass(frozen=True)
class AolHyper:
    meta_lr: float = 0.2
    """alpha (Eq. 1)."""
    k: float = 50.0
    """Binarization sharpness (Eq. 3)."""
    threshold: float = 0.5
    """Binarization threshold T (Eq. 3)."""
    combine: str = "text"
    """``text`` (weighted sum) or ``listing`` (weighted mean, Listing 1)."""


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_C = -1/N sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)], averaged over the batch (Sec. 3.1).

    Differentiable in ``targets`` too: the attention gradients flow through y_tilde (Sec. 3.2).
    """
    return F.binary_cross_entropy_with_logits(logits, targets)


def meta_features(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  meta_lr: float) -> torch.Tensor:
    """F_m for every label set m, stacked to (B, M, D), detached.

    theta_m = theta - alpha * grad_theta L_C(y_hat, y_m)   (Eq. 1, first order: no graph kept)
    F_m     = GAP features of x under theta_m, in train mode (batch statistics) with the batch-norm
              running statistics left untouched (the meta forwards run on throw-away buffer copies).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    features = []
    for m in range(labels.shape[1]):
        grads = torch.autograd.grad(bce(logits, labels[:, m]), params, retain_graph=True, allow_unused=True)
        theta_m = {n: p.detach() if g is None else p.detach() - meta_lr * g for n, p, g in zip(names, params, grads)}
        scratch = {n: b.clone() for n, b in buffers.items()}
        with torch.no_grad():
            features.append(functional_call(model, {**theta_m, **scratch}, (x,), {"features_only": True}))
    return torch.stack(features, dim=1)


def attended_labels(attention: LabelAttention, features: torch.Tensor, labels: torch.Tensor,
                    hp: AolHyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_tilde, w): Eq. 2 then y_bar (Sec. 3.2) then Eq. 3."""
    weights = attention(features)
    y_tilde = binarize(combine_labels(weights, labels, hp.combine), hp.k, hp.threshold)
    return y_tilde, weights


def aol_step(model: nn.Module, attention: LabelAttention, optimizer: torch.optim.Optimizer,
             attention_optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor, hp: AolHyper,
             average_gradients: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1 on a local batch; returns the loss and the attention weights.

    ``labels`` is (B, M, N) in {0, 1}. Outer update: Adam on grad_theta L_C(y_hat, y_tilde) (Eq. 4);
    attention update: SGD on grad_{W,b} of the same loss (Eq. 5).
    """
    logits = model(x)
    features = meta_features(model, x, logits, labels, hp.meta_lr)
    y_tilde, weights = attended_labels(attention, features, labels, hp)
    loss = bce(logits, y_tilde)
    optimizer.zero_grad(set_to_none=True)
    attention_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients()
    optimizer.step()
    attention_optimizer.step()
    return {"loss": loss.detach(), "weights": weights.detach()}

"""The attention-on-label meta step (Algorithm 1, Eq. 1-5): the reference and the fast path.

``meta_features_reference`` reads like Algorithm 1 and is the oracle the fast path is tested
against. The fast path computes the same numbers with less work per label set:
``meta_features_batched`` (ResNet-block backbones, see ``last_stage.py``) runs the last stage's M
meta-gradients and M meta forwards as one hand-written pass each, batched over the label sets, and
the trunk (full scope) by autograd; ``meta_features_fast`` (any backbone) takes the M meta-gradients
as vector-Jacobian products of the one forward graph with the analytic BCE cotangent
(sigmoid(z) - y_m) / (B N) instead of M loss graphs, builds the M updated weight sets with fused list
operations, and runs batch norm on batch statistics without tracking instead of on M throw-away
copies of the running statistics.

The step knows nothing about ranks: the caller injects ``forward``, which runs the step's loss
computation (in a distributed run through DDP, ``dist.data_parallel``, which then averages the outer and
attention gradients during the backward pass), and ``average_gradients``, called once per step between
the backward pass and the optimizer steps (``faults.StepGuard``: batch-norm statistics, NaN/inf policy).
The M meta-gradients stay local to the rank (SPEC 3.7): ``torch.autograd.grad`` never fills ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from aol_dist.method import last_stage
from aol_dist.model.attention import LabelAttention, binarize, combine_labels
from aol_dist.model.backbone import batch_statistics_only


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
    scope: str = "full"
    """``full``: meta-update every parameter (the paper). ``partial``: only the last stage, text layers
    and head, with the meta forwards starting from the activation before the last stage (an
    approximation of the paper's method, cheaper by roughly the share of the trunk)."""
    fast: bool = True
    """Use the fast path (same numbers as the reference, less work)."""
    batched: bool = True
    """In the fast path, use ``meta_features_batched`` where ``last_stage.supported``, else ``meta_features_fast``."""

    @classmethod
    def from_method(cls, mc) -> "AolHyper":
        """From a run config's ``method`` section (config.MethodConfig)."""
        return cls(meta_lr=mc.meta_lr, k=mc.k, threshold=mc.threshold, combine=mc.combine, scope=mc.meta_scope,
                   fast=mc.fast, batched=mc.batched_last_stage)


Forward = Callable[[Callable[[], Any]], Any]
"""Runs a step's loss computation, ``forward(compute) -> compute()``: :func:`local_forward`, or the DDP
wrapper of a distributed run (``dist.data_parallel``)."""


def local_forward(compute: Callable[[], Any]) -> Any:
    """The loss computation on this rank alone (one process, or a test of the step itself)."""
    return compute()


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_C = -1/N sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)], averaged over the batch (Sec. 3.1).

    Differentiable in ``targets`` too: the attention gradients flow through y_tilde (Sec. 3.2).
    """
    return F.binary_cross_entropy_with_logits(logits, targets)


def _scoped(model: nn.Module, scope: str) -> tuple[list[str], list[torch.Tensor]]:
    """Trainable parameters, with names: all (``full``), the last stage, text layers and head (``partial``),
    or all but those (``trunk``)."""
    top = set(model.last_stage_parameters()) if scope != "full" else set()
    pairs = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and (scope == "full" or (n in top) == (scope == "partial"))]
    return [n for n, _ in pairs], [p for _, p in pairs]


def _meta_update(detached: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...],
                 meta_lr: float) -> list[torch.Tensor]:
    """theta_m = theta - alpha grad (Eq. 1), written into the fresh gradient buffers: no second
    parameter-sized allocation. A parameter the loss does not reach keeps its value."""
    theta_m = [torch.zeros_like(p) if g is None else g for p, g in zip(detached, grads)]
    torch._foreach_mul_(theta_m, -meta_lr)
    torch._foreach_add_(theta_m, detached)
    return theta_m


def _meta_input(x: torch.Tensor, trunk: torch.Tensor, scope: str) -> tuple[torch.Tensor, bool]:
    return (trunk.detach(), True) if scope == "partial" else (x, False)


def meta_features_reference(model: nn.Module, x: torch.Tensor, trunk: torch.Tensor, logits: torch.Tensor,
                            labels: torch.Tensor, meta_lr: float, text: torch.Tensor | None = None,
                            scope: str = "full") -> torch.Tensor:
    """F_m for every label set m, stacked to (B, M, D), detached.

    theta_m = theta - alpha * grad_theta L_C(y_hat, y_m)   (Eq. 1, first order: no graph kept)
    F_m     = features of x under theta_m, in train mode (batch statistics), with the batch-norm
              running statistics left untouched (the meta forwards run on throw-away buffer copies).
    """
    names, params = _scoped(model, scope)
    buffers = dict(model.named_buffers())
    inputs, from_trunk = _meta_input(x, trunk, scope)
    features = []
    for m in range(labels.shape[1]):
        grads = torch.autograd.grad(bce(logits, labels[:, m]), params, retain_graph=True, allow_unused=True)
        theta_m = {n: p.detach() if g is None else p.detach() - meta_lr * g for n, p, g in zip(names, params, grads)}
        scratch = {n: b.clone() for n, b in buffers.items()}
        with torch.no_grad():
            features.append(functional_call(model, {**theta_m, **scratch}, (inputs,),
                                            {"text": text, "features_only": True, "from_trunk": from_trunk}))
    return torch.stack(features, dim=1)


def bce_cotangents(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """dL_C(y_hat, y_m)/dz for every label set m: (sigmoid(z) - y_m) / (B N), shape (B, M, N)."""
    return (torch.sigmoid(logits.detach()).unsqueeze(1) - labels) / logits.numel()


def meta_features_fast(model: nn.Module, x: torch.Tensor, trunk: torch.Tensor, logits: torch.Tensor,
                       labels: torch.Tensor, meta_lr: float, text: torch.Tensor | None = None,
                       scope: str = "full") -> torch.Tensor:
    """Same result as :func:`meta_features_reference`, computed with less work per label set.

    grad_theta L_C(y_hat, y_m) = J^T c_m with c_m = (sigmoid(z) - y_m) / (B N): one VJP of the shared
    forward graph per label set, no per-set loss graph.
    """
    names, params = _scoped(model, scope)
    inputs, from_trunk = _meta_input(x, trunk, scope)
    detached = [p.detach() for p in params]
    cotangents = bce_cotangents(logits, labels)
    features = []
    for m in range(labels.shape[1]):
        # outside batch_statistics_only: a checkpointed stage recomputes its forward in here
        grads = torch.autograd.grad(logits, params, cotangents[:, m], retain_graph=True, allow_unused=True)
        theta_m = _meta_update(detached, grads, meta_lr)
        with torch.no_grad(), batch_statistics_only(model):
            features.append(functional_call(model, dict(zip(names, theta_m)), (inputs,),
                                            {"text": text, "features_only": True, "from_trunk": from_trunk}))
    return torch.stack(features, dim=1)


def meta_features_batched(model: nn.Module, x: torch.Tensor, trunk: torch.Tensor, tape: last_stage.Tape,
                          cotangents: torch.Tensor, meta_lr: float, scope: str = "full") -> torch.Tensor:
    """Same result as :func:`meta_features_reference`, with the last stage batched over the label sets.

    The last stage's M meta-gradients and meta forwards run as one hand-written pass each
    (``last_stage.py``); in the full scope the trunk's M meta-gradients are vector-Jacobian products
    of the trunk with the M gradients that pass returns at the trunk activation, and its M meta
    forwards run under ``functional_call``.
    """
    num_sets = cotangents.shape[1]
    with torch.no_grad():
        g_trunk = last_stage.meta_backward(model, tape, cotangents, meta_lr, trunk_gradient=scope == "full")
    trunk_m = None
    if scope == "full":
        names, params = _scoped(model, "trunk")
        detached = [p.detach() for p in params]
        outputs = []
        for m in range(num_sets):
            grads = torch.autograd.grad(trunk, params, g_trunk[m], retain_graph=True, allow_unused=True)
            theta_m = dict(zip(names, _meta_update(detached, grads, meta_lr)))
            with torch.no_grad(), batch_statistics_only(model):
                outputs.append(functional_call(model, theta_m, (x,), {"trunk_only": True}))
        trunk_m = torch.stack(outputs)
    with torch.no_grad():
        return last_stage.meta_forward(model, tape, meta_lr, num_sets, trunk_m)


def attended_labels(attention: LabelAttention, features: torch.Tensor, labels: torch.Tensor,
                    hp: AolHyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_tilde, w): Eq. 2 then y_bar (Sec. 3.2) then Eq. 3."""
    weights = attention(features)
    y_tilde = binarize(combine_labels(weights, labels, hp.combine), hp.k, hp.threshold)
    return y_tilde, weights


def aol_loss(model: nn.Module, attention: LabelAttention, x: torch.Tensor, labels: torch.Tensor, hp: AolHyper,
             text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_C(y_hat, y_tilde) of one batch, the attention weights and y_tilde; backward gives Eq. 4 and Eq. 5 gradients."""
    trunk = model.trunk(x)
    if hp.fast and hp.batched and last_stage.supported(model):
        logits, tape = last_stage.recorded_top(model, trunk, text)
        features = meta_features_batched(model, x, trunk, tape, bce_cotangents(logits, labels), hp.meta_lr, hp.scope)
    else:
        logits = model(trunk, text, from_trunk=True)
        meta = meta_features_fast if hp.fast else meta_features_reference
        features = meta(model, x, trunk, logits, labels, hp.meta_lr, text, hp.scope)
    y_tilde, weights = attended_labels(attention, features, labels, hp)
    return bce(logits, y_tilde), weights, y_tilde


def aol_step(model: nn.Module, attention: LabelAttention, optimizer: torch.optim.Optimizer,
             attention_optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor, hp: AolHyper,
             average_gradients: Callable[[], bool | None] = lambda: None,
             text: torch.Tensor | None = None, forward: Forward = local_forward) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1 on a local batch; returns the loss and the attention weights.

    ``labels`` is (B, M, N) in {0, 1}. Outer update: Adam on grad_theta L_C(y_hat, y_tilde) (Eq. 4);
    attention update: SGD on grad_{W,b} of the same loss (Eq. 5).
    """
    optimizer.zero_grad(set_to_none=True)
    attention_optimizer.zero_grad(set_to_none=True)
    loss, weights, y_tilde = forward(lambda: aol_loss(model, attention, x, labels, hp, text))
    loss.backward()
    attention_grad_norm = grad_norm(attention.parameters())
    if average_gradients() is not False:  # False: non-finite gradients on some rank; every rank skips the update
        optimizer.step()
        attention_optimizer.step()
    y_tilde = y_tilde.detach()
    slope = hp.k * y_tilde * (1 - y_tilde)  # d y_tilde / d y_bar of Eq. 3: k sigma (1 - sigma)
    return {"loss": loss.detach(), "weights": weights.detach(), "targets": y_tilde,
            "attention_grad_norm": attention_grad_norm, "steep_fraction": (slope > 1).float().mean()}


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of the gradients of ``params`` (the diagnostics' attention gradient norm)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())

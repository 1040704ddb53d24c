"""Baselines trained through the same pipeline: one label set (R50), majority vote, soft average, CM (paper 002)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aol_dist.method.aol import bce


def single_target(labels: torch.Tensor, index: int) -> torch.Tensor:
    """R50 baseline: plain BCE against label set ``index``."""
    return labels[:, index]


def majority_target(labels: torch.Tensor) -> torch.Tensor:
    """Majority vote over the M label sets; a tie (possible for even M) gives 0.5."""
    mean = labels.mean(1)
    return torch.where(mean > 0.5, 1.0, torch.where(mean < 0.5, 0.0, 0.5))


def soft_average_target(labels: torch.Tensor) -> torch.Tensor:
    """Soft label: the mean of the M label sets."""
    return labels.mean(1)


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor,
               average_gradients: Callable[[], bool | None] = lambda: None,
               text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One ordinary BCE training step."""
    loss = bce(model(x, text), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if average_gradients() is not False:  # False: non-finite gradients on some rank; every rank skips the update
        optimizer.step()
    return {"loss": loss.detach()}


class ConfusionMatrices(nn.Module):
    """CM baseline (paper 002) adapted to multi-label: for label set m and finding n a 2 x 2 row-stochastic
    matrix A_mn (rows: true class, columns: the class label set m reports), A_mn = softmax over each row
    of a free parameter initialised at 6I - 5, i.e. near the identity (diagonal ~0.9975)."""

    def __init__(self, num_label_sets: int, num_findings: int) -> None:
        super().__init__()
        init = 6.0 * torch.eye(2) - 5.0
        self.raw = nn.Parameter(init.expand(num_label_sets, num_findings, 2, 2).clone())

    def matrices(self) -> torch.Tensor:
        """(M, N, 2, 2), each row summing to one."""
        return torch.softmax(self.raw, dim=-1)


def noisy_probabilities(p: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """P(label set m says 1) = (1 - p) A_mn[0, 1] + p A_mn[1, 1]  for p (B, N), A (M, N, 2, 2) -> (B, M, N)."""
    return (1 - p).unsqueeze(1) * matrices[..., 0, 1] + p.unsqueeze(1) * matrices[..., 1, 1]


def cm_loss(logits: torch.Tensor, labels: torch.Tensor, matrices: torch.Tensor, trace_weight: float) -> torch.Tensor:
    """sum_m BCE(A_m p, y_m) + lambda * mean_mn trace(A_mn)  (paper 002, Eq. 4, per finding)."""
    q = noisy_probabilities(torch.sigmoid(logits), matrices).clamp(1e-7, 1 - 1e-7)
    per_set = F.binary_cross_entropy(q, labels, reduction="none").mean(dim=(0, 2))  # (M,)
    trace = matrices.diagonal(dim1=-2, dim2=-1).sum(-1).mean()
    return per_set.sum() + trace_weight * trace


def cm_step(model: nn.Module, cm: ConfusionMatrices, optimizer: torch.optim.Optimizer, x: torch.Tensor,
            labels: torch.Tensor, trace_weight: float, average_gradients: Callable[[], bool | None] = lambda: None,
            text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One CM training step: classifier and confusion matrices trained jointly by one optimizer."""
    loss = cm_loss(model(x, text), labels, cm.matrices(), trace_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if average_gradients() is not False:  # False: non-finite gradients on some rank; every rank skips the update
        optimizer.step()
    return {"loss": loss.detach()}

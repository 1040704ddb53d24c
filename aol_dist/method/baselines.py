"""Baselines trained through the same pipeline: one label set (R50), majority vote, soft average."""

from __future__ import annotations

from typing import Callable

import torch
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
               average_gradients: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """One ordinary BCE training step."""
    loss = bce(model(x), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients()
    optimizer.step()
    return {"loss": loss.detach()}

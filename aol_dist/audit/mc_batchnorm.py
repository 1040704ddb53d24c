"""Monte-Carlo batch norm (paper 004, Sec. 2.1 and 2.2): T predictions of one sample, each with the
batch-norm statistics of another random training mini-batch.

Paper 004 sets the batch-norm decay to 0 and updates the means and variances from one random training
batch per pass, ignoring the learned running statistics. Here each pass's statistics are recorded once, on
a copy of the model (momentum 1: the running buffers become exactly that batch's mean and variance), so the
model's own running statistics are never touched, and every audited sample sees the same T passes:
reproducible from the seed that picked the batches, and the same on every rank.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn

Stats = list[tuple[torch.Tensor, torch.Tensor]]


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class MCBatchNorm:
    """A copy of ``model`` that predicts with T recorded sets of batch-norm statistics.

    ``forward(batch) -> logits`` runs one batch through the copy; ``batches`` are the T training
    mini-batches (already on the device). Without batch-norm layers every pass is the plain prediction.
    """

    def __init__(self, model: nn.Module, batches: Iterable[dict[str, Any]],
                 forward: Callable[[nn.Module, dict[str, Any]], torch.Tensor]) -> None:
        self.model = copy.deepcopy(model)
        self.forward = forward
        self.norms = batch_norms(self.model)
        self.passes: list[Stats] = []
        for m in self.norms:
            m.momentum = 1.0  # running = this batch's statistics (momentum None would average the batches)
        with torch.no_grad():
            for batch in batches:
                self.model.train()
                forward(self.model, batch)
                self.passes.append([(m.running_mean.clone(), m.running_var.clone()) for m in self.norms])
        self.model.eval()
        if not self.passes:
            raise ValueError("Monte-Carlo batch norm needs at least one training batch (T >= 1)")

    @property
    def samples(self) -> int:
        return len(self.passes)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """(T, B, N) logits: the batch under each pass's statistics."""
        out = []
        for stats in self.passes:
            for m, (mean, var) in zip(self.norms, stats):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            out.append(self.forward(self.model, batch).float())
        return torch.stack(out)

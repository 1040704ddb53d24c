"""Baselines trained through the same pipeline: one label set (R50), majority vote, soft average, CM
(paper 002), and two ceilings: the truth, and the best choice among the label sets.

Two losses (``method.loss``): ``bce``, each finding a yes/no (multi-label data; on multi-class data the
paper's one-hot BCE, Sec. 3.1), and ``softmax``, cross-entropy with soft targets over the K classes of
multi-class data (manifest ``label_kind = multiclass``, every label set one-hot). On multi-class data the
majority vote is a plurality vote over classes whatever the loss, and CM under ``softmax`` has one K x K
matrix per label set (Tanno et al.: confusions between classes), under ``bce`` the 2 x 2 per class.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from aol_dist.method.aol import Forward, bce, local_forward


def single_target(labels: torch.Tensor, index: int) -> torch.Tensor:
    """R50 baseline: plain BCE against label set ``index``."""
    return labels[:, index]


def majority_target(labels: torch.Tensor) -> torch.Tensor:
    """Majority vote over the M label sets; a tie (possible for even M) gives 0.5."""
    mean = labels.mean(1)
    return torch.where(mean > 0.5, 1.0, torch.where(mean < 0.5, 0.0, 0.5))


def plurality_target(labels: torch.Tensor) -> torch.Tensor:
    """Multi-class majority vote: labels (B, M, K) one-hot -> (B, K), the class named by the most label sets;
    a tie splits the mass evenly among the tied classes (three sets saying cat, dog, frog -> 1/3 each).
    Never all-zero, unlike a per-class 2-of-M vote."""
    votes = labels.sum(1)
    top = (votes == votes.amax(-1, keepdim=True)).to(labels.dtype)
    return top / top.sum(-1, keepdim=True)


def soft_average_target(labels: torch.Tensor) -> torch.Tensor:
    """Soft label: the mean of the M label sets (on multi-class data a distribution over the classes)."""
    return labels.mean(1)


def truth_target(batch: dict[str, Any], where: str, method: str = "truth") -> torch.Tensor:
    """Method ``truth`` (the ceiling): the split's truth vector as the target."""
    if "truth" not in batch:
        raise ValueError(f"method.name = {method}: {where} has no truth vector; train on a split with truth "
                         f"(data.train_split) or choose another method")
    return batch["truth"]


def best_choice_target(labels: torch.Tensor, truth: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """Method ``best_choice`` (a ceiling): the best target that weights over the label sets can make, the
    concept of attention-on-label (Sec. 3.2) with a perfect choice. The truth where some label set gives it,
    else the majority (multi-class: plurality) vote, since then every set is wrong alike. What it leaves to
    ``truth`` is the share of the ceiling no choice among the label sets can reach: errors all sets share."""
    if multiclass:  # labels (B, M, K) one-hot, truth (B, K) one-hot
        given = (labels * truth.unsqueeze(1)).sum(-1).amax(1, keepdim=True) > 0
        return torch.where(given, truth, plurality_target(labels).to(truth.dtype))
    given = (labels == truth.unsqueeze(1)).any(1)
    return torch.where(given, truth, majority_target(labels).to(truth.dtype))


def resolve_loss(loss: str, label_kind: str) -> str:
    """``method.loss`` for shards of ``label_kind``: auto -> softmax on multi-class, bce on multi-label."""
    if loss == "auto":
        return "softmax" if label_kind == "multiclass" else "bce"
    if loss == "softmax" and label_kind != "multiclass":
        raise ValueError("method.loss = softmax needs multi-class shards (manifest label_kind = multiclass: "
                         "`aol shards generic` without --multi-label); these are multi-label: use auto or bce")
    return loss


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-1/B sum_b sum_k t_bk log softmax(z_b)_k: softmax cross-entropy with a target distribution per sample
    (in float32 under bf16 autocast)."""
    return F.cross_entropy(_wide(logits), _wide(targets))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (bf16 autocast), other dtypes as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor,
               average_gradients: Callable[[], bool | None] = lambda: None,
               text: torch.Tensor | None = None,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = bce,
               forward: Forward = local_forward) -> dict[str, torch.Tensor]:
    """One ordinary training step: ``loss_fn`` (BCE, or :func:`soft_cross_entropy`) against fixed targets.
    ``forward`` and ``average_gradients`` as in :func:`aol_dist.method.aol.aol_step`."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward(lambda: loss_fn(model(x, text), targets))
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

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, trace_weight: float) -> torch.Tensor:
        return cm_loss(logits, labels, self.matrices(), trace_weight)


class ClassConfusionMatrices(nn.Module):
    """CM baseline (paper 002) on multi-class data: for label set m a K x K row-stochastic matrix A_m
    (A_m[i, j] = p(label set m says j | true class i)), A_m = softmax over each row of a free parameter
    initialised at 6I - 5, near the identity (diagonal e^6 / (e^6 + K - 1): 0.998 at K = 2, 0.978 at K = 10)."""

    def __init__(self, num_label_sets: int, num_classes: int) -> None:
        super().__init__()
        init = 6.0 * torch.eye(num_classes) - 5.0
        self.raw = nn.Parameter(init.expand(num_label_sets, num_classes, num_classes).clone())

    def matrices(self) -> torch.Tensor:
        """(M, K, K), each row summing to one."""
        return torch.softmax(self.raw, dim=-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, trace_weight: float) -> torch.Tensor:
        return cm_class_loss(logits, labels, self.matrices(), trace_weight)


def noisy_probabilities(p: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """P(label set m says 1) = (1 - p) A_mn[0, 1] + p A_mn[1, 1]  for p (B, N), A (M, N, 2, 2) -> (B, M, N)."""
    return (1 - p).unsqueeze(1) * matrices[..., 0, 1] + p.unsqueeze(1) * matrices[..., 1, 1]


def cm_loss(logits: torch.Tensor, labels: torch.Tensor, matrices: torch.Tensor, trace_weight: float) -> torch.Tensor:
    """sum_m BCE(A_m p, y_m) + lambda * mean_mn trace(A_mn)  (paper 002, Eq. 4, per finding)."""
    q = noisy_probabilities(torch.sigmoid(logits), matrices).clamp(1e-7, 1 - 1e-7)
    per_set = F.binary_cross_entropy(q, labels, reduction="none").mean(dim=(0, 2))  # (M,)
    trace = matrices.diagonal(dim1=-2, dim2=-1).sum(-1).mean()
    return per_set.sum() + trace_weight * trace


def cm_class_loss(logits: torch.Tensor, labels: torch.Tensor, matrices: torch.Tensor,
                  trace_weight: float) -> torch.Tensor:
    """sum_m CE(A_m^T p, y_m) + lambda * mean_m trace(A_m)  (paper 002, Eq. 4), p = softmax(logits) (B, K),
    labels (B, M, K) one-hot, A (M, K, K): label set m says j with probability sum_i p_i A_m[i, j]."""
    with torch.autocast(logits.device.type, enabled=False):  # float32: bf16 would round q = 0.999 to 1
        q = torch.einsum("bi,mij->bmj", torch.softmax(_wide(logits), -1), _wide(matrices)).clamp_min(1e-7)
    per_set = -(labels * q.log()).sum(-1).mean(0)  # (M,)
    trace = matrices.diagonal(dim1=-2, dim2=-1).sum(-1).mean()
    return per_set.sum() + trace_weight * trace


def cm_step(model: nn.Module, cm: ConfusionMatrices | ClassConfusionMatrices, optimizer: torch.optim.Optimizer,
            x: torch.Tensor, labels: torch.Tensor, trace_weight: float,
            average_gradients: Callable[[], bool | None] = lambda: None,
            text: torch.Tensor | None = None, forward: Forward = local_forward) -> dict[str, torch.Tensor]:
    """One CM training step: classifier and confusion matrices trained jointly by one optimizer (the
    matrices in a parameter group of their own, ``method.cm_lr``)."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward(lambda: cm.loss(model(x, text), labels, trace_weight))
    loss.backward()
    if average_gradients() is not False:  # False: non-finite gradients on some rank; every rank skips the update
        optimizer.step()
    return {"loss": loss.detach()}

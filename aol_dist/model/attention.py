"""The attention-on-label module (Eq. 2) and differentiable binarization (Eq. 3)."""

from __future__ import annotations

import torch
from torch import nn


class LabelAttention(nn.Module):
    """w = Softmax_m(W_attn Cat({F_m}) + b_attn)  (Eq. 2).

    ``per_set``: one weight per label set and sample, shape (B, M, 1).
    ``per_finding``: one weight per label set, finding and sample, shape (B, M, N); softmax over m.
    W_attn starts at zero, so training starts from equal weights 1/M (the paper leaves init open).
    """

    def __init__(self, feature_dim: int, num_label_sets: int, num_findings: int, per_finding: bool = False) -> None:
        super().__init__()
        self.num_label_sets, self.num_findings, self.per_finding = num_label_sets, num_findings, per_finding
        out = num_label_sets * (num_findings if per_finding else 1)
        self.attn_fc = nn.Linear(num_label_sets * feature_dim, out)
        nn.init.zeros_(self.attn_fc.weight)
        nn.init.zeros_(self.attn_fc.bias)

    def forward(self, meta_features: torch.Tensor) -> torch.Tensor:
        """``meta_features`` (B, M, D) -> weights (B, M, 1) or (B, M, N), summing to 1 over M."""
        b, m, _ = meta_features.shape
        scores = self.attn_fc(meta_features.reshape(b, -1))
        scores = scores.view(b, m, self.num_findings if self.per_finding else 1)
        return torch.softmax(scores, dim=1)


def combine_labels(weights: torch.Tensor, labels: torch.Tensor, mode: str = "text") -> torch.Tensor:
    """y_bar from weights (B, M, 1|N) and labels (B, M, N).

    ``text``: y_bar = sum_m w_m y_m (Sec. 3.2). ``listing``: mean over m of w_m y_m (Listing 1, A.6),
    which is the text's y_bar divided by M; Listing 1 pairs it with T = 0.1.
    """
    weighted = weights * labels
    if mode == "text":
        return weighted.sum(1)
    if mode == "listing":
        return weighted.mean(1)
    raise ValueError(f"unknown combine mode {mode!r}")


def binarize(y_bar: torch.Tensor, k: float = 50.0, threshold: float = 0.5) -> torch.Tensor:
    """y_tilde = 1 / (1 + exp(-k (y_bar - T)))  (Eq. 3, differentiable binarization)."""
    return torch.sigmoid(k * (y_bar - threshold))

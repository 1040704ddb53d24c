"""The label to believe, per sample and finding, and the weights over the label sets, from a trained run.

- attention-on-label, ``trust = posterior``: the posterior of the truth given the image and every label
  set, q = P(t | x, Y) (trust.py), and the trust weights P(set m is right | x, Y);
- attention-on-label, ``trust = attention`` (the paper): the attended label y_tilde of Eq. 2-3 and the
  attention weights of Eq. 2, from the meta step on the audited batch;
- any other method: the majority vote (multi-class: the plurality, ties split evenly), no weights.
"""

from __future__ import annotations

from typing import Any

import torch

from aol_dist.method import baselines
from aol_dist.method.aol import AolHyper, aol_loss
from aol_dist.method.trust import LabelTrust, TrustHyper, trust_loss
from aol_dist.model.attention import LabelAttention


def consensus_source(parts: Any, method: str) -> str:
    if method == "aol" and isinstance(parts.attention, LabelTrust):
        return "posterior"
    if method == "aol" and isinstance(parts.attention, LabelAttention):
        return "attention"
    return "majority"


def consensus(parts: Any, method_config: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(consensus (B, N) in [0, 1], weights (B, M, N) or (B, M, 1), or None) of one batch; the model in eval mode."""
    model, labels, x = parts.model, batch["labels"], batch["image"]
    text = parts.text(batch)
    source = consensus_source(parts, method_config.name)
    if source == "posterior":
        trust: LabelTrust = parts.attention
        hp = TrustHyper(trust.annotator, trust.input, method_config.meta_lr, method_config.meta_scope)
        with torch.enable_grad():  # the meta features F_m are gradients (trust_input = meta)
            _, q, w = trust_loss(model, trust, x, labels, hp, text, method_config.fast)  # training's posterior
        return q.detach(), w.detach()
    if source == "attention":
        with torch.enable_grad():  # the meta step of Eq. 1
            _, weights, y_tilde = aol_loss(model, parts.attention, x, labels, AolHyper.from_method(method_config), text)
        return y_tilde.detach(), weights.detach()
    vote = baselines.plurality_target if parts.label_kind == "multiclass" else baselines.majority_target
    return vote(labels), None

"""What the weights over the label sets are doing, per step: logged under ``diagnostics`` in log.jsonl.

- ``attention_grad_norm``: the norm of the gradient reaching the attention (or annotator-model) parameters,
  averaged over the ranks as the update applies it (DDP has reduced it by the time it is read).
- ``weight_spread``: the standard deviation of the weights across the samples of a batch, averaged over
  label sets and findings: 0 means one global weight (a bias), not a per-sample choice.
- ``weight_entropy``: the entropy of the weights over the label sets (log M = uniform, 0 = one set).
- ``steep_fraction`` (the paper's attention): the share of label entries where the slope of Eq. 3 exceeds 1,
  the only entries that pass a gradient to the attention.
- where the training batch has the truth: ``target_accuracy``, the accuracy of the training target
  (y_tilde, or the posterior) against the truth, and ``set_accuracy``, each label set's, beside it: does the
  attended label beat the best single set?
"""

from __future__ import annotations

import torch

SCALARS = ("attention_grad_norm", "weight_spread", "weight_entropy", "steep_fraction", "target_accuracy")


def step_diagnostics(out: dict[str, torch.Tensor], labels: torch.Tensor, truth: torch.Tensor | None,
                     multiclass: bool) -> torch.Tensor | None:
    """One step's values as a vector: SCALARS then the M set accuracies (NaN where not available)."""
    if "weights" not in out:
        return None
    w = out["weights"].detach().float()
    values = {"weight_spread": w.std(0, unbiased=False).mean(),
              "weight_entropy": -(w * w.clamp_min(1e-12).log()).sum(1).mean()}
    for key in ("attention_grad_norm", "steep_fraction"):
        if key in out:
            values[key] = out[key].detach().float()
    num_sets = labels.shape[1]
    sets = torch.full((num_sets,), float("nan"), device=w.device)
    if truth is not None and "targets" in out:
        targets = out["targets"].detach().float()
        if multiclass:
            true = truth.argmax(-1)
            values["target_accuracy"] = (targets.argmax(-1) == true).float().mean()
            sets = (labels.argmax(-1) == true[:, None]).float().mean(0)
        else:
            values["target_accuracy"] = ((targets > 0.5).float() == truth).float().mean()
            sets = (labels == truth[:, None]).float().mean((0, 2))
    head = torch.stack([values.get(k, torch.tensor(float("nan"), device=w.device)).reshape(()) for k in SCALARS])
    return torch.cat([head, sets.to(head.dtype)])


def summarise(total: torch.Tensor, count: torch.Tensor, label_sets: list[str]) -> dict:
    """Window means (sums over steps and ranks / counts) as the log record's ``diagnostics``."""
    mean = (total / count.clamp_min(1)).tolist()
    present = (count > 0).tolist()
    record = {k: round(v, 6) for k, v, ok in zip(SCALARS, mean, present) if ok}
    sets = {n: round(v, 6) for n, v, ok in zip(label_sets, mean[len(SCALARS):], present[len(SCALARS):]) if ok}
    if sets:
        record["set_accuracy"] = sets
    return record

"""Per-finding AUROC (and top-1 accuracy on multi-class data) with torchmetrics, synchronised across ranks;
tables as rich, JSON and CSV.

Every rank evaluates its own disjoint share of the split (``EvalStream``) and every rank calls
``compute()``, which gathers the predictions (AUROC) or the counts (accuracy) of all ranks: the figure is
that of the whole split, each sample counted once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MultilabelAUROC, MultilabelROC

from aol_dist.data.stream import to_device
from aol_dist.dist import World, all_reduce_sum

ACCURACY_ROW = "Top-1 accuracy"
"""Label of the accuracy row in the CSV and the tables (multi-class data)."""


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, label_sets: Sequence[str], findings: Sequence[str],
             world: World, predict: Callable[[dict[str, Any]], torch.Tensor] | None = None,
             roc_thresholds: int = 0, label_kind: str = "multilabel") -> dict[str, Any]:
    """AUROC per finding of ``model``'s predictions against ``truth`` (when the split has it) and
    against each noisy label set. A finding whose targets hold one class only gets NaN.
    ``predict(batch)`` gives the logits (default: ``model(batch["image"])``; image+text passes its own).
    ``roc_thresholds > 0`` adds ``"roc"``: per target, false and true positive rates per finding at that
    many evenly spaced thresholds (binned counts, summed across ranks: fixed size at any split size).

    ``label_kind = "multiclass"`` (the findings are K classes, truth and label sets one-hot): the scores are
    softmax(logits) over the classes (one-vs-rest AUROC per class), and ``"accuracy"`` adds the top-1
    accuracy per target, argmax of the logits against the argmax of the truth or label set (paper 000
    Sec. 5, accuracy_score on the argmax); ``"metric"`` names the headline figure, accuracy there, auroc
    on multi-label data."""
    if label_kind not in ("multilabel", "multiclass"):
        raise ValueError(f"label_kind must be multilabel or multiclass, got {label_kind!r}")
    multiclass = label_kind == "multiclass"
    was_training = model.training
    model.eval()
    n = len(findings)
    targets = ["truth", *label_sets]
    metrics = {t: MultilabelAUROC(num_labels=n, average=None, thresholds=None).to(world.device) for t in targets}
    accuracy = {t: MulticlassAccuracy(num_classes=n, average="micro", top_k=1).to(world.device)
                for t in targets} if multiclass else {}
    rocs = {t: MultilabelROC(num_labels=n, thresholds=roc_thresholds).to(world.device)
            for t in targets} if roc_thresholds else {}
    positives = torch.zeros(len(targets), n, dtype=torch.float64, device=world.device)
    samples = torch.zeros(2, dtype=torch.float64, device=world.device)  # [all, with truth]
    for raw in loader:
        batch = to_device(raw, world.device)
        logits = (predict(batch) if predict else model(batch["image"])).float()
        probs = torch.softmax(logits, -1) if multiclass else torch.sigmoid(logits)
        samples[0] += probs.shape[0]
        if "truth" in batch:
            samples[1] += probs.shape[0]
            metrics["truth"].update(probs, batch["truth"].long())
            if accuracy:
                accuracy["truth"].update(probs, batch["truth"].argmax(-1))
            if rocs:
                rocs["truth"].update(probs, batch["truth"].long())
            positives[0] += batch["truth"].sum(0).double()
        for i, name in enumerate(label_sets):
            metrics[name].update(probs, batch["labels"][:, i].long())
            if accuracy:
                accuracy[name].update(probs, batch["labels"][:, i].argmax(-1))
            if rocs:
                rocs[name].update(probs, batch["labels"][:, i].long())
            positives[i + 1] += batch["labels"][:, i].sum(0).double()
    all_reduce_sum(samples, world)
    all_reduce_sum(positives, world)
    total, with_truth = int(samples[0].item()), int(samples[1].item())
    if with_truth not in (0, total):
        raise ValueError(f"{with_truth} of {total} evaluation samples have a truth vector: all or none must")
    auc: dict[str, list[float]] = {}
    for t, name in enumerate(targets):
        if name == "truth" and with_truth == 0:
            continue
        with _undefined_quietly():
            values = metrics[name].compute().double().cpu()  # collective: every rank calls it
        pos = positives[t].cpu()
        defined = (pos > 0) & (pos < total)
        auc[name] = [float(v) if ok else math.nan for v, ok in zip(values.tolist(), defined.tolist())]
    model.train(was_training)
    result = {"samples": total, "findings": list(findings), "label_kind": label_kind,
              "metric": "accuracy" if multiclass else "auroc", "auc": auc,
              "mean_auc": {k: _nanmean(v) for k, v in auc.items()}}
    if multiclass:  # compute() is collective: every rank calls it, for the same targets as the AUCs
        result["accuracy"] = {name: float(accuracy[name].compute()) if total else math.nan for name in auc}
    if rocs:
        result["roc"] = {}
        for name in auc:  # the same targets as the AUCs; compute() is collective, every rank calls it
            with _undefined_quietly():
                fpr, tpr, _ = rocs[name].compute()
            result["roc"][name] = {"fpr": fpr.double().cpu().tolist(), "tpr": tpr.double().cpu().tolist()}
    return result


@contextlib.contextmanager
def _undefined_quietly() -> Iterator[None]:
    """A finding without a positive (or a negative) study has no AUROC: NaN in the results, "n/a" in the
    tables, left out of the mean. torchmetrics' warning about it would only repeat that, once per target."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets", category=UserWarning)
        yield


def _nanmean(values: Sequence[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


def auc_csv(result: dict[str, Any]) -> str:
    """Findings as rows, targets as columns, a final mean row (AUROC); on multi-class data a last row of
    top-1 accuracy."""
    out = io.StringIO()
    w = csv.writer(out)
    targets = list(result["auc"])
    w.writerow(["finding", *targets])
    for i, f in enumerate(result["findings"]):
        w.writerow([f, *(f"{result['auc'][t][i]:.4f}" for t in targets)])
    w.writerow(["Mean", *(f"{result['mean_auc'][t]:.4f}" for t in targets)])
    if "accuracy" in result:
        w.writerow([ACCURACY_ROW, *(f"{result['accuracy'][t]:.4f}" for t in targets)])
    return out.getvalue()


def write_results(run_dir: Path, split: str, result: dict[str, Any]) -> None:
    from aol_dist.writes import atomic_write_text

    atomic_write_text(run_dir / f"auc_{split}.json", json.dumps(result, indent=1))
    atomic_write_text(run_dir / f"auc_{split}.csv", auc_csv(result))

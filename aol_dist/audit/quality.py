"""How good is each label set, per finding, and how many wrong labels does a relabelling budget find.

Quality (``label_quality_<split>.json``): for every label set and finding, sensitivity P(y = 1 | ref = 1),
specificity P(y = 0 | ref = 0) and accuracy P(y = ref), against a reference that is the truth where the
split has it and the run's consensus otherwise (the file says which). Multi-class data is scored one class
against the rest, plus each set's top-1 accuracy. The agreement matrix is the share of entries (multi-class:
of samples) where two sets give the same label.

Relabelling (paper 003's simulation, ``relabel_<split>.json``): a radiologist re-reads a whole study, so
samples are relabelled in ranking order; a wrong label is a (label set, finding) entry that differs from the
truth (multi-class: a set naming another class than the truth). The curve is the share of all wrong labels
lying in the first k samples, against k / samples. An oracle that ranks samples by their number of wrong
labels finds 100 % at a budget equal to the share of samples holding any wrong label.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

BUDGET = 0.10
"""The budget ``found_at_10pct`` is read at: a tenth of the samples relabelled."""
CURVE_POINTS = 101


def _rate(hits: np.ndarray, total: np.ndarray) -> list[float]:
    with np.errstate(invalid="ignore", divide="ignore"):
        out = hits / total
    return [float(v) if total_ > 0 else math.nan for v, total_ in zip(out.tolist(), total.tolist())]


def label_quality(labels: np.ndarray, reference: np.ndarray, label_sets: Sequence[str], findings: Sequence[str],
                  multiclass: bool) -> dict[str, Any]:
    """labels (S, M, N) 0/1 (one-hot rows for multi-class), reference (S, N) 0/1 (truth or the hard consensus)."""
    y, ref = labels.astype(bool), reference.astype(bool)[:, None, :]
    pos, neg = ref.sum(0), (~ref).sum(0)  # (1, N)
    sens = (y & ref).sum(0) / np.where(pos > 0, pos, 1)
    spec = (~y & ~ref).sum(0) / np.where(neg > 0, neg, 1)
    acc = (y == ref).mean(0)
    out: dict[str, Any] = {"samples": int(labels.shape[0]), "label_sets": list(label_sets), "findings": list(findings)}
    for name, table, defined in (("sensitivity", sens, pos[0] > 0), ("specificity", spec, neg[0] > 0),
                                 ("accuracy", acc, np.ones_like(pos[0], dtype=bool))):
        out[name] = {s: {f: (float(table[m, n]) if defined[n] else math.nan) for n, f in enumerate(findings)}
                     for m, s in enumerate(label_sets)}
    if multiclass:
        said, true = labels.argmax(-1), reference.argmax(-1)[:, None]
        out["top1_accuracy"] = {s: float((said[:, m] == true[:, 0]).mean()) for m, s in enumerate(label_sets)}
    out["agreement"] = agreement(labels, multiclass)
    return out


def agreement(labels: np.ndarray, multiclass: bool) -> list[list[float]]:
    """(M, M): share of entries (multi-class: samples) where sets i and j agree."""
    m = labels.shape[1]
    said = labels.argmax(-1) if multiclass else labels
    return [[float((said[:, i] == said[:, j]).mean()) for j in range(m)] for i in range(m)]


def wrong_labels(labels: np.ndarray, truth: np.ndarray, multiclass: bool) -> np.ndarray:
    """(S,): the number of wrong labels per sample (entries differing from the truth)."""
    if multiclass:
        return (labels.argmax(-1) != truth.argmax(-1)[:, None]).sum(1)
    return (labels != truth[:, None, :]).sum((1, 2))


def relabel_curve(score: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """(S + 1,): share of the wrong labels found after relabelling the k highest-scored samples, k = 0..S
    (ties in index order: a stable sort)."""
    order = np.argsort(-score, kind="stable")
    found = np.concatenate([[0], np.cumsum(wrong[order])])
    total = wrong.sum()
    return found / total if total > 0 else np.ones_like(found, dtype=float)


def relabel_summary(scores: dict[str, np.ndarray], wrong: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The curve of every ranking in ``scores``, of a seeded random ranking and of the oracle: the share
    found at a 10 % budget, the area under the curve (budget 0..1) and the curve at 101 budget points."""
    n = len(wrong)
    rankings = dict(scores)
    rankings["random"] = np.random.default_rng(seed).permutation(n).astype(float)
    rankings["oracle"] = wrong.astype(float)
    budget = np.linspace(0, 1, CURVE_POINTS)
    out: dict[str, Any] = {"samples": n, "wrong_labels": int(wrong.sum()),
                           "samples_with_wrong_labels": float((wrong > 0).mean()) if n else 0.0,
                           "budget": budget.tolist(), "found_at_10pct": {}, "area": {}, "curves": {}}
    for name, score in rankings.items():
        curve = relabel_curve(score, wrong)
        k = np.linspace(0, 1, n + 1)
        out["found_at_10pct"][name] = float(curve[int(round(BUDGET * n))])
        out["area"][name] = float(np.trapezoid(curve, k)) if n else 1.0
        out["curves"][name] = np.interp(budget, k, curve).tolist()
    return out

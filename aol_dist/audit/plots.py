"""The audit's PNGs: label quality as heat maps (label sets x findings) and the relabelling curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from aol_dist.plots import _pyplot, _save


def quality_heatmap(quality: dict[str, Any], path: Path) -> Path:
    """Sensitivity, specificity and accuracy per label set and finding (and the trust where the run has it),
    against the reference the report names; the agreement matrix beside them."""
    plt = _pyplot()
    sets, findings = quality["label_sets"], quality["findings"]
    panels = ["sensitivity", "specificity", "accuracy"] + (["trust"] if isinstance(quality.get("trust"), dict) else [])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * len(panels) + 3.6, 0.36 * len(findings) + 2.4),
                             constrained_layout=True, gridspec_kw={"width_ratios": [1] * len(panels) + [0.8]})
    for ax, name in zip(axes, panels):
        table = quality[name]
        grid = [[table[s].get(f, table[s].get("all", math.nan)) for s in sets] for f in findings]
        if name == "trust":  # weights near 1/M: a diverging scale around the uniform weight shows who is preferred
            even = 1 / len(sets)
            spread = max([abs(v - even) for row in grid for v in row] + [1e-3])
            ax.imshow(grid, vmin=even - spread, vmax=even + spread, cmap="coolwarm", aspect="auto")
            dark = lambda v: abs(v - even) > 0.6 * spread  # noqa: E731
        else:
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            dark = lambda v: v < 0.6  # noqa: E731
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not (isinstance(v, float) and math.isnan(v)):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark(v) else "black")
        ax.set_xticks(range(len(sets)), sets, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(findings)), findings if ax is axes[0] else [""] * len(findings), fontsize=8)
        ax.set_title(name if name != "trust" else "trust (mean weight; red: above 1/M)", fontsize=10)
    fig.colorbar(im, ax=axes[2], shrink=0.6)
    ax = axes[-1]
    agree = quality["agreement"]
    ax.imshow(agree, vmin=0, vmax=1, cmap="magma")
    for i, row in enumerate(agree):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(sets)), sets, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(sets)), sets, fontsize=8)
    ax.set_title("agreement between sets", fontsize=10)
    fig.suptitle(f"label quality, split {quality['split']}: against {quality['reference']}, "
                 f"{quality['samples']} samples", fontsize=11)
    return _save(fig, path)


def relabel_plot(relabel: dict[str, Any], path: Path, split: str) -> Path:
    """Share of the wrong labels found against the share of samples relabelled, one line per ranking."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
    styles = {"oracle": dict(color="grey", ls=":"), "random": dict(color="black", ls="--")}
    for name, curve in relabel["curves"].items():
        label = f"{name} ({relabel['found_at_10pct'][name]:.0%} at 10 %, area {relabel['area'][name]:.2f})"
        ax.plot(relabel["budget"], curve, label=label, lw=1.6, **styles.get(name, {}))
    ax.axvline(0.1, color="lightgrey", lw=1)
    ax.set_xlabel("share of samples relabelled (whole samples, in ranking order)")
    ax.set_ylabel("share of wrong labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"relabelling simulation, split {split}: {relabel['wrong_labels']} wrong labels in "
                 f"{relabel['samples']} samples", fontsize=10)
    return _save(fig, path)

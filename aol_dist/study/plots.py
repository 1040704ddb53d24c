"""``study.png``: per benchmark, one bar per method (mean over seeds) with its seed standard deviation as an
error bar and the single seeds as dots; the best baseline's mean as a dashed line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aol_dist.study.grid import CEILINGS, is_baseline


def _colour(method: str) -> str:
    if method in CEILINGS:
        return "tab:green"
    if method.startswith("aol"):
        return "tab:blue"
    return "tab:orange" if is_baseline(method) else "tab:grey"


def study_plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Draw the summary into ``path`` (written under a temporary name, then renamed); None if it is empty."""
    benches = {b: m for b, m in summary["benchmarks"].items() if any(s["mean"] is not None for s in m.values())}
    if not benches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(6.0, 0.45 * max(len(m) for m in benches.values()) + 2)
    fig, axes = plt.subplots(len(benches), 1, figsize=(width, 3.2 * len(benches)), squeeze=False)
    for ax, (bench, methods) in zip(axes[:, 0], benches.items()):
        names = [m for m, s in methods.items() if s["mean"] is not None]
        means = [methods[m]["mean"] for m in names]
        stds = [methods[m]["std"] for m in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[_colour(m) for m in names], alpha=0.8)
        for i, m in enumerate(names):
            seeds = list(methods[m]["values"].values())
            ax.plot([i] * len(seeds), seeds, "k.", markersize=3)
        best = summary["best_baseline"].get(bench)
        if best:
            ax.axhline(methods[best]["mean"], color="tab:orange", linestyle="--", linewidth=1,
                       label=f"best baseline: {best}")
            ax.legend(loc="lower right", fontsize=8)
        low = min(v for m in names for v in methods[m]["values"].values())
        high = max(mn + (sd or 0) for mn, sd in zip(means, stds))
        ax.set_ylim(max(0.0, low - 0.1 * (high - low + 0.05)), min(1.0, high + 0.1 * (high - low + 0.05)))
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        metric = methods[names[0]]["metric"]
        ax.set_ylabel(metric)
        ax.set_title(f"{bench}: {metric} vs truth, mean and std over seeds", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.rename(path)
    return path

"""PNG plots of a run directory, from the files the run wrote (so they can be redrawn at any time):

- ``training_curves.png``: loss, samples/s and data-wait time per logged step (``log.jsonl``);
- ``attention.png``: mean attention weight per label set over training, the "who to believe" picture;
- ``roc_<split>.png``: ROC curve per finding against ``truth`` (or, without truth, each label set),
  from ``roc_<split>.json``, with the exact AUROC of ``auc_<split>.json`` in the legend.

``python -m aol_dist.plots RUN_DIR`` redraws them into ``RUN_DIR/plots``;
``python -m aol_dist.plots scaling RUN_DIR... --out DIR`` makes the scaling-study table and plot.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

PLOTS = "plots"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window; safe on headless nodes
    import matplotlib.pyplot as plt

    return plt


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_plots(run_dir: Path) -> list[Path]:
    """Every plot the run's files allow, into ``run_dir/plots``; returns the paths written."""
    run_dir = Path(run_dir)
    out = run_dir / PLOTS
    out.mkdir(exist_ok=True)
    log = read_log(run_dir)
    title = run_dir.name.removesuffix(".incomplete")
    written = []
    if log:
        written.append(training_curves(log, out / "training_curves.png", title))
        if any("attention" in r for r in log):
            written.append(attention_over_time(log, out / "attention.png", title))
    for roc_file in sorted(run_dir.glob("roc_*.json")):
        split = roc_file.stem.removeprefix("roc_")
        auc_file = run_dir / f"auc_{split}.json"
        auc = json.loads(auc_file.read_text()) if auc_file.exists() else None
        written.append(roc_curves(json.loads(roc_file.read_text()), auc, out / f"roc_{split}.png", f"{title}: {split}"))
    return written


def _save(fig, path: Path) -> Path:
    from aol_dist.writes import writing

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path, tmp):
            fig.savefig(tmp, dpi=110, format="png")
            tmp.rename(path)
    finally:
        _pyplot().close(fig)
    return path


def training_curves(log: list[dict[str, Any]], path: Path, title: str) -> Path:
    plt = _pyplot()
    steps = [r["step"] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    loss = [(r["step"], r["loss"]) for r in log if r.get("loss") is not None]
    ax = axes[0]
    ax.plot([s for s, _ in loss], [v for _, v in loss], color="tab:blue", lw=1.5)
    skipped = [r["step"] for i, r in enumerate(log) if r.get("skipped_steps", 0) > (log[i - 1].get("skipped_steps", 0) if i else 0)]
    if skipped:
        ax.scatter(skipped, [min(v for _, v in loss)] * len(skipped) if loss else [0] * len(skipped),
                   marker="x", color="tab:red", label="window with skipped (non-finite) steps", zorder=3)
        ax.legend(loc="upper right", fontsize=8)
    ax.set(title="training loss (mean over ranks)", xlabel="step", ylabel="BCE")
    ax = axes[1]
    ax.plot(steps, [r["samples_per_s"] for r in log], color="tab:green", lw=1.5)
    ax.set(title="throughput (all ranks)", xlabel="step", ylabel="samples / s", ylim=(0, None))
    ax = axes[2]
    ax.plot(steps, [r["data_wait_s"] for r in log], color="tab:orange", lw=1.5)
    ax.set(title="data wait per log window (mean over ranks)", xlabel="step", ylabel="seconds",
           ylim=(0, None))
    for ax in axes:
        ax.grid(alpha=0.3)
    world = log[-1].get("world_size")
    fig.suptitle(f"{title}" + (f"  ({world} ranks)" if world else ""), fontsize=12)
    return _save(fig, path)


def attention_over_time(log: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Mean attention weight per label set at every logged step: which labeler the model trusts. With the
    likelihood-trained trust, a second panel: each set's estimated accuracy (solid) beside its accuracy
    against the truth where the training split has it (dashed, the log's ``diagnostics.set_accuracy``)."""
    plt = _pyplot()
    rows = [r for r in log if "attention" in r]
    names = list(rows[0]["attention"])
    estimated = [r for r in rows if "estimated_accuracy" in r]
    fig, axes = plt.subplots(1, 2 if estimated else 1, figsize=(15 if estimated else 9, 5),
                             constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    for name in names:
        ax.plot([r["step"] for r in rows], [r["attention"][name] for r in rows], lw=2,
                label=f"{name} (last {rows[-1]['attention'][name]:.2f})")
    ax.axhline(1 / len(names), color="grey", ls="--", lw=1, label=f"equal trust 1/{len(names)}")
    ax.set(title=f"{title}: learned attention per label set (who to believe)", xlabel="step",
           ylabel="mean attention weight (over samples and ranks)", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, framealpha=0.9)
    if estimated:
        ax = axes[0, 1]
        real = [r for r in estimated if "set_accuracy" in r.get("diagnostics", {})]
        for i, name in enumerate(names):
            color = f"C{i}"
            ax.plot([r["step"] for r in estimated], [r["estimated_accuracy"][name] for r in estimated], lw=2,
                    color=color, label=f"{name} estimated (last {estimated[-1]['estimated_accuracy'][name]:.3f})")
            if real:
                ax.plot([r["step"] for r in real], [r["diagnostics"]["set_accuracy"][name] for r in real], lw=1,
                        ls="--", color=color, label=f"{name} against the truth")
        ax.set(title="estimated accuracy per label set, mean over findings", xlabel="step", ylabel="accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return _save(fig, path)


def roc_curves(roc: dict[str, Any], auc: dict[str, Any] | None, path: Path, title: str) -> Path:
    """One panel per finding: ROC against truth where the split has it, else against each label set."""
    plt = _pyplot()
    curves = roc["roc"]
    targets = ["truth"] if "truth" in curves else list(curves)
    findings = auc["findings"] if auc else [f"finding {i}" for i in range(len(curves[targets[0]]["fpr"]))]
    cols = 5 if len(findings) > 8 else min(4, len(findings))
    rows = math.ceil(len(findings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False, constrained_layout=True)
    for j, finding in enumerate(findings):
        ax = axes[j // cols][j % cols]
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        for target in targets:
            value = auc["auc"][target][j] if auc else math.nan
            fpr, tpr = curves[target]["fpr"][j], curves[target]["tpr"][j]
            if math.isnan(value):
                continue  # one class only in this split: no curve
            ax.plot(fpr, tpr, lw=1.8, label=f"{target}: {value:.3f}" if len(targets) > 1 else f"AUC {value:.3f}")
        if not ax.lines[1:]:
            ax.text(0.5, 0.5, "one class only", ha="center", va="center", color="grey")
        ax.set_title(finding, fontsize=10)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.tick_params(labelsize=8)
        if j % cols == 0:
            ax.set_ylabel("true positive rate", fontsize=8)
        if j // cols == rows - 1 or j + cols >= len(findings):
            ax.set_xlabel("false positive rate", fontsize=8)
        if ax.lines[1:]:
            ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    for j in range(len(findings), rows * cols):
        axes[j // cols][j % cols].axis("off")
    against = "truth" if targets == ["truth"] else "each label set (no truth in this split)"
    samples = f", {auc['samples']} samples" if auc else ""
    fig.suptitle(f"{title}: ROC per finding against {against}{samples}, step {roc.get('step', '?')}", fontsize=12)
    return _save(fig, path)


def scaling_points(run_dirs: list[Path]) -> list[tuple[int, float, str]]:
    """(GPUs, samples/s, run name) per run of a scaling study, sorted by GPUs: the median of ``samples_per_s``
    over its log records after the first (warm-up), and its ``world_size``."""
    points = []
    for run in run_dirs:
        log = [r for r in read_log(run) if "world_size" in r]
        if not log:
            raise ValueError(f"{run}: no log records with world_size (log.jsonl missing or from an older version)")
        speeds = sorted(r["samples_per_s"] for r in (log[1:] or log))
        points.append((log[-1]["world_size"], speeds[len(speeds) // 2], Path(run).name))
    return sorted(points)


def scaling_rows(points: list[tuple[int, float, str]]) -> list[dict[str, Any]]:
    """One row per point: efficiency = throughput / (GPUs x throughput per GPU at the smallest count)."""
    base_gpus, base_speed, _ = points[0]
    per_gpu = base_speed / base_gpus
    return [{"gpus": g, "samples_per_s": v, "samples_per_s_per_gpu": v / g, "speedup": v / base_speed,
             "efficiency": v / (g * per_gpu), "run": name} for g, v, name in points]


def scaling(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Throughput and efficiency vs GPU count from the runs of a scaling study (``slurm/scaling_array.sbatch``),
    per :func:`scaling_points` and :func:`scaling_rows` (``aol bench scaling --runs`` shows the same rows).
    Writes ``scaling.csv`` and ``scaling.png`` into ``out_dir``.
    """
    points = scaling_points(run_dirs)
    base_gpus, base_speed, _ = points[0]
    per_gpu = base_speed / base_gpus
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["gpus,samples_per_s,samples_per_s_per_gpu,speedup,efficiency,run"]
    rows += [f"{r['gpus']},{r['samples_per_s']:.2f},{r['samples_per_s_per_gpu']:.2f},{r['speedup']:.3f},"
             f"{r['efficiency']:.3f},{r['run']}" for r in scaling_rows(points)]
    csv_path = out_dir / "scaling.csv"
    csv_path.write_text("\n".join(rows) + "\n")

    plt = _pyplot()
    gpus = [g for g, _, _ in points]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    a.plot(gpus, [v for _, v, _ in points], "o-", lw=2, label="measured")
    a.plot(gpus, [g * per_gpu for g in gpus], "--", color="grey", label=f"linear from {base_gpus} GPU(s)")
    a.set(title="throughput", xlabel="GPUs", ylabel="samples / s", xscale="log", ylim=(0, None))
    b.plot(gpus, [v / (g * per_gpu) for g, v, _ in points], "o-", lw=2, color="tab:green")
    b.axhline(1.0, color="grey", ls="--", lw=1)
    b.set(title="scaling efficiency", xlabel="GPUs", ylabel="throughput / linear", xscale="log", ylim=(0, 1.1))
    for ax in (a, b):
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(alpha=0.3)
    a.legend(fontsize=9)
    return csv_path, _save(fig, out_dir / "scaling.png")


def scaling_projection(result: dict[str, Any], path: Path) -> Path:
    """Efficiency vs GPU count from ``aol bench scaling --json``: the projection per link, without (dashed) and
    with DDP's overlap (solid), and the measured training runs of ``--runs`` (the same rows as
    :func:`scaling`'s table), where given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    links = result["projection"]["links"]
    for name, rows in result["projected"].items():
        gpus = sorted(int(g) for g in rows)
        line, = ax.plot(gpus, [rows[str(g)]["overlap_efficiency"] for g in gpus], "o-", lw=2,
                        label=links[name]["label"])
        ax.plot(gpus, [rows[str(g)]["efficiency"] for g in gpus], "o--", lw=1.2, color=line.get_color())
    runs = result.get("runs") or {}
    if runs:
        gpus = sorted(int(g) for g in runs)
        ax.plot(gpus, [runs[str(g)]["efficiency"] for g in gpus], "ks-", lw=2, label="measured training runs")
    pr = result["projection"]
    ticks = sorted({int(g) for rows in result["projected"].values() for g in rows} | {int(g) for g in runs})
    low = min(line.get_ydata().min() for line in ax.lines)
    ax.set(title=f"weak scaling, projected: {pr['arch']}, batch {pr['batch_per_gpu']} per GPU, GPU step "
                 f"{pr['gpu_step_s']} s (assumed)\nsolid: with DDP's overlap, dashed: without", xlabel="GPUs",
           ylabel="efficiency (throughput / linear)", xscale="log", ylim=(max(0.0, low - 0.05), 1.02))
    ax.set_xticks(ticks, [str(g) for g in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, Path(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m aol_dist.plots RUN_DIR`` or ``python -m aol_dist.plots scaling RUN_DIR... [--out DIR]``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["scaling"]:
        out = Path(".")
        if "--out" in args:
            i = args.index("--out")
            out, args = Path(args[i + 1]), args[:i] + args[i + 2:]
        runs = [Path(a) for a in args[1:]]
        if not runs or not all(r.is_dir() for r in runs):
            print("usage: python -m aol_dist.plots scaling RUN_DIR... [--out DIR]", file=sys.stderr)
            return 2
        for path in scaling(runs, out):
            print(path)
        return 0
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m aol_dist.plots RUN_DIR  |  python -m aol_dist.plots scaling RUN_DIR... [--out DIR]",
              file=sys.stderr)
        return 2
    for path in write_plots(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

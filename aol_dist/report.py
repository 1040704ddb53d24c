"""What a user reads in the terminal: consoles and tables shared by training, eval and the CLI."""

from __future__ import annotations

from typing import Any


def make_console():
    """A rich console; 120 columns when writing to a file or pipe (rich would assume 80 and wrap tables)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def attention_table(record: dict[str, Any]):
    """Mean attention weight per label set over training: which labeler the model trusts."""
    from rich.table import Table

    table = Table(title="learned attention: mean weight per label set over training")
    table.add_column("label set")
    table.add_column("mean weight", justify="right")
    for name, w in sorted(record["mean"].items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{w:.3f}")
    return table


def compare_runs(runs: list[Any], split: str, target: str = "truth") -> dict[str, Any]:
    """AUROC per finding of several finished runs against one target, side by side (Tables 3-7)."""
    import json
    from pathlib import Path

    columns, findings = {}, None
    for run in runs:
        path = Path(run) / f"auc_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results for split {split!r} in this run")
        result = json.loads(path.read_text())
        if target not in result["auc"]:
            raise KeyError(f"{path}: no AUROC against {target!r}; has {sorted(result['auc'])}")
        if findings is not None and result["findings"] != findings:
            raise ValueError(f"{path}: findings differ from the first run's")
        findings = result["findings"]
        columns[Path(run).name] = {"auc": result["auc"][target], "mean": result["mean_auc"][target]}
    return {"split": split, "target": target, "findings": findings, "runs": columns}


def findings_table(title: str, findings: list[str], columns: dict[str, list[float]], means: dict[str, float],
                   bold_best: bool = False):
    """Findings as rows, one column of AUROCs per target or run, a mean row; n/a where undefined."""
    import math

    from rich.table import Table

    table = Table(title=title)
    table.add_column("finding")
    for name in columns:
        table.add_column(name, justify="right")
    fmt = lambda v: "n/a" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    for i, f in enumerate(findings):
        row = [values[i] for values in columns.values()]
        best = max((v for v in row if not math.isnan(v)), default=math.nan)
        table.add_row(f, *(f"[bold]{fmt(v)}[/]" if bold_best and v == best else fmt(v) for v in row))
    table.add_section()
    table.add_row("Mean", *(fmt(means[name]) for name in columns), style="bold")
    return table


def auc_table(result: dict[str, Any], title: str):
    """One evaluation: AUROC per finding against truth and each label set."""
    return findings_table(f"{title} ({result['samples']} samples): AUROC per finding", result["findings"],
                          result["auc"], result["mean_auc"])


def compare_table(comparison: dict[str, Any]):
    """Several runs against one target, the best per finding in bold."""
    runs = comparison["runs"]
    return findings_table(f"AUROC vs {comparison['target']} on {comparison['split']}", comparison["findings"],
                          {r: v["auc"] for r, v in runs.items()}, {r: v["mean"] for r, v in runs.items()},
                          bold_best=True)

"""What a user reads in the terminal: consoles and tables shared by training, eval and the CLI."""

from __future__ import annotations

from typing import Any


def make_console():
    """A rich console; 120 columns when writing to a file or pipe (rich would assume 80 and wrap tables)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def attention_table(record: dict[str, Any]):
    """The learned trust: per label set its mean weight (and estimated accuracy) over the reported steps, and
    per finding the set trusted most beside the set that was most accurate against the truth (where the
    training split has truth). "Trusted most" ranks by the estimated accuracy where the run has one (the
    likelihood-trained trust), else by the weight (the paper's attention)."""
    from rich.console import Group
    from rich.table import Table

    steps = record.get("steps")
    over = f"steps {steps[0]}-{steps[1]}" if steps else "training"
    accuracy, estimate = record.get("accuracy_vs_truth"), record.get("estimated_accuracy")
    table = Table(title=f"learned trust per label set ({over})")
    columns = ["label set", "mean weight"] + ["estimated accuracy"] * bool(estimate) + ["accuracy"] * bool(accuracy)
    for column in columns:
        table.add_column(column, justify="left" if column == "label set" else "right")
    overall, rank = _overall(record)
    for name, v in sorted(overall.items(), key=lambda kv: -kv[1][rank]):
        table.add_row(name, *(f"{v[k]:.3f}" for k in ("weight", "estimate", "accuracy") if k in v))
    if not accuracy:
        return table
    trusted, best = (max(overall, key=lambda n: overall[n][k]) for k in (rank, "accuracy"))
    verdict = (f"trusted most overall: {trusted}, " + ("the most accurate on average" if trusted == best else
               f"accuracy {overall[trusted]['accuracy']:.3f}; the most accurate on average: {best} "
               f"({overall[best]['accuracy']:.3f})"))
    rows = trust_vs_truth(record)
    right = sum(r["right"] for r in rows)
    scores = trust_scores(record)
    picks = (f"; uncertain mentions: leans to the more accurate of u0 / u1 on {scores['uncertain_right']} of "
             f"{scores['uncertain_of']} findings ({scores['u0_better_right']} of {scores['u0_better_of']} where u0 is)"
             if "uncertain_of" in scores else "")
    detail = Table(title=f"{verdict}{picks}. Per finding, trusted vs most accurate label set (training split's "
                         f"truth): right on {right} of {len(rows)} findings where the sets differ")
    for column in ("finding", "trusted most", "estimated accuracy" if estimate else "weight", "its accuracy",
                   "most accurate", "accuracy", ""):
        detail.add_column(column, justify="left" if column in ("finding", "trusted most", "most accurate") else "right")
    for r in rows:
        detail.add_row(r["finding"], r["trusted"], f"{r['trust']:.3f}", f"{r['trusted_accuracy']:.3f}", r["best"],
                       f"{r['accuracy']:.3f}", "yes" if r["right"] else "[red]no[/]")
    return Group(table, detail)


def _overall(record: dict[str, Any]) -> tuple[dict[str, dict[str, float]], str]:
    """Per label set its mean weight, estimated accuracy and accuracy over the findings (those the record
    has), and what ranks the trust: the estimated accuracy where the record has one, else the weight."""
    overall = {name: {"weight": w} for name, w in record["mean"].items()}
    for key, source in (("estimate", record.get("estimated_accuracy")), ("accuracy", record.get("accuracy_vs_truth"))):
        for name in overall if source else ():
            overall[name][key] = sum(per[name] for per in source.values()) / len(source)
    return overall, "estimate" if record.get("estimated_accuracy") else "weight"


def trust_scores(record: dict[str, Any]) -> dict[str, Any] | None:
    """How well one run's trust (attention.json) names the right label sets, where the training split has truth
    (else None): per finding, whether the set trusted most is the most accurate (:func:`trust_vs_truth`); for
    label sets in ``<labeler>_u0`` / ``<labeler>_u1`` pairs (uncertain mentions as 0 / as 1), per finding where
    they differ, whether the trust summed over the u1 sets against the u0 sets leans the way the accuracy does
    (the u0/u1 picks of issue 10, docs/quality.md), also counted over the findings where u0 is more accurate;
    and whether the set trusted most overall is one of the two most accurate on average."""
    accuracy = record.get("accuracy_vs_truth")
    if not accuracy:
        return None
    rows = trust_vs_truth(record)
    overall, rank = _overall(record)
    trusted = max(overall, key=lambda n: overall[n][rank])
    top_two = sorted(overall, key=lambda n: -overall[n]["accuracy"])[:2]
    out = {"per_finding_right": sum(r["right"] for r in rows), "per_finding_of": len(rows),
           "trusted_most": trusted, "trusted_in_top_two": trusted in top_two}
    pairs = [(name, name[:-1] + "1") for name in overall if name.endswith("_u0") and name[:-1] + "1" in overall]
    if pairs:
        trust = record.get("estimated_accuracy") or record["per_finding"]
        picks = {"uncertain_right": 0, "uncertain_of": 0, "u0_better_right": 0, "u0_better_of": 0}
        for finding, acc in accuracy.items():
            lean = sum(acc[u1] - acc[u0] for u0, u1 in pairs)
            if abs(lean) < 1e-9:
                continue  # u0 and u1 agree (No Finding): nothing to pick
            right = lean * sum(trust[finding][u1] - trust[finding][u0] for u0, u1 in pairs) > 0
            picks["uncertain_of"] += 1
            picks["uncertain_right"] += right
            if lean < 0:
                picks["u0_better_of"] += 1
                picks["u0_better_right"] += right
        out.update(picks)
    return out


def trust_vs_truth(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per finding where the label sets' accuracies differ: the most trusted set (by estimated accuracy where
    the record has one, else by weight), the most accurate one, and whether the trusted set is (within 0.001)
    as accurate as the best."""
    trust = record.get("estimated_accuracy") or record["per_finding"]
    rows = []
    for finding, acc in record["accuracy_vs_truth"].items():
        if max(acc.values()) - min(acc.values()) < 1e-3:
            continue  # a tie (e.g. No Finding): nothing to choose
        by = trust[finding]
        trusted, best = max(by, key=by.get), max(acc, key=acc.get)
        rows.append({"finding": finding, "trusted": trusted, "trust": by[trusted], "best": best,
                     "trusted_accuracy": acc[trusted], "accuracy": acc[best], "right": acc[trusted] >= acc[best] - 1e-3})
    return rows


def compare_runs(runs: list[Any], split: str, target: str = "truth") -> dict[str, Any]:
    """AUROC per finding of several finished runs against one target, side by side (Tables 3-7), and the
    top-1 accuracy of each run that has one (multi-class data)."""
    import json
    from pathlib import Path

    columns, findings = {}, None
    for run in runs:
        path = Path(run) / f"auc_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results for split {split!r} in this run")
        result = json.loads(path.read_text())
        if target not in result["auc"]:
            raise ValueError(f"{path}: no AUROC against {target!r}; has {sorted(result['auc'])}")
        if findings is not None and result["findings"] != findings:
            raise ValueError(f"{path}: findings differ from the first run's")
        findings = result["findings"]
        columns[Path(run).name] = {"auc": result["auc"][target], "mean": result["mean_auc"][target]}
        if target in result.get("accuracy", {}):
            columns[Path(run).name]["accuracy"] = result["accuracy"][target]
    return {"split": split, "target": target, "findings": findings, "runs": columns}


def findings_table(title: str, findings: list[str], columns: dict[str, list[float]], means: dict[str, float],
                   bold_best: bool = False, accuracy: dict[str, float] | None = None):
    """Findings as rows, one column of AUROCs per target or run, a mean row; n/a where undefined.
    ``accuracy`` (multi-class data): a last row of top-1 accuracy per column, "-" where a column has none."""
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
    if any(math.isnan(v) for values in columns.values() for v in values):
        table.caption = ("n/a: no positive or no negative study of that finding in this split (for that column); "
                         "the mean leaves it out")
    if accuracy:
        from aol_dist.evaluate import ACCURACY_ROW

        table.add_row(ACCURACY_ROW, *(fmt(accuracy[name]) if name in accuracy else "-" for name in columns),
                      style="bold")
    return table


def auc_table(result: dict[str, Any], title: str):
    """One evaluation: AUROC per finding against truth and each label set (and top-1 accuracy, multi-class)."""
    what = "AUROC per class and top-1 accuracy" if "accuracy" in result else "AUROC per finding"
    return findings_table(f"{title} ({result['samples']} samples): {what}", result["findings"],
                          result["auc"], result["mean_auc"], accuracy=result.get("accuracy"))


def compare_table(comparison: dict[str, Any]):
    """Several runs against one target, the best per finding in bold."""
    runs = comparison["runs"]
    accuracy = {r: v["accuracy"] for r, v in runs.items() if "accuracy" in v}
    return findings_table(f"AUROC{' and top-1 accuracy' if accuracy else ''} vs {comparison['target']} on "
                          f"{comparison['split']}", comparison["findings"],
                          {r: v["auc"] for r, v in runs.items()}, {r: v["mean"] for r, v in runs.items()},
                          bold_best=True, accuracy=accuracy)

"""The study's summary from ``results.csv``: per benchmark and method, mean and standard deviation over seeds
of the metric, and the paired difference (same seeds) to the best baseline; as a dict, JSON and rich tables.

Standard deviations are sample standard deviations (n - 1); with one seed they are 0 and ``seeds`` says 1.
The best baseline of a benchmark is the one with the highest mean among majority vote, soft average, CM and
the single label sets (:data:`aol_dist.study.grid.BASELINES`). A difference is "clear" when its mean exceeds
twice the larger of the two methods' seed standard deviations.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from aol_dist.study.grid import is_baseline


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Sequence[dict[str, Any]], keys: set[tuple[str, str, int]] | None = None,
              order: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """``rows`` as :func:`aol_dist.study.runner.read_results` gives them (a later row of the same benchmark,
    method and seed replaces an earlier one); ``keys`` limits them to a grid; ``order`` lists (benchmark,
    method) in table order (others follow in order of appearance)."""
    values: dict[str, dict[str, dict[int, float | None]]] = {}
    metrics: dict[tuple[str, str], str] = {}
    listed = list(order) + [(r["benchmark"], r["method"]) for r in rows]
    for bench, method in dict.fromkeys(listed):
        values.setdefault(bench, {}).setdefault(method, {})
    for r in rows:
        if keys is not None and (r["benchmark"], r["method"], r["seed"]) not in keys:
            continue
        values[r["benchmark"]][r["method"]][r["seed"]] = r["value"]
        metrics[r["benchmark"], r["method"]] = r["metric"]
    out: dict[str, Any] = {"benchmarks": {}, "best_baseline": {}}
    for bench, methods in values.items():
        table = {}
        for method, by_seed in methods.items():
            if (bench, method) not in metrics:
                continue  # listed in the order but never run
            finite = {s: v for s, v in sorted(by_seed.items()) if v is not None}
            mean, std = _mean_std(list(finite.values()))
            table[method] = {"metric": metrics[bench, method], "mean": mean, "std": std, "seeds": len(finite),
                             "values": {str(s): v for s, v in finite.items()}}
            if len(finite) < len(by_seed):
                table[method]["missing"] = len(by_seed) - len(finite)
        if not table:
            continue
        baselines = [(m, s["mean"]) for m, s in table.items() if is_baseline(m) and s["mean"] is not None]
        best = max(baselines, key=lambda kv: kv[1])[0] if baselines else None
        out["best_baseline"][bench] = best
        for method, stats in table.items():
            stats["vs_best_baseline"] = paired_difference(stats, table[best], best) if best else None
        out["benchmarks"][bench] = table
    return out


def paired_difference(stats: dict[str, Any], base: dict[str, Any], base_name: str) -> dict[str, Any] | None:
    """Mean and standard deviation over the seeds both have of (method - baseline)."""
    seeds = sorted(set(stats["values"]) & set(base["values"]), key=int)
    if not seeds:
        return None
    diffs = [stats["values"][s] - base["values"][s] for s in seeds]
    mean, std = _mean_std(diffs)
    clear = mean > 2 * max(stats["std"] or 0.0, base["std"] or 0.0) if len(seeds) > 1 else False
    return {"baseline": base_name, "mean": mean, "std": std, "seeds": len(seeds), "clear": clear}


def tables(summary: dict[str, Any]) -> list[Any]:
    """One rich table per benchmark: mean +- std over seeds, and the paired difference to the best baseline."""
    from rich.table import Table

    out = []
    for bench, methods in summary["benchmarks"].items():
        best = summary["best_baseline"].get(bench)
        metric = next(iter(methods.values()))["metric"]
        table = Table(title=f"{bench}: {metric} against truth (mean +- std over seeds); best baseline: {best or 'none'}")
        for column in ("method", metric, "seeds", f"paired diff to {best or 'best baseline'}", ""):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method, s in methods.items():
            value = "missing" if s["mean"] is None else f"{s['mean']:.4f} +- {s['std']:.4f}"
            d = s.get("vs_best_baseline")
            diff = "" if d is None or method == best else f"{d['mean']:+.4f} +- {d['std']:.4f}"
            note = "best baseline" if method == best else ("clear lead" if d and d["clear"] else "")
            style = "bold" if note else None
            table.add_row(method, value, str(s["seeds"]) + (f" ({s['missing']} missing)" if s.get("missing") else ""),
                          diff, note, style=style)
        out.append(table)
    return out

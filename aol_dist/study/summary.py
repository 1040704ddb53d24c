"""The study's summary from ``results.csv``: per benchmark and method, mean and standard deviation over seeds
of the metric, and the paired difference (same seeds) to the best baseline; as a dict, JSON and rich tables.

Standard deviations are sample standard deviations (n - 1); with one seed they are 0 and ``seeds`` says 1.
The best baseline of a benchmark is the one with the highest mean among majority vote, soft average, CM and
the single label sets (:data:`aol_dist.study.grid.BASELINES`). A difference is "clear" when its mean exceeds
twice the larger of the two methods' seed standard deviations.

Where a benchmark has ``best_choice`` runs (the best target a weighting of the label sets can make, a
ceiling: :func:`aol_dist.method.baselines.best_choice_target`) above the best baseline, every method also
gets ``room``: (its mean - the best baseline's) / (best_choice's mean - the best baseline's), the share of
what a perfect choice among the label sets gains over the best baseline that the method gains (1: all of
it; negative: below the baseline).

For the runs that write a trust (``attention.json``) on a training split with truth, :func:`trust_summary`
gives the same statistics of how often the trust names the more accurate label sets.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
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
        _room(table, best)
        out["benchmarks"][bench] = table
    return out


CHOICE_CEILING = "best_choice"


def _room(table: dict[str, Any], best: str | None) -> None:
    """Each method's share of the room between the best baseline and ``best_choice`` (module docstring)."""
    ceiling = table.get(CHOICE_CEILING)
    if best is None or ceiling is None or ceiling["mean"] is None or ceiling["mean"] <= table[best]["mean"]:
        return
    span = ceiling["mean"] - table[best]["mean"]
    for stats in table.values():
        if stats["mean"] is not None:
            stats["room"] = (stats["mean"] - table[best]["mean"]) / span


def paired_difference(stats: dict[str, Any], base: dict[str, Any], base_name: str) -> dict[str, Any] | None:
    """Mean and standard deviation over the seeds both have of (method - baseline)."""
    seeds = sorted(set(stats["values"]) & set(base["values"]), key=int)
    if not seeds:
        return None
    diffs = [stats["values"][s] - base["values"][s] for s in seeds]
    mean, std = _mean_std(diffs)
    clear = mean > 2 * max(stats["std"] or 0.0, base["std"] or 0.0) if len(seeds) > 1 else False
    return {"baseline": base_name, "mean": mean, "std": std, "seeds": len(seeds), "clear": clear}


TRUST_COUNTS = ("per_finding_right", "uncertain_right", "u0_better_right", "trusted_in_top_two")


def trust_summary(rows: Sequence[dict[str, Any]], keys: set[tuple[str, str, int]] | None = None) -> dict[str, Any]:
    """Per benchmark and method whose runs wrote a trust with the training split's truth beside it
    (attention.json): mean and standard deviation over seeds of :func:`aol_dist.report.trust_scores`'s counts,
    and out of how many findings."""
    from aol_dist.report import trust_scores

    scores: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in rows:
        if keys is not None and (r["benchmark"], r["method"], r["seed"]) not in keys:
            continue
        path = Path(r.get("run_dir") or "") / "attention.json"
        score = trust_scores(json.loads(path.read_text())) if r.get("run_dir") and path.is_file() else None
        if score is not None:
            scores.setdefault(r["benchmark"], {}).setdefault(r["method"], {})[r["seed"]] = score
    out: dict[str, Any] = {}
    for bench, methods in scores.items():
        for method, by_seed in methods.items():
            first = next(iter(by_seed.values()))
            stats: dict[str, Any] = {"seeds": len(by_seed)}
            for key in TRUST_COUNTS:
                if key in first:
                    mean, std = _mean_std([float(s[key]) for s in by_seed.values()])
                    of = first[key.removesuffix("_right") + "_of"] if key.endswith("_right") else 1
                    stats[key] = {"mean": mean, "std": std, "of": of}
            out.setdefault(bench, {})[method] = stats
    return out


def trust_tables(trust: dict[str, Any]) -> list[Any]:
    """One rich table per benchmark: how often the trust names the right label set (mean +- std over seeds)."""
    from rich.table import Table

    titles = {"per_finding_right": "trusted = most accurate, per finding", "uncertain_right": "u0 / u1 picks",
              "u0_better_right": "... where u0 is better", "trusted_in_top_two": "trusted most overall in the top two"}
    out = []
    for bench, methods in trust.items():
        table = Table(title=f"{bench}: does the trust name the more accurate label sets? (training split's truth, "
                            f"mean +- std over seeds, of how many findings)")
        table.add_column("method")
        for key in TRUST_COUNTS:
            table.add_column(titles[key], justify="right")
        for method, stats in methods.items():
            cells = [(f"{stats[k]['mean']:.1f} +- {stats[k]['std']:.1f} of {stats[k]['of']}" if k != "trusted_in_top_two"
                      else f"{stats[k]['mean'] * stats['seeds']:.0f} of {stats['seeds']} seeds") if k in stats else ""
                     for k in TRUST_COUNTS]
            table.add_row(method, *cells)
        out.append(table)
    return out


def tables(summary: dict[str, Any]) -> list[Any]:
    """One rich table per benchmark: mean +- std over seeds, and the paired difference to the best baseline."""
    from rich.table import Table

    out = []
    for bench, methods in summary["benchmarks"].items():
        best = summary["best_baseline"].get(bench)
        metric = next(iter(methods.values()))["metric"]
        table = Table(title=f"{bench}: {metric} against truth (mean +- std over seeds); best baseline: {best or 'none'}")
        room = any("room" in s for s in methods.values())
        columns = ("method", metric, "seeds", f"paired diff to {best or 'best baseline'}", "",
                   *(("share of best_choice's gain",) if room else ()))
        for column in columns:
            table.add_column(column, justify="left" if column == "method" else "right")
        for method, s in methods.items():
            value = "missing" if s["mean"] is None else f"{s['mean']:.4f} +- {s['std']:.4f}"
            d = s.get("vs_best_baseline")
            diff = "" if d is None or method == best else f"{d['mean']:+.4f} +- {d['std']:.4f}"
            note = "best baseline" if method == best else ("clear lead" if d and d["clear"] else "")
            style = "bold" if note else None
            share = (f"{s['room']:.0%}" if "room" in s and method != best else "",) if room else ()
            table.add_row(method, value, str(s["seeds"]) + (f" ({s['missing']} missing)" if s.get("missing") else ""),
                          diff, note, *share, style=style)
        out.append(table)
    return out

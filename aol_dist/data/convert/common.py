"""What every converter shares: CSV tables whose errors name file, row and column; writing the splits
(parallel, resumable, atomic per shard, via :func:`aol_dist.data.shards.write_split`); the conversion
report (kept per split, dropped by reason, failed files with the reason)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from aol_dist.data import shards
from aol_dist.errors import UserError
from aol_dist.writes import atomic_write_text

REPORT = "conversion_report.json"
#: Kept-sample notes listed one by one in the report; beyond this only their count per kind.
MAX_LISTED_NOTES = 1000


class ConversionError(UserError, ValueError):
    """Input that cannot be converted safely (missing column, unknown value...); the message names where."""


# --------------------------------------------------------------------------- tables


def find_table(root: str | Path, stem: str) -> Path:
    """``root/stem.csv`` or ``root/stem.csv.gz`` (MIMIC ships both ways)."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise ConversionError(f"{root}: neither {stem}.csv nor {stem}.csv.gz found")


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_table(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    """All rows of a CSV (plain or .gz) as dicts; a missing required column is an error naming both.

    Data row ``r`` (1-based) is line ``r + 1`` of the file; errors below cite both.
    """
    path = Path(path)
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise ConversionError(f"{path}: missing column {missing[0]!r}"
                                      + (f" (and {missing[1:]})" if len(missing) > 1 else "") + f"; has {header}")
            return list(reader)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise ConversionError(f"{path}: cannot read table ({e})") from None


def where(path: Path, row: int, column: str) -> str:
    return f"{path}: row {row} (line {row + 1}), column {column!r}"


def parse_mention(value: str | None, path: Path, row: int, column: str) -> float:
    """One labeler cell -> 1.0, 0.0, -1.0 (uncertain) or NaN (blank = not mentioned).

    ``nan`` is read as blank because pandas writes missing values that way; anything else is an error
    naming file, row and column, never a silent 0.
    """
    text = (value or "").strip()
    if text == "" or text.lower() == "nan":
        return math.nan
    try:
        v = float(text)
    except ValueError:
        v = None
    if v not in (1.0, 0.0, -1.0):
        raise ConversionError(f"{where(path, row, column)}: unknown label value {text!r}; expected 1, 0, -1 or blank")
    return v


# --------------------------------------------------------------------------- writing


def write_splits(out: str | Path, items: dict[str, Sequence[Any]], make_sample: Callable[[Any], dict[str, Any]],
                 samples_per_shard: int, workers: int, head: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Write every split's shards (finished ones are kept: resumable); returns records per split, reused count.
    ``head``: what the manifest will say of every split (findings, label sets, image settings), checked against
    the directory's other splits before the first shard (:func:`shards.check_directory`)."""
    out = Path(out)
    shards.check_directory(out, [split for split, split_items in items.items() if split_items], **head)
    records, reused = {}, 0
    for split, split_items in items.items():
        if not split_items:
            continue
        jobs = shards.plan_jobs(split, list(split_items), samples_per_shard)
        records[split], r = shards.write_split(out, jobs, make_sample, workers)
        reused += r
    return records, reused


def skip_reason_kind(reason: str) -> str:
    """Skip reasons are written ``"<kind>: <file> (<detail>)"``; the kind is what the report counts."""
    kind, sep, _ = reason.partition(": ")
    return kind if sep and " " not in kind else "failed"


def build_report(dataset: str, records: dict[str, list[dict[str, Any]]], reused: int, dropped: Counter,
                 extra: dict[str, Any] | None = None, failed: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Counts kept per split, dropped by reason (before writing and while writing), failed files, notes.

    ``failed`` lists files that failed before writing (e.g. unparsable XML); their drops are in ``dropped``.
    """
    dropped = Counter(dropped)
    failed, notes = list(failed or []), []
    for recs in records.values():
        for r in recs:
            for s in r.get("skipped", []):
                dropped[skip_reason_kind(s["reason"])] += 1
                failed.append(s)
            notes += r.get("notes", [])
    note_counts = Counter(n["note"].partition(":")[0] for n in notes)
    report = {
        "dataset": dataset,
        "kept": {split: sum(r["samples"] for r in recs) for split, recs in records.items()},
        "dropped": dict(sorted(dropped.items())),
        "failed": failed,
        "notes": dict(sorted(note_counts.items())),
        "noted_samples": notes[:MAX_LISTED_NOTES],
        "reused_shards": reused,
    }
    report.update(extra or {})
    return report


def finish(out: str | Path, report: dict[str, Any], stream: TextIO | None = None) -> dict[str, Any]:
    """Write ``OUT/conversion_report.json`` (atomically) and print its summary."""
    atomic_write_text(Path(out) / REPORT, json.dumps(report, indent=1))
    print_report(report, Path(out), stream or sys.stdout)
    return report


def print_report(report: dict[str, Any], out: Path, stream: TextIO, listed: int = 10) -> None:
    w = lambda s: print(s, file=stream)  # noqa: E731
    kept = ", ".join(f"{k} {v}" for k, v in report["kept"].items()) or "nothing"
    w(f"{out}: {report['dataset']} shards, kept {kept} (reused {report['reused_shards']} finished shards)")
    if report["dropped"]:
        w("dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
    if report["notes"]:
        w("kept with notes: " + ", ".join(f"{k} {v}" for k, v in report["notes"].items()))
    for s in report["failed"][:listed]:
        w(f"  failed: {s['reason']}")
    if len(report["failed"]) > listed:
        w(f"  ... {len(report['failed']) - listed} more failed files")
    w(f"full report: {out / REPORT}")

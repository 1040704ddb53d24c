"""``aol study --preset quick|full|smoke --out DIR [--benchmarks a,b] [--methods x,y] [--seeds N] [--parallel P]
[--set section.key=value ...] [--launch fork|exec] [--dry-run] [--json]``.

Builds each benchmark's shards once under ``DIR/shards/<benchmark>``, runs the grid (``DIR/runs``, one row
per finished run in ``DIR/results.csv``), then prints one table per benchmark and writes
``DIR/summary.json`` and ``DIR/study.png``. Killed and called again with the same arguments, it skips the
finished runs and ends with the same summary. ``DIR/study.json`` records the preset and settings: a
directory holding another study's runs is refused rather than mixed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from aol_dist.study.benchmarks import BENCHMARKS, BenchmarkUnavailable, build_benchmark
from aol_dist.study.grid import METHODS, PRESETS, impossible, plan
from aol_dist.study.runner import command, read_results, run_grid
from aol_dist.study.summary import summarize, tables, trust_summary, trust_tables

RECORD = "study.json"
PRESET_TOML = "preset.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True,
                        help="; ".join(f"{p.name}: {p.about}" for p in PRESETS.values()))
    parser.add_argument("--out", required=True, help="study directory (shards, runs, results.csv, summary)")
    parser.add_argument("--benchmarks", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--methods", default="", help="comma-separated labels or patterns, e.g. aol,majority,'single:*'")
    parser.add_argument("--seeds", type=int, default=0, help="seeds 0..N-1 (default: the preset's)")
    parser.add_argument("--parallel", type=int, default=0,
                        help="runs side by side (default: CPU cores, or GPUs where there are GPUs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config override for every run (part of the study's settings); a key "
                             "that a chosen method row sets itself is refused")
    parser.add_argument("--launch", choices=("fork", "exec"), default="fork",
                        help="fork: each run forked from a process that imported the training code once (default); "
                             "exec: each run a `python -m aol_dist.train` subprocess (pays the imports every run)")
    parser.add_argument("--dry-run", action="store_true", help="build the shards, print the runs' commands, run nothing")
    parser.add_argument("--json", action="store_true", help="end by printing the summary as one JSON object")


def main(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.seeds < 0 or args.parallel < 0:
        raise SystemExit("--seeds and --parallel must be >= 0")
    settings = (*preset.settings, *args.set)
    try:
        preset_toml = _write_settings(out, preset.name, settings, preset.per_benchmark)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    patterns = [p for p in args.methods.split(",") if p]
    typos = impossible(patterns)
    if typos:  # before the shards are built (minutes for a fresh study)
        raise SystemExit(f"--methods {','.join(typos)}: matches no method; known: "
                         f"{', '.join(m.label for m in METHODS)} (a {{label_set}} is one of a benchmark's label sets)")
    names = [n for n in args.benchmarks.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--benchmarks: unknown {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    console = _console(args.json)
    from rich.markup import escape

    def say(text: str, style: str = "") -> None:
        console.print(f"[{style}]{escape(text)}[/]" if style else escape(text), highlight=False)
    built, skipped = {}, {}
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        for name in names:
            t = time.perf_counter()
            try:
                manifest = build_benchmark(name, out / "shards" / name, preset.scale, workers=os.cpu_count() or 1)
            except BenchmarkUnavailable as e:
                say(str(e), "yellow")
                skipped[name] = str(e)
                continue
            except ValueError as e:  # a directory built from another spec: say so, touch nothing
                raise SystemExit(str(e)) from None
            counts = {s: v["samples"] for s, v in manifest["splits"].items()}
            say(f"{name}: shards {out / 'shards' / name} {counts}, label sets {manifest['label_sets']} "
                f"({time.perf_counter() - t:.0f} s)")
            built[name] = (BENCHMARKS[name], manifest["label_sets"], out / "shards" / name)
    try:
        runs = plan(built, out, args.seeds or preset.seeds, patterns,
                    per_benchmark=preset.per_benchmark, extra=args.set)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.dry_run:
        for run in runs:
            print(" ".join(command(run, preset_toml)), file=sys.stderr if args.json else sys.stdout)
        return 0
    gpus = _gpus()
    try:  # a results.csv that is not ours: say which line, touch nothing
        result = run_grid(runs, out / "results.csv", preset_toml, args.parallel or gpus or os.cpu_count() or 1, gpus,
                          say=say, launch=args.launch)
        rows = read_results(out / "results.csv")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    summary = summarize(rows, keys={r.key for r in runs}, order=[(r.benchmark, r.method) for r in runs])
    summary = {**summary, "trust": trust_summary(rows, keys={r.key for r in runs}), "preset": preset.name,
               "settings": list(settings),
               "per_benchmark": {b: list(v) for b, v in preset.per_benchmark.items()}, "skipped": skipped}
    from aol_dist.writes import atomic_write_text
    from aol_dist.study.plots import study_plot

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    for table in tables(summary) + trust_tables(summary["trust"]):
        console.print(table)
    plot = study_plot(summary, out / "study.png")
    say(f"{out / 'results.csv'}, {out / 'summary.json'}" + (f", {plot}" if plot else ""))
    if result["failed"]:
        say(f"{len(result['failed'])} run(s) failed; their logs: {', '.join(result['failed'])}", "red")
    if args.json:
        print(json.dumps(summary))
    return 1 if result["failed"] else 0


def _console(to_stderr: bool):
    from rich.console import Console

    from aol_dist.report import make_console

    return Console(stderr=True, width=120) if to_stderr else make_console()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _write_settings(out: Path, preset: str, settings: tuple[str, ...], per_benchmark: dict[str, tuple[str, ...]]) -> Path:
    """Check ``settings`` (a config error names the key), refuse a directory of another study, and write the
    settings as a typed TOML that every run loads with ``--config``."""
    import tomli_w

    from aol_dist.config import ConfigError, load_config, parse_overrides
    from aol_dist.writes import atomic_write_text

    try:
        config = load_config(None, list(settings))
        for extra in per_benchmark.values():
            load_config(None, [*settings, *extra])
    except ConfigError as e:
        raise ValueError(f"study settings: {e}") from None
    record = {"preset": preset, "settings": list(settings), "per_benchmark": {b: list(v) for b, v in per_benchmark.items()}}
    path = out / RECORD
    if path.is_file():
        before = json.loads(path.read_text())
        if before != record:
            raise ValueError(f"{out} holds a study with {before}; this call asks for {record}: use another --out")
    atomic_write_text(path, json.dumps(record, indent=1))
    typed: dict[str, Any] = {}
    for section, keys in parse_overrides(list(settings)).items():
        values = getattr(config, section)
        typed[section] = {k: list(v) if isinstance(v := getattr(values, k), tuple) else v for k in keys}
    toml = out / PRESET_TOML
    atomic_write_text(toml, f"# aol study --preset {preset}: settings every run shares\n" + tomli_w.dumps(typed))
    return toml

"""The ``aol`` command: ``aol shards synth|mimic|openi|generic|verify|inspect``, ``aol eval``, ``aol compare``,
``aol bench step|loader|scaling``, ``aol study``, ``aol audit``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _shards_synth(args: argparse.Namespace) -> int:
    from aol_dist.data.build import build_synth

    manifest = build_synth(args.out, args.train, args.validate, args.test, args.image_size, args.seed,
                           args.samples_per_shard, args.workers, args.tokenizer, args.max_length)
    counts = {s: v["samples"] for s, v in manifest["splits"].items()}
    print(f"{args.out}: synthetic shards {counts} (reused {manifest['reused_shards']} finished shards)")
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from aol_dist.data.shards import ShardError, verify

    try:
        counts = verify(args.dir)
    except ShardError as e:
        print(f"verify failed: {e}", file=sys.stderr)
        return 1
    print(f"{args.dir}: ok, {counts}")
    return 0


def _shards_inspect(args: argparse.Namespace) -> int:
    from aol_dist.data.label_stats import inspect

    summary = inspect(args.dir)
    if args.json:
        print(json.dumps(summary))
        return 0
    from rich.table import Table

    from aol_dist.report import make_console

    console = make_console()
    console.print(f"[bold]{args.dir}[/]: dataset {summary['dataset']}, image size {summary['image_size']}, "
                  f"label sets {summary['label_sets']}")
    for split, s in summary["splits"].items():
        console.print(f"{split}: {s['samples']} samples in {s['shards']} shards, {s['skipped']} skipped at conversion")
        if "prevalence" not in s:
            continue
        cols = list(s["prevalence"])
        table = Table(title=f"{split}: prevalence per label set" + (" (and accuracy vs truth)" if s.get("accuracy_vs_truth") else ""))
        table.add_column("finding")
        for c in cols:
            table.add_column(c, justify="right")
        for j, f in enumerate(summary["findings"]):
            cells = []
            for c in cols:
                cell = f"{s['prevalence'][c][j]:.3f}"
                if c in s.get("accuracy_vs_truth", {}):
                    cell += f" ({s['accuracy_vs_truth'][c][j]:.2f})"
                cells.append(cell)
            table.add_row(f, *cells)
        console.print(table)
        if s["agreement"]:
            console.print("agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in s["agreement"].items()))
        if s.get("per_image"):  # multi-class data: the class of each image, not entry by entry
            console.print(_per_image_table(split, s["per_image"]))
    return 0


def _per_image_table(split: str, per_image: dict):
    from rich.table import Table

    noise = per_image.get("noise_vs_truth", {})
    table = Table(title=f"{split}: per image (class != true class)")
    table.add_column("label set(s)")
    table.add_column("noise vs truth", justify="right")
    table.add_column("agreement", justify="right")
    for name, rate in noise.items():
        table.add_row(name, f"{rate:.3f}", "")
    for pair, rate in per_image["agreement"].items():
        table.add_row(pair, "", f"{rate:.3f}")
    table.add_row("all label sets", "", f"{per_image['all_agree']:.3f}", style="bold")
    return table


def _eval(args: argparse.Namespace) -> int:
    from aol_dist import dist
    from aol_dist.checkpoint import load_weights
    from aol_dist.data.shards import label_shape, split_shards
    from aol_dist.data.stream import EvalStream, make_loader
    from aol_dist.evaluate import evaluate, write_results
    from aol_dist.finished_run import RunInputError, open_finished_run
    from aol_dist.parts import build_parts
    from aol_dist.report import auc_table
    from aol_dist.writes import output_dir

    run = Path(args.run)
    try:
        found = open_finished_run(run, args.shards, args.split, all_label_sets=False)
    except RunInputError as e:
        print(f"aol eval: {e}", file=sys.stderr)
        return 2
    if args.out:
        output_dir(args.out)  # before the evaluation, not after it
    config, checkpoint, shard_dir, manifest = found.config, found.checkpoint, found.shard_dir, found.manifest
    names, index = found.label_sets, found.index
    world = dist.command_world()
    # the run's own label sets rebuild the same modules; the split may hold any subset of them
    parts = build_parts(config, {**manifest, "label_sets": checkpoint["label_sets"]}, world)
    load_weights(parts.model, checkpoint["model"], run / "model.pt", "model")
    for split in args.split:
        stream = EvalStream(split_shards(shard_dir, manifest, split), world.rank, world.world_size, args.batch_size, index,
                            label_shape(manifest))
        result = evaluate(parts.model, make_loader(stream, 0), names, manifest["findings"], world, parts.predict,
                          label_kind=parts.label_kind)
        if world.is_main:
            from aol_dist.report import make_console

            make_console().print(auc_table(result, f"{shard_dir}:{split}"))
            if args.out:
                write_results(Path(args.out), split, result)
    dist.shutdown(world)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from aol_dist.report import compare_runs, compare_table, make_console

    try:
        comparison = compare_runs(args.runs, args.split, args.target)
    except (FileNotFoundError, ValueError) as e:  # a run without results, another target or other findings
        print(f"aol compare: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(comparison))
    else:
        make_console().print(compare_table(comparison))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aol", description="attention-on-label training tools")
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="build, verify and inspect WebDataset shards").add_subparsers(
        dest="shards_command", required=True)
    synth = shards.add_parser("synth", help="the built-in synthetic chest-radiograph-like dataset")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--train", type=int, default=4000, help="training studies")
    synth.add_argument("--validate", type=int, default=500, help="validation studies")
    synth.add_argument("--test", type=int, default=1000, help="test studies (with truth)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--samples-per-shard", type=int, default=250)
    synth.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel shard writers")
    synth.add_argument("--tokenizer", default="", help="local Hugging Face tokenizer directory: store report token ids")
    synth.add_argument("--max-length", type=int, default=128, help="tokens per report (padded / truncated)")
    synth.set_defaults(func=_shards_synth)

    from aol_dist.data.convert.commands import add_converters

    add_converters(shards)  # mimic, openi, generic

    verify = shards.add_parser("verify", help="re-read every shard against the manifest")
    verify.add_argument("dir")
    verify.set_defaults(func=_shards_verify)

    insp = shards.add_parser("inspect", help="counts, prevalence and agreement of label sets")
    insp.add_argument("dir")
    insp.add_argument("--json", action="store_true", help="print one JSON object")
    insp.set_defaults(func=_shards_inspect)

    ev = sub.add_parser("eval", help="per-finding AUC tables of a finished run on shard splits")
    ev.add_argument("run", help="run directory (holds config.toml and model.pt)")
    ev.add_argument("--shards", help="shard directory (default: the run's data.shards)")
    ev.add_argument("--split", nargs="+", default=["test"])
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--out", help="directory for auc_<split>.json/.csv")
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser("compare", help="AUROC per finding of several runs side by side (e.g. aol vs baselines)")
    cmp.add_argument("runs", nargs="+", help="finished run directories")
    cmp.add_argument("--split", default="test")
    cmp.add_argument("--target", default="truth", help="truth or a label-set name")
    cmp.add_argument("--json", action="store_true", help="print one JSON object")
    cmp.set_defaults(func=_compare)

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side").add_subparsers(
        dest="bench_command", required=True)
    _add_bench_step(bench)
    _add_bench_loader(bench)
    _add_bench_scaling(bench)

    from aol_dist.study import command as study

    study_parser = sub.add_parser("study", help="methods x seeds x benchmarks: mean and spread, paired differences")
    study.add_arguments(study_parser)
    study_parser.set_defaults(func=study.main)

    from aol_dist.audit import command as audit

    audit_parser = sub.add_parser("audit", help="which labels are wrong: Phi, C(x), U(x), consensus labels, "
                                                "quality per label set, the relabelling curve")
    audit.add_arguments(audit_parser)
    audit_parser.set_defaults(func=audit.main)
    return parser


def _add_bench_loader(bench: argparse._SubParsersAction) -> None:
    from aol_dist.bench import loader as bench_loader

    loader = bench.add_parser("loader", help="images/s per CPU core from shards through decode and collate")
    bench_loader.add_arguments(loader)
    loader.set_defaults(func=bench_loader.main)


def _add_bench_scaling(bench: argparse._SubParsersAction) -> None:
    from aol_dist.bench import scaling

    parser = bench.add_parser("scaling", help="step and all-reduce time at 1 and 2 processes here; projected "
                                              "efficiency at 8-64 GPUs")
    scaling.add_arguments(parser)
    parser.set_defaults(func=scaling.main)


def _add_bench_step(bench: argparse._SubParsersAction) -> None:
    from aol_dist.bench import step as bench_step

    step = bench.add_parser("step", help="seconds per step of plain, reference, fast, fast_autograd, partial; ratios to plain")
    bench_step.add_arguments(step)
    step.set_defaults(func=bench_step.main)


def main(argv: list[str] | None = None) -> int:
    from aol_dist.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # a full disk, a permission, a run of another version, shards that do not fit (another conversion's,
    # a bad sample), whatever a command did not answer itself: one line naming the file (aol_dist/errors.py)
    except UserError as e:
        print(f"aol {args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output folder that cannot be made, an input that is not there: the path, the cause
        print(f"aol {args.command}: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

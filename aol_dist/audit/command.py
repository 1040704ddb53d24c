"""``aol audit RUN --split NAME``: which labels are wrong, how good each label set is, what to believe.

Runs in one process or under ``accelerate launch``: each rank scores its own share of the split (every
sample exactly once, as in evaluation), rank 0 gathers the rows and writes the files. Every input is
checked before any work.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aol_dist.errors import UserError

if TYPE_CHECKING:
    from aol_dist.finished_run import FinishedRun

OUTPUTS = """\
files written to --out (default: RUN/audit):
  audit_<split>.csv.gz          one row per sample, most suspect first (--rank-by: expected_wrong, or Phi =
                                CE - H of paper 003 Eq. 2-4): rank, key, the study ids, phi, expected_wrong
                                (sum of |label - consensus|), confidence (C(x) over the labels
                                the model contradicts), uncertainty (U(x), Monte-Carlo batch norm, paper
                                004), wrong_labels (splits with truth), suspects (up to 3 entries
                                finding:label_set=label), and for the top suspect its finding, label set,
                                label, the model's probability, the consensus and the trust weight
  consensus_<split>.csv.gz      the label to believe per sample and finding: key, ids, one column per
                                finding (1 present, 0 absent, in between the posterior or 0.5 for a tied
                                vote); multi-class data adds the class
  label_quality_<split>.json    per label set and finding: sensitivity, specificity, accuracy against the
                                truth where the split has it, else against the consensus ("reference"
                                says which); the agreement matrix; the trust weights where the run has them
  label_quality_<split>.png     the same as heat maps
  relabel_<split>.json / .png   splits with truth: share of the wrong labels found against the share of
                                samples relabelled, ranking by phi, expected_wrong, confidence,
                                uncertainty, random and the oracle; found_at_10pct and area per ranking
"""


RANKINGS = {"phi": "phi", "expected_wrong": "expected_wrong"}
"""``--rank-by``: the audit CSV's order (the rows' column holding the score)."""


class AuditError(UserError, ValueError):
    """Bad input to the audit: named before any work."""


def check_inputs(run: Path, split: str, shards: str | None, mc_samples: int) -> FinishedRun:
    """Every bad input as an :class:`AuditError` naming the file or the value (the run against the shards:
    :func:`aol_dist.finished_run.open_finished_run`, as ``aol eval``; then the training shards that
    Monte-Carlo batch norm draws from)."""
    from aol_dist.finished_run import RunInputError, open_finished_run

    if mc_samples < 1:
        raise AuditError(f"--mc-samples must be >= 1 (the Monte-Carlo batch-norm passes T), got {mc_samples}")
    try:
        found = open_finished_run(run, shards, [split], all_label_sets=True)
    except RunInputError as e:
        raise AuditError(str(e)) from None
    config, train_manifest = found.config, found.train_manifest
    if train_manifest is None:  # read again only to name why it cannot be read
        from aol_dist.data.shards import ShardError, read_manifest

        try:
            train_manifest = read_manifest(config.data.shards)
        except (OSError, ValueError, ShardError) as e:
            raise AuditError(f"{config.data.shards}: the run's training shards (Monte-Carlo batch norm draws its "
                             f"batches from them) cannot be read ({e}); run the audit from the directory the run "
                             f"was trained in") from None
    if config.data.train_split not in train_manifest["splits"]:
        raise AuditError(f"{config.data.shards}: no training split {config.data.train_split!r} for Monte-Carlo batch norm")
    return found


def mc_batches(config: Any, samples: int, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """T random training mini-batches (batch size of the run), the same on every rank for one seed."""
    from aol_dist.data.shards import label_shape, read_manifest, split_shards
    from aol_dist.data.stream import TrainStream, to_device
    from aol_dist.parts import resolve_label_sets

    manifest = read_manifest(config.data.shards)
    _, index = resolve_label_sets(config, manifest)
    stream = TrainStream(split_shards(config.data.shards, manifest, config.data.train_split), 0, 1,
                         config.data.batch_size, seed, config.data.shuffle_buffer, 1, index,
                         label_shape=label_shape(manifest))
    out: list[dict[str, Any]] = []
    epoch = 0
    while len(out) < samples:
        stream.set_epoch(epoch)
        for batch in stream.iter_worker(0, 1):
            out.append(to_device(batch, device))
            if len(out) == samples:
                break
        epoch += 1
    return out


def score_split(parts: Any, config: Any, stream: Any, mc: Any, world: Any) -> dict[str, Any]:
    """This rank's rows: arrays over its samples (global index order within the rank)."""
    from aol_dist.audit.consensus import consensus
    from aol_dist.audit.scores import audit_scores, expected_wrong
    from aol_dist.data.stream import to_device

    multiclass = parts.label_kind == "multiclass"
    squash = (lambda z: torch.softmax(z, -1)) if multiclass else torch.sigmoid
    cols: dict[str, list[Any]] = {k: [] for k in ("key", "ids", "labels", "truth", "p", "consensus", "weights",
                                                  "phi", "phi_entry", "confidence", "uncertainty",
                                                  "contradiction", "uncertainty_score", "expected_wrong")}
    parts.model.eval()
    parts.attention.eval()  # the regime network's batch norm: its running statistics, as the model's
    for raw in stream:
        batch = to_device(raw, world.device)
        with torch.no_grad():
            p = squash(parts.predict(batch).float())
        mc_p = squash(mc.predict(batch))
        agreed, weights = consensus(parts, config.method, batch)
        s = audit_scores(p, mc_p, batch["labels"], multiclass)
        cols["key"] += list(raw["key"])
        cols["ids"] += raw.get("ids", [{}] * len(raw["key"]))
        for name, value in (("labels", raw["labels"]), ("truth", raw.get("truth")), ("p", p),
                            ("consensus", agreed), ("weights", weights), ("phi", s.phi), ("phi_entry", s.phi_entry),
                            ("confidence", s.confidence), ("uncertainty", s.uncertainty),
                            ("contradiction", s.contradiction), ("uncertainty_score", s.uncertainty_score),
                            ("expected_wrong", expected_wrong(agreed, batch["labels"], multiclass))):
            if value is not None:
                cols[name].append(value.detach().float().cpu().numpy() if value.dtype != torch.uint8 else value.numpy())
    out = {k: (np.concatenate(v) if v and isinstance(v[0], np.ndarray) else v) for k, v in cols.items()}
    n = len(out["key"])
    out["index"] = world.rank + world.world_size * np.arange(n)  # EvalStream: rank r holds samples i = r mod W
    return out


def gather(local: dict[str, Any], world: Any) -> dict[str, Any] | None:
    """Rank 0: every rank's rows merged in split order (each sample once); other ranks: None."""
    from aol_dist import dist

    parts = dist.all_gather_object(local, world)
    if not world.is_main:
        return None
    merged: dict[str, Any] = {}
    for k in local:
        values = [p[k] for p in parts]
        if isinstance(values[0], np.ndarray):
            merged[k] = np.concatenate(values)
        else:
            merged[k] = [x for v in values for x in v]
    order = np.argsort(merged["index"], kind="stable")
    if len(np.unique(merged["index"])) != len(order):
        raise RuntimeError("audit: a sample was scored twice across ranks")
    return {k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order] if v else v)  # [] = none (no truth)
            for k, v in merged.items()}


def _csv_gz(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    import csv
    import io

    from aol_dist.writes import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, gzip.compress(buf.getvalue().encode("utf-8"), mtime=0))
    return path


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def write_outputs(out: Path, split: str, rows: dict[str, Any], label_sets: list[str], findings: list[str],
                  multiclass: bool, source: str, trust_training: dict[str, Any] | None, seed: int,
                  rank_by: str = "expected_wrong") -> dict[str, Any]:
    """Write the files (see :data:`OUTPUTS`); returns the summary (paths, top suspects, relabelling)."""
    from aol_dist.audit import plots
    from aol_dist.audit.quality import label_quality, relabel_summary, wrong_labels
    from aol_dist.audit.scores import wrong_entries
    from aol_dist.writes import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    n = len(rows["key"])
    id_keys = sorted({k for ids in rows["ids"] for k in ids})
    has_truth = isinstance(rows["truth"], np.ndarray) and len(rows["truth"]) == n
    wrong = wrong_labels(rows["labels"], rows["truth"], multiclass) if has_truth else None
    entry = (rows["phi_entry"] if rank_by == "phi" else  # (S, M, N'): the suspects, scored as the ranking scores
             wrong_entries(torch.from_numpy(rows["consensus"]), torch.from_numpy(rows["labels"]), multiclass).numpy())
    flat = entry.reshape(n, -1)
    width = entry.shape[2]
    order = np.argsort(-rows[RANKINGS[rank_by]], kind="stable")
    weights = rows["weights"] if isinstance(rows["weights"], np.ndarray) else None

    def describe(i: int, j: int) -> tuple[str, str, str, int]:
        m, f = divmod(j, width)
        if multiclass:
            k = int(rows["labels"][i, m].argmax())
            return findings[k], label_sets[m], findings[k], k
        return findings[f], label_sets[m], str(int(rows["labels"][i, m, f])), f

    header = ["rank", "key", *id_keys, "phi", "expected_wrong", "confidence", "uncertainty", *(["wrong_labels"] if has_truth else []),
              "suspects", "top_finding", "top_label_set", "top_label", "model_p", "consensus",
              *(["trust"] if weights is not None else [])]
    audit_rows, top = [], []
    for rank, i in enumerate(order, 1):
        ranked = np.argsort(-flat[i], kind="stable")
        suspects = []
        for j in ranked[:3]:
            if flat[i, j] <= (0 if rank_by == "phi" else 0.5) and suspects:  # phi > 0 / more likely wrong than right
                break
            finding, name, label, _ = describe(i, int(j))
            suspects.append(f"{finding}:{name}={label}")
        j = int(ranked[0])
        finding, name, label, f = describe(i, j)
        m = j // width
        row = [rank, rows["key"][i], *(rows["ids"][i].get(k, "") for k in id_keys), _fmt(float(rows["phi"][i])),
               _fmt(float(rows["expected_wrong"][i])),
               _fmt(float(rows["contradiction"][i])), _fmt(float(rows["uncertainty_score"][i])),
               *([int(wrong[i])] if has_truth else []), "; ".join(suspects), finding, name, label,
               _fmt(float(rows["p"][i, f])), _fmt(float(rows["consensus"][i, f]))]
        if weights is not None:
            row.append(_fmt(float(weights[i, m, min(f, weights.shape[2] - 1)])))
        audit_rows.append(row)
        if rank <= 10:
            top.append(dict(zip(header, row)))
    paths = {"audit": _csv_gz(out / f"audit_{split}.csv.gz", header, audit_rows)}
    cons_header = ["key", *id_keys, *findings, *(["class"] if multiclass else [])]
    cons_rows = [[rows["key"][i], *(rows["ids"][i].get(k, "") for k in id_keys),
                  *(f"{v:.3f}" for v in rows["consensus"][i]),
                  *([findings[int(rows["consensus"][i].argmax())]] if multiclass else [])] for i in range(n)]
    paths["consensus"] = _csv_gz(out / f"consensus_{split}.csv.gz", cons_header, cons_rows)

    if has_truth:
        reference, reference_name = rows["truth"], "truth"
    elif multiclass:
        reference = np.eye(len(findings))[rows["consensus"].argmax(-1)]
        reference_name = f"consensus ({source})"
    else:
        reference, reference_name = (rows["consensus"] > 0.5).astype(np.uint8), f"consensus ({source})"
    quality = {"split": split, "reference": reference_name, "consensus": source,
               **label_quality(rows["labels"], reference, label_sets, findings, multiclass)}
    if weights is not None:
        mean = weights.mean(0)  # (M, N'')
        quality["trust"] = {s: ({f: float(mean[m, k]) for k, f in enumerate(findings)} if mean.shape[1] > 1
                                else {"all": float(mean[m, 0])}) for m, s in enumerate(label_sets)}
    if trust_training:
        quality["trust_training"] = trust_training
    atomic_write_text(out / f"label_quality_{split}.json", json.dumps(quality, indent=1))
    paths["quality"] = out / f"label_quality_{split}.json"
    paths["quality_png"] = plots.quality_heatmap(quality, out / f"label_quality_{split}.png")
    summary: dict[str, Any] = {"split": split, "samples": n, "consensus": source, "reference": reference_name,
                               "rank_by": rank_by, "top": top}
    if has_truth:
        relabel = relabel_summary({"phi": rows["phi"], "expected_wrong": rows["expected_wrong"],
                                   "confidence": rows["contradiction"],
                                   "uncertainty": rows["uncertainty_score"]}, wrong, seed)
        relabel["definition"] = ("samples relabelled whole, in ranking order; a wrong label is a (label set, finding) "
                                 "entry that differs from the truth (multi-class: a set naming another class); "
                                 "found = share of all wrong labels lying in the relabelled samples")
        atomic_write_text(out / f"relabel_{split}.json", json.dumps(relabel, indent=1))
        paths["relabel"] = out / f"relabel_{split}.json"
        paths["relabel_png"] = plots.relabel_plot(relabel, out / f"relabel_{split}.png", split)
        summary["found_at_10pct"] = relabel["found_at_10pct"]
        summary["area"] = relabel["area"]
    summary["files"] = {k: str(v) for k, v in paths.items()}
    return summary


def run_audit(run: Path, split: str, shards: str | None = None, mc_samples: int = 10, out: Path | None = None,
              seed: int = 0, batch_size: int = 64, world: Any = None,
              rank_by: str = "expected_wrong") -> dict[str, Any] | None:
    """The audit of ``run`` on ``split``; rank 0 returns the summary, other ranks None."""
    from aol_dist import dist
    from aol_dist.audit.consensus import consensus_source
    from aol_dist.audit.mc_batchnorm import MCBatchNorm
    from aol_dist.checkpoint import load_weights
    from aol_dist.data.shards import label_shape, split_shards
    from aol_dist.data.stream import EvalStream
    from aol_dist.parts import build_parts
    from aol_dist.writes import output_dir

    run = Path(run)
    inputs = check_inputs(run, split, shards, mc_samples)
    out = output_dir(Path(out) if out else run / "audit")  # before the scoring, not after it
    world = world or dist.command_world()
    config = inputs.config
    parts = build_parts(config, {**inputs.manifest, "label_sets": inputs.label_sets}, world)
    load_weights(parts.model, inputs.checkpoint["model"], run / "model.pt", "model")
    if "attention" in inputs.checkpoint:
        load_weights(parts.attention, inputs.checkpoint["attention"], run / "model.pt", "attention")
    parts.model.eval()
    parts.attention.eval()  # the regime network's batch norm: its running statistics, as the model's
    mc = MCBatchNorm(parts.model, mc_batches(config, mc_samples, seed, world.device),
                     lambda model, batch: model(batch["image"], parts.text(batch)))
    stream = EvalStream(split_shards(inputs.shard_dir, inputs.manifest, split), world.rank, world.world_size,
                        batch_size, inputs.index, label_shape(inputs.manifest))
    rows = gather(score_split(parts, config, stream, mc, world), world)
    if rows is None:
        return None
    trust_training = None
    if (run / "attention.json").is_file():
        trust_training = json.loads((run / "attention.json").read_text()).get("per_finding")
    return write_outputs(out, split, rows, inputs.label_sets,
                         list(inputs.manifest["findings"]), parts.label_kind == "multiclass",
                         consensus_source(parts, config.method.name), trust_training, seed, rank_by)


def top_table(summary: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"label audit, {summary['split']}: the {len(summary['top'])} most suspect of "
                        f"{summary['samples']} samples by {summary['rank_by']} (consensus: {summary['consensus']})")
    for col in ("rank", "key", summary["rank_by"], "suspects", "model_p", "consensus", "wrong_labels"):
        if any(col in r for r in summary["top"]):
            table.add_column(col, justify="right" if col not in ("key", "suspects") else "left")
    cols = [c.header for c in table.columns]
    for r in summary["top"]:
        table.add_row(*(str(r.get(c, "")) for c in cols))
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = OUTPUTS
    parser.add_argument("run", help="finished run directory (config.toml, model.pt)")
    parser.add_argument("--split", required=True, help="shard split to audit (e.g. train: the labels you trained on)")
    parser.add_argument("--shards", help="shard directory (default: the run's data.shards)")
    parser.add_argument("--mc-samples", type=int, default=10,
                        help="T: Monte-Carlo batch-norm passes for C(x) and U(x), each with another random training batch")
    parser.add_argument("--out", help="output directory (default: RUN/audit)")
    parser.add_argument("--rank-by", choices=sorted(RANKINGS), default="expected_wrong",
                        help="order of the audit CSV: expected_wrong (default: the wrong labels a sample holds if the "
                             "consensus is right; found more wrong labels than phi in every run of docs/audit.md) or "
                             "phi (paper 003, Eq. 2)")
    parser.add_argument("--seed", type=int, default=0, help="picks the Monte-Carlo batches and the random ranking")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def main(args: argparse.Namespace) -> int:
    from aol_dist import dist

    world = dist.command_world()
    try:
        summary = run_audit(Path(args.run), args.split, args.shards, args.mc_samples, args.out, args.seed,
                            args.batch_size, world, args.rank_by)
    except AuditError as e:
        print(f"aol audit: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown(world)
    if summary is None:
        return 0
    if args.json:
        print(json.dumps(summary))
        return 0
    from aol_dist.report import make_console

    console = make_console()
    console.print(top_table(summary))
    if "found_at_10pct" in summary:
        found = summary["found_at_10pct"]
        console.print("wrong labels found by relabelling 10 % of the samples: " +
                      ", ".join(f"{k} {v:.1%}" for k, v in found.items()))
    console.print("files: " + ", ".join(summary["files"].values()))
    return 0

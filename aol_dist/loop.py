"""The training loop: build from config, run the steps, log, evaluate, write the run directory.

The run directory is written as ``<out_dir>/<name>.incomplete`` and renamed to ``<out_dir>/<name>``
only when the run has finished, so a directory under its final name is always a whole run.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from aol_dist import dist as D
from aol_dist.config import Config, git_revision, to_toml
from aol_dist.data.shards import atomic_write_text, read_manifest, split_shards
from aol_dist.data.stream import EvalStream, TrainStream, in_order, make_loader, to_device
from aol_dist.evaluate import auc_table, evaluate, write_results
from aol_dist.parts import Parts, build_parts, resolve_label_sets
from aol_dist.report import attention_table, make_console


def prepare_run_dir(config: Config, world: D.World) -> tuple[Path, Path]:
    """(working dir ``<name>.incomplete``, final dir), the same on every rank."""
    name = config.train.run_name or f"{config.method.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    name = D.broadcast_object(name, world)
    final = Path(config.train.out_dir) / name
    work = final.with_name(name + ".incomplete")
    if world.is_main:
        if final.exists():
            raise FileExistsError(f"run directory {final} exists; choose another train.run_name")
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "config.toml", to_toml(config, git_revision()))
    D.barrier(world)
    return work, final


class Log:
    """JSONL of every logged step (rank 0 writes; the values are already averaged over ranks)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.file = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def run_evaluation(parts: Parts, config: Config, manifest: dict[str, Any], world: D.World, run_dir: Path,
                   step: int, console: Any) -> dict[str, Any]:
    _, label_index = resolve_label_sets(config, manifest)
    results = {}
    for split in config.data.eval_splits:
        stream = EvalStream(split_shards(config.data.shards, manifest, split), world.rank, world.world_size,
                            config.train.eval_batch_size, label_index)
        result = evaluate(parts.model, make_loader(stream, 0), parts.label_sets, parts.findings, world,
                          predict=parts.predict)
        result["step"] = step
        results[split] = result
        if world.is_main:
            write_results(run_dir, split, result)
            if console is not None:
                console.print(auc_table(result, f"{split} @ step {step}"))
    return results


def train(config: Config, world: D.World) -> Path:
    """Train with ``config`` on this rank; returns the finished run directory."""
    manifest = read_manifest(config.data.shards)
    _, label_index = resolve_label_sets(config, manifest)
    parts = build_parts(config, manifest, world)
    stream = TrainStream(split_shards(config.data.shards, manifest, config.data.train_split), world.rank,
                         world.world_size, config.data.batch_size, config.train.seed, config.data.shuffle_buffer,
                         config.data.num_workers, label_index)
    loader = make_loader(stream, config.data.num_workers)
    work, final = prepare_run_dir(config, world)
    console = make_console() if world.is_main else None
    log = Log(work / "log.jsonl", world.is_main)
    trainable = parts.trainable()
    buffers = list(parts.model.buffers())
    average = lambda: D.average_gradients(trainable, world, buffers)  # noqa: E731

    m = len(parts.label_sets)
    weight_sum = torch.zeros(m, parts.attention.num_findings, dtype=torch.float64, device=world.device)
    window = {"loss": 0.0, "n": 0, "wait": 0.0, "weights": torch.zeros_like(weight_sum)}
    step, epoch, t_window = 0, 0, time.perf_counter()
    if console:
        console.print(f"[bold]{config.method.name}[/] on {manifest['dataset']} ({stream.total_samples} train samples, "
                      f"{stream.steps_per_epoch} steps/epoch), {world.world_size} rank(s), "
                      f"label sets {parts.label_sets}, run dir {work}")
    progress = _progress(console, config.train.steps)
    while step < config.train.steps:
        stream.set_epoch(epoch)
        t_wait = time.perf_counter()
        for raw in in_order(loader):
            window["wait"] += time.perf_counter() - t_wait
            batch = to_device(raw, world.device)
            out = parts.step(batch, average)
            step += 1
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"rank {world.rank}: loss {loss} at step {step} on samples {raw['key'][:8]}")
            window["loss"] += loss
            window["n"] += 1
            if "weights" in out:
                w = out["weights"].double().mean(0)  # (M, 1|N)
                window["weights"] += w.expand(m, parts.attention.num_findings)
            if step % config.train.log_every == 0 or step == config.train.steps:
                weight_sum += window["weights"]
                _log_window(log, window, step, epoch, parts, config, world, time.perf_counter() - t_window)
                window = {"loss": 0.0, "n": 0, "wait": 0.0, "weights": torch.zeros_like(weight_sum)}
                t_window = time.perf_counter()
            if progress:
                progress[0].update(progress[1], advance=1, description=f"step {step} loss {loss:.4f}")
            if config.train.eval_every and step % config.train.eval_every == 0 and step < config.train.steps:
                run_evaluation(parts, config, manifest, world, work, step, console)
            if step >= config.train.steps:
                break
            t_wait = time.perf_counter()
        epoch += 1
    if progress:
        progress[0].stop()
    log.close()

    run_evaluation(parts, config, manifest, world, work, step, console)
    D.all_reduce_sum(weight_sum, world)
    if world.is_main:
        attention = _write_attention(work, parts, weight_sum / (world.world_size * step), config)
        if attention:
            console.print(attention_table(attention))
        _save_model(work, parts, step)
        work.rename(final)
        console.print(f"run directory: {final}")
    D.barrier(world)
    return final


def _log_window(log: Log, window: dict[str, Any], step: int, epoch: int, parts: Parts, config: Config,
                world: D.World, seconds: float) -> None:
    stats = torch.tensor([window["loss"], window["n"], window["wait"]], dtype=torch.float64, device=world.device)
    weights = window["weights"].clone()
    D.all_reduce_sum(stats, world)
    D.all_reduce_sum(weights, world)
    n = stats[1].item()
    record = {
        "step": step, "epoch": epoch, "loss": stats[0].item() / n,
        "samples_per_s": n * config.data.batch_size / max(seconds, 1e-9),  # n counts steps of all ranks
        "data_wait_s": stats[2].item() / world.world_size,
        "lr": parts.optimizer.param_groups[0]["lr"],
    }
    if config.method.name == "aol":
        mean = (weights / n).mean(1)  # over findings
        record["attention"] = dict(zip(parts.label_sets, [round(v, 5) for v in mean.tolist()]))
    log.write(record)


def _write_attention(run_dir: Path, parts: Parts, mean_weights: torch.Tensor, config: Config) -> dict[str, Any] | None:
    """Mean learned attention weight per label set (and per finding) over training: who to believe."""
    if config.method.name != "aol":
        return None
    w = mean_weights.cpu()
    record = {"label_sets": parts.label_sets, "mean": dict(zip(parts.label_sets, w.mean(1).tolist()))}
    if config.method.attention == "per_finding":
        record["per_finding"] = {f: dict(zip(parts.label_sets, w[:, j].tolist())) for j, f in enumerate(parts.findings)}
    atomic_write_text(run_dir / "attention.json", json.dumps(record, indent=1))
    return record


def _save_model(run_dir: Path, parts: Parts, step: int) -> None:
    tmp = run_dir / ".model.pt.tmp"
    torch.save({"step": step, "model": parts.model.state_dict(), "attention": parts.attention.state_dict(),
                "label_sets": parts.label_sets, "findings": parts.findings}, tmp)
    tmp.rename(run_dir / "model.pt")


def _progress(console: Any, total: int):
    if console is None or not console.is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                 TimeRemainingColumn(), console=console)
    p.start()
    return p, p.add_task("training", total=total)

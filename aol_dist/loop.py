"""The training loop: build from config, run the steps, log, checkpoint, evaluate, write the run directory.

The run directory is written as ``<out_dir>/<name>.incomplete`` and renamed to ``<out_dir>/<name>``
only when the run has finished, so a directory under its final name is always a whole run.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from aol_dist import checkpoint
from aol_dist import dist as D
from aol_dist.config import Config
from aol_dist.data.convert.tokenize import check_tokenizer
from aol_dist.data.gold import load_gold
from aol_dist.data.shards import label_shape, read_manifest, split_shards
from aol_dist.writes import atomic_write_text
from aol_dist.data.stream import EvalStream, TrainStream, in_order, make_loader, to_device
from aol_dist.evaluate import evaluate, write_results
from aol_dist.faults import StepGuard
from aol_dist.method import diagnostics
from aol_dist.parts import Parts, build_parts, resolve_label_sets
from aol_dist.report import attention_table, auc_table, make_console
from aol_dist.zero import maybe_deepspeed

ROC_THRESHOLDS = 200
TRUST_FROM = 0.5
"""attention.json reports the weights (and estimated accuracies) averaged over the steps after this fraction of
``train.steps``: the trust the run settled on, not the start it moved away from (docs/quality.md, "Third pass:
the trust a run reports")."""


class Log:
    """JSONL of every logged step (rank 0 writes; the values are already averaged over ranks), and the
    same scalars to TensorBoard with ``train.tensorboard``."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, resumed_at: int = 0,
                 console: Any = None) -> None:
        self.file = open(run_dir / "log.jsonl", "a") if enabled else None
        self.tensorboard = _tensorboard_writer(run_dir, resumed_at, console) if enabled and tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard:
            for key, value in record.items():
                if isinstance(value, dict):
                    for name, v in value.items():
                        self.tensorboard.add_scalar(f"{key}/{name}", v, record["step"])
                elif isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()


def _tensorboard_writer(run_dir: Path, resumed_at: int, console: Any):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if console is not None:
            console.print("[yellow]train.tensorboard = true, but the tensorboard package is not installed "
                          "(pip install tensorboard): logging to log.jsonl only[/]")
        return None
    # purge_step drops events a killed run wrote after the checkpoint this run resumes from
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)


class LoopState:
    """The loop's counters and running sums on one rank: with the RNG states, what a checkpoint needs so
    that a resumed run logs the same numbers as an uninterrupted one."""

    def __init__(self, num_sets: int, num_findings: int, device: torch.device) -> None:
        self.step, self.skipped = 0, 0
        self.weight_sum = torch.zeros(num_sets, num_findings, dtype=torch.float64, device=device)
        """Per label set and finding, the weights summed over the steps of the reported stretch (TRUST_FROM)."""
        self.right_sum = torch.zeros_like(self.weight_sum)
        """The same for P(t = y_m | x, Y) (likelihood-trained trust): each set's estimated accuracy."""
        self.reported_steps, self.reported_from = 0, 0
        self.truth_hits = torch.zeros(num_sets + 1, num_findings, dtype=torch.float64, device=device)
        """Per label set and finding, training entries that match the truth (where the split has it); last row: count."""
        self.diag_width = len(diagnostics.SCALARS) + num_sets
        self.new_window()

    def new_window(self) -> None:
        zeros = torch.zeros(self.diag_width, dtype=torch.float64, device=self.weight_sum.device)
        self.window = {"loss": 0.0, "n": 0, "wait": 0.0, "skipped": 0, "weights": torch.zeros_like(self.weight_sum),
                       "right": torch.zeros_like(self.weight_sum), "diag": zeros, "diag_n": zeros.clone()}

    def add(self, out: dict[str, torch.Tensor], applied: bool, diag: torch.Tensor | None = None,
            labels: torch.Tensor | None = None, truth: torch.Tensor | None = None, reported: bool = False) -> None:
        """Count one step: its loss, attention weights and diagnostics, and (multi-label data with truth) the
        label sets' entries that match the truth; or a skip (nan_policy = skip). ``reported``: the step is in
        the stretch whose weights (and, with ``out["right"]``, estimated accuracies) attention.json reports."""
        if not applied:
            self.skipped += 1
            self.window["skipped"] += 1
            return
        self.window["loss"] += float(out["loss"])
        self.window["n"] += 1
        if "weights" in out:
            weights = out["weights"].double().mean(0).expand_as(self.weight_sum)  # (M, 1|N)
            self.window["weights"] += weights
            right = out["right"].double().mean(0).expand_as(self.right_sum) if "right" in out else None
            if right is not None:
                self.window["right"] += right
            if reported:
                self.weight_sum += weights
                self.reported_from = self.reported_from or self.step
                self.reported_steps += 1
                if right is not None:
                    self.right_sum += right
        if truth is not None:  # how accurate each label set really is, for the trust table
            self.truth_hits[:-1] += (labels == truth.unsqueeze(1)).double().sum(0)
            self.truth_hits[-1] += truth.shape[0]
        if diag is not None:
            ok = torch.isfinite(diag)
            self.window["diag"] += torch.where(ok, diag, 0).double()
            self.window["diag_n"] += ok.double()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "weight_sum": self.weight_sum, "window": dict(self.window),
                "truth_hits": self.truth_hits, "right_sum": self.right_sum, "reported_steps": self.reported_steps,
                "reported_from": self.reported_from}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.skipped = state["step"], state["skipped"]
        self.truth_hits = state.get("truth_hits", self.truth_hits)
        if "reported_steps" in state:  # older checkpoints summed the weights over every step: not carried on
            self.weight_sum, self.right_sum = state["weight_sum"], state["right_sum"]
            self.reported_steps, self.reported_from = state["reported_steps"], state["reported_from"]
        self.window = dict(state["window"])
        self.window.setdefault("right", torch.zeros_like(self.weight_sum))  # checkpoints before it was logged


def run_evaluation(parts: Parts, config: Config, manifest: dict[str, Any], world: D.World, run_dir: Path,
                   step: int, console: Any) -> dict[str, Any]:
    _, label_index = resolve_label_sets(config, manifest)
    results = {}
    for split in config.data.eval_splits:
        stream = EvalStream(split_shards(config.data.shards, manifest, split), world.rank, world.world_size,
                            config.train.eval_batch_size, label_index, label_shape(manifest))
        result = evaluate(parts.model, make_loader(stream, 0), parts.label_sets, parts.findings, world,
                          predict=parts.predict, roc_thresholds=ROC_THRESHOLDS if config.train.plots else 0,
                          label_kind=parts.label_kind)
        result["step"] = step
        roc = result.pop("roc", None)
        results[split] = result
        if world.is_main:
            write_results(run_dir, split, result)
            if roc is not None:
                atomic_write_text(run_dir / f"roc_{split}.json", json.dumps({"step": step, "roc": roc}))
            if console is not None:
                console.print(auc_table(result, f"{split} @ step {step}"))
    return results


def train(config: Config, world: D.World) -> Path:
    """Train with ``config`` on this rank; returns the finished run directory."""
    tc = config.train
    manifest = read_manifest(config.data.shards)
    check_tokenizer(manifest, config.model.text_encoder, where=str(config.data.shards))  # before any work
    _, label_index = resolve_label_sets(config, manifest)
    for split in (config.data.train_split, *config.data.eval_splits):  # every split the run needs, before any step
        split_shards(config.data.shards, manifest, split)
    parts = build_parts(config, manifest, world)
    engine = maybe_deepspeed(parts, config, world)  # DeepSpeed launch configs: ZeRO owns the update
    if engine is None and world.distributed:  # every other launch: DDP averages the gradients in backward
        parts.forward = D.data_parallel(parts.trained(), world, tc.grad_compression, tc.ddp_fixed_buckets)
    optimizers = {} if engine else _optimizers(parts)
    shards = split_shards(config.data.shards, manifest, config.data.train_split)
    stream = TrainStream(shards, world.rank, world.world_size, config.data.batch_size, tc.seed,
                         config.data.shuffle_buffer, config.data.num_workers, label_index,
                         label_shape=label_shape(manifest))
    loader = make_loader(stream, config.data.num_workers)
    gold = (load_gold(config.data.shards, manifest, config.data.gold_split, label_index, config.data.gold_samples)
            if config.data.gold_split else None)
    run = checkpoint.open_run_dir(config, world)
    if run.finished:
        return run.final
    work = run.work
    console = make_console() if world.is_main else None
    state = LoopState(len(parts.label_sets), parts.attention.num_findings, world.device)
    shard_ids = [(Path(path).name, n) for path, n in shards]
    pending_rng = None
    if run.resume_from is not None:
        pending_rng = _resume(run.resume_from, parts, engine, optimizers, config, world, shard_ids, state)
    log = Log(work, world.is_main, tc.tensorboard, state.step, console)
    autocast = step_autocast(tc.precision, world.device)
    multiclass = parts.label_kind == "multiclass"
    # batch-norm statistics of every network on the image: the classifier's and the regime network's
    buffers = list(parts.model.buffers()) + list(parts.attention.buffers())
    guard = StepGuard(parts.trainable(), buffers, world, tc.nan_policy, tc.max_skipped_steps, tc.debug_fault)
    if console:
        console.print(f"[bold]{config.method.name}[/] on {manifest['dataset']} ({stream.total_samples} train samples, "
                      f"{stream.steps_per_epoch} steps/epoch), {world.world_size} rank(s), "
                      f"label sets {parts.label_sets}, run dir {work}"
                      + (f", {len(gold)} hand-labelled studies of split {gold.split!r} fit the trust" if gold is not None else "")
                      + (f", resumed at step {state.step}" if state.step else ""))
        if gold is not None and gold.split in config.data.eval_splits:
            console.print(f"[yellow]data.gold_split {gold.split!r} is also in data.eval_splits: its studies' truth "
                          f"fits the trust, so its results are not on unseen studies (give the hand-labelled "
                          f"studies for the trust a split of their own)[/]")
    progress = _progress(console, tc.steps, state.step)
    t_window, speed = time.perf_counter(), 0.0
    reported_after = int(TRUST_FROM * tc.steps)
    while state.step < tc.steps:
        epoch, start = divmod(state.step, stream.steps_per_epoch)  # the reader cursor
        stream.set_epoch(epoch, start)
        batches = iter(loader)
        if pending_rng is not None:  # restored after the loader drew its seed, as at this point of the first run
            checkpoint.set_rng_state(pending_rng, world.device)
            pending_rng = None
        t_wait = time.perf_counter()
        for raw in in_order(batches, start):
            state.window["wait"] += time.perf_counter() - t_wait
            batch = to_device(raw, world.device)
            if gold is not None:  # drawn from (seed, step, rank) alone: a resumed run draws the same
                batch["gold"] = to_device(gold.draw(tc.seed, state.step + 1, world.rank, config.data.batch_size),
                                          world.device)
            guard.before(batch, state.step + 1)
            with autocast:
                out = parts.step(batch, guard)
            state.step += 1
            truth = batch.get("truth")
            state.add(out, guard.after(out, raw["key"]),
                      diagnostics.step_diagnostics(out, batch["labels"], truth, multiclass),
                      batch["labels"], None if multiclass else truth, reported=state.step > reported_after)
            step = state.step
            if step % tc.log_every == 0 or step == tc.steps:
                speed = _log_window(log, state, epoch, parts, config, world, time.perf_counter() - t_window)
                state.new_window()
                t_window = time.perf_counter()
            if progress:
                progress[0].update(progress[1], advance=1,
                                   description=f"step {step} loss {float(out['loss']):.4f} {speed:.0f} samples/s")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                run_evaluation(parts, config, manifest, world, work, step, console)
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.steps:
                write_zero = (lambda tmp: engine.save_checkpoint(str(tmp / "deepspeed"), tag="zero")) if engine else None
                checkpoint.save(work, step, parts.modules(), optimizers, config, world, divmod(step, stream.steps_per_epoch),
                                shard_ids, {"loop": state.state_dict()}, write_zero)
            if step >= tc.steps:
                break
            t_wait = time.perf_counter()
    if progress:
        progress[0].stop()
    log.close()
    return _finish(config, parts, manifest, world, run, state, console)


def _finish(config: Config, parts: Parts, manifest: dict[str, Any], world: D.World, run: checkpoint.RunDir,
            state: LoopState, console: Any) -> Path:
    """Final evaluation, attention summary, model, plots; then the run directory gets its final name."""
    work = run.work
    run_evaluation(parts, config, manifest, world, work, state.step, console)
    for total in (state.weight_sum, state.right_sum, state.truth_hits):
        D.all_reduce_sum(total, world)
    if world.is_main:
        reported = max(1, state.reported_steps) * world.world_size
        attention = _write_attention(work, parts, state.weight_sum / reported, config, state.truth_hits,
                                     state.right_sum / reported if state.right_sum.any() else None,
                                     (state.reported_from, state.step))
        if attention:
            console.print(attention_table(attention))
        if state.skipped:
            console.print(f"[yellow]{state.skipped} step(s) skipped for non-finite values (nan_policy = skip)[/]")
        _save_model(work, parts, state.step)
        if config.train.plots:
            _write_plots(work, console)
        work.rename(run.final)
        console.print(f"run directory: {run.final}")
    D.barrier(world)
    return run.final


def _resume(path: Path, parts: Parts, engine: Any, optimizers: dict[str, torch.optim.Optimizer], config: Config,
            world: D.World, shard_ids: list[tuple[str, int]], state: LoopState) -> dict[str, Any]:
    """Load checkpoint ``path`` into the parts (and a DeepSpeed engine) and the loop state; returns the
    RNG states to restore once the reader has started."""
    _, mine = checkpoint.load(path, parts.modules(), optimizers, config, world, shard_ids)
    if engine is not None:  # ZeRO's partitioned optimizer state, one file per rank
        engine.load_checkpoint(str(path / "deepspeed"), tag="zero", load_module_strict=True)
    state.load_state_dict(mine["loop"])
    return mine["rng"]


def _optimizers(parts: Parts) -> dict[str, torch.optim.Optimizer]:
    return {"optimizer": parts.optimizer, "attention_optimizer": parts.attention_optimizer}


def _write_plots(run_dir: Path, console: Any) -> None:
    from aol_dist import plots

    try:
        written = plots.write_plots(run_dir)
    except Exception as e:  # noqa: BLE001 - a plotting bug must not cost the finished run its final name
        console.print(f"[yellow]plots failed ({type(e).__name__}: {e}); the run is complete without them[/]")
        return
    console.print(f"plots: {', '.join(p.name for p in written)}")


def _log_window(log: Log, state: LoopState, epoch: int, parts: Parts, config: Config, world: D.World,
                seconds: float) -> float:
    """Write one JSONL record for the steps since the last one (means over ranks); returns samples/s."""
    window = state.window
    stats = torch.tensor([window["loss"], window["n"], window["wait"], window["n"] + window["skipped"]],
                         dtype=torch.float64, device=world.device)
    weights, diag, diag_n = window["weights"].clone(), window["diag"].clone(), window["diag_n"].clone()
    right = window["right"].clone()
    D.all_reduce_sum(stats, world)
    D.all_reduce_sum(weights, world)
    D.all_reduce_sum(right, world)
    D.all_reduce_sum(diag, world)
    D.all_reduce_sum(diag_n, world)
    n, steps = stats[1].item(), stats[3].item()  # summed over ranks
    speed = steps * config.data.batch_size / max(seconds, 1e-9)
    record = {
        "step": state.step, "epoch": epoch, "loss": stats[0].item() / n if n else None,
        "samples_per_s": speed,
        "data_wait_s": stats[2].item() / world.world_size,
        "step_time_s": seconds * world.world_size / max(steps, 1),
        "lr": parts.optimizer.param_groups[0]["lr"],
        "attention_lr": parts.attention_optimizer.param_groups[0]["lr"],
        "skipped_steps": state.skipped,
        "world_size": world.world_size,
    }
    if config.method.name == "aol" and n:
        mean = (weights / n).mean(1)  # over findings
        record["attention"] = dict(zip(parts.label_sets, [round(v, 5) for v in mean.tolist()]))
        if right.any():  # likelihood-trained trust: each set's estimated accuracy, mean over findings
            estimate = (right / n).mean(1)
            record["estimated_accuracy"] = dict(zip(parts.label_sets, [round(v, 5) for v in estimate.tolist()]))
    if diag_n.sum() > 0:
        record["diagnostics"] = diagnostics.summarise(diag, diag_n, parts.label_sets)
    log.write(record)
    return speed


def _write_attention(run_dir: Path, parts: Parts, mean_weights: torch.Tensor, config: Config,
                     truth_hits: torch.Tensor, estimated_accuracy: torch.Tensor | None,
                     steps: tuple[int, int]) -> dict[str, Any] | None:
    """Who to believe: the mean learned weight per label set (and per finding) over ``steps`` (the second
    half of training); with the likelihood-trained trust, each set's estimated accuracy per finding too."""
    if config.method.name != "aol":
        return None
    w = mean_weights.cpu()

    def per_finding(values: torch.Tensor) -> dict[str, dict[str, float]]:
        return {f: dict(zip(parts.label_sets, values[:, j].tolist())) for j, f in enumerate(parts.findings)}

    record = {"label_sets": parts.label_sets, "trust": config.method.trust, "steps": list(steps),
              "mean": dict(zip(parts.label_sets, w.mean(1).tolist())), "per_finding": per_finding(w)}
    if estimated_accuracy is not None:  # E[P(t = y_m | x, Y)] over the same steps (trust.set_right)
        record["estimated_accuracy"] = per_finding(estimated_accuracy.cpu().expand_as(w))
    if truth_hits[-1].min() > 0:  # the training split has truth: how accurate each set was on what we trained on
        acc = (truth_hits[:-1] / truth_hits[-1]).cpu()
        record["accuracy_vs_truth"] = per_finding(acc)
    atomic_write_text(run_dir / "attention.json", json.dumps(record, indent=1))
    return record


def step_autocast(precision: str, device: torch.device):
    """bf16 autocast for the training step where asked ("auto": on CUDA only); parameters, optimizer
    states and the gradient all-reduce stay float32, autocast only lowers the matmuls and convolutions."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save_model(run_dir: Path, parts: Parts, step: int) -> None:
    tmp = run_dir / ".model.pt.tmp"
    modules = {name: module.state_dict() for name, module in parts.modules().items()}  # model, attention[, cm]
    torch.save({"step": step, **modules, "label_sets": parts.label_sets, "findings": parts.findings}, tmp)
    tmp.rename(run_dir / "model.pt")


def _progress(console: Any, total: int, done: int = 0):
    """Rich progress bar (step, loss, samples/s, ETA) on rank 0 when writing to a terminal."""
    if console is None or not console.is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                 TimeRemainingColumn(), console=console)
    p.start()
    return p, p.add_task("training", total=total, completed=done)

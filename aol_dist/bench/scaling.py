"""``aol bench scaling``: the training step at 1 and 2 gloo processes here, and a projection to 8-64 GPUs.

Measured, in spawned gloo processes on the CPU (one thread each), on synthetic in-memory batches, with the
step the trainer builds (``parts.build_parts`` from the default config plus ``--arch``/``--batch`` and
any ``--set`` overrides; ``dist.data_parallel`` and ``faults.StepGuard`` as ``loop.train`` uses them).
Per round, every rank runs, after a barrier each:

- ``compute``: the step with no communication at all (local forward, no gradient averaging);
- ``flat``: the same step, its gradients all-reduced after the backward in one flat call (the former
  ``average_gradients``), then the batch-norm statistics (``dist.average_statistics``);
- ``ddp``: the trainer's step: DDP's bucketed all-reduce during the backward, then the statistics;
- ``allreduce``: one all-reduce of a float32 buffer of the gradient bytes, alone;
- ``stats``: the batch-norm statistics' all-reduce, alone.

Each figure is the median over rounds of the slowest rank's time. Exposed communication = a step's time
minus the ``compute`` step's in the same round (median over rounds); the share DDP hides =
1 - exposed(ddp) / exposed(flat).

Projected (``aol_dist.bench.ring``): ResNet-50's gradient bytes (computed from the model the trainer
builds, batch ``--gpu-batch``) through the ring all-reduce cost model, with a GPU step time that is an
input (``--gpu-step-s``, default the H100's ``fast`` step of docs/performance.md), not measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from aol_dist.bench import ring

GPU_STEP_S = 0.0742
"""``fast`` step of ``aol bench step``, ResNet-50 at 256 x 256, batch 32, bf16, one H100 (docs/performance.md)."""
GPU_BACKWARD_S = 0.0109
"""The outer backward pass in which DDP overlaps the all-reduce: two thirds of the H100's plain step
(0.0163 s, docs/performance.md), as a backward costs about twice a forward. An assumption, not measured."""


def trainer_parts(arch: str, batch: int, overrides: list[str], world: Any):
    """The parts ``loop.train`` builds from the default config with these overrides, for synthetic data of the
    built-in dataset's findings and label sets."""
    from aol_dist.config import load_config
    from aol_dist.data.findings import FINDINGS, LABEL_SETS
    from aol_dist.parts import build_parts

    config = load_config(None, [f"model.arch={arch}", f"data.batch_size={batch}", *overrides])
    manifest = {"findings": list(FINDINGS), "label_sets": list(LABEL_SETS), "label_kind": "multilabel"}
    return config, build_parts(config, manifest, world)


def gradient_bytes(parts: Any) -> int:
    """Bytes DDP all-reduces per step: every trained parameter's size x element size (``Parts.trained``)."""
    return sum(p.numel() * p.element_size() for m in parts.trained().values() for p in m.parameters()
               if p.requires_grad)


def statistics_buffers(parts: Any) -> list[torch.Tensor]:
    """The batch-norm statistics ``loop.train`` averages after every step."""
    return [b for b in list(parts.model.buffers()) + list(parts.attention.buffers()) if b.is_floating_point()]


def synthetic_batch(parts: Any, batch: int, size: int, seed: int) -> dict[str, Any]:
    """Images in [0, 1] and 0/1 labels, the shapes ``data.stream.to_device`` gives the step."""
    g = torch.Generator().manual_seed(seed)
    m, n = len(parts.label_sets), len(parts.findings)
    truth = torch.randint(0, 2, (batch, n), generator=g).float()
    return {"image": torch.rand(batch, 1, size, size, generator=g), "truth": truth,
            "labels": torch.randint(0, 2, (batch, m, n), generator=g).float(),
            "key": [f"bench-{i}" for i in range(batch)]}


def _flat_average(params: list[torch.nn.Parameter], buffers: list[torch.Tensor], world: Any) -> Callable[[], bool]:
    """The hand-written averaging DDP replaced: after the backward, every gradient into one flat buffer,
    one all-reduce, copied back; then the statistics."""
    import torch.distributed as dist

    from aol_dist import dist as D

    def average() -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return D.average_statistics(buffers, world)
    return average


def measure_rank(rank: int, world_size: int, opts: dict[str, Any], out: str) -> None:
    """One rank's measurements (module docstring); rank 0 writes the medians as JSON to ``out``."""
    import torch.distributed as dist

    from aol_dist import dist as D
    from aol_dist.faults import StepGuard
    from aol_dist.loop import step_autocast

    world = D.world_from_process_group()
    config, local = trainer_parts(opts["arch"], opts["batch"], opts["overrides"], world)
    batch = synthetic_batch(local, opts["batch"], opts["size"], seed=rank)
    autocast = step_autocast(config.train.precision, world.device)
    nbytes = gradient_bytes(local)
    buffers = statistics_buffers(local)
    steps: dict[str, Callable[[], Any]] = {"compute": lambda: local.step(batch, lambda: None)}
    extra: dict[str, Any] = {}  # what DDP itself reports (2+ processes)
    if world.distributed:
        _, wrapped = trainer_parts(opts["arch"], opts["batch"], opts["overrides"], world)
        ddp = D.data_parallel(wrapped.trained(), world, opts["compression"])
        wrapped.forward = ddp
        guard = StepGuard(wrapped.trainable(), statistics_buffers(wrapped), world, "stop", 1)
        flat = _flat_average([p for m in local.trained().values() for p in m.parameters()], buffers, world)
        buffer = torch.zeros(nbytes // 4)  # float32, like the gradients
        spare = [b.clone() for b in buffers]
        steps.update(flat=lambda: local.step(batch, flat), ddp=lambda: wrapped.step(batch, guard),
                     allreduce=lambda: dist.all_reduce(buffer), stats=lambda: D.average_statistics(spare, world))
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(opts["warmup"] + opts["rounds"]):
        for name, fn in steps.items():
            D.barrier(world)
            t0 = time.perf_counter()
            with autocast:
                fn()
            if r >= opts["warmup"]:
                times[name].append(time.perf_counter() - t0)
    if world.distributed:
        logged = ddp._get_ddp_logging_data()
        # after its first iteration DDP re-buckets in the order the gradients arrived (25 MiB caps)
        sizes = str(logged.get("rebuilt_bucket_sizes", logged["bucket_sizes"]))
        extra = {"ddp_bytes": int(logged["total_parameter_size_bytes"]),
                 "ddp_bucket_bytes": [int(v) for v in sizes.split(",") if v.strip()]}
    every = D.all_gather_object(times, world)
    if rank == 0:
        slowest = {k: [max(t[k][i] for t in every) for i in range(opts["rounds"])] for k in times}
        Path(out).write_text(json.dumps({"times": slowest, "bytes": nbytes,
                                         "stats_bytes": sum(b.numel() * b.element_size() for b in buffers), **extra}))


def measure(world_size: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Spawn ``world_size`` gloo processes and summarise their rounds (module docstring)."""
    from aol_dist.dist import run_gloo

    with tempfile.TemporaryDirectory(prefix="aol-bench-scaling-") as tmp:
        out = str(Path(tmp) / "result.json")
        run_gloo(measure_rank, world_size, opts, out, timeout_s=300)
        raw = json.loads(Path(out).read_text())
    t = raw["times"]
    median = {k: statistics.median(v) for k, v in t.items()}
    row: dict[str, Any] = {"bytes": raw["bytes"], "stats_bytes": raw["stats_bytes"], "compute_s": median["compute"]}
    if world_size == 1:
        row.update(step_s=median["compute"], allreduce_s=0.0)
    else:
        exposed = {k: statistics.median(s - c for s, c in zip(t[k], t["compute"])) for k in ("flat", "ddp")}
        row.update(step_s=median["ddp"], allreduce_s=median["allreduce"], flat_step_s=median["flat"],
                   stats_allreduce_s=median["stats"], exposed_flat_s=exposed["flat"], exposed_ddp_s=exposed["ddp"],
                   hidden_share=1 - exposed["ddp"] / exposed["flat"] if exposed["flat"] > 0 else None,
                   ddp_bytes=raw["ddp_bytes"], ddp_bucket_bytes=raw["ddp_bucket_bytes"])
    row["samples_per_s"] = world_size * opts["batch"] / row["step_s"]
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aol_dist.dist import World

    opts = {"arch": args.arch, "size": args.size, "batch": args.batch, "overrides": list(args.set),
            "rounds": args.rounds, "warmup": args.warmup, "compression": args.compression}
    measured = {str(w): measure(w, opts) for w in args.worlds}
    base = measured[str(min(args.worlds))]
    for w, row in measured.items():  # weak scaling: samples/s per process against the smallest world's
        row["efficiency"] = row["samples_per_s"] / int(w) / (base["samples_per_s"] / min(args.worlds))
    _, gpu_parts = trainer_parts(args.gpu_arch, args.gpu_batch, list(args.set), World())
    grad_bytes = gradient_bytes(gpu_parts)
    stats_bytes = sum(b.numel() * b.element_size() for b in statistics_buffers(gpu_parts))
    projected = ring.project(grad_bytes, stats_bytes, args.gpu_step_s, args.gpu_backward_s, args.gpu_batch,
                             args.gpus, ring.LINKS, args.gpus_per_node, args.nics_per_node)
    result: dict[str, Any] = {
        "measured": measured, "projected": projected,
        "measured_config": {**opts, "device": "cpu", "backend": "gloo", "threads_per_process": 1},
        "projection": {"arch": args.gpu_arch, "batch_per_gpu": args.gpu_batch, "bytes": grad_bytes,
                       "stats_bytes": stats_bytes, "buckets": ring.ddp_buckets(grad_bytes),
                       "gpu_step_s": args.gpu_step_s, "gpu_backward_s": args.gpu_backward_s,
                       "gpu_step_is_default": args.gpu_step_s == GPU_STEP_S,
                       **ring.assumptions(ring.LINKS, args.gpus_per_node, args.nics_per_node)}}
    if args.runs:
        result["runs"] = runs_table(args.runs)
    return result


def runs_table(run_dirs: list[str]) -> dict[str, dict[str, Any]]:
    """Measured points of training runs (the SLURM scaling array's), in the rows ``plots.scaling`` writes."""
    from aol_dist.plots import scaling_points, scaling_rows

    return {str(r["gpus"]): r for r in scaling_rows(scaling_points([Path(d) for d in run_dirs]))}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet_tiny", help="model measured here")
    p.add_argument("--size", type=int, default=32, help="image side of the synthetic batches measured here")
    p.add_argument("--batch", type=int, default=16, help="batch per process measured here")
    p.add_argument("--worlds", type=_ints, default=[1, 2], help="process counts measured here (comma-separated)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compression", choices=("none", "bf16", "fp16"), default="none",
                   help="train.grad_compression of the DDP step (the flat and the lone all-reduce stay float32)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides of the step measured and projected, e.g. method.trust=attention")
    p.add_argument("--gpu-arch", default="resnet50", help="model whose gradient bytes are projected")
    p.add_argument("--gpu-batch", type=int, default=32, help="batch per GPU of the projection")
    p.add_argument("--gpu-step-s", type=float, default=GPU_STEP_S,
                   help="one GPU's step time without communication (default: H100 fast step, docs/performance.md)")
    p.add_argument("--gpu-backward-s", type=float, default=GPU_BACKWARD_S,
                   help="the part of it DDP can overlap the all-reduce with (the outer backward pass)")
    p.add_argument("--gpus", type=_ints, default=[8, 16, 64], help="GPU counts to project to")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nics-per-node", type=int, default=1, help="network links per node, shared by its GPUs")
    p.add_argument("--runs", nargs="*", default=[], help="finished training runs (the SLURM scaling array's) to "
                                                          "tabulate beside the figures")
    p.add_argument("--plot", help="write the efficiency plot (projection and --runs) to this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.plot:
        from aol_dist.plots import scaling_projection

        result["plot"] = str(scaling_projection(result, Path(args.plot)))
    if args.json:
        print(json.dumps(result))
        return 0
    from aol_dist.report import make_console

    console = make_console()
    for table in tables(result):
        console.print(table)
    return 0


def tables(result: dict[str, Any]) -> list[Any]:
    """Rich tables: measured here, measured runs (if given), projected."""
    from rich.table import Table

    c, pr = result["measured_config"], result["projection"]
    here = Table(title=f"measured here: {c['arch']} {c['size']}x{c['size']}, batch {c['batch']} per process, "
                       f"gloo on the CPU, 1 thread per process, median of {c['rounds']} rounds")
    for col in ("processes", "step s", "compute s", "all-reduce s (alone)", "exposed: flat / DDP s", "DDP hides",
                "MB", "samples/s", "efficiency"):
        here.add_column(col, justify="right")
    for w, r in result["measured"].items():
        exposed = f"{r['exposed_flat_s']:.4f} / {r['exposed_ddp_s']:.4f}" if "exposed_ddp_s" in r else "-"
        hidden = f"{r['hidden_share']:.0%}" if r.get("hidden_share") is not None else "-"
        here.add_row(w, f"{r['step_s']:.4f}", f"{r['compute_s']:.4f}", f"{r['allreduce_s']:.4f}", exposed, hidden,
                     f"{r['bytes'] / 1e6:.2f}", f"{r['samples_per_s']:.1f}", f"{r['efficiency']:.2f}")
    out = [here]
    if result.get("runs"):
        runs = Table(title="measured training runs (log.jsonl; as plots.scaling writes them)")
        for col in ("GPUs", "samples/s", "per GPU", "speed-up", "efficiency", "run"):
            runs.add_column(col, justify="right")
        for g, r in result["runs"].items():
            runs.add_row(g, f"{r['samples_per_s']:.1f}", f"{r['samples_per_s_per_gpu']:.1f}", f"{r['speedup']:.2f}",
                         f"{r['efficiency']:.3f}", r["run"])
        out.append(runs)
    gpus = sorted({int(g) for rows in result["projected"].values() for g in rows})
    proj = Table(title=f"projected: {pr['arch']}, batch {pr['batch_per_gpu']} per GPU, {pr['bytes'] / 1e6:.1f} MB of "
                       f"gradients in {pr['buckets']} buckets, GPU step {pr['gpu_step_s']} s (assumed), "
                       f"{pr['gpus_per_node']} GPUs and {pr['nics_per_node']} link(s) per node; "
                       f"efficiency without / with overlap")
    proj.add_column("link")
    for g in gpus:
        proj.add_column(f"{g} GPUs", justify="right")
    for name, rows in result["projected"].items():
        cells = [f"{rows[str(g)]['efficiency']:.3f} / {rows[str(g)]['overlap_efficiency']:.3f}" if str(g) in rows
                 else "-" for g in gpus]
        proj.add_row(pr["links"][name]["label"], *cells)
    out.append(proj)
    return out

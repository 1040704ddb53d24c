"""``aol bench step``: seconds per training step, measured side by side in one process.

Variants, all on the same model, batch and machine: ``plain`` (one BCE step on one label set),
``reference`` (the attention-on-label step that reads like Algorithm 1), ``fast`` (the fast path,
proven equal by the tests), ``fast_autograd`` (the fast path with ``method.batched_last_stage = false``:
autograd per label set for the last stage too, what non-ResNet backbones get) and ``partial`` (fast
path, partial meta scope). The variants are timed round-robin, one step each per round; the seconds
are medians over rounds, and each ratio is the median over rounds of the variant's time over the plain
step's in the same round, so a drift of the machine's speed hits every variant alike. Memory, of the
reference and the fast step, with and without checkpointing: on CUDA the peak allocated memory of a
step; on the CPU the bytes of activations kept for the backward pass (what checkpointing saves).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Any, Callable

import torch

from aol_dist.method.aol import AolHyper, aol_step
from aol_dist.method.baselines import plain_step
from aol_dist.model.attention import LabelAttention
from aol_dist.model.backbone import Classifier

VARIANTS = ("plain", "reference", "fast", "fast_autograd", "partial")


def _build(args: argparse.Namespace, device: torch.device, checkpointing: bool = False):
    torch.manual_seed(0)
    model = Classifier(args.arch, args.findings, checkpointing=checkpointing).to(device)
    attention = LabelAttention(model.feature_dim, args.label_sets, args.findings).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, attention, torch.optim.Adam(model.parameters(), 1e-4), torch.optim.SGD(attention.parameters(), 0.05)


def _step_fn(variant: str, args: argparse.Namespace, device: torch.device, checkpointing: bool = False) -> Callable[[], Any]:
    model, attention, opt, att_opt = _build(args, device, checkpointing)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 1, args.size, args.size, generator=g).to(device)
    if args.channels_last:
        x = x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch, args.label_sets, args.findings), generator=g).float().to(device)
    hp = {"reference": AolHyper(fast=False), "fast": AolHyper(fast=True), "fast_autograd": AolHyper(batched=False),
          "partial": AolHyper(fast=True, scope="partial")}.get(variant)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext():
            if hp is None:
                return plain_step(model, opt, x, y[:, 0])
            return aol_step(model, attention, opt, att_opt, x, y, hp)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every variant, one list entry per round (the variants take turns within a round)."""
    steps = {v: _step_fn(v, args, device) for v in VARIANTS}
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[v].append(time.perf_counter() - t0)
    return times


def step_memory(args: argparse.Namespace, device: torch.device, variant: str, checkpointing: bool) -> int:
    """Peak CUDA memory of one step, or on the CPU the peak bytes held by autograd for backward."""
    fn = _step_fn(variant, args, device, checkpointing)
    fn()  # optimizer state exists from here on, as in training
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    held = {"now": 0, "peak": 0}

    def pack(t: torch.Tensor):
        # parameters are saved by reference and cost nothing extra: count only fresh activations
        size = 0 if isinstance(t, torch.nn.Parameter) else t.numel() * t.element_size()
        held["now"] += size
        held["peak"] = max(held["peak"], held["now"])
        return t, size

    def unpack(packed):
        return packed[0]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fn()
    return held["peak"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    times = time_variants(args, device)
    result: dict[str, Any] = {f"{v}_s": statistics.median(times[v]) for v in VARIANTS}
    # ratio: the median over rounds of the variant's time over the plain step's in the same round, so a
    # change of the machine's speed between rounds cancels out
    result.update({f"{v}_ratio": statistics.median(t / p for t, p in zip(times[v], times["plain"]))
                   for v in VARIANTS})
    kind = "peak_cuda_bytes" if device.type == "cuda" else "activation_bytes"
    for variant in ("reference", "fast"):
        result[f"{kind}_{variant}"] = step_memory(args, device, variant, False)
        result[f"{kind}_{variant}_checkpointed"] = step_memory(args, device, variant, True)
    result["config"] = {k: getattr(args, k) for k in ("arch", "size", "batch", "label_sets", "findings", "bf16",
                                                       "channels_last", "device", "repeats", "warmup")}
    result["config"]["threads"] = torch.get_num_threads()
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--label-sets", type=int, default=4, help="M")
    p.add_argument("--findings", type=int, default=14, help="N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.table import Table

    from aol_dist.report import make_console

    c = result["config"]
    table = Table(title=f"step time: {c['arch']} {c['size']}x{c['size']}, batch {c['batch']}, M={c['label_sets']}, "
                        f"{c['device']}{' bf16' if c['bf16'] else ''}{' channels_last' if c['channels_last'] else ''}")
    table.add_column("variant")
    table.add_column("s / step", justify="right")
    table.add_column("x plain", justify="right")
    for v in VARIANTS:
        table.add_row(v, f"{result[f'{v}_s']:.4f}", f"{result[f'{v}_ratio']:.2f}")
    console = make_console()
    console.print(table)
    for k, v in result.items():
        if "_bytes_" in k:
            console.print(f"{k}: {v / 2**20:.1f} MiB")
    return 0

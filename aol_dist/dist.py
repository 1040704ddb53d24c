"""The only module that knows about ranks: process-group start-up, gradient averaging, broadcasts.

Training code receives a :class:`World` and an ``average_gradients`` callable; models, the meta step
and the data reader never read global distributed state themselves.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(timeout_s: float = 600.0) -> World:
    """Start the process group from the environment that ``accelerate launch`` / torchrun set.

    Uses accelerate's ``PartialState`` so every launcher it supports works; forces gloo on CPU-only
    machines (accelerate otherwise starts unconnected single processes there).
    """
    from accelerate import PartialState
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu, **InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s)).to_kwargs())
    device = torch.device("cpu") if cpu else state.device
    return World(rank=state.process_index, world_size=state.num_processes,
                 local_rank=state.local_process_index, device=device)


def world_from_process_group(device: torch.device | None = None) -> World:
    """A :class:`World` for an already initialised process group (tests start their own)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World(device=device or torch.device("cpu"))
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)), device=device or torch.device("cpu"))


def average_gradients(params: Iterable[torch.nn.Parameter], world: World,
                      buffers: Iterable[torch.Tensor] = ()) -> None:
    """Average ``.grad`` of ``params`` over all ranks with one coalesced all-reduce (SPEC 3.7).

    Floating-point ``buffers`` (batch-norm running statistics) ride in the same all-reduce and are
    averaged too: each rank's forward updates them from its local batch, and without this the ranks'
    models would drift apart in eval mode although their parameters are identical. A parameter with
    no gradient on this rank contributes zeros.
    """
    if not world.distributed:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    tensors = [p.grad for p in params] + [b for b in buffers if b.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.float32
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (run names, resolved paths)."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_parameters(module: torch.nn.Module, world: World, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers."""
    if not world.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()

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


def command_world() -> World:
    """The world of a command that needs no training group (``aol eval``, ``aol audit``): the launcher's
    process group under ``accelerate launch`` / torchrun, else one process on the first GPU where there is
    one (the CPU otherwise), as training picks without a launcher."""
    if "WORLD_SIZE" in os.environ:
        return init_world()
    return World(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


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
    world = World(rank=state.process_index, world_size=state.num_processes,
                  local_rank=state.local_process_index, device=device)
    _start_diagnosis_group(world, min(10.0, timeout_s))
    return world


_diagnosis_group: Any = None
_diagnosis_timeout_s = 10.0


def _start_diagnosis_group(world: World, timeout_s: float) -> None:
    """A second gloo group, used only after a failed collective to ask which ranks still answer.

    Gloo runs only: there a timed-out collective raises in the main thread. Under NCCL the watchdog
    ends the process after the timeout instead (the launcher then ends the others).
    """
    global _diagnosis_group, _diagnosis_timeout_s
    if world.distributed and dist.get_backend() == "gloo":
        _diagnosis_group = dist.new_group(backend="gloo")
        _diagnosis_timeout_s = timeout_s


def unresponsive_ranks(world: World) -> str | None:
    """After a failed collective: a line naming the ranks that do not reach a monitored barrier within
    min(10 s, the collective timeout) (the hung or dead ones, as seen from rank 0), or None where this
    cannot be asked."""
    if _diagnosis_group is None or not world.distributed:
        return None
    try:
        dist.monitored_barrier(group=_diagnosis_group, timeout=datetime.timedelta(seconds=_diagnosis_timeout_s),
                               wait_all_ranks=True)
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    return "every rank answered a monitored barrier afterwards"


def world_from_process_group(device: torch.device | None = None) -> World:
    """A :class:`World` for an already initialised process group (tests start their own)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World(device=device or torch.device("cpu"))
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)), device=device or torch.device("cpu"))


def deepspeed_config_file() -> str | None:
    """The DeepSpeed JSON when ``accelerate launch`` runs a DeepSpeed config (launch_configs/deepspeed_*.yaml)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        raise ValueError("a DeepSpeed launch config must name its JSON (deepspeed_config.deepspeed_config_file)")
    return path


def average_gradients(params: Iterable[torch.nn.Parameter], world: World,
                      buffers: Iterable[torch.Tensor] = ()) -> bool:
    """Average ``.grad`` of ``params`` over all ranks with one coalesced all-reduce (SPEC 3.7).

    Floating-point ``buffers`` (batch-norm running statistics) ride in the same all-reduce and are
    averaged too: each rank's forward updates them from its local batch, and without this the ranks'
    models would drift apart in eval mode although their parameters are identical. A parameter with
    no gradient on this rank contributes zeros.

    Returns whether every averaged value is finite. A NaN or inf on any rank survives the sum, so
    every rank reads the same answer from the same reduced buffer and the ranks agree on skipping
    a step without a second collective.
    """
    params = [p for p in params if p.requires_grad]
    buffers = [b for b in buffers if b.is_floating_point()]
    if not world.distributed:
        local = [p.grad for p in params if p.grad is not None] + buffers
        return bool(torch.stack([torch.isfinite(t).all() for t in local]).all()) if local else True
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    tensors = [p.grad for p in params] + buffers
    dtype = tensors[0].dtype if tensors else torch.float32
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    return bool(torch.isfinite(flat).all())


def all_gather_object(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (error reports: which rank saw what)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


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

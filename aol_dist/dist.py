"""The only module that knows about ranks: process-group start-up, the DDP wrapper of the outer step,
averaging of batch-norm statistics, broadcasts.

Training code receives a :class:`World`, a ``forward`` (:func:`data_parallel`) and an
``average_gradients`` callable (:class:`~aol_dist.faults.StepGuard`); models, the meta step and the data
reader never read global distributed state themselves.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn


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


GRAD_COMPRESSION = ("none", "bf16", "fp16")
"""``train.grad_compression``: how DDP sends the outer and attention gradients (DDP communication hooks)."""


class OuterStep(nn.Module):
    """The modules the outer update trains (classifier, and attention or CM matrices: Eq. 4 and 5) as one
    module whose forward runs the step's loss computation, ``compute()``.

    DDP wraps it: DDP's forward prepares its reducer around the whole outer computation, the M meta passes
    (Eq. 1) included, and the one backward of the loss all-reduces every trained module's gradients in
    buckets while it runs. The meta passes stay local: ``torch.autograd.grad`` returns their gradients
    without accumulating them into ``.grad``, so none of DDP's hooks fires and nothing is sent
    (tests/test_distributed.py counts it).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.trained = nn.ModuleDict(modules)

    def forward(self, compute: Callable[[], Any]) -> Any:
        return compute()


def data_parallel(modules: dict[str, nn.Module], world: World, compression: str = "none",
                  fixed_buckets: bool = False) -> nn.Module:
    """PyTorch DDP over ``modules``: the ``forward`` the step functions route their loss through (SPEC 3.7).

    Every parameter of ``modules`` must get a gradient every step (no unused-parameter search: pass only
    the modules the method trains). DDP does not broadcast buffers in the forward (``forward_sync_buffers``
    off): :class:`~aol_dist.faults.StepGuard` averages the batch-norm running statistics after the backward
    pass (:func:`average_statistics`), as before DDP. ``compression`` bf16/fp16 registers DDP's compression
    hook: gradients travel in half precision, divided by the world size before the sum. The gradients are
    views into DDP's buckets (``gradient_as_bucket_view``): no copy between the two.

    ``fixed_buckets`` (``train.ddp_fixed_buckets``): DDP rebuilds its buckets in gradient-ready order after its
    first step; from 3 ranks on, another layout sums some gradient elements in another grouping, which changes
    the float rounding, so the first step after a resume (a fresh DDP, first layout) differs in the last bits
    from that step of the uninterrupted run. ``find_unused_parameters`` keeps the first layout for good.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    if compression not in GRAD_COMPRESSION:
        raise ValueError(f"train.grad_compression must be one of {GRAD_COMPRESSION}, got {compression!r}")
    ddp = DistributedDataParallel(OuterStep(modules), forward_sync_buffers=False, gradient_as_bucket_view=True,
                                  find_unused_parameters=fixed_buckets)
    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    if compression in hooks:
        ddp.register_comm_hook(None, hooks[compression])
    return ddp


def average_statistics(tensors: Iterable[torch.Tensor], world: World) -> bool:
    """Average the floating-point ``tensors`` over all ranks with one all-reduce; whether all are finite.

    For the batch-norm running statistics: each rank's forward updates them from its local batch, and
    without this the ranks' models would drift apart in eval mode although their parameters are
    identical. A NaN or inf on any rank survives the sum, so every rank reads the same answer.
    """
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors:
        return True
    if not world.distributed:
        return all_finite(tensors)
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    return bool(torch.isfinite(flat).all())


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (one host synchronisation)."""
    checks = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


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
        gc.collect()  # see _gloo_child: a DDP wrapper in a cycle would keep the group alive past its destruction
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now, for a rendezvous on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_child(rank: int, world_size: int, port: int, timeout_s: float, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        # A DDP wrapper left in a reference cycle keeps the process group alive past destroy_process_group, until
        # interpreter teardown, where its still-joinable gloo thread aborts the child ("terminate called without
        # an active exception": 1 in 16 runs of `aol bench scaling` without this collect, none in 40 with it).
        gc.collect()
        dist.barrier()  # no rank tears the group down while a peer still finishes a collective
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes on the CPU, one thread each
    (``fn`` and ``args`` picklable); raises if one fails. For the tests and ``aol bench scaling``."""
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_child, args=(world_size, free_port(), timeout_s, fn, args), nprocs=world_size, join=True,
                       start_method="spawn")

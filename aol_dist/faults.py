"""What a step does when something goes wrong: the NaN/inf policy, and faults injected for tests.

The step functions call the injected ``average_gradients`` between backward and the optimizer steps;
:class:`StepGuard` is that callable. By then DDP has averaged the gradients during the backward pass
(``dist.data_parallel``); the guard averages the batch-norm statistics (one all-reduce), learns from the
averaged gradients and statistics whether any rank had a NaN or inf (every rank holds the same
averages, so the ranks agree without another collective), and after the step applies
``train.nan_policy``: restore the batch-norm statistics the bad forward touched and either skip the
update on every rank or stop with the step, the rank(s) and the sample ids named.

``train.debug_fault = KIND:RANK:STEP`` lets tests make a rank misbehave at a chosen step: ``nan``
poisons the rank's batch; ``exit``, ``hang`` and ``kill`` act mid-step, after backward and before
the statistics all-reduce, where a real failure leaves the other ranks waiting in a collective.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from aol_dist import dist as D

KINDS = ("nan", "exit", "hang", "kill")


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient under ``nan_policy = "stop"`` (or too many consecutive skips)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int


def parse_fault(text: str) -> Fault:
    """``"nan:1:3"`` -> Fault("nan", rank 1, step 3); steps count from 1."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in KINDS:
        raise ValueError(f"expected KIND:RANK:STEP with KIND in {KINDS}, got {text!r}")
    try:
        rank, step = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"RANK and STEP must be integers in {text!r}") from None
    if rank < 0 or step < 1:
        raise ValueError(f"RANK must be >= 0 and STEP >= 1 in {text!r}")
    return Fault(parts[0], rank, step)


class StepGuard:
    """The ``average_gradients`` callable of one rank, with the NaN/inf policy and injected faults.

    Per step: ``before(batch, step)``, then the step function (which calls the guard once), then
    ``after(out, keys)``, which returns whether the update was applied.
    """

    def __init__(self, params: list[torch.nn.Parameter], buffers: list[torch.Tensor], world: D.World,
                 policy: str, max_skipped: int, fault: str = "") -> None:
        self.params, self.world, self.policy, self.max_skipped = params, world, policy, max_skipped
        self.buffers = [b for b in buffers if b.is_floating_point()]
        parsed = parse_fault(fault) if fault else None
        self.fault = parsed if parsed is not None and parsed.rank == world.rank else None
        self.step, self.finite, self.consecutive = 0, True, 0
        self._saved: list[torch.Tensor] = []

    def before(self, batch: dict[str, Any], step: int) -> None:
        """Remember the batch-norm statistics (a bad forward overwrites them) and inject a ``nan`` fault."""
        self.step, self.finite = step, True
        self._saved = [b.clone() for b in self.buffers]
        if self._fault_now("nan"):
            batch["image"].fill_(math.nan)

    def __call__(self) -> bool:
        """After the backward pass, in which DDP averaged the gradients: average the batch-norm statistics;
        whether the gradients and statistics are finite (the same answer on every rank)."""
        statistics = self._average(self.buffers)
        self.finite = statistics and D.all_finite(p.grad for p in self.params if p.grad is not None)
        return self.finite

    def check(self, extra: list[torch.Tensor] = ()) -> bool:
        """Under DeepSpeed, which holds the reduced gradients in its own buffers: average the batch-norm
        statistics and ``extra`` (the loss) in our all-reduce and say whether all are finite on every rank."""
        self.finite = self._average(self.buffers + list(extra))
        return self.finite

    def _average(self, tensors: list[torch.Tensor]) -> bool:
        for kind in ("exit", "hang", "kill"):
            if self._fault_now(kind):
                self._act(kind)
        try:
            return D.average_statistics(tensors, self.world)
        except RuntimeError as e:  # a peer died or hung: say where this rank was
            raise RuntimeError(f"all-reduce of the batch-norm statistics of step {self.step} failed: {e}") from e

    def after(self, out: dict[str, torch.Tensor], keys: list[str]) -> bool:
        """True if the step's update was applied; False if it was skipped; raises under ``stop``."""
        if self.finite:
            self.consecutive = 0
            return True
        with torch.no_grad():
            for b, saved in zip(self.buffers, self._saved):
                b.copy_(saved)
        self.consecutive += 1
        reports = D.all_gather_object((float(out["loss"]), list(keys)), self.world)
        message = describe(self.step, reports)
        if self.policy == "stop":
            raise NonFiniteError(f"{message}; nan_policy = stop")
        if self.consecutive > self.max_skipped:
            raise NonFiniteError(f"{message}; {self.consecutive} consecutive steps skipped "
                                 f"(train.max_skipped_steps = {self.max_skipped}): the run has diverged")
        if self.world.is_main:
            print(f"warning: {message}; step skipped on every rank (nan_policy = skip)", file=sys.stderr, flush=True)
        return False

    def _fault_now(self, kind: str) -> bool:
        return self.fault is not None and self.fault.kind == kind and self.fault.step == self.step

    def _act(self, kind: str) -> None:
        where = f"rank {self.world.rank}: injected fault {kind!r} mid-step {self.step}"
        print(where, file=sys.stderr, flush=True)
        if kind == "exit":
            os._exit(3)  # no clean-up, no collective: the way a crashed process leaves its peers
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang
            time.sleep(60)


def describe(step: int, reports: list[tuple[float, list[str]]]) -> str:
    """One line naming the step, the rank(s) with a non-finite loss and their first sample ids."""
    bad = [(rank, loss, keys) for rank, (loss, keys) in enumerate(reports) if not math.isfinite(loss)]
    if not bad:
        return f"non-finite gradients at step {step} with finite losses on every rank"
    parts = [f"rank {rank} (loss {loss}, samples {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})"
             for rank, loss, keys in bad]
    return f"non-finite loss at step {step} on " + "; ".join(parts)

"""DeepSpeed ZeRO-1/2 as a launch choice: ``accelerate launch --config_file launch_configs/deepspeed_zero2.yaml``.

The training loop is the same; only the update changes hands. DeepSpeed hooks the outputs of
``engine(...)`` and takes *any* backward through them for the training backward: an inner
``torch.autograd.grad`` of the meta step on those outputs starts ZeRO's reduction half-way and fails
inside it (stage 2). So the engine wraps :class:`Objective`, whose forward computes the whole
attention-on-label loss - the M meta-gradients included, by ``torch.autograd.grad`` on a graph no
DeepSpeed hook sits on yet - and returns the loss. The one backward of that loss is then the only
one DeepSpeed sees: the outer and attention gradients are reduced exactly once per step (all-reduce
under ZeRO-1, reduce-scatter under ZeRO-2); the meta-gradients never leave the rank (SPEC 3.7).

Adam (classifier) and SGD (attention) become one :class:`JointOptimizer`, because an engine takes one
optimizer; ZeRO partitions its state across ranks. Batch-norm statistics are not DeepSpeed's concern:
:class:`~aol_dist.faults.StepGuard` averages them in our own all-reduce, as in the DDP path, and
the same all-reduce carries the loss so every rank learns of a NaN.

Limits (documented in docs/distributed.md): method ``aol`` only; ``nan_policy = skip`` is not
available (a non-finite step stops the run: ZeRO holds the reduced gradients in its own buffers);
fp32 only (the JSON files leave bf16/fp16 off); ``train.grad_compression`` must be ``none`` (it is a
DDP communication hook).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from aol_dist import dist as D
from aol_dist.config import Config
from aol_dist.method.aol import AolHyper, aol_loss
from aol_dist.method.trust import TrustHyper, set_right, trust_loss


class JointOptimizer(torch.optim.Optimizer):
    """Several optimizers as one, for an engine that takes one: here Adam for the classifier and SGD
    for the attention module (Eq. 4 and Eq. 5).

    The joint optimizer's param groups *are* the inner optimizers' group dicts, so when ZeRO swaps a
    group's parameters for its flat partition, the inner optimizer steps that partition; all inner
    optimizers share one state dict (keyed by tensor, so they never collide).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.inner = list(optimizers)
        super().__init__([p for o in self.inner for g in o.param_groups for p in g["params"]], {})
        self._sizes = [len(o.param_groups) for o in self.inner]
        self.param_groups = [g for o in self.inner for g in o.param_groups]
        self._link()

    def _link(self) -> None:
        groups = iter(self.param_groups)
        for o, n in zip(self.inner, self._sizes):
            o.param_groups = [next(groups) for _ in range(n)]
            o.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading builds new group dicts and a new state dict: share them again

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """Step the groups in ``self.param_groups`` only: ZeRO narrows it to one group per call."""
        for o in self.inner:
            mine = [g for g in o.param_groups if any(g is h for h in self.param_groups)]
            if not mine:
                continue
            everything, o.param_groups = o.param_groups, mine
            try:
                o.step()
            finally:
                o.param_groups = everything


class Objective(nn.Module):
    """The attention-on-label loss of a batch as a module's forward (what a DeepSpeed engine wraps)."""

    def __init__(self, model: nn.Module, attention: nn.Module, hp: AolHyper | TrustHyper) -> None:
        super().__init__()
        self.model, self.attention, self.hp = model, attention, hp

    def forward(self, x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None = None,
                gold: dict[str, torch.Tensor] | None = None):
        """(loss, weights, right): ``right`` P(t = y_m | x, Y) for the likelihood-trained trust, else None;
        ``gold``: a batch of hand-labelled studies (data.gold_split, trust = posterior)."""
        if isinstance(self.hp, TrustHyper):  # method.trust = posterior
            loss, q, weights = trust_loss(self.model, self.attention, x, labels, self.hp, text, gold=gold)
            return loss, weights.detach(), set_right(q, labels, self.attention.multiclass)
        loss, weights, _ = aol_loss(self.model, self.attention, x, labels, self.hp, text)
        return loss, weights.detach(), None  # no DeepSpeed hook on the weights: the loss is the only output


def read_deepspeed_config(path: str | Path, batch_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, checked: an explicit micro-batch size equal to ``data.batch_size``."""
    config = json.loads(Path(path).read_text())
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro != batch_size:
        raise ValueError(f"{path}: train_micro_batch_size_per_gpu is {micro!r}; it must be the run config's "
                         f"data.batch_size ({batch_size}), written out (not 'auto')")
    if config.get("gradient_accumulation_steps", 1) != 1:
        raise ValueError(f"{path}: gradient_accumulation_steps must be 1 (one optimizer step per meta step)")
    if config.get("gradient_clipping", 1.0) != 0:  # DeepSpeed clips at 1.0 unless told otherwise
        raise ValueError(f"{path}: set gradient_clipping to 0.0 (the method does not clip; DeepSpeed's default is 1.0)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(f"{path}: zero_optimization.stage {stage} is not supported here (1 or 2)")
    return config


def build_engine(model: nn.Module, attention: nn.Module, optimizer: torch.optim.Optimizer,
                 attention_optimizer: torch.optim.Optimizer, hp: AolHyper | TrustHyper, ds_config: dict[str, Any]):
    """A DeepSpeed engine owning the classifier and attention updates (the process group must exist)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=Objective(model, attention, hp),
                                      optimizer=JointOptimizer([optimizer, attention_optimizer]),
                                      config=ds_config, dist_init_required=False)
    return engine


def make_step(engine, text_of: Callable[[dict[str, Any]], torch.Tensor | None]):
    """The training step under DeepSpeed, called like the default path's ``step(batch, average)``."""
    def step(batch: dict[str, Any], guard) -> dict[str, torch.Tensor]:
        loss, weights, right = engine(batch["image"], batch["labels"], text_of(batch), batch.get("gold"))
        engine.backward(loss)
        if guard.check(extra=[loss.detach().reshape(1).clone()]):
            engine.step()
        return {"loss": loss.detach(), "weights": weights} | ({} if right is None else {"right": right})
    return step


def maybe_deepspeed(parts: Any, config: Config, world: D.World):
    """If launched with a DeepSpeed accelerate config: the engine, with ``parts.step`` replaced by the
    DeepSpeed step. Otherwise None and nothing changes."""
    path = D.deepspeed_config_file()
    if path is None:
        return None
    if config.method.name != "aol":
        raise ValueError(f"the DeepSpeed launch configs train method aol only (method.name = {config.method.name!r}); "
                         f"train baselines with the DDP-style configs (gpu_8_ddp.yaml, multi_node.yaml)")
    if config.train.grad_compression != "none":
        raise ValueError(f"train.grad_compression = {config.train.grad_compression!r} is a DDP communication hook and "
                         f"does not apply under DeepSpeed (ZeRO reduces the gradients itself); use grad_compression = none")
    if config.train.nan_policy == "skip":
        raise ValueError("train.nan_policy = skip is not available under DeepSpeed (ZeRO keeps the reduced "
                         "gradients in its own buffers); use nan_policy = stop")
    mc = config.method
    hp = (TrustHyper(parts.attention.annotator, parts.attention.input, mc.meta_lr, mc.meta_scope, mc.gold_weight)
          if mc.trust == "posterior" else AolHyper.from_method(mc))
    engine = build_engine(parts.model, parts.attention, parts.optimizer, parts.attention_optimizer, hp,
                          read_deepspeed_config(path, config.data.batch_size))
    parts.step = make_step(engine, parts.text)
    return engine

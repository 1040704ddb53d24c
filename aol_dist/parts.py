"""Build what a training step needs from the config: classifier, label model, optimizers, the step.

Every rank builds the same parts from the same seed, then rank 0's parameters are broadcast so the
ranks start identical for certain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from aol_dist import dist as D
from aol_dist.config import Config, ConfigError, check_listing_threshold
from aol_dist.data.shards import label_kind
from aol_dist.method import baselines
from aol_dist.method.aol import AolHyper, Forward, aol_step, bce, local_forward
from aol_dist.method.trust import LabelTrust, TrustHyper, trust_step
from aol_dist.model.attention import LabelAttention
from aol_dist.model.backbone import Classifier
from aol_dist.model.text import ReportEncoder

Step = Callable[[dict[str, Any], Callable[[], None]], dict[str, torch.Tensor]]


@dataclass
class Parts:
    """Everything a step needs, built identically on every rank."""

    model: Classifier
    attention: LabelAttention | LabelTrust
    """The weights over the label sets: the paper's attention (Eq. 2) or the likelihood-trained trust (trust.py)."""
    optimizer: torch.optim.Optimizer
    attention_optimizer: torch.optim.Optimizer
    label_sets: list[str]
    findings: list[str]
    step: Step
    cm: baselines.ConfusionMatrices | baselines.ClassConfusionMatrices | None = None
    """Confusion matrices of the CM baseline (trained by ``optimizer`` with the model, at ``method.cm_lr``)."""
    text_encoder: ReportEncoder | None = None
    """Frozen report encoder in image+text mode (not trained, not checkpointed)."""
    label_kind: str = "multilabel"
    """The shards' ``label_kind``: multilabel, or multiclass (the findings are classes, label sets one-hot)."""
    loss: str = "bce"
    """``method.loss`` resolved for the shards, bce or softmax: what the baselines train with."""
    method: str = "aol"
    """``method.name``: which modules the step trains (:meth:`trained`)."""
    forward: Forward = local_forward
    """How the step runs its loss computation: on this rank alone, or through DDP (``dist.data_parallel``
    over :meth:`trained`, set by the loop in a distributed run)."""

    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by name (what a checkpoint holds)."""
        out: dict[str, nn.Module] = {"model": self.model, "attention": self.attention}
        if self.cm is not None:
            out["cm"] = self.cm
        return out

    def trained(self) -> dict[str, nn.Module]:
        """The modules whose parameters the step updates (the attention is built for every method, so that
        checkpoints hold the same modules, and trained by ``aol`` only): what DDP reduces."""
        out: dict[str, nn.Module] = {"model": self.model}
        if self.method == "aol":
            out["attention"] = self.attention
        if self.cm is not None:
            out["cm"] = self.cm
        return out

    def trainable(self) -> list[nn.Parameter]:
        """Parameters whose gradients are averaged across ranks every step."""
        return [p for m in self.modules().values() for p in m.parameters()]

    def text(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The frozen encoder's report vectors for the batch (image+text mode), else None."""
        if self.text_encoder is None:
            return None
        if "tokens" not in batch:
            raise ValueError("model.text_encoder is set but the shards hold no report tokens: "
                             "convert with a tokenizer (--tokenizer) or train image-only")
        return self.text_encoder(batch["tokens"], batch.get("key"))

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits for an evaluation batch."""
        return self.model(batch["image"], self.text(batch))


def resolve_label_sets(config: Config, manifest: dict[str, Any]) -> tuple[list[str], list[int]]:
    available = list(manifest["label_sets"])
    if not available:
        raise ValueError(f"{config.data.shards}: the shards hold no noisy label sets (an evaluation-only set such "
                         f"as OpenI): use them in data.eval_splits or `aol eval`, and train on shards with label sets")
    wanted = list(config.data.label_sets) or available
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ValueError(f"data.label_sets {missing} not in the shards' label sets {available}")
    return wanted, [available.index(n) for n in wanted]


def build_parts(config: Config, manifest: dict[str, Any], world: D.World) -> Parts:
    label_sets, _ = resolve_label_sets(config, manifest)
    findings = list(manifest["findings"])
    mc = config.method
    check_listing_threshold(mc, len(label_sets))
    kind = label_kind(manifest)
    loss = baselines.resolve_loss(mc.loss, kind)
    torch.manual_seed(config.train.seed)  # identical init on every rank; the broadcast below makes it certain
    encoder = ReportEncoder(config.model.text_encoder).to(world.device) if config.model.text_encoder else None
    model = Classifier(config.model.arch, len(findings), config.model.pretrained,
                       text_dim=encoder.out_dim if encoder else 0,
                       checkpointing=config.model.checkpointing).to(world.device)
    attention = _label_attention(config, kind, model.feature_dim, len(label_sets), len(findings)).to(world.device)
    cm = None
    if mc.name == "cm":  # K x K per label set under softmax (multi-class), else 2 x 2 per label set and finding
        matrices = baselines.ClassConfusionMatrices if loss == "softmax" else baselines.ConfusionMatrices
        cm = matrices(len(label_sets), len(findings)).to(world.device)
    for module in (model, attention, cm):
        if module is not None:
            D.broadcast_parameters(module, world)
    groups = [{"params": list(model.parameters())}]
    if cm is not None:  # the confusion matrices learn at their own rate
        groups.append({"params": list(cm.parameters()), "lr": mc.cm_lr})
    optimizer = torch.optim.Adam(groups, lr=mc.lr)
    attention_optimizer = (torch.optim.Adam(_trust_groups(attention, mc), lr=mc.trust_lr) if isinstance(attention, LabelTrust)
                           else torch.optim.SGD(attention.parameters(), lr=mc.attention_lr))
    parts = Parts(model, attention, optimizer, attention_optimizer, label_sets, findings, step=None,  # type: ignore[arg-type]
                  cm=cm, text_encoder=encoder, label_kind=kind, loss=loss, method=mc.name)
    parts.step = _make_step(parts, config)
    return parts


def _trust_groups(trust: LabelTrust, mc: Any) -> list[dict[str, Any]]:
    """The annotator model and the regime network's last layer at ``method.trust_lr``; the regime network's
    convolutions (a network on the image, like the classifier) at the classifier's ``method.lr``."""
    fast, slow = [], []
    for name, p in trust.named_parameters():
        (slow if name.startswith("regime_net.features.") else fast).append(p)
    return [{"params": fast}] + ([{"params": slow, "lr": mc.lr}] if slow else [])


def _make_step(parts: Parts, config: Config) -> Step:
    mc = config.method
    model, labels_of = parts.model, (lambda batch: batch["labels"])
    if mc.name == "aol" and isinstance(parts.attention, LabelTrust):
        trust_hp = TrustHyper(parts.attention.annotator, parts.attention.input, mc.meta_lr, mc.meta_scope, mc.gold_weight)

        def step(batch, average):
            return trust_step(model, parts.attention, parts.optimizer, parts.attention_optimizer, batch["image"],
                              labels_of(batch), trust_hp, average, parts.text(batch), mc.fast, forward=parts.forward,
                              gold=batch.get("gold"))
        return step
    if mc.name == "aol":
        hp = AolHyper.from_method(mc)

        def step(batch, average):
            return aol_step(model, parts.attention, parts.optimizer, parts.attention_optimizer, batch["image"],
                            labels_of(batch), hp, average, parts.text(batch), forward=parts.forward)
        return step
    if mc.name == "cm":
        def step(batch, average):
            return baselines.cm_step(model, parts.cm, parts.optimizer, batch["image"], labels_of(batch),
                                     mc.cm_lambda, average, parts.text(batch), forward=parts.forward)
        return step
    loss_fn = baselines.soft_cross_entropy if parts.loss == "softmax" else bce
    if mc.name in ("truth", "best_choice"):
        where = f"{config.data.shards} split {config.data.train_split!r}"
        multiclass = parts.label_kind == "multiclass"

        def step(batch, average):
            target = baselines.truth_target(batch, where, mc.name)
            if mc.name == "best_choice":
                target = baselines.best_choice_target(labels_of(batch), target, multiclass)
            return baselines.plain_step(model, parts.optimizer, batch["image"], target, average, parts.text(batch),
                                        loss_fn, forward=parts.forward)
        return step
    if mc.name == "single":
        name = mc.single_label_set or parts.label_sets[0]
        if name not in parts.label_sets:
            raise ValueError(f"method.single_label_set {name!r} not in {parts.label_sets}")
        index = parts.label_sets.index(name)
        target = lambda y: baselines.single_target(y, index)  # noqa: E731
    else:
        majority = baselines.plurality_target if parts.label_kind == "multiclass" else baselines.majority_target
        target = {"majority": majority, "soft_average": baselines.soft_average_target}[mc.name]

    def step(batch, average):
        return baselines.plain_step(model, parts.optimizer, batch["image"], target(labels_of(batch)), average,
                                    parts.text(batch), loss_fn, forward=parts.forward)
    return step


def _label_attention(config: Config, kind: str, feature_dim: int, num_sets: int,
                     num_findings: int) -> LabelAttention | LabelTrust:
    """The module that weighs the label sets: ``method.trust = posterior`` (method aol) or the paper's Eq. 2
    (also built, unused, for the baselines, so every run's checkpoint has the same modules)."""
    mc = config.method
    if mc.name == "aol" and mc.trust == "posterior":
        multiclass = kind == "multiclass"
        head_input = mc.trust_input if mc.trust_input != "auto" else ("features" if multiclass else "none")
        try:
            return LabelTrust(feature_dim, num_sets, num_findings, multiclass, mc.annotator, head_input, mc.monotone,
                              mc.regimes, mc.regime_balance, mc.prior_power)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return LabelAttention(feature_dim, num_sets, num_findings, per_finding=mc.attention == "per_finding")


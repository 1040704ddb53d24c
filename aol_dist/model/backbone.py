"""Classifier f_theta: ResNet (conv1..res5c) -> global average pool -> F [++ text feature] -> Linear (Sec. 3.1, 3.3).

The backbone is a stem and four stages, so the meta step can (a) checkpoint each stage and (b) in
the partial meta scope start the meta forwards from the activation before the last stage.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ARCHS = ("resnet_tiny", "resnet18", "resnet34", "resnet50")
TIMM_PREFIX = "timm/"
"""``timm/<name>``: any timm ResNet-family model (stem conv1/bn1/act1/maxpool, stages layer1..layer4)."""


def known_arch(arch: str) -> bool:
    return arch in ARCHS or (arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX))


def _tiny() -> tuple[nn.Module, list[nn.Module], int]:
    """A narrow 4-stage ResNet (16..128 channels) for CPU demos and tests."""
    from torchvision.models.resnet import BasicBlock

    widths = (16, 32, 64, 128)
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    stages, cin = [], widths[0]
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None if stride == 1 and cin == w else nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
        stages.append(BasicBlock(cin, w, stride, down))
        cin = w
    return stem, stages, cin


def _timm(name: str) -> tuple[nn.Module, list[nn.Module], int]:
    import timm

    net = timm.create_model(name, pretrained=False)  # weights only ever come from model.pretrained
    needed = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if not all(hasattr(net, a) for a in needed):
        raise ValueError(f"timm model {name!r} is not ResNet-shaped (needs {', '.join(needed)})")
    stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
    return stem, [net.layer1, net.layer2, net.layer3, net.layer4], net.num_features


def _torchvision(name: str) -> tuple[nn.Module, list[nn.Module], int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return stem, [net.layer1, net.layer2, net.layer3, net.layer4], net.fc.in_features


@contextlib.contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """Batch norm in ``module`` uses batch statistics and leaves its running statistics untouched.

    Used for the meta forwards (SPEC 3.3: they must not change the running statistics).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class _RestoredBuffers:
    """Undo whatever a block of code does to ``module``'s buffers; re-enterable, because one
    checkpointed forward is recomputed by every backward pass through it (M + 1 per meta step)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.saved = module, []

    def __enter__(self) -> None:
        self.saved = [(b, b.clone()) for b in self.module.buffers()]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for b, copy in self.saved:
                b.copy_(copy)
        self.saved = []


def _checkpoint_contexts(stage: nn.Module):
    # The recomputation must run the very same operations as the forward (checkpoint checks the
    # saved tensors), so batch norm tracks statistics there too, and the second update is undone.
    return contextlib.nullcontext(), _RestoredBuffers(stage)


class TextHead(nn.Module):
    """The two fully connected layers of 512 on the frozen encoder's pooled report vector (Sec. 3.3); part of theta."""

    def __init__(self, in_dim: int = 768, dim: int = 512) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim), nn.ReLU(inplace=True))
        self.out_dim = dim

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.layers(text)


class Classifier(nn.Module):
    """Image (and optionally the frozen encoder's report vector) -> logits over N findings.

    Grey-scale input in [0, 1] is repeated to three channels, so ImageNet weights apply unchanged.
    ``checkpointing`` recomputes each stage in the backward pass (non-reentrant, so it works with
    ``torch.autograd.grad``) instead of storing its activations.
    """

    def __init__(self, arch: str, num_findings: int, pretrained: str = "", text_dim: int = 0,
                 checkpointing: bool = False) -> None:
        super().__init__()
        if arch == "resnet_tiny":
            stem, stages, image_dim = _tiny()
        elif arch.startswith(TIMM_PREFIX):
            stem, stages, image_dim = _timm(arch[len(TIMM_PREFIX):])
        elif arch in ARCHS:
            stem, stages, image_dim = _torchvision(arch)
        else:
            raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
        self.stem, self.stages = stem, nn.ModuleList(stages)
        if pretrained:
            load_backbone_weights(self, pretrained)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.text = TextHead(text_dim) if text_dim else None
        self.image_dim = image_dim
        self.feature_dim = image_dim + (self.text.out_dim if self.text else 0)
        self.head = nn.Linear(self.feature_dim, num_findings)
        self.checkpointing = checkpointing

    def _run(self, stage: nn.Module, a: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, a, use_reentrant=False, context_fn=functools.partial(_checkpoint_contexts, stage))
        return stage(a)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Activation before the last stage (the partial meta scope starts its meta forwards here)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        a = self._run(self.stem, x)
        for stage in self.stages[:-1]:
            a = self._run(stage, a)
        return a

    def top(self, a: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """F: GAP of the last stage, concatenated with the text feature in image+text mode."""
        f = self.pool(self._run(self.stages[-1], a)).flatten(1)
        if self.text is not None:
            if text is None:
                raise ValueError("this classifier has a text branch: pass the report vectors")
            f = torch.cat([f, self.text(text)], dim=1)
        return f

    def features(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return self.top(self.trunk(x), text)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None, features_only: bool = False,
                from_trunk: bool = False, trunk_only: bool = False) -> torch.Tensor:
        """Logits (B, N), or F (B, D) with ``features_only``, or the trunk activation with ``trunk_only``;
        ``from_trunk``: ``x`` is a trunk activation."""
        if trunk_only:
            return self.trunk(x)
        f = self.top(x, text) if from_trunk else self.features(x, text)
        return f if features_only else self.head(f)

    def last_stage_parameters(self) -> list[str]:
        """Names of the parameters the partial meta scope updates: last stage, text layers and head."""
        keep = ("stages.%d." % (len(self.stages) - 1), "text.", "head.")
        return [n for n, _ in self.named_parameters() if n.startswith(keep)]


def load_backbone_weights(model: Classifier, path: str) -> None:
    """Load a torchvision ResNet state dict (``conv1.weight``, ``layer1.0...``) from a local file."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    rename = {"conv1": "stem.0", "bn1": "stem.1", "layer1": "stages.0", "layer2": "stages.1",
              "layer3": "stages.2", "layer4": "stages.3"}
    mapped = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in rename:
            mapped[f"{rename[head]}.{rest}"] = v
    own = {k for k in model.state_dict() if k.startswith(("stem.", "stages."))}
    missing = sorted(own - set(mapped))
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    model.load_state_dict(mapped, strict=False)

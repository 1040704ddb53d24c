"""Classifier f_theta: backbone (ResNet conv1..res5c) -> global average pool -> feature F -> Linear (Sec. 3.1)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TinyResNet(nn.Module):
    """A 4-stage ResNet with narrow stages (16..128 channels) for CPU demos and tests."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and cin == w else nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            stages.append(BasicBlock(cin, w, stride, down))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def _torchvision(name: str) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    dim = net.fc.in_features
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, dim


ARCHS = ("resnet_tiny", "resnet18", "resnet34", "resnet50")


class Classifier(nn.Module):
    """Image -> (logits over N findings, pooled feature F).

    Grey-scale input in [0, 1] is repeated to three channels, so ImageNet weights apply unchanged.
    """

    def __init__(self, arch: str, num_findings: int, pretrained: str = "") -> None:
        super().__init__()
        if arch == "resnet_tiny":
            self.backbone, self.feature_dim = TinyResNet(), 128
        elif arch in ARCHS:
            self.backbone, self.feature_dim = _torchvision(arch)
        else:
            raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
        if pretrained:
            load_backbone_weights(self.backbone, pretrained)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.feature_dim, num_findings)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """F: the GAP output (B, D)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.pool(self.backbone(x)).flatten(1)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        f = self.features(x)
        return f if features_only else self.head(f)


def load_backbone_weights(body: nn.Sequential, path: str) -> None:
    """Load a torchvision ResNet state dict (``conv1.weight``, ``layer1.0...``) from a local file."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    mapped = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in names:
            mapped[f"{names.index(head)}.{rest}"] = v
    missing, unexpected = body.load_state_dict(mapped, strict=False)
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:5]}{'...' if len(missing) > 5 else ''}")

"""Built-in backbones, each exposed as an ordered list of *units* plus a GAP + linear classifier.

A multi-exit network cuts the unit list into segments; exits can sit after any unit but the last.
Every backbone here runs ``x -> units[0] -> units[1] -> ... -> GAP -> fc`` with nothing in between,
which is what makes the cut exact.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Backbone(nn.Module):
    """Units run in order, then global average pooling and a linear classifier (CAM-ready)."""

    def __init__(self, units: list[nn.Module], num_features: int, num_classes: int) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.num_features = num_features
        self.fc = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); 1x1 projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride, act=nn.ReLU(inplace=True))
        self.conv2 = _conv_bn(cout, cout, 3)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def cifar_resnet(depth: int, num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> Backbone:
    """CIFAR-style ResNet (He et al. 2016, section 4.2): depth = 6n + 2, stages of 16/32/64 x width channels."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
    n = (depth - 2) // 6
    widths = [_scaled(c, width) for c in (16, 32, 64)]
    units: list[nn.Module] = [_conv_bn(in_chans, widths[0], 3, act=nn.ReLU(inplace=True))]
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(n):
            units.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
    return Backbone(units, cin, num_classes)


def resnet18(num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_input: bool = False) -> Backbone:
    """ImageNet-style ResNet-18; ``small_input`` swaps the 7x7/2 stem and max-pool for a 3x3/1 stem (32x32 inputs)."""
    widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
    if small_input:
        stem = _conv_bn(in_chans, widths[0], 3, act=nn.ReLU(inplace=True))
    else:
        stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    units: list[nn.Module] = [stem]
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(2):
            units.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
    return Backbone(units, cin, num_classes)


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.ReLU6(inplace=True)))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6(inplace=True)), _conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2(num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, small_input: bool = False) -> Backbone:
    """MobileNetV2 (Sandler et al. 2018); ``small_input`` uses stride 1 in the stem and first stride-2 stage (32x32)."""
    cin = _divisible(32 * width)
    units: list[nn.Module] = [_conv_bn(in_chans, cin, 3, 1 if small_input else 2, act=nn.ReLU6(inplace=True))]
    for stage, (t, c, n, s) in enumerate(MOBILENETV2_SETTINGS):
        cout = _divisible(c * width)
        stride = 1 if small_input and stage == 1 else s
        for i in range(n):
            units.append(InvertedResidual(cin, cout, stride if i == 0 else 1, t))
            cin = cout
    last = _divisible(1280 * max(1.0, width))
    units.append(_conv_bn(cin, last, 1, act=nn.ReLU6(inplace=True)))
    return Backbone(units, last, num_classes)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet20": lambda **kw: cifar_resnet(20, **kw),
    "resnet32": lambda **kw: cifar_resnet(32, **kw),
    "resnet56": lambda **kw: cifar_resnet(56, **kw),
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
}
SMALL_INPUT_ARCHS = ("resnet18", "mobilenetv2")
# Input side each backbone was designed for: CIFAR ResNets at 32 px, the ImageNet networks at 224 px.
DEFAULT_INPUT_SIZE = {"resnet20": 32, "resnet32": 32, "resnet56": 32, "resnet18": 224, "mobilenetv2": 224}


def check_arch(arch: str) -> None:
    if arch not in BACKBONES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(BACKBONES)}")


def build_backbone(arch: str, num_classes: int, in_chans: int = 3, width: float = 1.0, small_input: bool = False) -> Backbone:
    check_arch(arch)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, width=width)
    if arch in SMALL_INPUT_ARCHS:
        kwargs["small_input"] = small_input
    return BACKBONES[arch](**kwargs)

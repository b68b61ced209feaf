"""CAM-ready exit heads: (pool -> small conv block) -> features F -> global average pooling -> linear.

Because the classifier is linear after GAP, the class activation map (Zhou et al. 2016) of class c is

    M_c(y, x) = sum_k W[c, k] * F[k, y, x],   and   mean_{y,x} M_c = logit_c - b_c,

so a head returns the map of its own prediction without any gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class HeadOutput(NamedTuple):
    logits: torch.Tensor  # (B, C)
    cam: torch.Tensor  # (B, h, w): CAM of the predicted class
    features: torch.Tensor  # (B, K, h, w): the features the linear layer sees (before GAP)


class CamHead(nn.Module):
    """An exit head. ``block`` maps segment features to head features (Identity for the backbone's own classifier)."""

    def __init__(self, block: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.block = block
        self.fc = fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x).mean(dim=(2, 3)))

    def forward_cam(self, x: torch.Tensor) -> HeadOutput:
        features = self.block(x)
        logits = self.fc(features.mean(dim=(2, 3)))
        weights = self.fc.weight[logits.argmax(dim=1)]  # (B, K)
        cam = torch.einsum("bk,bkhw->bhw", weights, features)
        return HeadOutput(logits, cam, features)


def pool_factor(spatial: int, grid: int) -> int:
    """Average-pool kernel (= stride) that brings ``spatial`` down to about ``grid`` positions per side."""
    return max(1, spatial // grid) if grid > 0 else 1


def exit_head(in_channels: int, num_classes: int, spatial: int, grid: int = 8, width: int | None = None) -> CamHead:
    """A cheap internal exit: avg-pool to ~grid x grid, depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU, GAP, linear.

    MACs ~ g^2 (9 C_in + C_in * width): a few percent of a ResNet segment. ``width`` defaults to
    1.5 C_in rounded up to a multiple of 8 (at least 32, at most 256).
    """
    width = width or min(256, max(32, -(-3 * in_channels // 16) * 8))
    k = pool_factor(spatial, grid)
    block = nn.Sequential(
        nn.AvgPool2d(k, k) if k > 1 else nn.Identity(),
        nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )
    return CamHead(block, nn.Linear(width, num_classes))


def final_head(fc: nn.Linear) -> CamHead:
    """The backbone's own classifier (GAP + linear) as the last exit."""
    return CamHead(nn.Identity(), fc)

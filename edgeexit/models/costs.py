"""MAC and parameter accounting for segments and heads.

Counted: multiply-accumulates of Conv2d (output elements x C_in/groups x k_h x k_w) and Linear (in x out) layers;
BatchNorm, activations, pooling and additions are not counted (they are < 1% for these networks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


def count_macs(module: nn.Module, example: torch.Tensor) -> tuple[int, torch.Tensor]:
    """MACs of one forward pass of ``module`` on a batch-1 ``example``, and its output."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, _out):
        nonlocal total
        total += inp[0][0].numel() // m.in_features * m.in_features * m.out_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            out = module(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total, out


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Costs:
    """Per-segment and per-head costs, and the cost of leaving at each exit.

    ``cumulative_macs[i]`` = segments 0..i + heads 0..i (every head passed is paid for).
    ``reference_macs`` = all segments + the last head: the plain network without internal exits,
    the denominator of every cost fraction edgeexit reports.
    """

    segment_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    segment_params: tuple[int, ...]
    head_params: tuple[int, ...]

    @property
    def cumulative_macs(self) -> tuple[int, ...]:
        out, running = [], 0
        for seg, head in zip(self.segment_macs, self.head_macs):
            running += seg + head
            out.append(running)
        return tuple(out)

    @property
    def reference_macs(self) -> int:
        return sum(self.segment_macs) + self.head_macs[-1]

    @property
    def cumulative_fraction(self) -> tuple[float, ...]:
        return tuple(c / self.reference_macs for c in self.cumulative_macs)

    def to_dict(self) -> dict:
        data = {k: list(v) for k, v in asdict(self).items()}
        data["cumulative_macs"] = list(self.cumulative_macs)
        data["reference_macs"] = self.reference_macs
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Costs":
        return cls(*(tuple(int(v) for v in data[k]) for k in ("segment_macs", "head_macs", "segment_params", "head_params")))

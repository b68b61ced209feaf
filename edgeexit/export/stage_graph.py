"""The deployed graphs of a bundle (torch modules that export to ONNX): stages and CAM graphs.

A *stage* is one engine call of the chain (``edgeexit.stages``): the backbone segments since the previous kept
exit, then that exit's head, computing only what the exit decision reads::

    stage_j: (input | features_in [, prev_cam]) -> (features, class, confidence [, signals] [, cam])

- ``features``: the backbone's output at this exit (the next stage's input; for the last stage, the input of
  its CAM graph, so an annotated frame can show the final exit's map);
- ``class`` (B,) int64: argmax of the exit's logits; ``confidence`` (B,): max softmax(z / T);
- ``signals`` (B, S): the gate's signals (``gates.GATES[gate].signals``, temperature baked in), absent for
  patience and at the last stage (the last exit takes every sample: nothing to decide);
- ``cam`` (B, h, w): this exit's CAM, only when the next stage's gate compares maps (coherence, learned).

A CAM graph ``(features) -> cam`` recomputes one exit head's map for the frames that are drawn (``run --save``):
frames that are not drawn never pay for it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.heads import CamHead
from .head_graph import SignalGraph

__all__ = ["StageGraph", "CamGraph", "class_cam"]


def class_cam(head: CamHead, features: torch.Tensor, cam_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, class, cam) of one head: ``cam[b] = W[class_b] @ F[b]`` as a Gather and a batched MatMul."""
    f = head.block(features)
    logits = head.fc(f.mean(dim=(2, 3)))
    cls = torch.argmax(logits, dim=1)
    h, w = cam_hw
    cam = torch.matmul(head.fc.weight[cls].unsqueeze(1), torch.flatten(f, 2)).reshape(-1, h, w)
    return logits, cls, cam


class StageGraph(nn.Module):
    """One stage (see the module docstring). ``signals``: the signal names the gate reads at this exit (empty at
    the last stage); ``prev_hw``: the previous kept exit's CAM grid when the gate compares maps (then the graph
    takes ``prev_cam``); ``emit_cam``: return this exit's CAM for the next stage."""

    def __init__(self, segments: Sequence[nn.Module], head: CamHead, *, cam_hw: Sequence[int], temperature: float,
                 signals: Sequence[str] = (), prev_hw: Optional[Sequence[int]] = None, emit_cam: bool = False,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.head = head
        self.cam_hw = (int(cam_hw[0]), int(cam_hw[1]))
        self.signal_names = tuple(signals)
        self.takes_prev = prev_hw is not None
        self.emit_cam = bool(emit_cam)
        self.needs_cam = self.emit_cam or any(n.startswith(("sal_", "coh_")) for n in self.signal_names)
        classes = int(num_classes if num_classes is not None else head.fc.out_features)
        self.signal_graph = SignalGraph(classes, self.cam_hw, prev_hw, temperature)

    def forward(self, x: torch.Tensor, prev_cam: Optional[torch.Tensor] = None):
        for segment in self.segments:
            x = segment(x)
        if self.needs_cam:
            logits, cls, cam = class_cam(self.head, x, self.cam_hw)
        else:
            logits = self.head(x)
            cls, cam = torch.argmax(logits, dim=1), None
        confidence, signals = self.signal_graph.selected(logits, cam, prev_cam, self.signal_names)
        out = [x, cls, confidence]
        if signals is not None:
            out.append(signals)
        if self.emit_cam:
            out.append(cam)
        return tuple(out)


class CamGraph(nn.Module):
    """``cam_k.onnx``: an exit's features -> the CAM of its predicted class (for drawing)."""

    def __init__(self, head: CamHead, cam_hw: Sequence[int]) -> None:
        super().__init__()
        self.head = head
        self.cam_hw = (int(cam_hw[0]), int(cam_hw[1]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return class_cam(self.head, features, self.cam_hw)[2]

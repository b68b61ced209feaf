"""The gate signals as a torch graph (``SignalGraph``, used by every exported stage) and the plain network (torch).

``SignalGraph`` computes ``edgeexit.gates.exit_signals`` with torch operations that export to plain ONNX
(MatMul, Softmax, TopK, ReduceSum/Max/Mean, Log, Sqrt, Where, Clip) and that TensorRT parses. Everything
static is baked in as constants: the temperature, the unit-square pixel coordinates and the area-resize
matrices (``gates.resize_matrix``) that bring this exit's map and the previous exit's map to the common grid.
The arithmetic is float32 (numpy's is float64); tests hold the two within 1e-5.

Differences in formulation that do not change values (kept for float32 / float16 robustness):
- ``relu(nan_to_num(cam))`` is one ``where(0 < cam < inf, cam, 0)``;
- the map is divided by its maximum before it is divided by its sum (no overflow of the sum).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..gates import SIGNAL_NAMES, SSIM_C1, SSIM_C2, common_grid, resize_matrix
from ..models.heads import CamHead

__all__ = ["SignalGraph", "FullGraph"]

_EPS = 1e-12
_TINY32 = float(torch.finfo(torch.float32).tiny)


def _as_grid(hw: Sequence[int]) -> Tuple[int, int]:
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"map grid must be at least 1x1, got {tuple(hw)}")
    return h, w


class SignalGraph(nn.Module):
    """``forward(logits, cam, prev_cam=None) -> (probs, signals)``: ``softmax(logits / T)`` and float32 (B, 7)
    signals in ``SIGNAL_NAMES`` order, equal to ``gates.exit_signals(logits, cam, prev_cam, T)``.

    ``cam_hw`` is this exit's map grid, ``prev_hw`` the previous exit's (None at the first exit: no prev_cam and
    zeros for the two coherence signals).
    """

    def __init__(self, num_classes: int, cam_hw: Sequence[int], prev_hw: Optional[Sequence[int]] = None,
                 temperature: float = 1.0) -> None:
        super().__init__()
        t = float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
        self.num_classes = int(num_classes)
        self.temperature = t
        self.cam_hw = _as_grid(cam_hw)
        self.prev_hw = None if prev_hw is None else _as_grid(prev_hw)
        h, w = self.cam_hw
        self.register_buffer("ys", (torch.arange(h, dtype=torch.float64) + 0.5).div(h).float(), persistent=False)
        self.register_buffer("xs", (torch.arange(w, dtype=torch.float64) + 0.5).div(w).float(), persistent=False)
        self.grid = None
        if self.prev_hw is not None:
            self.grid = common_grid(self.cam_hw, self.prev_hw)
            for tag, (sh, sw) in (("a", self.cam_hw), ("b", self.prev_hw)):
                self._resize_buffers(tag, sh, sw)

    def _resize_buffers(self, tag: str, h: int, w: int) -> None:
        gh, gw = self.grid
        ry = torch.from_numpy(resize_matrix(h, gh)).float() if h != gh else None
        rx = torch.from_numpy(resize_matrix(w, gw).T.copy()).float() if w != gw else None
        self.register_buffer(f"ry_{tag}", ry, persistent=False)
        self.register_buffer(f"rxt_{tag}", rx, persistent=False)

    # -- pieces, each the torch twin of a gates.py function ---------------------------------------------------
    def softmax_signals(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z = logits / self.temperature
        probs = torch.softmax(z, dim=1)
        if self.num_classes == 1:
            one = torch.ones_like(probs[:, 0])
            return probs, one, one, one
        logp = torch.log_softmax(z, dim=1)
        top2 = torch.topk(probs, 2, dim=1).values
        max_prob = top2[:, 0]
        margin = top2[:, 0] - top2[:, 1]
        h = -(probs * logp).sum(dim=1)
        entropy_conf = torch.clamp(1.0 - h / math.log(self.num_classes), 0.0, 1.0)
        return probs, max_prob, margin, entropy_conf

    @staticmethod
    def distribution(cam: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """``gates.cam_distribution``: relu (non-finite -> 0), normalised to sum 1; uniform without positive mass."""
        h, w = hw
        r = torch.where((cam > 0.0) & (cam < math.inf), cam, torch.zeros_like(cam))
        peak = torch.amax(r, dim=(1, 2), keepdim=True)
        has_mass = peak > 0.0
        r = r / torch.where(has_mass, peak, torch.ones_like(peak))
        total = r.sum(dim=(1, 2), keepdim=True)
        uniform = torch.full_like(r, 1.0 / (int(h) * int(w)))
        return torch.where(has_mass, r / torch.where(has_mass, total, torch.ones_like(total)), uniform)

    def spatial_entropy(self, p: torch.Tensor) -> torch.Tensor:
        n = self.cam_hw[0] * self.cam_hw[1]
        if n == 1:
            return torch.zeros_like(p[:, 0, 0])
        positive = p > 0.0
        plogp = torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))), torch.zeros_like(p))
        h = -plogp.sum(dim=(1, 2))
        return torch.clamp(h / math.log(n), 0.0, 1.0)

    def spatial_spread(self, p: torch.Tensor) -> torch.Tensor:
        px = p.sum(dim=1)  # (B, w)
        py = p.sum(dim=2)  # (B, h)
        cx = (px * self.xs).sum(dim=1, keepdim=True)
        cy = (py * self.ys).sum(dim=1, keepdim=True)
        var_x = (px * (self.xs - cx) ** 2).sum(dim=1)
        var_y = (py * (self.ys - cy) ** 2).sum(dim=1)
        return var_x + var_y

    def _to_grid(self, p: torch.Tensor, tag: str) -> torch.Tensor:
        ry = getattr(self, f"ry_{tag}")
        rxt = getattr(self, f"rxt_{tag}")
        if ry is not None:
            p = torch.matmul(ry, p)
        if rxt is not None:
            p = torch.matmul(p, rxt)
        return torch.flatten(p, 1)

    @staticmethod
    def cosine(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
        num = (pa * pb).sum(dim=1)
        den = torch.sqrt((pa * pa).sum(dim=1)) * torch.sqrt((pb * pb).sum(dim=1))
        return torch.clamp(num / torch.clamp(den, min=_EPS), 0.0, 1.0)

    @staticmethod
    def ssim(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
        qa = pa / torch.clamp(torch.amax(pa, dim=1, keepdim=True), min=_TINY32)
        qb = pb / torch.clamp(torch.amax(pb, dim=1, keepdim=True), min=_TINY32)
        mu_a = qa.mean(dim=1, keepdim=True)
        mu_b = qb.mean(dim=1, keepdim=True)
        da = qa - mu_a
        db = qb - mu_b
        var_a = (da * da).mean(dim=1)
        var_b = (db * db).mean(dim=1)
        cov = (da * db).mean(dim=1)
        mu_a, mu_b = mu_a[:, 0], mu_b[:, 0]
        num = (2.0 * mu_a * mu_b + SSIM_C1) * (2.0 * cov + SSIM_C2)
        den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
        return torch.clamp(num / den, -1.0, 1.0)

    def forward(self, logits: torch.Tensor, cam: torch.Tensor, prev_cam: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        cam = cam.float()
        probs, max_prob, margin, entropy_conf = self.softmax_signals(logits)
        p = self.distribution(cam, self.cam_hw)
        sal_entropy = self.spatial_entropy(p)
        sal_spread = self.spatial_spread(p)
        if self.prev_hw is None:
            if prev_cam is not None:
                raise ValueError("this exit was built without a previous exit (prev_hw=None): pass no prev_cam")
            coh_cos = torch.zeros_like(max_prob)
            coh_ssim = torch.zeros_like(max_prob)
        else:
            if prev_cam is None:
                raise ValueError("this exit compares with the previous exit's map: prev_cam is required")
            pa = self._to_grid(p, "a")
            pb = self._to_grid(self.distribution(prev_cam.float(), self.prev_hw), "b")
            coh_cos = self.cosine(pa, pb)
            coh_ssim = self.ssim(pa, pb)
        signals = torch.stack([max_prob, margin, entropy_conf, sal_entropy, sal_spread, coh_cos, coh_ssim], dim=1)
        assert signals.shape[1] == len(SIGNAL_NAMES)
        return probs, signals


    def selected(self, logits: torch.Tensor, cam: Optional[torch.Tensor], prev_cam: Optional[torch.Tensor],
                 names: Sequence[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(confidence (B,), signals (B, len(names)) or None)``: only the named signals are computed, so a
        deployed stage carries the few nodes its gate reads (a margin-only head is ~15 ONNX nodes, all seven
        ~200). Values equal the same columns of ``forward``."""
        z = logits.float() / self.temperature
        probs = torch.softmax(z, dim=1)
        max_prob = torch.amax(probs, dim=1)
        if not names:
            return max_prob, None
        cols = {"max_prob": max_prob}
        if "margin" in names:
            if self.num_classes == 1:
                cols["margin"] = torch.ones_like(max_prob)
            else:
                top2 = torch.topk(probs, 2, dim=1).values
                cols["margin"] = top2[:, 0] - top2[:, 1]
        if "entropy_conf" in names:
            cols["entropy_conf"] = self.softmax_signals(logits)[3]
        if any(n in names for n in ("sal_entropy", "sal_spread", "coh_cosine", "coh_ssim")):
            p = self.distribution(cam.float(), self.cam_hw)
            if "sal_entropy" in names:
                cols["sal_entropy"] = self.spatial_entropy(p)
            if "sal_spread" in names:
                cols["sal_spread"] = self.spatial_spread(p)
            if "coh_cosine" in names or "coh_ssim" in names:
                if self.prev_hw is None:
                    cols["coh_cosine"] = cols["coh_ssim"] = torch.zeros_like(max_prob)
                else:
                    pa = self._to_grid(p, "a")
                    pb = self._to_grid(self.distribution(prev_cam.float(), self.prev_hw), "b")
                    cols["coh_cosine"] = self.cosine(pa, pb)
                    cols["coh_ssim"] = self.ssim(pa, pb)
        return max_prob, torch.stack([cols[n] for n in names], dim=1)


class FullGraph(nn.Module):
    """``full.onnx``: the plain network, image -> the last exit's logits (no internal exits)."""

    def __init__(self, segments: nn.ModuleList, last_head: CamHead) -> None:
        super().__init__()
        self.segments = segments
        self.last_head = last_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for segment in self.segments:
            x = segment(x)
        return self.last_head(x)

"""Drift guard: notice when a stream's conditions leave the calibration's and fall back to a conservative policy.

The statistic is the confidence of each decision (max softmax probability at the exit taken, the JSON lines'
``confidence``): every frame has it, whatever the gate, and it is what degraded inputs move (noise, blur, fog and
low contrast lower it; the calibrated thresholds were chosen for its clean distribution). Over the last ``window``
decisions the guard computes

    z = (mean(confidence over the window) - mu) / (sigma / sqrt(window))

against the reference (mu, sigma) of the policy in force, measured on the clean calibration split
(``reference_stats``): the calibrated policy's, or the conservative policy's while that runs (it leaves at other
exits, so its confidences have another distribution). With the calibrated policy, ``|z| > bound`` switches to the
conservative policy (event ``drift``); with the conservative one, ``|z| <= recover * bound`` switches back (event
``recovered``): the hysteresis keeps a stream near the bound from flapping. The window restarts at each switch, so
a decision takes at least ``window`` frames. The conservative policy is the pipeline's stages with the calibrated-
for-degraded thresholds when the bundle has them (``conservative_thresholds``), else every frame runs to the last
exit (full depth).

``bound`` is calibrated (``calibrate_bound``): the largest |z| of clean windows drawn from the calibration split
(a 1-in-``n_windows`` false-alarm level), at least ``MIN_BOUND``. Numpy only: this runs on the device.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["DriftReference", "DriftGuard", "SwitchingRunner", "reference_stats", "calibrate_bound",
           "DEFAULT_WINDOW", "MIN_BOUND"]

DEFAULT_WINDOW = 32
MIN_BOUND = 4.0  # two-sided normal tail 6e-5 per window: rare false alarms over long streams


@dataclass(frozen=True)
class DriftReference:
    """The manifest's ``drift`` block of a pipeline (see the module docstring)."""

    mean: float
    std: float
    mean_conservative: float
    std_conservative: float
    bound: float
    window: int = DEFAULT_WINDOW
    recover: float = 0.5
    conservative_thresholds: Optional[tuple] = None  # per kept internal exit; None = full depth
    statistic: str = "confidence"

    def __post_init__(self) -> None:
        for name in ("mean", "std", "mean_conservative", "std_conservative", "bound", "recover"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or (name != "mean" and name != "mean_conservative" and v < 0):
                raise ValueError(f"drift.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if int(self.window) < 1:
            raise ValueError(f"drift.window must be >= 1, got {self.window}")
        if self.statistic != "confidence":
            raise ValueError(f"drift.statistic {self.statistic!r} is not known (confidence)")

    def to_dict(self) -> Dict[str, Any]:
        return {"statistic": self.statistic, "mean": float(self.mean), "std": float(self.std),
                "mean_conservative": float(self.mean_conservative), "std_conservative": float(self.std_conservative),
                "bound": float(self.bound), "window": int(self.window), "recover": float(self.recover),
                "conservative_thresholds": None if self.conservative_thresholds is None
                else [float(t) for t in self.conservative_thresholds]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DriftReference":
        thr = data.get("conservative_thresholds")
        return cls(float(data["mean"]), float(data["std"]), float(data["mean_conservative"]),
                   float(data["std_conservative"]), float(data["bound"]), int(data.get("window", DEFAULT_WINDOW)),
                   float(data.get("recover", 0.5)), None if thr is None else tuple(float(t) for t in thr),
                   str(data.get("statistic", "confidence")))


class DriftGuard:
    """Running window of the statistic, the current policy (``conservative``) and the switches so far."""

    def __init__(self, reference: DriftReference, window: Optional[int] = None) -> None:
        self.reference = reference
        self.window = int(window if window is not None else reference.window)
        if self.window < 1:
            raise ValueError(f"--drift-window must be >= 1, got {self.window}")
        self.conservative = False
        self.z: Optional[float] = None
        self.events: list = []  # (frame index, "drift" | "recovered", z)
        self.frames = 0
        self.conservative_frames = 0
        self._values: deque = deque(maxlen=self.window)
        self._sum = 0.0

    def update(self, value: Optional[float]) -> Optional[str]:
        """Add one decision's statistic (None: a failed frame, ignored); returns the event it triggers, if any.
        The new policy applies from the next frame on."""
        self.frames += 1
        self.conservative_frames += int(self.conservative)
        if value is None or not math.isfinite(value):
            return None
        if len(self._values) == self.window:
            self._sum -= self._values[0]
        self._values.append(float(value))
        self._sum += float(value)
        if len(self._values) < self.window:
            return None
        ref = self.reference
        mu, sigma = (ref.mean_conservative, ref.std_conservative) if self.conservative else (ref.mean, ref.std)
        self.z = (self._sum / self.window - mu) / max(sigma / math.sqrt(self.window), 1e-9)
        event = None
        if not self.conservative and abs(self.z) > ref.bound:
            event = "drift"
        elif self.conservative and abs(self.z) <= ref.recover * ref.bound:
            event = "recovered"
        if event is not None:
            self.conservative = event == "drift"
            self.events.append((self.frames - 1, event, float(self.z)))
            self._values.clear()
            self._sum = 0.0
        return event

    def record(self, event: Optional[str]) -> Dict[str, Any]:
        """The JSON-line field: the policy the frame ran with is ``policy`` before the event."""
        return {"policy": "conservative" if (self.conservative != (event is not None)) else "calibrated",
                "z": None if self.z is None else round(float(self.z), 3), "event": event}

    def summary(self) -> str:
        n = len(self.events)
        drifts = sum(1 for e in self.events if e[1] == "drift")
        share = 100.0 * self.conservative_frames / max(1, self.frames)
        first = ", ".join(f"{kind} at frame {i}" for i, kind, _ in self.events[:6])
        return (f"drift guard (window {self.window}, bound |z| > {self.reference.bound:.2f}): {n} switch(es), "
                f"{drifts} drift(s), {share:.1f}% of frames on the conservative policy" + (f"; {first}" if n else ""))


class SwitchingRunner:
    """Two StageRunners on the same backend, the guard choosing between them per batch: ``run_batch`` goes to the
    active one; every other attribute (classes, preprocess, exits, ...) is the calibrated runner's."""

    def __init__(self, calibrated: Any, conservative: Any, guard: DriftGuard) -> None:
        self.calibrated = calibrated
        self.conservative = conservative
        self.guard = guard

    @property
    def active(self) -> Any:
        return self.conservative if self.guard.conservative else self.calibrated

    def run_batch(self, x: np.ndarray, batch_size: Optional[int] = None) -> list:
        return self.active.run_batch(x, batch_size)

    def warmup(self, batch: int = 1, repeats: int = 2) -> float:
        return self.calibrated.warmup(batch, repeats) + self.conservative.warmup(batch, repeats)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.calibrated, name)


def reference_stats(confidence: np.ndarray) -> tuple:
    """(mean, std) of per-frame confidences, float; std at least 1e-6."""
    c = np.asarray(confidence, dtype=np.float64)
    return float(c.mean()), max(float(c.std()), 1e-6)


def calibrate_bound(confidence: np.ndarray, window: int = DEFAULT_WINDOW, n_windows: int = 5000,
                    seed: int = 0) -> float:
    """The largest |z| over ``n_windows`` windows of ``window`` clean confidences drawn at random (without
    replacement within a window) from the calibration split, at least ``MIN_BOUND``."""
    c = np.asarray(confidence, dtype=np.float64)
    mu, sigma = reference_stats(c)
    w = max(1, min(int(window), len(c)))
    rng = np.random.default_rng(seed)
    means = np.array([c[rng.choice(len(c), w, replace=False)].mean() for _ in range(int(n_windows))])
    z = np.abs(means - mu) / (sigma / math.sqrt(w))
    return max(MIN_BOUND, float(z.max()))

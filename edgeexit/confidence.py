"""How far to trust a calibrated operating point: bootstrap intervals of its accuracy loss and cost (numpy only).

A gate's thresholds are chosen on a finite calibration split, so the accuracy loss it shows there is an estimate.
For the chosen point, per calibration image j: ``taken_j`` (the answer at the exit the policy leaves at is
right), ``final_j`` (the last exit's answer is right) and ``cost_j`` (cost of leaving where it left, as a fraction
of the plain network). The statistics are

    loss = 100 * (mean(final) - mean(taken))   (accuracy points below the final exit; > 0 is a loss)
    cost = mean(cost)

**Method: paired percentile bootstrap.** B resamples of the n images, drawn with replacement (one seeded
``numpy.random.default_rng(seed)``, so the interval is reproducible); each resample recomputes both statistics
on the same drawn images (paired: the final exit's and the policy's answers on an image stay together). The
interval at level L is the (1 - L)/2 and (1 + L)/2 quantiles of the B values (Efron & Tibshirani 1993, ch. 13).
Thresholds are held fixed, so the interval covers the sampling noise of the split, not that of the threshold search
(it is optimistic for the split the thresholds were tuned on; that is why a test folder is still needed).

**Split too small.** The interval's width shrinks as 1/sqrt(n). When the loss interval is wider than the target
``max_drop``, the split cannot tell a point meeting the target from one missing it by the target's size; the number
of held-out images that would bring the width down to the target is ``ceil(n * (width / max_drop)^2)``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np

__all__ = ["bootstrap_point", "images_needed", "split_warning", "flag_test_drop", "describe", "for_policy"]

METHOD = "paired percentile bootstrap"


def _interval(values: np.ndarray, point: float, level: float) -> Dict[str, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return {"value": float(point), "low": float(lo), "high": float(hi)}


def bootstrap_point(taken_correct: Sequence[bool], final_correct: Sequence[bool], cost: Sequence[float], *,
                    n_boot: int = 2000, level: float = 0.95, seed: int = 0, chunk: int = 256) -> Dict[str, Any]:
    """Intervals of the operating point's accuracy loss (points) and mean cost (fraction); see the module docstring.

    Returns ``{"method", "level", "n_boot", "seed", "n", "drop": {"value", "low", "high"}, "cost": {...}}``.
    """
    taken = np.asarray(taken_correct, dtype=np.float64).reshape(-1)
    final = np.asarray(final_correct, dtype=np.float64).reshape(-1)
    cost_arr = np.asarray(cost, dtype=np.float64).reshape(-1)
    n = taken.shape[0]
    if n == 0 or final.shape[0] != n or cost_arr.shape[0] != n:
        raise ValueError(f"need the same positive number of taken/final/cost values, got {taken.shape[0]}, "
                         f"{final.shape[0]}, {cost_arr.shape[0]}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must lie in (0, 1) and n_boot be positive, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    diff = final - taken
    drops, costs = np.empty(n_boot), np.empty(n_boot)
    for start in range(0, n_boot, chunk):  # bounded memory: chunk x n indices at a time
        k = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        drops[start : start + k] = 100.0 * diff[idx].mean(axis=1)
        costs[start : start + k] = cost_arr[idx].mean(axis=1)
    return {"method": METHOD, "level": float(level), "n_boot": int(n_boot), "seed": int(seed), "n": int(n),
            "drop": _interval(drops, 100.0 * diff.mean(), level), "cost": _interval(costs, cost_arr.mean(), level)}


def for_policy(oriented: np.ndarray, correct: np.ndarray, cost_fraction: Sequence[float],
               thresholds: Sequence[float], seed: int = 0, **kwargs) -> Dict[str, Any]:
    """``bootstrap_point`` of a policy given as oriented scores (n, E-1), per-exit correctness (n, E), the cost of
    leaving at each exit (E,) and its thresholds (E-1,): the samples leave as ``thresholds.simulate`` says."""
    from .thresholds import simulate

    ex, _, _ = simulate(oriented, correct, cost_fraction, thresholds)
    correct = np.asarray(correct, dtype=bool)
    return bootstrap_point(correct[np.arange(len(ex)), ex], correct[:, -1], np.asarray(cost_fraction)[ex],
                           seed=seed, **kwargs)


def images_needed(n: int, width: float, target: float) -> Optional[int]:
    """Held-out images for an interval of ``width`` on n images to shrink to ``target`` (width ~ 1/sqrt(n));
    None when the target is 0 (no finite split can check it)."""
    if target <= 0:
        return None
    return int(math.ceil(n * (width / target) ** 2))


def split_warning(conf: Dict[str, Any], max_drop: Optional[float]) -> Optional[str]:
    """One line when the loss interval is wider than the target ``max_drop`` (points), else None."""
    if max_drop is None:
        return None
    d, n = conf["drop"], conf["n"]
    width = d["high"] - d["low"]
    if width <= max_drop:
        return None
    pct = f"{100 * conf['level']:g}%"
    needed = images_needed(n, width, max_drop)
    advice = (f"about {needed} held-out images would narrow it to the target (raise --val-fraction or add images), "
              "or --confidence 0.95 holds the target on the interval's upper end" if needed
              else "a 0-point target cannot be checked on a finite split")
    return (f"the calibration split ({n} images) is too small for a {max_drop:g}-point target: the {pct} interval "
            f"of the accuracy loss is {d['low']:.1f} to {d['high']:.1f} points ({width:.1f} wide); {advice}")


def flag_test_drop(test_drop: float, conf: Optional[Dict[str, Any]], max_drop: Optional[float]) -> Optional[str]:
    """One line when an evaluation's accuracy loss (points) exceeds the target and lies above the calibration
    interval: the policy does not hold on this data beyond what the calibration split's noise explains."""
    if conf is None or max_drop is None or not math.isfinite(test_drop):
        return None
    high = conf["drop"]["high"]
    if test_drop <= max_drop or test_drop <= high:
        return None
    return (f"the accuracy loss here, {test_drop:.1f} points, exceeds the {max_drop:g}-point target and the "
            f"calibration interval ({conf['drop']['low']:.1f} to {high:.1f}): the calibration split does not "
            "represent this data (recalibrate on more, or more similar, images)")


def describe(conf: Dict[str, Any], gate: str) -> list[str]:
    """Two lines (each under 80 columns) for the calibrate output."""
    d, c, pct = conf["drop"], conf["cost"], f"{100 * conf['level']:g}%"
    return [f"{gate}: accuracy loss {d['value']:.1f} pts ({pct} CI {d['low']:.1f} to {d['high']:.1f}), "
            f"cost {100 * c['value']:.1f}% ({100 * c['low']:.1f}-{100 * c['high']:.1f}%)",
            f"  ({conf['method']}, {conf['n_boot']} resamples of {conf['n']} images)"]

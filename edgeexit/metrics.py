"""Evaluation metrics for exit gates and accuracy/cost trade-offs (numpy only, torch-free)."""

from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence

import numpy as np

__all__ = ["auroc", "accuracy_cost_auc", "percentiles"]


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each group
    mid = ends - (counts - 1) / 2.0
    return mid[inverse.reshape(-1)]


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for separating ``positive`` from the rest (Mann-Whitney U).

    ``AUROC = P(s+ > s-) + 0.5 P(s+ == s-)`` over all (positive, negative) pairs, computed from mid-ranks:
    ``(sum of positive ranks - n+ (n+ + 1) / 2) / (n+ n-)``. 1 = positives always score higher, 0.5 = chance.
    Returns nan when either class is empty. Scores must be finite (ValueError otherwise).
    """
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive).reshape(-1).astype(bool)
    if s.shape != pos.shape:
        raise ValueError(f"score and positive lengths differ: {s.shape[0]} vs {pos.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("auroc needs finite scores")
    n_pos = int(pos.sum())
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(s)
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def accuracy_cost_auc(costs: Sequence[float], accs: Sequence[float], full_cost: float = 1.0) -> float:
    """Area under the accuracy-vs-cost curve, cost normalised to [0, 1] of full depth.

    Each point is (``c = costs[k] / full_cost``, ``accs[k]``); pass ``full_cost`` = cost of leaving at the last exit
    when ``costs`` are absolute (MACs, ms), or keep 1.0 when they are already fractions. Costs are clipped to
    [0, 1] and the points sorted by cost (equal costs keep the order of increasing accuracy). The curve is extended
    flat at both ends: from cost 0 at the accuracy of the cheapest point, and to cost 1 at the accuracy of the most
    expensive point; the area is then the trapezoid rule over [0, 1]. A single point (c, a) gives a; a constant
    accuracy a gives a. Returns nan for no points.
    """
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    a = np.asarray(accs, dtype=np.float64).reshape(-1)
    if c.shape != a.shape:
        raise ValueError(f"costs and accs lengths differ: {c.shape[0]} vs {a.shape[0]}")
    if not (math.isfinite(full_cost) and full_cost > 0):
        raise ValueError(f"full_cost must be positive, got {full_cost!r}")
    if c.size == 0:
        return float("nan")
    c = np.clip(c / full_cost, 0.0, 1.0)
    order = np.lexsort((a, c))
    c, a = c[order], a[order]
    xs = np.concatenate([[0.0], c, [1.0]])
    ys = np.concatenate([[a[0]], a, [a[-1]]])
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 90, 95, 99)) -> Dict[str, float]:
    """Percentiles of ``values`` (linear interpolation) as ``{"p50": ..., "p90": ...}``, plus ``mean``, ``min``,
    ``max`` and ``n``. All values are nan (n = 0) for an empty input."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    out: Dict[str, float] = {}
    for q in qs:
        key = f"p{q:g}"
        out[key] = float(np.percentile(v, q)) if v.size else float("nan")
    out["mean"] = float(v.mean()) if v.size else float("nan")
    out["min"] = float(v.min()) if v.size else float("nan")
    out["max"] = float(v.max()) if v.size else float("nan")
    out["n"] = float(v.size)
    return out

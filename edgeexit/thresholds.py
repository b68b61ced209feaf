"""Per-exit threshold search on calibration data (numpy only, torch-free).

Shapes: n samples, E exits. ``scores`` (n, E - 1) are the *oriented* gate scores at the internal exits (higher
means leave; see ``ExitPolicy.oriented_score`` and ``orient``), ``correct`` (n, E) says whether each exit's
prediction is right, ``cumulative_cost`` (E,) is the cost of leaving at each exit (nondecreasing; MACs, ms, ...).
A sample leaves at the first internal exit i with ``scores[:, i] >= thresholds[i]``, else at the last exit.
nan scores never pass. Costs returned are in the units of ``cumulative_cost``; ``cost_fraction`` divides by the
full-depth cost ``cumulative_cost[-1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .metrics import auroc

__all__ = ["PathPoint", "simulate", "greedy_path", "choose", "choose_confident", "loss_upper_bound", "oracle", "orient"]


@dataclass(frozen=True)
class PathPoint:
    """One operating point: per-exit ``thresholds`` (E - 1; ``inf`` = exit unused), the resulting ``accuracy``,
    ``mean_cost`` (units of ``cumulative_cost``) and ``cost_fraction`` (= mean_cost / full-depth cost)."""

    thresholds: List[float]
    accuracy: float
    mean_cost: float
    cost_fraction: float


def _check_inputs(
    scores: np.ndarray, correct: np.ndarray, cumulative_cost: Sequence[float]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = np.asarray(correct).astype(bool)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"correct must be (n, E), got shape {c.shape}")
    n, e = c.shape
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1 and e == 2:
        s = s[:, None]
    if s.shape != (n, e - 1):
        raise ValueError(f"scores must be (n, E - 1) = ({n}, {e - 1}), got shape {s.shape}")
    cost = np.asarray(cumulative_cost, dtype=np.float64).reshape(-1)
    if cost.shape[0] != e:
        raise ValueError(f"cumulative_cost must have E = {e} entries, got {cost.shape[0]}")
    if not np.all(np.isfinite(cost)) or np.any(np.diff(cost) < 0) or cost[-1] <= 0:
        raise ValueError(f"cumulative_cost must be finite, nondecreasing and end > 0, got {cost.tolist()}")
    return s, c, cost


def _first_pass(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the first internal exit whose score passes its threshold, E - 1 if none: int64 (n,)."""
    n, k = scores.shape
    with np.errstate(invalid="ignore"):
        passes = (scores >= thresholds[None, :]) & (thresholds[None, :] < np.inf)  # +inf threshold: exit unused
    passes = np.concatenate([passes, np.ones((n, 1), dtype=bool)], axis=1)
    return np.argmax(passes, axis=1).astype(np.int64)


def simulate(
    scores: np.ndarray,
    correct: np.ndarray,
    cumulative_cost: Sequence[float],
    thresholds: Sequence[float],
) -> Tuple[np.ndarray, float, float]:
    """Offline early exit: ``(exit_index (n,), accuracy, mean_cost)``.

    ``exit_index = min{i : scores[:, i] >= thresholds[i]}`` (E - 1 if none); ``accuracy = mean(correct[n,
    exit_index])``; ``mean_cost = mean(cumulative_cost[exit_index])``.
    """
    s, c, cost = _check_inputs(scores, correct, cumulative_cost)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thr.shape[0] != s.shape[1]:
        raise ValueError(f"thresholds must have E - 1 = {s.shape[1]} entries, got {thr.shape[0]}")
    ex = _first_pass(s, thr)
    if ex.size == 0:
        return ex, float("nan"), float("nan")
    acc = float(np.mean(c[np.arange(c.shape[0]), ex]))
    return ex, acc, float(np.mean(cost[ex]))


def _candidates(column: np.ndarray, n_candidates: int) -> np.ndarray:
    """Descending candidate thresholds of one exit: observed scores at ``n_candidates`` evenly spaced quantiles
    (always including the max and the min finite score)."""
    finite = column[np.isfinite(column)]
    if finite.size == 0:
        return np.empty(0)
    qs = np.linspace(1.0, 0.0, n_candidates) if n_candidates > 1 else np.array([0.0])
    vals = np.quantile(finite, qs, method="inverted_cdf")
    return np.unique(vals)[::-1]


def greedy_path(
    scores: np.ndarray,
    correct: np.ndarray,
    cumulative_cost: Sequence[float],
    n_candidates: int = 64,
    reference_cost: Optional[float] = None,
) -> List[PathPoint]:
    """Greedy accuracy/cost path over per-exit thresholds, from full depth down to the cheapest point.

    Start with every threshold at ``+inf`` (all samples leave at the last exit). Each exit's candidates are its
    observed scores at ``n_candidates`` quantiles, visited from high to low. At each step every exit that still has
    a lower candidate proposes lowering its threshold to it; with ``loss`` = number of samples that become wrong
    minus those that become right and ``saving`` = total cost saved (>= 0, costs are nondecreasing), the move with
    the smallest ``loss / saving`` is taken (``saving == 0``: -inf if loss < 0, 0 if loss == 0, +inf if loss > 0),
    so moves that save cost without losing accuracy go first; ties go to the larger saving, then the lower exit.
    Stops when every threshold is at its lowest candidate (the cheapest point). Every point is recorded, the
    first being full depth; mean cost never increases along the path.

    ``cost_fraction`` of each point is ``mean_cost / reference_cost``; ``reference_cost`` defaults to full depth,
    ``cumulative_cost[-1]`` (pass the plain network's cost, without the internal heads, to express budgets
    against it; full depth then has a fraction slightly above 1).
    """
    s, c, cost = _check_inputs(scores, correct, cumulative_cost)
    n, e = c.shape
    if n == 0:
        raise ValueError("greedy_path needs at least one sample")
    if int(n_candidates) < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    k_int = e - 1
    full = float(cost[-1]) if reference_cost is None else float(reference_cost)
    if not (math.isfinite(full) and full > 0):
        raise ValueError(f"reference_cost must be finite and > 0, got {reference_cost!r}")
    cands = [_candidates(s[:, i], int(n_candidates)) for i in range(k_int)]
    buckets = [_passing_buckets(s[:, i], cands[i]) for i in range(k_int)]
    pos = np.full(k_int, -1, dtype=np.int64)  # index into cands[i]; -1 = +inf
    ex = np.full(n, e - 1, dtype=np.int64)
    at_exit = np.zeros(e, dtype=np.int64)  # samples leaving at each exit
    at_exit[-1] = n
    n_right = int(c[:, -1].sum())
    c_int = c.astype(np.int64)
    cost_int = cost[:k_int]
    exit_ids = np.arange(k_int)

    def point() -> PathPoint:
        thr = [float(cands[i][pos[i]]) if pos[i] >= 0 else math.inf for i in range(k_int)]
        mean_cost = float(at_exit @ cost / n)
        return PathPoint(thr, n_right / n, mean_cost, mean_cost / full)

    path = [point()]
    while True:
        active = np.array([pos[i] + 1 < len(cands[i]) for i in range(k_int)], dtype=bool)
        if not active.any():
            break
        # A sample starts to pass exit i when its threshold drops to the next candidate iff its score lies in that
        # candidate's bucket; it moves there if it left later so far (one that passes a higher threshold left
        # at i or earlier already). Only those samples change: O(n / n_candidates) work per exit and step.
        ids = exit_ids[active]
        parts = [buckets[i][pos[i] + 1] for i in ids]
        idx = np.concatenate(parts)
        lab = np.repeat(ids, [len(p) for p in parts])
        now = ex[idx]
        later = now > lab
        idx, lab, now = idx[later], lab[later], now[later]
        n_moved = np.bincount(lab, minlength=k_int)
        gain = np.bincount(lab, weights=c_int[idx, lab] - c_int[idx, now], minlength=k_int)
        saving = np.bincount(lab, weights=cost[now], minlength=k_int) - cost_int * n_moved
        saving = np.maximum(saving, 0.0)
        loss = -gain
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(saving > 0, loss / np.where(saving > 0, saving, 1.0), np.sign(loss) * np.inf)
        ratio = np.where(np.isnan(ratio), 0.0, ratio)  # 0 * inf: no change in accuracy, no saving
        ratio = np.where(active, ratio, np.inf)
        key_saving = np.where(active, -saving, np.inf)
        order = np.lexsort((exit_ids, key_saving, ratio))
        best = int(order[0])
        mine = lab == best
        at_exit -= np.bincount(now[mine], minlength=e)
        at_exit[best] += int(mine.sum())
        n_right += int(round(gain[best]))
        ex[idx[mine]] = best
        pos[best] += 1
        path.append(point())
    return path


def _passing_buckets(column: np.ndarray, candidates: np.ndarray) -> List[np.ndarray]:
    """Samples grouped by the candidate at which they start to pass: bucket p holds the samples with
    ``candidates[p] <= score < candidates[p - 1]`` (descending candidates; nan and scores below every candidate
    pass none)."""
    safe = np.where(np.isnan(column), -np.inf, column)
    n_below_or_equal = np.searchsorted(candidates[::-1], safe, side="right")
    first = len(candidates) - n_below_or_equal  # index of the highest candidate <= score; len = none
    order = np.argsort(first, kind="stable")
    bounds = np.searchsorted(first[order], np.arange(len(candidates) + 1))
    return [order[bounds[p]:bounds[p + 1]] for p in range(len(candidates))]


def choose(
    path: Sequence[PathPoint],
    target_accuracy: Optional[float] = None,
    budget: Optional[float] = None,
) -> PathPoint:
    """Pick an operating point; give exactly one of ``target_accuracy`` or ``budget``.

    - ``target_accuracy``: the cheapest point with ``accuracy >= target`` (ties: more accurate); if none reaches
      it, the full-depth point (the most expensive one, ties: more accurate).
    - ``budget`` (mean cost as a fraction of the path's reference cost, full depth by default: ``cost_fraction``): the most accurate point with
      ``cost_fraction <= budget`` (ties: cheaper); if none fits, the cheapest point.
    """
    if (target_accuracy is None) == (budget is None):
        raise ValueError("choose needs exactly one of target_accuracy or budget")
    pts = list(path)
    if not pts:
        raise ValueError("choose needs a non-empty path")
    tol = 1e-12
    if target_accuracy is not None:
        ok = [p for p in pts if p.accuracy >= float(target_accuracy) - tol]
        if not ok:
            return max(pts, key=lambda p: (p.mean_cost, p.accuracy))
        return min(ok, key=lambda p: (p.mean_cost, -p.accuracy))
    ok = [p for p in pts if p.cost_fraction <= float(budget) + tol]  # type: ignore[arg-type]
    if not ok:
        return min(pts, key=lambda p: (p.mean_cost, -p.accuracy))
    return max(ok, key=lambda p: (p.accuracy, -p.mean_cost))


def loss_upper_bound(taken_correct: np.ndarray, final_correct: np.ndarray, z: float):
    """One-sided upper confidence bound of an operating point's accuracy loss (a fraction), from n paired images
    along the last axis (a float for 1-D inputs; one bound per row for (k, n) inputs).

    ``d_j = final_j - taken_j`` (1: the final exit is right and the taken exit wrong; -1: the reverse);
    ``bound = mean(d) + z * sqrt((mean(d^2) - mean(d)^2) / n)`` (normal approximation of the paired mean; ``z`` =
    the standard normal quantile of the confidence level, 1.645 at 95%).
    """
    d = np.asarray(final_correct, dtype=np.float64) - np.asarray(taken_correct, dtype=np.float64)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    var = np.maximum(np.mean(d * d, axis=-1) - mean * mean, 0.0)
    bound = mean + float(z) * np.sqrt(var / n)
    return float(bound) if np.ndim(bound) == 0 else bound


def choose_confident(path: Sequence[PathPoint], scores: np.ndarray, correct: np.ndarray,
                     cumulative_cost: Sequence[float], max_loss: float, z: float) -> PathPoint:
    """The accuracy target held with confidence: fixed-sequence testing along the path (as in Learn then Test,
    Angelopoulos et al. 2021). Points are visited from full depth (no loss) towards cheaper ones; each is accepted
    while ``loss_upper_bound <= max_loss`` (a fraction) and the walk stops at the first that fails, so the test
    order is fixed before the data speak. Returns the last accepted point (full depth if the first one fails)."""
    pts = list(path)
    if not pts:
        raise ValueError("choose_confident needs a non-empty path")
    c = np.asarray(correct).astype(bool)
    rows = np.arange(c.shape[0])
    chosen = pts[0]
    for point in pts:
        ex, _, _ = simulate(scores, c, cumulative_cost, point.thresholds)
        if loss_upper_bound(c[rows, ex], c[:, -1], z) > max_loss + 1e-12:
            break
        chosen = point
    return chosen


def oracle(correct: np.ndarray, cumulative_cost: Sequence[float]) -> Tuple[float, float]:
    """Ideal exit: each sample leaves at its earliest correct exit (the last exit if none is correct).
    Returns ``(mean_cost, accuracy)``; accuracy is the fraction of samples right at some exit."""
    c = np.asarray(correct).astype(bool)
    if c.ndim != 2:
        raise ValueError(f"correct must be (n, E), got shape {c.shape}")
    cost = np.asarray(cumulative_cost, dtype=np.float64).reshape(-1)
    if cost.shape[0] != c.shape[1]:
        raise ValueError(f"cumulative_cost must have E = {c.shape[1]} entries, got {cost.shape[0]}")
    if c.shape[0] == 0:
        return float("nan"), float("nan")
    any_right = c.any(axis=1)
    ex = np.where(any_right, np.argmax(c, axis=1), c.shape[1] - 1)
    return float(np.mean(cost[ex])), float(np.mean(any_right))


def orient(raw_scores: np.ndarray, correct_at_exit: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per internal exit: ``sign = +1`` if ``AUROC(raw, correct) >= 0.5`` else -1 (+1 when the AUROC is nan, i.e.
    all right or all wrong), and the AUROC of the oriented score ``sign * raw`` (= max(a, 1 - a), nan stays nan).

    ``raw_scores`` (n, K) with K = E - 1; ``correct_at_exit`` (n, K), or (n, E) whose last column is ignored.
    Returns ``(signs (K,), auroc (K,))`` float64. nan scores are left out of that exit's AUROC.
    """
    s = np.asarray(raw_scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    c = np.asarray(correct_at_exit).astype(bool)
    if c.ndim == 1:
        c = c[:, None]
    if s.ndim != 2 or c.ndim != 2 or c.shape[0] != s.shape[0]:
        raise ValueError(f"raw_scores (n, K) and correct_at_exit (n, K or K + 1) expected, got {s.shape}, {c.shape}")
    k = s.shape[1]
    if c.shape[1] == k + 1:
        c = c[:, :k]
    if c.shape[1] != k:
        raise ValueError(f"correct_at_exit must have {k} or {k + 1} columns, got {c.shape[1]}")
    signs = np.ones(k, dtype=np.float64)
    aucs = np.full(k, np.nan, dtype=np.float64)
    for i in range(k):
        keep = np.isfinite(s[:, i])
        a = auroc(s[keep, i], c[keep, i])
        if math.isnan(a):
            continue
        if a < 0.5:
            signs[i] = -1.0
            a = 1.0 - a
        aucs[i] = a
    return signs, aucs

"""Stages: which exits a deployed chain keeps, and the one cost rule for leaving at them (numpy only, torch-free).

A multi-exit network has E exits: E - 1 internal heads and the backbone's own classifier (exit E - 1). A
deployment keeps a subset of the internal exits (``exits``, sorted) plus the last exit. Each kept exit k ends one
*stage*: one graph holding the backbone segments since the previous kept exit and head k, run by one engine call::

    exits = (1, 3), E = 7  ->  stages: segments 0-1 + head 1 | segments 2-3 + head 3 | segments 4-6 + head 6

The cost rule (calibration, evaluation, export and profile all use it, nothing else does this sum):

    cost(k_j) = sum_{i <= k_j} segment[i] + sum_{kept k <= k_j} head[k] + (j + 1) * boundary

where k_0 < k_1 < ... are the kept exits and ``boundary`` is the fixed cost of one engine call (the per-call
host work that MACs do not count: launching, copying in and out, layout conversions; measured by ``profile``,
or a MAC-equivalent the user sets). The plain network (``full.onnx``, one call) costs
``sum(segment) + head[E - 1] + boundary``: the reference every cost fraction divides by.
"""

from __future__ import annotations

from itertools import combinations
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["normalize_exits", "kept_exits", "stage_ranges", "internal_subsets", "exit_costs", "reference_cost",
           "parse_exits"]


def normalize_exits(exits: Optional[Sequence[int]], num_exits: int) -> Tuple[int, ...]:
    """Sorted, unique kept internal exits; ``None`` keeps every internal exit. ValueError for an index outside
    ``[0, E - 2]`` (the last exit is always kept and is not listed)."""
    e = int(num_exits)
    if e < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    if exits is None:
        return tuple(range(e - 1))
    out = sorted({int(k) for k in exits})
    bad = [k for k in out if not 0 <= k <= e - 2]
    if bad:
        raise ValueError(f"exit {bad[0]} is not an internal exit: internal exits are 0..{e - 2} "
                         f"(exit {e - 1}, the backbone's classifier, is always kept)")
    return tuple(out)


def parse_exits(text: Optional[str], num_exits: int) -> Optional[Tuple[int, ...]]:
    """``"2,4"`` -> (2, 4); ``"none"`` or ``""`` -> () (no internal exit: the plain network); None -> None."""
    if text is None:
        return None
    text = str(text).strip().lower()
    if text in ("", "none"):
        return ()
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--exits needs comma-separated exit indices such as 2,4 (or none), got {text!r}") from None
    return normalize_exits(values, num_exits)


def kept_exits(exits: Optional[Sequence[int]], num_exits: int) -> Tuple[int, ...]:
    """The kept internal exits plus the last exit, in order: the exit each stage ends at."""
    return normalize_exits(exits, num_exits) + (int(num_exits) - 1,)


def stage_ranges(exits: Optional[Sequence[int]], num_exits: int) -> List[Tuple[int, int]]:
    """(first segment, last segment) of every stage, inclusive; stage j ends at kept exit j."""
    out, start = [], 0
    for k in kept_exits(exits, num_exits):
        out.append((start, k))
        start = k + 1
    return out


def internal_subsets(num_exits: int, max_kept: Optional[int] = None) -> Iterator[Tuple[int, ...]]:
    """Every subset of the internal exits (2^(E-1) of them, the empty one first), at most ``max_kept`` exits each."""
    internal = range(int(num_exits) - 1)
    top = len(internal) if max_kept is None else min(int(max_kept), len(internal))
    for size in range(top + 1):
        yield from combinations(internal, size)


def _costs(segment_costs: Sequence[float], head_costs: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    seg = np.asarray(segment_costs, dtype=np.float64).reshape(-1)
    head = np.asarray(head_costs, dtype=np.float64).reshape(-1)
    if seg.shape != head.shape or seg.size < 1:
        raise ValueError(f"need one cost per segment and per head, got {seg.size} segments and {head.size} heads")
    if not (np.all(np.isfinite(seg)) and np.all(np.isfinite(head))) or seg.min() < 0 or head.min() < 0:
        raise ValueError("segment and head costs must be finite and >= 0")
    return seg, head


def exit_costs(segment_costs: Sequence[float], head_costs: Sequence[float], exits: Optional[Sequence[int]] = None,
               boundary: float = 0.0) -> np.ndarray:
    """Cost of leaving at each kept exit (the kept internal exits, then the last), float64 (len(exits) + 1,):
    the segments up to it, the kept heads passed and one ``boundary`` per stage run (module docstring)."""
    seg, head = _costs(segment_costs, head_costs)
    if not (np.isfinite(boundary) and boundary >= 0):
        raise ValueError(f"the per-stage overhead must be finite and >= 0, got {boundary}")
    kept = kept_exits(exits, seg.size)
    seg_cum = np.cumsum(seg)
    heads_paid = np.cumsum(head[list(kept)])
    return np.asarray([seg_cum[k] + heads_paid[j] + (j + 1) * boundary for j, k in enumerate(kept)])


def reference_cost(segment_costs: Sequence[float], head_costs: Sequence[float], boundary: float = 0.0) -> float:
    """The plain network run as one graph: every segment, the backbone's classifier and one call."""
    seg, head = _costs(segment_costs, head_costs)
    return float(seg.sum() + head[-1] + boundary)

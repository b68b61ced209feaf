"""Calibration for degraded inputs: one policy whose accuracy target holds on clean frames and on corrupted copies.

``calibrate --degrade KINDS`` runs the model once over the calibration split and once over each corrupted copy
(``corrupt.corrupt``, every kind at every severity: one *condition* each), pools the outputs and runs the usual
subset / threshold search (``calibrate.calibrate_outputs``) on the pool, with one change: on each subset's greedy
path (``thresholds.greedy_path`` on the pooled samples) the operating point is not the cheapest that meets a pooled
accuracy, but the cheapest whose per-condition drops satisfy the robust target (``Conditions.meets``):

- ``mean``  (default): clean drop <= max_drop, mean drop over the degraded conditions <= max_drop and the worst
  degraded drop <= worst_drop;
- ``worst``: the drop on every condition (clean included) <= max_drop.

With a confidence level (``calibrate --degrade --confidence L``, ``Conditions.z`` = the standard normal quantile of
L), each drop above is replaced by its one-sided upper confidence bound (``thresholds.loss_upper_bound`` per
condition; the mean over degraded conditions is bounded over per-image averages, since every condition holds the same
images), so each condition's target holds on new images, not only on these. With bounds the path is not
binary-searched but walked from full depth, stopping at the first point that fails (fixed-sequence testing, as the
clean ``--confidence`` does in ``thresholds.choose_confident``), so no failing point is stepped over.

A condition's drop is ``100 * (acc_final(c) - acc_policy(c))``: points below full depth *on that condition*, so a
corruption that hurts the whole network is not charged to the gate. The point is found by a binary search over the
path index (drops grow along the path, from 0 at full depth, near-monotonically), so a subset costs about
log2(path length) policy simulations rather than one per point. Subsets and gates are then compared on the clean
mean cost (the objective: the camera's usual frames), among those that meet the robust target.

The learned gate is cross-fitted on the pool with folds grouped by image (a picture and its corrupted copies always
share a fold), so its out-of-fold scores never see the image they score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .thresholds import PathPoint, loss_upper_bound, simulate

__all__ = ["ROBUST_MODES", "Conditions", "pool_outputs", "parse_severities", "condition_name"]

ROBUST_MODES = ("mean", "worst")


def condition_name(kind: str, severity: int) -> str:
    return f"{kind}-{int(severity)}"


def parse_severities(text: str | Sequence[int]) -> List[int]:
    """``"1,3,5"`` -> [1, 3, 5] (each 1..5, no duplicates)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    out: List[int] = []
    for p in parts:
        if str(p).strip() == "":
            continue
        try:
            s = int(str(p).strip())
        except ValueError:
            raise ValueError(f"severities must be integers 1..5, got {p!r}") from None
        if not 1 <= s <= 5:
            raise ValueError(f"severities must be integers 1..5, got {s}")
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError("no severity given (e.g. --severities 1,3,5)")
    return out


def pool_outputs(parts: Sequence[Any]):
    """Concatenate ``ExitOutputs`` of the same images under several conditions (clean first)."""
    from .collect import ExitOutputs

    return ExitOutputs(
        logits=np.concatenate([p.logits for p in parts]),
        cams=[np.concatenate([p.cams[i] for p in parts]) for i in range(parts[0].num_exits)],
        labels=np.concatenate([p.labels for p in parts]),
    )


@dataclass
class Conditions:
    """Which pooled sample belongs to which condition, and the robust target.

    ``ids``: int64 (N,), 0 = clean, k = ``names[k]``; ``n_images``: images per condition (the pool is
    ``len(names)`` blocks of ``n_images``, in ``names`` order)."""

    ids: np.ndarray
    names: List[str]
    n_images: int
    mode: str = "mean"
    max_drop: float = 1.0
    worst_drop: float = 2.5
    z: Optional[float] = None  # confidence: hold the targets on upper bounds of the drops (None: the estimates)

    @classmethod
    def blocks(cls, names: Sequence[str], n_images: int, **target: Any) -> "Conditions":
        ids = np.repeat(np.arange(len(names), dtype=np.int64), int(n_images))
        return cls(ids, list(names), int(n_images), **target)

    def __post_init__(self) -> None:
        if self.mode not in ROBUST_MODES:
            raise ValueError(f"--robust must be one of {', '.join(ROBUST_MODES)}, got {self.mode!r}")
        if not (np.isfinite(self.worst_drop) and self.worst_drop >= 0):
            raise ValueError(f"--worst-drop must be >= 0 accuracy points, got {self.worst_drop}")
        if not self.names or self.names[0] != "clean":
            raise ValueError("the first condition must be the clean split")
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self._counts = np.bincount(self.ids, minlength=len(self.names)).astype(np.float64)
        # paired bounds need the pool as blocks() lays it out: the same n_images images under every condition
        self._blocked = bool(np.array_equal(self.ids, np.repeat(np.arange(len(self.names)), self.n_images)))

    @property
    def clean(self) -> np.ndarray:
        """Boolean mask of the clean samples, (N,)."""
        return self.ids == 0

    def tile_folds(self, fold_ids: np.ndarray) -> np.ndarray:
        """Fold ids grouped by image: the clean block's ids repeated for every condition."""
        return np.tile(np.asarray(fold_ids)[: self.n_images], len(self.names))

    def _per_condition(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.ids, weights=values, minlength=len(self.names)) / np.maximum(self._counts, 1)

    def evaluate(self, scores: np.ndarray, correct: np.ndarray, fractions: np.ndarray,
                 thresholds: Sequence[float]) -> Dict[str, np.ndarray]:
        """Per-condition accuracy, mean cost, full-depth accuracy and drop (points) of one operating point."""
        ex, _, _ = simulate(scores, correct, fractions, thresholds)
        right = correct[np.arange(len(ex)), ex].astype(np.float64)
        acc = self._per_condition(right)
        final = self._per_condition(correct[:, -1].astype(np.float64))
        cost = self._per_condition(np.asarray(fractions, dtype=np.float64)[ex])
        out = {"accuracy": acc, "mean_cost": cost, "final": final, "drop": 100.0 * (final - acc)}
        if self.z is not None:
            out.update(self._bounds(right, correct[:, -1].astype(np.float64)))
        return out

    def _bounds(self, taken: np.ndarray, final: np.ndarray) -> Dict[str, np.ndarray]:
        """Upper confidence bounds (points) of each condition's drop, and of the mean drop over the degraded ones
        (paired per image: the pool is ``len(names)`` blocks of the same ``n_images`` images)."""
        k = len(self.names)
        if not self._blocked or len(taken) != k * self.n_images:
            raise ValueError("confidence bounds need the pool as Conditions.blocks lays it out")
        taken, final = taken.reshape(k, self.n_images), final.reshape(k, self.n_images)
        bound = 100.0 * np.atleast_1d(loss_upper_bound(taken, final, self.z))
        mean_bound = (100.0 * loss_upper_bound(taken[1:].mean(axis=0), final[1:].mean(axis=0), self.z) if k > 1
                      else float(bound[0]))
        return {"drop_bound": bound, "mean_drop_bound": np.array(mean_bound)}

    def meets(self, ev: Dict[str, np.ndarray]) -> bool:
        tol = 1e-9
        drop = ev["drop_bound"] if self.z is not None else ev["drop"]
        if self.mode == "worst" or len(drop) == 1:
            return bool(np.all(drop <= self.max_drop + tol))
        degraded = drop[1:]
        mean = float(ev["mean_drop_bound"]) if self.z is not None else degraded.mean()
        return bool(drop[0] <= self.max_drop + tol and mean <= self.max_drop + tol
                    and degraded.max() <= self.worst_drop + tol)

    def choose(self, path: Sequence[PathPoint], scores: np.ndarray, correct: np.ndarray,
               fractions: np.ndarray) -> Tuple[PathPoint, bool, Dict[str, np.ndarray]]:
        """The cheapest point of ``path`` meeting the robust target (binary search; the first point, full depth,
        when none does), as a PathPoint with the *clean* accuracy and mean cost, whether it meets, and its
        per-condition evaluation."""
        cache: Dict[int, Dict[str, np.ndarray]] = {}

        def ev(j: int) -> Dict[str, np.ndarray]:
            if j not in cache:
                cache[j] = self.evaluate(scores, correct, fractions, path[j].thresholds)
            return cache[j]

        if self.z is not None:  # bounds: fixed-sequence testing from full depth, stop at the first failure
            lo = 0
            for j in range(1, len(path)):
                if not self.meets(ev(j)):
                    break
                lo = j
        else:
            lo, hi = 0, len(path) - 1  # invariant: lo meets (or is the start), answer in [lo, hi]
            if self.meets(ev(hi)):
                lo = hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.meets(ev(mid)):
                    lo = mid
                else:
                    hi = mid
        e = ev(lo)
        clean = PathPoint(list(path[lo].thresholds), float(e["accuracy"][0]), float(e["mean_cost"][0]),
                          float(e["mean_cost"][0]))
        return clean, self.meets(e), e

    def target(self) -> Dict[str, Any]:
        return {"mode": self.mode, "max_drop": float(self.max_drop),
                "worst_drop": None if self.mode == "worst" else float(self.worst_drop),
                "z": None if self.z is None else float(self.z),
                "conditions": list(self.names), "images_per_condition": int(self.n_images)}

    def summary(self, ev: Dict[str, np.ndarray]) -> Dict[str, Any]:
        """Per-gate statistics: clean cost, mean / worst drop over the degraded conditions, per condition."""
        drop = ev["drop"]
        degraded = drop[1:] if len(drop) > 1 else drop
        worst = int(np.argmax(degraded)) + (1 if len(drop) > 1 else 0)
        return {
            "clean_cost": float(ev["mean_cost"][0]), "clean_drop": float(drop[0]),
            "mean_drop": float(degraded.mean()), "worst_drop": float(drop[worst]),
            "worst_condition": self.names[worst],
            "mean_cost_degraded": float(ev["mean_cost"][1:].mean()) if len(drop) > 1 else float(ev["mean_cost"][0]),
            **({"worst_drop_bound": float(np.max(ev["drop_bound"][1:] if len(drop) > 1 else ev["drop_bound"])),
                "mean_drop_bound": float(ev["mean_drop_bound"])} if "drop_bound" in ev else {}),
            "per_condition": {name: {"accuracy": float(ev["accuracy"][k]), "final": float(ev["final"][k]),
                                     "drop": float(drop[k]), "mean_cost": float(ev["mean_cost"][k])}
                              for k, name in enumerate(self.names)},
        }


def degraded_outputs(model, images: np.ndarray, labels: np.ndarray, preprocess, kinds: Sequence[str],
                     severities: Sequence[int], batch_size: int, device: str, progress: bool, seed: int = 0,
                     clean=None) -> Tuple[List[str], list]:
    """Collect the model's outputs once per condition: clean (``clean`` when already collected), then every kind
    at every severity (corruption seed ``seed + k`` for the k-th condition). Returns (names, outputs)."""
    from .collect import collect
    from .corrupt import corrupt

    names, parts = ["clean"], [clean if clean is not None else collect(
        model, images, labels, preprocess, batch_size, device, progress, description="calibration split")]
    for kind in kinds:
        for s in severities:
            names.append(condition_name(kind, s))
            bad = corrupt(images, kind, s, seed=seed + len(names))
            parts.append(collect(model, bad, labels, preprocess, batch_size, device, progress,
                                 description=f"calibration split, {names[-1]}"))
    return names, parts

"""Calibration of exit gates on the checkpoint's calibration split (the validation part held out in training).

Steps (``calibrate``):
1. run the model once over the calibration split (``collect``) and fit one softmax temperature per exit
   (``gates.fit_temperature``, NLL);
2. for every gate and every subset of the internal exits (``stages.internal_subsets``: 64 for 7 exits; or the
   subset forced with ``exits``), compute the gate's raw score at each kept exit as the deployed chain computes it:
   the coherence signals against the previous *kept* exit, PABEE ``patience`` over the kept exits, and the
   ``learned`` gate, a logistic regression per kept exit over the 7 signals + patience predicting "this exit's
   answer is right". The learned gate is cross-fitted: its threshold search sees out-of-fold scores (K folds);
   the weights stored in the policy are refitted on all the data. Scores, orientations and fits are cached by
   what they depend on (the exit, and the previous kept exit or the kept exits before it);
3. orient every gate per kept exit from the data (``thresholds.orient``: sign +1 when a higher score means right);
4. price leaving at each kept exit with ``stages.exit_costs`` (the kept heads only, one ``boundary`` per stage run)
   as a fraction of ``stages.reference_cost`` (the plain network, one call), and search per-exit thresholds on
   that subset (``thresholds.greedy_path`` + ``choose``) for the target: an accuracy at most ``max_drop`` points
   below the final exit's on the split, or a mean-cost budget (fraction of the plain network);
5. each gate keeps its best subset: the cheapest that meets the target (budget: the most accurate within budget);
6. the winner is the gate with the smallest mean cost that meets the target (budget: the most accurate within
   budget); its ``ExitPolicy`` (with its kept ``exits``) goes into ``ckpt["policy"]``, every gate's policy and
   statistics into ``ckpt["calibration"]`` (layout in docs/architecture.md).

Costs: MACs from ``model.costs()`` plus a per-stage overhead in MAC-equivalents (``stage_overhead``), or measured
per-segment / per-head costs and per-call overhead from a ``costs.json`` written by ``edgeexit profile``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import confidence
from . import gates as G
from . import stages
from .metrics import accuracy_cost_auc
from .policy import ExitPolicy
from .thresholds import PathPoint, choose, choose_confident, greedy_path, oracle, orient, simulate

__all__ = [
    "CostModel", "DEFAULT_STAGE_OVERHEAD", "model_costs", "load_costs", "resolve_costs", "parse_gates",
    "fit_temperatures", "cross_fit", "ScoreColumns", "policy_scores", "CalibrationResult", "calibrate_outputs",
    "calibrate", "print_calibration", "direction",
]

COST_METRICS = ("latency_ms", "energy_mj")
COSTS_SCHEMAS = ("edgeexit-costs/1", "edgeexit-costs/2")
DEFAULT_STAGE_OVERHEAD = 2_000_000.0
"""MAC-equivalents charged per engine call (stage) when costs are MACs: about 25-30 us of per-call overhead
(ONNX Runtime on a 2-core x86 CPU) at the ~70 GMAC/s that CPU sustains on these convolutions."""


# ----------------------------------------------------------------------------------------------------------------
# costs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Per-exit compute costs and the per-call overhead, in ``unit``.

    ``segments`` / ``heads``: E compute costs each; ``boundary``: the fixed cost of one engine call (one stage).
    Leaving at the kept exits of a chain costs ``stages.exit_costs(segments, heads, exits, boundary)``; the plain
    network (``reference``) costs ``stages.reference_cost(segments, heads, boundary)``. ``stage_timings``: the
    per-stage measurements of a costs.json v2, kept for the record (calibration prices stages with the rule).
    """

    segments: tuple
    heads: tuple
    boundary: float
    unit: str
    source: str
    device: Optional[str] = None
    backend: Optional[str] = None
    stage_timings: tuple = ()

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def reference(self) -> float:
        """The plain network run as one graph (``stages.reference_cost``)."""
        return stages.reference_cost(self.segments, self.heads, self.boundary)

    def exit_costs(self, exits: Optional[Sequence[int]] = None) -> np.ndarray:
        """Absolute cost of leaving at each kept exit (kept internal exits, then the last), float64."""
        return stages.exit_costs(self.segments, self.heads, exits, self.boundary)

    def fractions(self, exits: Optional[Sequence[int]] = None) -> np.ndarray:
        """``exit_costs(exits) / reference``: the cost fractions calibration and evaluation use."""
        return self.exit_costs(exits) / self.reference

    def for_gate(self, gate: str) -> "CostModel":
        """The costs of ``gate``'s stages: every internal head also pays for computing the gate's signals,
        ``GATES[gate].signal_cost`` per-call overheads (MACs do not count those graph nodes; a margin stage pays
        nothing, a learned one computes all seven signals). The last exit computes none."""
        extra = G.gate_spec(gate).signal_cost * self.boundary
        if extra == 0.0:
            return self
        heads = tuple(float(h) + (extra if i < self.num_exits - 1 else 0.0) for i, h in enumerate(self.heads))
        return replace(self, heads=heads)

    def exit_vector(self, exits: Optional[Sequence[int]] = None) -> np.ndarray:
        """``fractions(exits)`` spread over all E exits, float64 (E,); nan at the exits that are not kept."""
        out = np.full(self.num_exits, np.nan)
        out[list(stages.kept_exits(exits, self.num_exits))] = self.fractions(exits)
        return out

    def single_exit_fractions(self) -> np.ndarray:
        """Each exit on its own: one stage straight to exit i (its segments, its head, one call), float64 (E,);
        the last entry is the plain network (1.0)."""
        e = self.num_exits
        return np.asarray([self.fractions((i,) if i < e - 1 else ())[0] for i in range(e)])

    @property
    def cumulative(self) -> tuple:
        """Cost of leaving at each exit when every exit is kept (absolute)."""
        return tuple(float(v) for v in self.exit_costs(None))

    @property
    def fraction(self) -> np.ndarray:
        """``cumulative / reference``, float64 (E,): every exit kept."""
        return self.fractions(None)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "unit": self.unit, "source": self.source,
            "segments": [float(v) for v in self.segments], "heads": [float(v) for v in self.heads],
            "boundary": float(self.boundary), "reference": float(self.reference),
            "cumulative": [float(v) for v in self.cumulative], "fraction": [float(v) for v in self.fraction],
            "single_exit": [float(v) for v in self.single_exit_fractions()],
            "stage_timings": [dict(s) for s in self.stage_timings],
            "device": self.device, "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CostModel":
        """Inverse of ``to_dict``; a calibration written before stages existed has no boundary (0)."""
        return cls(tuple(float(v) for v in data["segments"]), tuple(float(v) for v in data["heads"]),
                   float(data.get("boundary") or 0.0), str(data["unit"]), str(data.get("source", "?")),
                   data.get("device"), data.get("backend"), tuple(dict(s) for s in data.get("stage_timings") or ()))


def _check_overhead(value: float, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return v


def model_costs(model, stage_overhead: float = DEFAULT_STAGE_OVERHEAD) -> CostModel:
    """MACs of the model's segments and heads (``model.costs()``), ``stage_overhead`` MACs per engine call."""
    c = model.costs()
    overhead = _check_overhead(stage_overhead, "--stage-overhead (MACs per stage)")
    return CostModel(tuple(float(v) for v in c.segment_macs), tuple(float(v) for v in c.head_macs), overhead,
                     "MACs", "model")


def _cost_values(name: str, values: Any, num_exits: int, path: Path) -> List[float]:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{path}: {name} must be a list of {num_exits} numbers")
    out = []
    for v in values:
        if isinstance(v, dict):  # a statistics record: take its central value
            v = next((v[k] for k in ("mean", "p50", "median") if k in v), None)
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {name} must contain numbers, got {v!r}") from None
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"{path}: {name} must be finite and >= 0, got {f}")
        out.append(f)
    if len(out) != num_exits:
        raise ValueError(f"{path}: {name} has {len(out)} entries but the model has {num_exits} exits "
                         "(profiled for another model?)")
    return out


def _boundary_value(record: Dict[str, Any], metric: str, path: Path) -> float:
    if "boundary" not in record:
        raise ValueError(f"{path}: an edgeexit-costs/2 file needs 'boundary' (the measured per-call overhead) for "
                         f"{metric}")
    value = record["boundary"]
    if isinstance(value, dict):  # a statistics record, as for segments and heads
        value = next((value[k] for k in ("mean", "p50", "median") if k in value), None)
    try:
        return _check_overhead(value, "boundary")
    except (TypeError, ValueError):
        raise ValueError(f"{path}: boundary must be a finite number >= 0, got {value!r}") from None


def _stage_timings(value: Any, num_exits: int, path: Path) -> tuple:
    """The optional per-stage timings of a v2 file: a list of objects, each naming the ``exits`` (indices of this
    model's exits) of what it timed. Informative only, so nothing else about them is checked."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, dict) and isinstance(s.get("exits"), list) for s in value):
        raise ValueError(f"{path}: stages must be a list of objects with an 'exits' list")
    for s in value:
        bad = [k for k in s["exits"] if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_exits]
        if bad:
            raise ValueError(f"{path}: stages: {bad[0]!r} is not an exit of a {num_exits}-exit model")
    return tuple(dict(s) for s in value)


def load_costs(path: Path | str, num_exits: int, metric: Optional[str] = None) -> CostModel:
    """Read a ``costs.json`` (docs/architecture.md "Device costs").

    ``edgeexit-costs/1``: every segment and head was measured as its own call, so the per-stage ``boundary`` is 0;
    ``edgeexit-costs/2``: ``segments`` / ``heads`` are compute only and ``boundary`` is the measured per-call
    overhead (same unit); optional ``stages`` timings are kept for the record. ``metric`` (latency_ms |
    energy_mj) picks one of the measured costs; default: the file's ``metric``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"costs file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") not in COSTS_SCHEMAS:
        expected = " or ".join(f'"{s}"' for s in COSTS_SCHEMAS)
        raise ValueError(f"{path} is not an edgeexit costs file (expected \"schema\": {expected})")
    v2 = data["schema"] == "edgeexit-costs/2"
    file_metric = data.get("metric")
    if metric is not None and metric not in COST_METRICS:
        raise ValueError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, got {metric!r}")
    metric = metric or file_metric
    if metric not in COST_METRICS:
        raise ValueError(f"{path}: metric must be one of {', '.join(COST_METRICS)}, got {file_metric!r}")
    if metric == file_metric and "segments" in data and "heads" in data:
        record = data
    else:
        measured_all = data.get("measured") or {}
        if not isinstance(measured_all, dict):
            raise ValueError(f"{path}: 'measured' must be an object, got {type(measured_all).__name__}")
        record = measured_all.get(metric)
        if not isinstance(record, dict) or "segments" not in record or "heads" not in record:
            raise ValueError(f"{path} has no measured {metric} (segments and heads); profile with that meter "
                             f"or drop --cost-metric")
    seg = _cost_values("segments", record["segments"], num_exits, path)
    heads = _cost_values("heads", record["heads"], num_exits, path)
    boundary = _boundary_value(record, metric, path) if v2 else 0.0
    timings = _stage_timings(data.get("stages"), num_exits, path) if v2 else ()
    if sum(seg) + heads[-1] + boundary <= 0:
        raise ValueError(f"{path}: the plain network's cost (sum of segments + last head) must be > 0")
    return CostModel(tuple(seg), tuple(heads), boundary, metric, str(path), data.get("device"), data.get("backend"),
                     timings)


def resolve_costs(model, costs_path: Optional[Path | str] = None, cost_metric: Optional[str] = None,
                  stage_overhead: Optional[float] = None) -> CostModel:
    """MACs plus ``stage_overhead`` (default ``DEFAULT_STAGE_OVERHEAD``) without ``costs_path``, else the file."""
    if costs_path is None:
        if cost_metric is not None:
            raise ValueError("--cost-metric needs --costs costs.json (without it, costs are the model's MACs)")
        return model_costs(model, DEFAULT_STAGE_OVERHEAD if stage_overhead is None else stage_overhead)
    if stage_overhead is not None:
        raise ValueError("--stage-overhead is in MACs and prices MAC costs; with --costs the per-call overhead is the "
                         "file's measured 'boundary' (edgeexit-costs/2)")
    return load_costs(costs_path, model.num_exits, cost_metric)


# ----------------------------------------------------------------------------------------------------------------
# gates and scores
# ----------------------------------------------------------------------------------------------------------------
def parse_gates(text: Optional[str | Sequence[str]]) -> List[str]:
    """``"all"`` / None -> every gate; else a comma-separated list (order of ``gates.GATES``)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return list(G.GATES)
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in G.GATES]
    if unknown:
        raise ValueError(f"unknown gate {unknown[0]!r}; choose from all, {', '.join(G.GATES)}")
    if not names:
        raise ValueError("--gates names no gate")
    return [g for g in G.GATES if g in names]


def fit_temperatures(logits: np.ndarray, labels: np.ndarray) -> List[float]:
    """One temperature per exit (NLL on the calibration split), logits (n, E, C)."""
    return [float(G.fit_temperature(logits[:, i], labels)) for i in range(logits.shape[1])]


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    k = max(1, min(int(folds), n))
    ids = np.empty(n, dtype=np.int64)
    order = np.random.RandomState(seed).permutation(n)
    for f, chunk in enumerate(np.array_split(order, k)):
        ids[chunk] = f
    return ids


def cross_fit(features: np.ndarray, target: np.ndarray, fold_ids: np.ndarray,
              l2: float = 1e-2) -> Tuple[np.ndarray, Dict[str, Any]]:
    """One learned gate, cross-fitted: ``(oof, params)``. ``oof`` float64 (n,): each sample scored by the
    ``fit_logistic`` model fitted without its fold (``fold_ids``); ``params``: fitted on all the data (what the
    policy and the runtime use). With a single fold the scores are in-sample."""
    full = G.fit_logistic(features, target, l2=l2)
    n_folds = int(fold_ids.max()) + 1 if fold_ids.size else 0
    if n_folds < 2:
        return G.logistic_score(features, full), full
    oof = np.zeros(features.shape[0], dtype=np.float64)
    for f in range(n_folds):
        test = fold_ids == f
        oof[test] = G.logistic_score(features[test], G.fit_logistic(features[~test], target[~test], l2=l2))
    return oof, full


Chain = Tuple[int, ...]  # the kept internal exits before an exit, in order


class ScoreColumns:
    """Every gate's raw score, orientation and AUROC at one exit of a chain, cached by what it depends on.

    Exit i's score depends on the kept exits before it (``prefix``) only through what the gate reads
    (``gates.GATES``): softmax and saliency gates on nothing, the coherence gates on the previous kept exit
    (``prefix[-1]``), patience and the learned gate on the whole prefix (patience counts agreeing kept exits).
    So 64 subsets of 7 exits need at most 6 + 21 + 63 distinct columns per gate family, not 64 x 6.
    """

    def __init__(self, outputs, temperatures: Sequence[float], folds: int = 5, seed: int = 0, l2: float = 1e-2):
        self.outputs = outputs
        self.temperatures = [float(t) for t in temperatures]
        self.classes = outputs.classes
        self.correct = outputs.correct
        self.fold_ids = _fold_ids(len(outputs), folds, seed)
        self.n_folds = int(self.fold_ids.max()) + 1 if len(outputs) else 0
        self.l2 = l2
        self._cache: Dict[tuple, Any] = {}

    def _memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def patience(self, i: int, prefix: Chain) -> np.ndarray:
        """Patience at exit i after the kept exits ``prefix``, int64 (n,): ``gates.next_patience`` along the chain,
        as the runtime counts it."""
        if not prefix:
            return G.next_patience(None, None, self.classes[:, i])

        def compute() -> np.ndarray:
            prev = prefix[-1]
            return G.next_patience(self.patience(prev, prefix[:-1]), self.classes[:, prev], self.classes[:, i])

        return self._memo(("patience", i, prefix), compute)

    def signals(self, i: int, prefix: Chain) -> np.ndarray:
        """The 7 signals of exit i after ``prefix``, float32 (n, 7) (``ExitOutputs.exit_signals``)."""
        return self.outputs.exit_signals(i, prefix[-1] if prefix else None, self.temperatures)

    def learned(self, i: int, prefix: Chain) -> Tuple[np.ndarray, Dict[str, Any]]:
        """``cross_fit`` of the learned gate at exit i after ``prefix``: (out-of-fold scores, params)."""
        def compute():
            x = G.gate_features(self.signals(i, prefix), self.patience(i, prefix))
            return cross_fit(x, self.correct[:, i], self.fold_ids, self.l2)

        return self._memo(("learned", i, prefix), compute)

    def raw(self, gate: str, i: int, prefix: Chain) -> np.ndarray:
        """Raw (unoriented) calibration score of ``gate`` at exit i, float64 (n,); the learned gate's is out-of-fold."""
        if gate == "learned":
            return self.learned(i, prefix)[0]
        if gate == "patience":
            return self.patience(i, prefix).astype(np.float64)
        if G.gate_spec(gate).family == "combined":
            return G.gate_score(gate, self.signals(i, prefix))
        return self.signals(i, prefix)[:, G.SIGNAL_NAMES.index(gate)].astype(np.float64)

    def oriented(self, gate: str, i: int, prefix: Chain) -> Tuple[np.ndarray, float, float]:
        """``(sign * raw, sign, auroc)`` of ``gate`` at exit i (``thresholds.orient``)."""
        spec = G.gate_spec(gate)
        if spec.needs_patience:
            depends: tuple = prefix
        elif spec.needs_prev_cam:
            depends = prefix[-1:]
        else:
            depends = ()

        def compute():
            raw = self.raw(gate, i, prefix)
            signs, aucs = orient(raw[:, None], self.correct[:, i:i + 1])
            return raw * signs[0], float(signs[0]), float(aucs[0])

        return self._memo(("oriented", gate, i, depends), compute)

    def learned_params(self, exits: Sequence[int]) -> List[Optional[Dict[str, Any]]]:
        """The learned gate's params of the chain keeping ``exits`` (E - 1 entries, None where not kept)."""
        e = self.outputs.num_exits
        out: List[Optional[Dict[str, Any]]] = [None] * (e - 1)
        for j, k in enumerate(exits):
            out[k] = self.learned(k, tuple(exits[:j]))[1]
        return out


def policy_scores(policy: ExitPolicy, signals: np.ndarray, patience: np.ndarray) -> np.ndarray:
    """Oriented gate scores of ``policy`` at every internal exit, float64 (n, E - 1), from ``signals`` and
    ``patience`` of the policy's chain (``ExitOutputs.signals(temps, policy.exits)``, ``patience_for``); nan at
    the exits the policy does not keep."""
    e = policy.num_exits
    out = np.full((signals.shape[0], e - 1), np.nan)
    for i in policy.kept_internal:
        out[:, i] = policy.oriented_score(i, signals[:, i], patience[:, i])
    return out


def direction(signs: Sequence[float]) -> str:
    """"higher" / "lower" (= right) when every internal exit agrees, else the per-exit pattern, e.g. "mixed ++-"."""
    s = [float(v) for v in signs]
    if s and all(v > 0 for v in s):
        return "higher"
    if s and all(v < 0 for v in s):
        return "lower"
    return "mixed " + "".join("+" if v > 0 else "-" for v in s) if s else "-"


def _nan_mean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# calibration on collected outputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationResult:
    calibration: Dict[str, Any]
    policy: Dict[str, Any]
    oriented: Dict[str, np.ndarray] = field(default_factory=dict)  # gate -> oriented scores at its kept exits


def _target_dict(final_acc: float, max_drop: Optional[float], budget: Optional[float],
                 confidence_level: Optional[float] = None) -> Dict[str, Any]:
    if budget is not None:
        return {"kind": "budget", "budget": float(budget), "max_drop": None, "accuracy": None,
                "final_accuracy": final_acc, "confidence": None}
    drop = 1.0 if max_drop is None else float(max_drop)
    return {"kind": "accuracy", "budget": None, "max_drop": drop, "accuracy": final_acc - drop / 100.0,
            "final_accuracy": final_acc, "confidence": confidence_level}


def check_confidence(level: Optional[float], budget: Optional[float] = None) -> Optional[float]:
    """``--confidence``: a one-sided level in [0.5, 1) (0.5 is the plain point estimate) for an accuracy target
    (clean, or with ``--degrade`` every condition's), or None."""
    if level is None:
        return None
    if not (math.isfinite(level) and 0.5 <= level < 1):
        raise ValueError(f"--confidence must lie in [0.5, 1) (e.g. 0.95), got {level}")
    if budget is not None:
        raise ValueError("--confidence applies to an accuracy target (--max-drop), not to --budget")
    return float(level)


def confidence_z(level: Optional[float]) -> Optional[float]:
    """The standard normal quantile of a one-sided confidence level (1.645 at 0.95), or None."""
    return None if level is None else float(NormalDist().inv_cdf(level))


def _meets(target: Dict[str, Any], accuracy: float, cost_fraction: float) -> bool:
    tol = 1e-12
    if target["kind"] == "budget":
        return cost_fraction <= target["budget"] + tol
    return accuracy >= target["accuracy"] - tol


def _best_index(accuracy: Sequence[float], cost: Sequence[float], meets: Sequence[bool],
                target: Dict[str, Any]) -> int:
    """The candidate a target picks: accuracy target -> the cheapest that meets it (else the most accurate);
    budget -> the most accurate within it (else the cheapest). Remaining ties go to the earlier candidate."""
    idx = range(len(accuracy))
    ok = [k for k in idx if meets[k]]
    if target["kind"] == "accuracy":
        if ok:
            return min(ok, key=lambda k: (cost[k], -accuracy[k], k))
        return max(idx, key=lambda k: (accuracy[k], -cost[k], -k))
    if ok:
        return max(ok, key=lambda k: (accuracy[k], -cost[k], -k))
    return min(idx, key=lambda k: (cost[k], -accuracy[k], k))


def _pick_winner(stats: Dict[str, Dict[str, Any]], target: Dict[str, Any]) -> str:
    names = list(stats)
    k = _best_index([stats[g]["accuracy"] for g in names], [stats[g]["mean_cost"] for g in names],
                    [stats[g]["meets_target"] for g in names], target)
    return names[k]


@dataclass
class _Trial:
    """One gate on one subset of exits: its threshold path and the point the target picks."""

    exits: Chain
    path: List[PathPoint]
    point: PathPoint
    meets: bool
    robust: Optional[Dict[str, np.ndarray]] = None  # per-condition evaluation (calibration for degraded inputs)


def _oriented_columns(cols: ScoreColumns, gate: str, exits: Chain) -> Tuple[np.ndarray, List[float], List[float]]:
    """Oriented scores (n, len(exits)), signs and AUROCs of ``gate`` at the kept internal ``exits``."""
    parts = [cols.oriented(gate, k, exits[:j]) for j, k in enumerate(exits)]
    scores = np.stack([p[0] for p in parts], axis=1) if parts else np.zeros((len(cols.outputs), 0))
    return scores, [p[1] for p in parts], [p[2] for p in parts]


def _try_subset(cols: ScoreColumns, gate: str, exits: Chain, costs: CostModel, target: Dict[str, Any],
                n_candidates: int, conditions=None) -> _Trial:
    kept = exits + (cols.outputs.num_exits - 1,)
    scores, _, _ = _oriented_columns(cols, gate, exits)
    path = greedy_path(scores, cols.correct[:, kept], costs.fractions(exits), n_candidates=n_candidates,
                       reference_cost=1.0)
    if conditions is not None:  # degraded inputs: the per-condition target on the pooled path (edgeexit.robust)
        point, meets, ev = conditions.choose(path, scores, cols.correct[:, kept], costs.fractions(exits))
        return _Trial(exits, path, point, meets, ev)
    if target["kind"] == "budget":
        point = choose(path, budget=target["budget"])
    elif target.get("confidence") is not None:  # the loss's upper bound, not its estimate, within the target
        z = confidence_z(target["confidence"])
        point = choose_confident(path, scores, cols.correct[:, kept], costs.fractions(exits),
                                 target["max_drop"] / 100.0, z)
    else:
        point = choose(path, target_accuracy=target["accuracy"])
    return _Trial(exits, path, point, _meets(target, point.accuracy, point.mean_cost))


def _spread(values: Sequence[float], exits: Chain, num_exits: int, fill: float) -> List[float]:
    """Values at the kept internal ``exits`` -> a list over all E - 1 internal exits, ``fill`` elsewhere."""
    out = [float(fill)] * (num_exits - 1)
    for k, v in zip(exits, values):
        out[k] = float(v)
    return out


def _policy_of(cols: ScoreColumns, gate: str, trial: _Trial) -> ExitPolicy:
    """The ExitPolicy of ``gate`` at the point a trial chose on its chain."""
    e = cols.outputs.num_exits
    _, signs, _ = _oriented_columns(cols, gate, trial.exits)
    return ExitPolicy(gate=gate, thresholds=_spread(trial.point.thresholds, trial.exits, e, math.inf),
                      signs=_spread(signs, trial.exits, e, 1.0), temperatures=cols.temperatures,
                      learned=cols.learned_params(trial.exits), exits=list(trial.exits))


def _gate_stats(cols: ScoreColumns, gate: str, trials: List[_Trial], best: _Trial, every: _Trial, costs: CostModel,
                target: Dict[str, Any], final_acc: float) -> Tuple[Dict[str, Any], np.ndarray]:
    """Statistics of a gate: its chosen chain (``best``: policy, operating point, histogram, curve) and, to compare
    gates on an equal footing, the chain that keeps every exit (``every``: AUROC per exit, curve area)."""
    e = cols.outputs.num_exits
    exits = best.exits
    kept = exits + (e - 1,)
    scores, signs, kept_aucs = _oriented_columns(cols, gate, exits)
    frac = costs.fractions(exits)
    pos, acc, mean_cost = simulate(scores, cols.correct[:, kept], frac, best.point.thresholds)
    ex = np.asarray(kept)[pos]
    policy = _policy_of(cols, gate, best)
    _, _, all_aucs = _oriented_columns(cols, gate, every.exits)
    stats = {
        "family": G.gate_spec(gate).family,
        "exits": [int(k) for k in exits],
        "policy": policy.to_dict(),
        "accuracy": float(acc),
        "mean_cost": float(mean_cost),
        "drop": 100.0 * (final_acc - float(acc)),
        "histogram": [int(v) for v in np.bincount(ex, minlength=e)],
        "stage_cost": [float(v) for v in frac],
        "kept_auroc": _spread(kept_aucs, exits, e, math.nan),
        "auroc": [float(a) for a in all_aucs],
        "mean_auroc": _nan_mean(all_aucs),
        "signs": [float(s) for s in policy.signs],
        "direction": direction(signs),
        "meets_target": _meets(target, float(acc), float(mean_cost)),
        "path": [[float(p.mean_cost), float(p.accuracy)] for p in best.path],
        "path_thresholds": [_spread(p.thresholds, exits, e, math.inf) for p in best.path],
        "auc": accuracy_cost_auc([p.mean_cost for p in every.path], [p.accuracy for p in every.path], full_cost=1.0),
        "all_exits": {
            "policy": _policy_of(cols, gate, every).to_dict(),
            "path": [[float(p.mean_cost), float(p.accuracy)] for p in every.path],
            "path_thresholds": [[float(t) for t in p.thresholds] for p in every.path],
        },
        "cross_fitted": gate == "learned" and cols.n_folds >= 2,
        "subsets": [{"exits": list(t.exits), "mean_cost": float(t.point.mean_cost), "accuracy": float(t.point.accuracy),
                     "meets_target": bool(t.meets)} for t in trials],
    }
    return stats, scores


def drift_block(outputs, policy: ExitPolicy, seed: int = 0,
                conservative_thresholds: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """The run-time drift guard's reference for ``policy`` (``runtime.drift``): mean / std of the confidence of
    the exit each clean calibration image takes, the same for the conservative policy (``conservative_thresholds``,
    one per kept internal exit, on the same stages as the runtime applies them; None or all inf: full depth), and
    the bound calibrated on clean windows of the default size."""
    from .runtime.chain import runner_policy
    from .runtime.drift import DEFAULT_WINDOW, DriftReference, calibrate_bound, reference_stats

    strict = None if conservative_thresholds is None else tuple(float(t) for t in conservative_thresholds)
    if strict is not None and all(math.isinf(t) for t in strict):  # never leaves early: full depth in one call
        strict = None
    sig = outputs.signals(policy.temperatures, policy.exits)  # the conservative policy shares exits and temperatures

    def taken_confidence(p: Optional[ExitPolicy]) -> np.ndarray:
        ex = np.full(len(outputs), outputs.num_exits - 1) if p is None else p.decide(sig, outputs.classes)
        return sig[np.arange(len(outputs)), ex, G.SIGNAL_NAMES.index("max_prob")]

    conf = taken_confidence(policy)
    conservative = None if strict is None else runner_policy(policy, list(strict))
    (mu, sd), (mu_c, sd_c) = reference_stats(conf), reference_stats(taken_confidence(conservative))
    return DriftReference(mu, sd, mu_c, sd_c, calibrate_bound(conf, DEFAULT_WINDOW, seed=seed),
                          conservative_thresholds=strict).to_dict()


def fit_guard_thresholds(calibration: Dict[str, Any], pooled, costs: CostModel, conditions, *,
                         max_drop: float, confidence_level: Optional[float] = None, seed: int = 0,
                         gate_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``calibrate --degrade KINDS --degraded-as guard``: the clean calibration stays the policy, and the degraded
    copies fit the drift guard's conservative policy instead of the default one. Per gate (``gate_names``: every
    calibrated one; never the learned gate, whose weights would be refitted), thresholds on the *same* kept exits,
    temperatures and orientation that meet the robust target (``conditions``) on ``pooled`` (clean + degraded
    copies); they become the gate's drift block's ``conservative_thresholds``, so a drifting stream keeps the
    early exits but leaves them only when the degraded-calibrated thresholds allow (usually higher ones; nothing
    forces each to be, the target on the copies is what they are fitted to). A gate without such a point
    keeps full depth as its conservative policy. Updates ``calibration["gates"][g]["drift"]`` in place and returns,
    per gate, the robust figures of the conservative thresholds (``guard``)."""
    eligible = guard_gates(calibration["gates"] if gate_names is None else gate_names)
    clean_outputs = pooled.subset(np.flatnonzero(conditions.clean))
    out: Dict[str, Any] = {}
    for gate in eligible:
        entry = calibration["gates"][gate]
        policy = ExitPolicy.from_dict(entry["policy"])
        res = calibrate_outputs(pooled, costs, max_drop=max_drop, gate_names=[gate], exits=policy.kept_internal,
                                temperatures=policy.temperatures, conditions=conditions,
                                confidence_level=confidence_level, seed=seed).calibration["gates"][gate]
        strict = ExitPolicy.from_dict(res["policy"])
        same_scale = all(strict.signs[k] == policy.signs[k] for k in policy.kept_internal)
        usable = res["meets_target"] and same_scale
        thresholds = [strict.thresholds[k] for k in policy.kept_internal] if usable else None
        entry["drift"] = drift_block(clean_outputs, policy, seed=seed, conservative_thresholds=thresholds)
        has_thresholds = entry["drift"]["conservative_thresholds"] is not None
        out[gate] = {"conservative": "thresholds" if has_thresholds else "full depth",
                     "thresholds": entry["drift"]["conservative_thresholds"],
                     "robust": res.get("robust"), "mean_cost": res["mean_cost"]}
    return out


def _subsets(num_exits: int, exits: Optional[Sequence[int]], max_kept: Optional[int]) -> List[Chain]:
    if exits is not None:
        if max_kept is not None:
            raise ValueError("give --exits or --max-kept, not both")
        return [stages.normalize_exits(exits, num_exits)]
    if max_kept is not None and int(max_kept) < 0:
        raise ValueError(f"--max-kept must be >= 0, got {max_kept}")
    return list(stages.internal_subsets(num_exits, max_kept))


def calibrate_outputs(
    outputs,
    costs: CostModel,
    *,
    max_drop: Optional[float] = None,
    budget: Optional[float] = None,
    gate_names: Optional[Sequence[str]] = None,
    folds: int = 5,
    seed: int = 0,
    n_candidates: int = 64,
    temperatures: Optional[Sequence[float]] = None,
    exits: Optional[Sequence[int]] = None,
    max_kept: Optional[int] = None,
    conditions=None,
    confidence_level: Optional[float] = None,
) -> CalibrationResult:
    """Calibrate every gate on collected ``ExitOutputs`` (labels known). ``max_drop`` in accuracy points
    (default 1.0) or ``budget`` (mean cost as a fraction of the plain network): not both. Every subset of the
    internal exits is tried (at most ``max_kept`` exits each), or only ``exits`` when given (``()``: none).
    ``conditions`` (``robust.Conditions``): ``outputs`` pools clean and degraded copies of the split; each
    operating point must meet the per-condition target, and accuracy / cost / drop in the statistics are clean.
    ``confidence_level`` (one-sided, e.g. 0.95): the accuracy target must hold for the upper confidence bound of
    the loss, not its estimate (``thresholds.choose_confident``)."""
    if max_drop is not None and budget is not None:
        raise ValueError("give --max-drop or --budget, not both")
    confidence_level = check_confidence(confidence_level, budget)
    if conditions is not None and confidence_level is not None:  # every condition's target held on its bound
        conditions = replace(conditions, z=confidence_z(confidence_level))
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"--budget must be a positive fraction of the plain network (e.g. 0.5), got {budget}")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise ValueError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")
    n, e = len(outputs), outputs.num_exits
    if n == 0:
        raise ValueError("no calibration images")
    if e < 2:
        raise ValueError("the model has a single exit: there is nothing to gate")
    if np.any(outputs.labels < 0):
        raise ValueError("calibration needs labelled images")
    gate_names = parse_gates(gate_names)
    if costs.num_exits != e:
        raise ValueError(f"costs have {costs.num_exits} exits, the model {e}")
    subsets = _subsets(e, exits, max_kept)

    if conditions is not None and budget is not None:
        raise ValueError("calibration for degraded inputs needs an accuracy target (--max-drop), not --budget")
    temps = list(temperatures) if temperatures is not None else fit_temperatures(outputs.logits, outputs.labels)
    cols = ScoreColumns(outputs, temps, folds, seed)
    clean = slice(None) if conditions is None else conditions.clean
    if conditions is not None:
        cols.fold_ids = conditions.tile_folds(cols.fold_ids)
    exit_acc = cols.correct[clean].mean(axis=0)
    final_acc = float(exit_acc[-1])
    target = _target_dict(final_acc, max_drop, budget, confidence_level)
    if conditions is not None:
        target["robust"] = conditions.target()
    oracle_cost, oracle_acc = oracle(cols.correct[clean], costs.single_exit_fractions())

    started = time.perf_counter()
    stats: Dict[str, Dict[str, Any]] = {}
    oriented_all: Dict[str, np.ndarray] = {}
    every_exit = tuple(range(e - 1))
    for gate in gate_names:
        gate_costs = costs.for_gate(gate)
        trials = [_try_subset(cols, gate, s, gate_costs, target, n_candidates, conditions) for s in subsets]
        best = trials[_best_index([t.point.accuracy for t in trials], [t.point.mean_cost for t in trials],
                                  [t.meets for t in trials], target)]
        every = next((t for t in trials if t.exits == every_exit), None)
        if every is None:  # forced or capped subsets: the reference chain is searched on its own
            every = _try_subset(cols, gate, every_exit, gate_costs, target, n_candidates, conditions)
        stats[gate], oriented_all[gate] = _gate_stats(cols, gate, trials, best, every, gate_costs, target, final_acc)
        if conditions is not None:
            robust = conditions.summary(best.robust)
            stats[gate].update(accuracy=best.point.accuracy, mean_cost=best.point.mean_cost,
                               drop=robust["clean_drop"], meets_target=best.meets, robust=robust)
    clean_outputs = outputs if conditions is None else outputs.subset(np.flatnonzero(conditions.clean))
    for gate in gate_names:
        stats[gate]["drift"] = drift_block(clean_outputs, ExitPolicy.from_dict(stats[gate]["policy"]), seed=seed)
    winner = _pick_winner(stats, target)
    calibration = {
        "version": 2,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n": int(n),
        "target": target,
        "costs": costs.to_dict(),
        "cost_source": costs.source,
        "temperatures": [float(t) for t in temps],
        "exit_accuracy": [float(a) for a in exit_acc],
        "oracle": {"mean_cost": float(oracle_cost), "accuracy": float(oracle_acc)},
        "folds": cols.n_folds,
        "n_candidates": int(n_candidates),
        "subset_search": {"forced": None if exits is None else [int(k) for k in subsets[0]],
                          "max_kept": None if max_kept is None else int(max_kept), "subsets": len(subsets),
                          "seconds": round(time.perf_counter() - started, 3)},
        "gates": stats,
        "winner": winner,
    }
    win = ExitPolicy.from_dict(stats[winner]["policy"])  # bootstrap interval of the winner's operating point
    calibration["confidence"] = confidence.for_policy(  # on the clean split (degraded copies: the per-copy stats)
        oriented_all[winner][clean], cols.correct[clean][:, list(win.kept)],
        costs.for_gate(winner).fractions(win.exits), [win.thresholds[k] for k in win.kept_internal], seed=seed)
    return CalibrationResult(calibration, stats[winner]["policy"], oriented_all)


DEGRADED_AS = ("policy", "guard")  # what calibrate --degrade fits: the policy itself, or the drift guard's


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
def calibrate(
    ckpt_path: Path | str,
    *,
    out: Optional[Path | str] = None,
    max_drop: Optional[float] = None,
    budget: Optional[float] = None,
    costs_path: Optional[Path | str] = None,
    cost_metric: Optional[str] = None,
    data: Optional[Path | str] = None,
    gates: Optional[str | Sequence[str]] = "all",
    stage_overhead: Optional[float] = None,
    exits: Optional[str | Sequence[int]] = None,
    max_kept: Optional[int] = None,
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = print,
    degrade: Optional[str | Sequence[str]] = None,
    severities: str | Sequence[int] = "1,3,5",
    robust: str = "mean",
    worst_drop: float = 2.5,
    confidence_level: Optional[float] = None,
    degraded_as: str = "policy",
) -> Dict[str, Any]:
    """Calibrate a checkpoint's exit gates on its calibration split and write ``policy`` and ``calibration``
    into it (atomically; ``out`` writes a new checkpoint instead). Returns the calibration dict.

    ``stage_overhead``: MACs per engine call when costs are MACs (default ``DEFAULT_STAGE_OVERHEAD``); ``exits``:
    force the kept internal exits ("2,4", "none" or a list) instead of searching every subset; ``max_kept``: try
    only subsets of at most that many internal exits. ``degrade``: corruption kinds ("noise,blur" or a list) to
    calibrate for degraded inputs too, at ``severities``, with the ``robust`` target (``edgeexit.robust``):
    ``degraded_as="policy"`` makes that the policy; ``"guard"`` keeps the clean policy and fits the drift guard's
    conservative thresholds on the degraded copies instead (``fit_guard_thresholds``). ``confidence_level``: hold
    the accuracy target at this one-sided confidence (``calibrate_outputs``)."""
    from . import robust as R
    from .checkpoint import load_model, save_checkpoint
    from .corrupt import parse_kinds
    from .collect import calibration_images, collect
    from .preprocess import Preprocess

    if max_drop is not None and budget is not None:
        raise ValueError("give --max-drop or --budget, not both")
    check_confidence(confidence_level, budget)  # fail before the model pass
    gate_names = parse_gates(gates)
    model, ckpt = load_model(ckpt_path)
    if model.num_exits < 2:
        raise ValueError(f"{ckpt_path} has a single exit: there is nothing to gate")
    costs = resolve_costs(model, costs_path, cost_metric, stage_overhead)
    forced = stages.parse_exits(exits, model.num_exits) if isinstance(exits, str) else (
        None if exits is None else stages.normalize_exits(exits, model.num_exits))
    _subsets(model.num_exits, forced, max_kept)  # fail before the model pass
    kinds = (parse_kinds(degrade if isinstance(degrade, str) else ",".join(degrade))) if degrade else []
    sev = R.parse_severities(severities) if kinds else []
    if kinds and budget is not None:
        raise ValueError("--degrade needs an accuracy target (--max-drop), not --budget")
    if kinds and robust not in R.ROBUST_MODES:
        raise ValueError(f"--robust must be one of {', '.join(R.ROBUST_MODES)}, got {robust!r}")
    if degraded_as not in DEGRADED_AS:
        raise ValueError(f"--degraded-as must be one of {', '.join(DEGRADED_AS)}, got {degraded_as!r}")
    if degraded_as != "policy" and not kinds:
        raise ValueError("--degraded-as guard needs --degrade KINDS (the copies the guard's thresholds are fitted on)")
    if degraded_as == "guard":
        guard_gates(gate_names)  # fail before the model pass
    images = calibration_images(ckpt, data, progress=progress)
    root = data if data is not None else (ckpt.get("split") or {}).get("data")
    log(f"calibration split: {len(images)} held-out images of {root}"
        + (f" ({images.skipped} unreadable skipped)" if images.skipped else ""))
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    dev = _device(device)
    outputs = clean = collect(model, images.images, images.labels, preprocess, batch_size, dev, progress,
                              description="calibration split")
    conditions = None
    if kinds:  # each condition collected once, then one pooled search (edgeexit.robust)
        names, parts = R.degraded_outputs(model, images.images, images.labels, preprocess, kinds, sev, batch_size,
                                          dev, progress, seed=seed, clean=clean)
        outputs = R.pool_outputs(parts)
        conditions = R.Conditions.blocks(names, len(images), mode=robust,
                                         max_drop=1.0 if max_drop is None else float(max_drop),
                                         worst_drop=float(worst_drop))
        log(f"degraded copies: {len(names) - 1} condition(s) ({', '.join(kinds)} at severities "
            f"{','.join(map(str, sev))}), {len(outputs)} samples pooled")
    for_policy = conditions if degraded_as == "policy" else None
    result = calibrate_outputs(clean if for_policy is None else outputs, costs, max_drop=max_drop, budget=budget,
                               gate_names=gate_names, folds=folds, seed=seed, exits=forced, max_kept=max_kept,
                               conditions=for_policy, confidence_level=confidence_level)
    search = result.calibration["subset_search"]
    log(f"searched {search['subsets']} exit subset(s) x {len(gate_names)} gate(s) in {search['seconds']:.1f} s")
    if conditions is not None and for_policy is None:  # the degraded copies fit the drift guard's thresholds
        guard = fit_guard_thresholds(result.calibration, outputs, costs, conditions, max_drop=conditions.max_drop,
                                     confidence_level=confidence_level, seed=seed, gate_names=gate_names)
        result.calibration["guard"] = {"target": conditions.target(), "gates": guard}
        log(guard_text(result.calibration["winner"], guard))
    small = confidence.split_warning(result.calibration["confidence"], result.calibration["target"]["max_drop"])
    if small and confidence_level is None:  # with a confidence level the bound already pays for a small split
        log(f"edgeexit: warning: {small}")
    split = ckpt.get("split") or {}
    result.calibration["split"] = {
        "data": str(Path(data).resolve()) if data is not None else split.get("data"),
        "seed": split.get("seed"), "val_fraction": split.get("val_fraction"), "n": len(images),
        "skipped": int(images.skipped),
    }
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "version")}
    payload["policy"] = result.policy
    payload["calibration"] = result.calibration
    target_path = Path(out) if out is not None else Path(ckpt_path)
    save_checkpoint(target_path, payload)
    result.calibration["written_to"] = str(target_path)
    return result.calibration


def guard_gates(names: Sequence[str]) -> List[str]:
    """The gates ``--degraded-as guard`` can fit thresholds for: all but the learned gate, whose weights would be
    refitted on the degraded copies (no thresholds on the clean ones carry over)."""
    eligible = [g for g in names if g != "learned"]
    if not eligible:
        raise ValueError("--degraded-as guard: the learned gate has no guard thresholds (its weights would be "
                         "refitted); calibrate at least one other gate (--gates)")
    return eligible


def guard_text(winner: str, guard: Dict[str, Any]) -> str:
    """One line on the winner's drift-guard policy fitted by ``--degraded-as guard``."""
    g = guard.get(winner)
    if g is None:
        return f"drift guard of {winner}: full depth (no degraded-calibrated thresholds for this gate)"
    if g["thresholds"] is None:
        return (f"drift guard of {winner}: full depth (no thresholds on its kept exits meet the target on the "
                "degraded copies)")
    r = g["robust"]
    return (f"drift guard of {winner}: thresholds {', '.join(f'{t:.3f}' for t in g['thresholds'])} on the same exits "
            f"(degraded copies: mean loss {r['mean_drop']:.1f}, worst {r['worst_drop']:.1f} {r['worst_condition']}, "
            f"cost {_pct(r['mean_cost_degraded'])}%; clean cost {_pct(g['mean_cost'])}%)")


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def exits_text(exits: Optional[Sequence[int]]) -> str:
    """Kept internal exits for a table cell: ``"1,3"``, ``"none"`` (plain network), ``"all"`` (None)."""
    if exits is None:
        return "all"
    return ",".join(str(int(k)) for k in exits) or "none"


def histogram_text(hist: Sequence[int], exits: Optional[Sequence[int]] = None) -> str:
    """Share of samples per exit in percent, e.g. ``"62 18 5 15"``; ``-`` at the exits a chain that keeps the
    internal ``exits`` does not have (None: every exit is kept)."""
    total = max(1, sum(hist))
    kept = stages.kept_exits(exits, len(hist))
    return " ".join(f"{round(100 * h / total):d}" if i in kept else "-" for i, h in enumerate(hist))


def print_calibration(cal: Dict[str, Any], console=None) -> None:
    """One row per gate: kept exits, mean cost, accuracy, loss (points below the final exit), exit histogram, mean
    AUROC, direction; the winner marked, the legend printed as short lines below."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = cal["target"]
    goal = (f"accuracy >= {100 * t['accuracy']:.2f}% (final exit {100 * t['final_accuracy']:.2f}% minus "
            f"{t['max_drop']:g} pts)" if t["kind"] == "accuracy" else f"mean cost <= {100 * t['budget']:.1f}% of the plain network")
    if t.get("confidence") is not None:
        goal += f", held with {100 * t['confidence']:g}% confidence (the loss's upper bound meets it)"
    costs = cal["costs"]
    overhead = f"{costs.get('boundary') or 0:g} {costs['unit']} per stage"
    table = Table(title=f"Exit gates calibrated on {cal['n']} images", box=box.SIMPLE_HEAVY, pad_edge=False)
    robust = t.get("robust")
    columns = [("gate", "left"), ("exits", "left"), ("cost %", "right"), ("acc %", "right"), ("loss", "right"),
               ("exits %", "right"), ("AUROC", "right"), ("right if", "left")]
    if robust:
        columns[5:5] = [("mean loss", "right"), ("worst loss", "right"), ("deg. cost %", "right")]
    for col, just in columns:
        table.add_column(col, justify=just, no_wrap=True)
    for name, g in cal["gates"].items():
        won = name == cal["winner"]
        style = "bold green" if won else (None if g["meets_target"] else "dim")
        cells = [
            name + (" *" if won else ("" if g["meets_target"] else " x")), exits_text(g.get("exits")),
            _pct(g["mean_cost"]), _pct(g["accuracy"]), f"{g['drop']:.1f}", histogram_text(g["histogram"], g.get("exits")),
            "-" if not math.isfinite(g["mean_auroc"]) else f"{g['mean_auroc']:.3f}", g["direction"],
        ]
        if robust:
            r = g["robust"]
            cells[5:5] = [f"{r['mean_drop']:.1f}", f"{r['worst_drop']:.1f} {r['worst_condition']}",
                          _pct(r["mean_cost_degraded"])]
        table.add_row(*cells, style=style)
    console.print(table)
    legend = [  # short lines, not a table caption: they stay readable in an 80-column terminal
        f"target: {goal}",
        "exits: kept internal exits, chosen per gate (each ends a stage; the last exit is always kept)",
        f"cost %: mean {costs['unit']} as % of the plain network ({costs['source']}; {overhead}; a gate's signals "
        "cost extra per stage)",
        "loss: accuracy points below the final exit; * = winner, x = misses the target",
        "exits %: share of images leaving at each exit (- = not kept)",
        "AUROC: mean over internal exits of predicting a right answer (every exit kept: comparable across gates)",
        "right if: a higher or lower score means right (per kept exit when mixed)",
        f"oracle (each image straight to its earliest right exit): {_pct(cal['oracle']['mean_cost'])}% cost at "
        f"{_pct(cal['oracle']['accuracy'])}% accuracy",
        *(confidence.describe(cal["confidence"], cal["winner"]) if cal.get("confidence") else []),
    ]
    if robust:
        legend[1:1] = [
            f"degraded inputs: {len(robust['conditions']) - 1} corrupted copies of the split "
            f"({', '.join(robust['conditions'][1:])}); target '{robust['mode']}': "
            + (f"clean loss and mean loss <= {robust['max_drop']:g}, worst loss <= {robust['worst_drop']:g} pts"
               if robust["mode"] == "mean" else f"every condition's loss <= {robust['max_drop']:g} pts"),
            "cost %, acc %, loss: on the clean split; mean / worst loss: points below full depth on each corrupted "
            "copy; deg. cost %: mean cost over them (exits %: pooled)",
        ]
    for line in legend:
        console.print(line, highlight=False)

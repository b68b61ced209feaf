"""Calibration of exit gates on the checkpoint's calibration split (the validation part held out in training).

Steps (``calibrate``):
1. run the model once over the calibration split (``collect``) and fit one softmax temperature per exit
   (``gates.fit_temperature``, NLL);
2. compute every gate's raw score at every internal exit: the 7 signals (``gates.exit_signals``), PABEE
   ``patience`` and the ``learned`` gate, a logistic regression per internal exit over the 7 signals + patience
   predicting "this exit's answer is right". The learned gate is cross-fitted: its threshold search sees
   out-of-fold scores (K folds), and the weights stored in the policy are refitted on all the data;
3. orient every gate per exit from the data (``thresholds.orient``: sign +1 when a higher score means right);
4. search per-exit thresholds (``thresholds.greedy_path`` + ``choose``) for the target: an accuracy at most
   ``max_drop`` points below the final exit's on the split, or a mean-cost budget (fraction of the plain network);
5. the winner is the gate with the smallest mean cost that meets the target (budget: the most accurate within
   budget); its ``ExitPolicy`` goes into ``ckpt["policy"]``, every gate's policy and statistics into
   ``ckpt["calibration"]`` (layout in docs/architecture.md).

Costs are fractions of the plain network (all segments + the last head): MACs from ``model.costs()``, or measured
per-segment / per-head costs from a ``costs.json`` written by ``edgeexit profile``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from . import confidence  # i12
from . import gates as G
from .metrics import accuracy_cost_auc
from .policy import ExitPolicy
from .thresholds import PathPoint, choose, greedy_path, oracle, orient, simulate

__all__ = [
    "CostModel", "GATE_FAMILY", "model_costs", "load_costs", "resolve_costs", "parse_gates", "fit_temperatures",
    "fit_learned", "raw_scores", "CalibrationResult", "calibrate_outputs", "calibrate", "print_calibration",
    "direction",
]

COST_METRICS = ("latency_ms", "energy_mj")
GATE_FAMILY: Dict[str, str] = {
    "max_prob": "softmax", "margin": "softmax", "entropy_conf": "softmax",
    "sal_entropy": "saliency", "sal_spread": "saliency",
    "coh_cosine": "coherence", "coh_ssim": "coherence",
    "patience": "agreement", "learned": "learned",
}


# ----------------------------------------------------------------------------------------------------------------
# costs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Cost of leaving at each exit (``cumulative``, absolute, in ``unit``) and of the plain network (``reference``)."""

    cumulative: tuple
    reference: float
    unit: str
    source: str
    segments: tuple = ()
    heads: tuple = ()
    device: Optional[str] = None
    backend: Optional[str] = None

    @property
    def fraction(self) -> np.ndarray:
        """Cost of leaving at each exit as a fraction of the plain network, float64 (E,)."""
        return np.asarray(self.cumulative, dtype=np.float64) / float(self.reference)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "unit": self.unit, "source": self.source,
            "cumulative": [float(v) for v in self.cumulative], "reference": float(self.reference),
            "fraction": [float(v) for v in self.fraction],
            "segments": [float(v) for v in self.segments], "heads": [float(v) for v in self.heads],
            "device": self.device, "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CostModel":
        return cls(tuple(float(v) for v in data["cumulative"]), float(data["reference"]), str(data["unit"]),
                   str(data.get("source", "?")), tuple(data.get("segments") or ()), tuple(data.get("heads") or ()),
                   data.get("device"), data.get("backend"))


def _cost_model(segments: Sequence[float], heads: Sequence[float], unit: str, source: str, **extra) -> CostModel:
    seg = np.asarray(segments, dtype=np.float64)
    hd = np.asarray(heads, dtype=np.float64)
    cumulative = np.cumsum(seg) + np.cumsum(hd)
    reference = float(seg.sum() + hd[-1])
    return CostModel(tuple(float(v) for v in cumulative), reference, unit, source,
                     tuple(float(v) for v in seg), tuple(float(v) for v in hd), **extra)


def model_costs(model) -> CostModel:
    """MACs of the model's segments and heads (``model.costs()``)."""
    c = model.costs()
    return _cost_model(c.segment_macs, c.head_macs, "MACs", "model")


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


def load_costs(path: Path | str, num_exits: int, metric: Optional[str] = None) -> CostModel:
    """Read a ``costs.json`` (schema ``edgeexit-costs/1``, see docs/architecture.md "Device costs").

    ``metric`` (latency_ms | energy_mj) picks one of the measured costs; default: the file's ``metric``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"costs file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != "edgeexit-costs/1":
        raise ValueError(f"{path} is not an edgeexit costs file (expected \"schema\": \"edgeexit-costs/1\")")
    file_metric = data.get("metric")
    if metric is not None and metric not in COST_METRICS:
        raise ValueError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, got {metric!r}")
    metric = metric or file_metric
    if metric not in COST_METRICS:
        raise ValueError(f"{path}: metric must be one of {', '.join(COST_METRICS)}, got {file_metric!r}")
    if metric == file_metric and "segments" in data and "heads" in data:
        seg, heads = data["segments"], data["heads"]
    else:
        measured_all = data.get("measured") or {}
        if not isinstance(measured_all, dict):
            raise ValueError(f"{path}: 'measured' must be an object, got {type(measured_all).__name__}")
        measured = measured_all.get(metric)
        if not isinstance(measured, dict) or "segments" not in measured or "heads" not in measured:
            raise ValueError(f"{path} has no measured {metric} (segments and heads); profile with that meter "
                             f"or drop --cost-metric")
        seg, heads = measured["segments"], measured["heads"]
    seg = _cost_values("segments", seg, num_exits, path)
    heads = _cost_values("heads", heads, num_exits, path)
    if sum(seg) + heads[-1] <= 0:
        raise ValueError(f"{path}: the plain network's cost (sum of segments + last head) must be > 0")
    return _cost_model(seg, heads, metric, str(path), device=data.get("device"), backend=data.get("backend"))


def resolve_costs(model, costs_path: Optional[Path | str] = None, cost_metric: Optional[str] = None) -> CostModel:
    if costs_path is None:
        if cost_metric is not None:
            raise ValueError("--cost-metric needs --costs costs.json (without it, costs are the model's MACs)")
        return model_costs(model)
    return load_costs(costs_path, model.num_exits, cost_metric)


# ----------------------------------------------------------------------------------------------------------------
# gates and scores
# ----------------------------------------------------------------------------------------------------------------
def parse_gates(text: Optional[str | Sequence[str]]) -> List[str]:
    """``"all"`` / None -> every gate; else a comma-separated list (order of ``gates.GATE_NAMES``)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return list(G.GATE_NAMES)
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in G.GATE_NAMES]
    if unknown:
        raise ValueError(f"unknown gate {unknown[0]!r}; choose from all, {', '.join(G.GATE_NAMES)}")
    if not names:
        raise ValueError("--gates names no gate")
    return [g for g in G.GATE_NAMES if g in names]


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


def fit_learned(signals: np.ndarray, patience: np.ndarray, correct: np.ndarray, folds: int = 5, seed: int = 0,
                l2: float = 1e-2) -> tuple[np.ndarray, List[Dict[str, Any]]]:
    """The learned gate of every internal exit, cross-fitted.

    Returns ``(oof, params)``: ``oof`` float64 (n, E - 1) out-of-fold probabilities (each sample scored by the
    model fitted without its fold; K = min(folds, n) folds, seeded), and ``params``: E - 1 ``fit_logistic`` dicts
    fitted on all the data (what the policy and the runtime use). With fewer than 2 samples or ``folds < 2`` the
    scores are in-sample.
    """
    n, e = correct.shape
    k_int = e - 1
    oof = np.zeros((n, k_int), dtype=np.float64)
    params: List[Dict[str, Any]] = []
    ids = _fold_ids(n, folds, seed)
    n_folds = int(ids.max()) + 1 if n else 0
    for i in range(k_int):
        x = G.gate_features(signals[:, i], patience[:, i])
        y = correct[:, i]
        full = G.fit_logistic(x, y, l2=l2)
        params.append(full)
        if n_folds < 2:
            oof[:, i] = G.logistic_score(x, full)
            continue
        for f in range(n_folds):
            test = ids == f
            fitted = G.fit_logistic(x[~test], y[~test], l2=l2)
            oof[test, i] = G.logistic_score(x[test], fitted)
    return oof, params


def raw_scores(gate: str, signals: np.ndarray, patience: np.ndarray,
               learned: Optional[Sequence[Dict[str, Any]]] = None) -> np.ndarray:
    """Raw (unoriented) score of ``gate`` at every internal exit, float64 (n, E - 1), via ``gates.gate_score``."""
    e = signals.shape[1]
    out = np.zeros((signals.shape[0], e - 1), dtype=np.float64)
    for i in range(e - 1):
        params = learned[i] if learned is not None else None
        out[:, i] = G.gate_score(gate, signals[:, i], patience[:, i], params)
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
    oriented: Dict[str, np.ndarray] = field(default_factory=dict)  # gate -> oriented calibration scores (n, E-1)


def _target_dict(final_acc: float, max_drop: Optional[float], budget: Optional[float]) -> Dict[str, Any]:
    if budget is not None:
        return {"kind": "budget", "budget": float(budget), "max_drop": None, "accuracy": None,
                "final_accuracy": final_acc}
    drop = 1.0 if max_drop is None else float(max_drop)
    return {"kind": "accuracy", "budget": None, "max_drop": drop, "accuracy": final_acc - drop / 100.0,
            "final_accuracy": final_acc}


def _meets(target: Dict[str, Any], accuracy: float, cost_fraction: float) -> bool:
    tol = 1e-12
    if target["kind"] == "budget":
        return cost_fraction <= target["budget"] + tol
    return accuracy >= target["accuracy"] - tol


def _pick_winner(stats: Dict[str, Dict[str, Any]], target: Dict[str, Any]) -> str:
    names = list(stats)
    order = {g: k for k, g in enumerate(names)}
    ok = [g for g in names if stats[g]["meets_target"]]
    if target["kind"] == "accuracy":
        if ok:
            return min(ok, key=lambda g: (stats[g]["mean_cost"], -stats[g]["accuracy"], order[g]))
        return max(names, key=lambda g: (stats[g]["accuracy"], -stats[g]["mean_cost"], -order[g]))
    if ok:
        return max(ok, key=lambda g: (stats[g]["accuracy"], -stats[g]["mean_cost"], -order[g]))
    return min(names, key=lambda g: (stats[g]["mean_cost"], -stats[g]["accuracy"], order[g]))


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
) -> CalibrationResult:
    """Calibrate every gate on collected ``ExitOutputs`` (labels known). ``max_drop`` in accuracy points
    (default 1.0) or ``budget`` (mean cost as a fraction of the plain network): not both."""
    if max_drop is not None and budget is not None:
        raise ValueError("give --max-drop or --budget, not both")
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
    frac = costs.fraction
    if frac.shape[0] != e:
        raise ValueError(f"costs have {frac.shape[0]} exits, the model {e}")

    temps = list(temperatures) if temperatures is not None else fit_temperatures(outputs.logits, outputs.labels)
    signals = outputs.signals(temps)
    patience = outputs.patience
    correct = outputs.correct
    exit_acc = correct.mean(axis=0)
    final_acc = float(exit_acc[-1])
    target = _target_dict(final_acc, max_drop, budget)
    oracle_cost, oracle_acc = oracle(correct, frac)

    oof, learned = fit_learned(signals, patience, correct, folds, seed)
    n_folds = int(_fold_ids(n, folds, seed).max()) + 1
    stats: Dict[str, Dict[str, Any]] = {}
    oriented_all: Dict[str, np.ndarray] = {}
    for gate in gate_names:
        raw = oof if gate == "learned" else raw_scores(gate, signals, patience)
        signs, aucs = orient(raw, correct)
        oriented = raw * signs[None, :]
        path: List[PathPoint] = greedy_path(oriented, correct, frac, n_candidates=n_candidates, reference_cost=1.0)
        if target["kind"] == "budget":
            point = choose(path, budget=target["budget"])
        else:
            point = choose(path, target_accuracy=target["accuracy"])
        ex, acc, mean_cost = simulate(oriented, correct, frac, point.thresholds)
        policy = ExitPolicy(gate=gate, thresholds=list(point.thresholds), signs=[float(s) for s in signs],
                            temperatures=[float(t) for t in temps], learned=learned)
        auc_list = [float(a) for a in aucs]
        stats[gate] = {
            "family": GATE_FAMILY.get(gate, gate),
            "policy": policy.to_dict(),
            "accuracy": float(acc),
            "mean_cost": float(mean_cost),
            "drop": 100.0 * (final_acc - float(acc)),
            "histogram": [int(v) for v in np.bincount(ex, minlength=e)],
            "auroc": auc_list,
            "mean_auroc": _nan_mean(auc_list),
            "signs": [float(s) for s in signs],
            "direction": direction(signs),
            "meets_target": _meets(target, float(acc), float(mean_cost)),
            "path": [[float(p.mean_cost), float(p.accuracy)] for p in path],
            "path_thresholds": [[float(t) for t in p.thresholds] for p in path],
            "auc": accuracy_cost_auc([p.mean_cost for p in path], [p.accuracy for p in path], full_cost=float(frac[-1])),
            "cross_fitted": gate == "learned" and n_folds >= 2,
        }
        oriented_all[gate] = oriented
    winner = _pick_winner(stats, target)
    calibration = {
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n": int(n),
        "target": target,
        "costs": costs.to_dict(),
        "cost_source": costs.source,
        "temperatures": [float(t) for t in temps],
        "exit_accuracy": [float(a) for a in exit_acc],
        "oracle": {"mean_cost": float(oracle_cost), "accuracy": float(oracle_acc)},
        "folds": n_folds,
        "n_candidates": int(n_candidates),
        "gates": stats,
        "winner": winner,
    }
    calibration["confidence"] = confidence.for_policy(  # i12: bootstrap interval of the winner's operating point
        oriented_all[winner], correct, frac, ExitPolicy.from_dict(stats[winner]["policy"]).thresholds, seed=seed)
    return CalibrationResult(calibration, stats[winner]["policy"], oriented_all)


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
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Calibrate a checkpoint's exit gates on its calibration split and write ``policy`` and ``calibration``
    into it (atomically; ``out`` writes a new checkpoint instead). Returns the calibration dict."""
    from .checkpoint import load_model, save_checkpoint
    from .collect import calibration_images, collect
    from .preprocess import Preprocess

    if max_drop is not None and budget is not None:
        raise ValueError("give --max-drop or --budget, not both")
    gate_names = parse_gates(gates)
    model, ckpt = load_model(ckpt_path)
    if model.num_exits < 2:
        raise ValueError(f"{ckpt_path} has a single exit: there is nothing to gate")
    costs = resolve_costs(model, costs_path, cost_metric)
    images = calibration_images(ckpt, data, progress=progress)
    root = data if data is not None else (ckpt.get("split") or {}).get("data")
    log(f"calibration split: {len(images)} held-out images of {root}"
        + (f" ({images.skipped} unreadable skipped)" if images.skipped else ""))
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    dev = _device(device)
    outputs = collect(model, images.images, images.labels, preprocess, batch_size, dev, progress,
                      description="calibration split")
    result = calibrate_outputs(outputs, costs, max_drop=max_drop, budget=budget, gate_names=gate_names,
                               folds=folds, seed=seed)
    small = confidence.split_warning(result.calibration["confidence"], result.calibration["target"]["max_drop"])  # i12
    if small:  # i12
        log(f"edgeexit: warning: {small}")  # i12
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


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def histogram_text(hist: Sequence[int]) -> str:
    """Share of samples per exit in percent, e.g. ``"62 18 5 15"``."""
    total = max(1, sum(hist))
    return " ".join(f"{round(100 * h / total):d}" for h in hist)


def print_calibration(cal: Dict[str, Any], console=None) -> None:
    """One row per gate: mean cost, accuracy, loss (points below the final exit), exit histogram, mean AUROC,
    direction; the winner marked."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = cal["target"]
    goal = (f"accuracy >= {100 * t['accuracy']:.2f}% (final exit {100 * t['final_accuracy']:.2f}% minus "
            f"{t['max_drop']:g} pts)" if t["kind"] == "accuracy" else f"mean cost <= {100 * t['budget']:.1f}% of the plain network")
    costs = cal["costs"]
    table = Table(title=f"Exit gates calibrated on {cal['n']} images", box=box.SIMPLE_HEAVY, pad_edge=False)
    for col, just in (("gate", "left"), ("cost %", "right"), ("acc %", "right"), ("loss", "right"),
                      ("exits %", "right"), ("AUROC", "right"), ("right if", "left")):
        table.add_column(col, justify=just, no_wrap=True)
    for name, g in cal["gates"].items():
        won = name == cal["winner"]
        style = "bold green" if won else (None if g["meets_target"] else "dim")
        table.add_row(
            name + (" *" if won else ("" if g["meets_target"] else " x")), _pct(g["mean_cost"]), _pct(g["accuracy"]),
            f"{g['drop']:.1f}", histogram_text(g["histogram"]),
            "-" if not math.isfinite(g["mean_auroc"]) else f"{g['mean_auroc']:.3f}", g["direction"],
            style=style,
        )
    console.print(table)
    legend = [  # short lines, not a table caption: they stay readable in an 80-column terminal
        f"target: {goal}",
        f"cost %: mean {costs['unit']} as % of the plain network ({costs['source']})",
        "loss: accuracy points below the final exit; * = winner, x = misses the target",
        "exits %: share of images leaving at each exit",
        "AUROC: mean over internal exits of predicting a right answer",
        "right if: a higher or lower score means right (per exit when mixed)",
        f"oracle: {_pct(cal['oracle']['mean_cost'])}% cost at {_pct(cal['oracle']['accuracy'])}% accuracy",
        *(confidence.describe(cal["confidence"], cal["winner"]) if cal.get("confidence") else []),  # i12
    ]
    for line in legend:
        console.print(line, highlight=False)

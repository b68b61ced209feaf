"""Evaluation report of a calibrated checkpoint on a labelled folder: does saliency beat softmax?

Everything here applies what calibration fixed (temperatures, signs, thresholds, learned weights); the evaluation
data tunes nothing. For every calibrated gate:

- the accuracy-vs-mean-cost curve: every point of the gate's calibration path (its per-exit thresholds on its kept
  exits) applied to the evaluation data; the area under the same kind of curve with every exit kept
  (``metrics.accuracy_cost_auc``, cost as a fraction of the plain network), comparable across gates;
- the calibrated operating point (the gate's ``ExitPolicy`` with its kept exits, as the runtime applies it): accuracy,
  mean cost, exit histogram. Signals are those of the gate's chain (coherence against the previous kept exit,
  patience over the kept exits, ``ExitOutputs.signals``) and costs follow the one cost rule (``stages.exit_costs``);
- the failure-prediction AUROC per internal exit: how well the oriented score separates right from wrong answers
  of that exit, with every exit kept (``kept_auroc``: at the gate's kept exits, null elsewhere);

plus per-exit accuracy, each exit's cost on its own (one stage straight to it) and the oracle (each image runs
straight to its earliest right exit). ``--corrupt`` repeats the
operating points on corrupted copies of the images (``edgeexit.corrupt``) at each severity, with the clean-
calibrated thresholds. Outputs: a rich table, ``report.json`` (written atomically) and PNG plots.

report.json keys (schema ``edgeexit-report/1``; accuracies in [0, 1], costs as fractions of the plain network,
non-finite numbers written as null):
``schema, created, edgeexit_version, checkpoint, data, n, skipped, limit, classes, costs, calibration, exit_accuracy,
exit_cost, oracle, gates, winner, comparison, corruptions, plots``; each ``gates[name]``: ``family, accuracy,
mean_cost, drop, histogram, auroc, mean_auroc, kept_auroc, auc, curve, signs, thresholds, exits, exit_cost,
calibrated``
(``exits``: the kept internal exits; ``exit_cost``: cost of leaving at each exit on that chain, null where not kept).
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from . import confidence
from .jsonio import write_json
from .calibrate import CostModel, policy_scores, resolve_costs
from .gates import gate_spec
from .metrics import accuracy_cost_auc, auroc
from .policy import ExitPolicy
from .thresholds import oracle, simulate
from .errors import EdgeexitError

__all__ = ["REPORT_SCHEMA", "REPORT_KEYS", "GATE_KEYS", "NotCalibratedError", "require_calibration", "analyse",
           "evaluate", "print_report", "write_json"]

REPORT_SCHEMA = "edgeexit-report/1"
REPORT_KEYS = ("schema", "created", "edgeexit_version", "checkpoint", "data", "n", "skipped", "limit", "classes",
               "costs", "calibration", "exit_accuracy", "exit_cost", "oracle", "gates", "winner", "comparison",
               "corruptions", "plots")
GATE_KEYS = ("family", "accuracy", "mean_cost", "drop", "histogram", "auroc", "mean_auroc", "kept_auroc", "auc", "curve",
             "signs", "thresholds", "exits", "exit_cost", "calibrated")
CAM_FAMILIES = ("saliency", "coherence")


class NotCalibratedError(EdgeexitError, ValueError):
    """A checkpoint without ``calibration`` / ``policy``."""


def require_calibration(ckpt: Dict[str, Any], path: Path | str) -> Dict[str, Any]:
    cal = ckpt.get("calibration")
    if not isinstance(cal, dict) or not cal.get("gates") or not ckpt.get("policy"):
        raise NotCalibratedError(f"{path} is not calibrated: run edgeexit calibrate first")
    return cal


def _finite(x: float) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _nan_mean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if _finite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# analysis of one set of outputs
# ----------------------------------------------------------------------------------------------------------------
def _chain(outputs, policy: ExitPolicy, costs: CostModel, path_thresholds) -> Dict[str, Any]:
    """``policy`` on ``outputs`` as its stages compute it: oriented scores (nan where not kept), the exit of every
    image, the AUROC per internal exit (nan where not kept) and the curve of ``path_thresholds`` (E - 1 each)."""
    correct = outputs.correct
    signals = outputs.signals(policy.temperatures, policy.exits)
    oriented = policy_scores(policy, signals, outputs.patience_for(policy.exits))
    aurocs = []
    for i in range(outputs.num_exits - 1):
        keep = np.isfinite(oriented[:, i])
        aurocs.append(float(auroc(oriented[keep, i], correct[keep, i])) if i in policy.kept_internal else math.nan)
    inner, kept = list(policy.kept_internal), list(policy.kept)
    chain_cost = costs.for_gate(policy.gate).fractions(policy.exits)
    curve = []
    for thr in path_thresholds:
        _, a, c = simulate(oriented[:, inner], correct[:, kept], chain_cost, [thr[i] for i in inner])
        curve.append([float(c), float(a)])
    return {"exit": policy.decide(signals, outputs.classes), "auroc": aurocs, "curve": curve}


def analyse(outputs, cal: Dict[str, Any], costs: CostModel, curves: bool = True) -> Dict[str, Any]:
    """Per-exit accuracy, oracle and, for every calibrated gate, curve / operating point / AUROC on ``outputs``
    (labelled ``ExitOutputs``), with calibration's temperatures, signs, thresholds, learned weights and kept exits.
    ``costs``: prices every chain with the one cost rule (fractions of the plain network).

    The operating point, its histogram and ``curve`` are the gate's own chain (its kept exits); ``auroc``,
    ``mean_auroc`` and ``auc`` are measured on the chain that keeps every exit (calibration's ``all_exits``), so
    gates compare on an equal footing; ``kept_auroc`` is the AUROC at the gate's kept exits."""
    n, e = len(outputs), outputs.num_exits
    correct = outputs.correct
    rows = np.arange(n)
    exit_acc = correct.mean(axis=0)
    final_acc = float(exit_acc[-1])
    oracle_cost, oracle_acc = oracle(correct, costs.single_exit_fractions())
    gates_out: Dict[str, Any] = {}
    for name, g in cal["gates"].items():
        policy = ExitPolicy.from_dict(g["policy"])
        if policy.num_exits != e:
            raise ValueError(f"the calibration of gate {name} has {policy.num_exits} exits, the model {e}")
        own = _chain(outputs, policy, costs, g.get("path_thresholds") or [policy.thresholds])
        every = g.get("all_exits")  # absent in calibrations made before exit selection: they kept every exit
        ref = _chain(outputs, ExitPolicy.from_dict(every["policy"]), costs, every["path_thresholds"]) if every else own
        ex = own["exit"]  # the operating point, exactly as the runtime decides
        exit_cost = costs.for_gate(policy.gate).exit_vector(policy.exits)
        acc = float(correct[rows, ex].mean())
        entry: Dict[str, Any] = {
            "family": gate_spec(name).family,
            "accuracy": acc,
            "mean_cost": float(exit_cost[ex].mean()),
            "drop": 100.0 * (final_acc - acc),
            "histogram": [int(v) for v in np.bincount(ex, minlength=e)],
            "auroc": ref["auroc"],
            "mean_auroc": _nan_mean(ref["auroc"]),
            "kept_auroc": own["auroc"],
            "signs": [float(s) for s in policy.signs],
            "thresholds": [float(t) for t in policy.thresholds],
            "exits": list(policy.kept_internal),
            "exit_cost": [float(c) for c in exit_cost],
            "auc": accuracy_cost_auc([c for c, _ in ref["curve"]], [a for _, a in ref["curve"]], full_cost=1.0),
        }
        if curves:
            entry["curve"] = own["curve"]
        entry["calibrated"] = {k: g.get(k) for k in ("accuracy", "mean_cost", "auc", "mean_auroc")}
        gates_out[name] = entry
    return {
        "n": int(n),
        "exit_accuracy": [float(a) for a in exit_acc],
        "oracle": {"mean_cost": float(oracle_cost), "accuracy": float(oracle_acc)},
        "gates": gates_out,
    }


def compare_families(gates: Dict[str, Any]) -> Dict[str, Any]:
    """Best gate of each family, then the headline: does a CAM gate (saliency or coherence) beat the best softmax gate?

    Each family's representative (and the best CAM family) is chosen by its curve area on the *calibration* split,
    so the evaluation data selects nothing; the figures reported for it are the evaluation data's."""
    best: Dict[str, Any] = {}
    for name, g in gates.items():
        fam = g["family"]
        cal = g.get("calibrated") or {}
        key = (cal.get("auc") if _finite(cal.get("auc")) else -1.0,
               cal.get("mean_auroc") if _finite(cal.get("mean_auroc")) else -1.0)
        if fam not in best or key > best[fam]["_key"]:
            best[fam] = {"gate": name, "auc": g["auc"], "mean_auroc": g["mean_auroc"], "accuracy": g["accuracy"],
                         "mean_cost": g["mean_cost"], "_key": key}
    soft = best.get("softmax")
    cams = [best[f] for f in CAM_FAMILIES if f in best]
    cam = max(cams, key=lambda v: v["_key"]) if cams else None
    for v in best.values():
        v.pop("_key")
    out: Dict[str, Any] = {"metric": "auc", "families": best, "best_softmax": soft, "best_cam": cam}
    if soft and cam and _finite(soft["auc"]) and _finite(cam["auc"]):
        out["saliency_beats_softmax"] = bool(cam["auc"] > soft["auc"])
        out["auc_gain"] = float(cam["auc"] - soft["auc"])
        out["auroc_gain"] = (float(cam["mean_auroc"] - soft["mean_auroc"])
                             if _finite(cam["mean_auroc"]) and _finite(soft["mean_auroc"]) else None)
    else:
        out["saliency_beats_softmax"] = None
        out["auc_gain"] = None
        out["auroc_gain"] = None
    return out


# ----------------------------------------------------------------------------------------------------------------
# json
# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
def evaluate(
    ckpt_path: Path | str,
    data: Path | str,
    *,
    out: Optional[Path | str] = None,
    corrupt: Optional[Sequence[str] | str] = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    costs_path: Optional[Path | str] = None,
    cost_metric: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 256,
    device: str = "cpu",
    seed: int = 0,
    plots: bool = True,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Evaluate a calibrated checkpoint on a labelled folder; writes ``report.json`` and plots into ``out``
    (default ``reports/<checkpoint stem>``). Returns the report dict."""
    from . import __version__
    from .calibrate import _device
    from .checkpoint import load_checkpoint, load_model
    from .collect import collect, labelled_images, progress_bar
    from .corrupt import SEVERITY_PARAMS, corrupt as corrupt_images, parse_kinds
    from .preprocess import Preprocess

    ckpt_path = Path(ckpt_path)
    cal = require_calibration(load_checkpoint(ckpt_path), ckpt_path)  # fail before any heavy work
    kinds = parse_kinds(corrupt if isinstance(corrupt, str) else ",".join(corrupt)) if corrupt else []
    sev = sorted({int(s) for s in severities})
    if kinds and (not sev or sev[0] < 1 or sev[-1] > 5):
        raise ValueError(f"--severities must lie in 1..5, got {list(severities)}")
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    out_dir = Path(out) if out is not None else Path("reports") / ckpt_path.stem
    model, ckpt = load_model(ckpt_path)
    if cost_metric is not None and costs_path is None:
        raise ValueError("--cost-metric needs --costs")
    costs = resolve_costs(model, costs_path, cost_metric) if costs_path is not None else CostModel.from_dict(cal["costs"])
    if costs.num_exits != model.num_exits:
        raise ValueError(f"the costs have {costs.num_exits} exits, the model {model.num_exits}")
    split_root = (cal.get("split") or {}).get("data") or (ckpt.get("split") or {}).get("data")
    if split_root and Path(split_root).resolve() == data.resolve():
        log(f"edgeexit: warning: {data} is the training folder: its images were used for training and calibration")

    images = labelled_images(data, ckpt, limit=limit, seed=seed, progress=progress)
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    dev = _device(device)
    outputs = collect(model, images.images, images.labels, preprocess, batch_size, dev, progress,
                      paths=images.paths, description="evaluation images")
    clean = analyse(outputs, cal, costs)
    flag = confidence.flag_test_drop(clean["gates"][cal["winner"]]["drop"], cal.get("confidence"),
                                     (cal.get("target") or {}).get("max_drop"))
    if flag:
        log(f"edgeexit: warning: {flag}")

    corruptions: Dict[str, Any] = {}
    if kinds:
        with progress_bar(progress, "corruptions", len(kinds) * len(sev)) as bar:
            for kind in kinds:
                entry: Dict[str, Any] = {"params": list(SEVERITY_PARAMS[kind]), "severities": {}}
                for s in sev:
                    bad = corrupt_images(images.images, kind, s, seed=seed)
                    out_s = collect(model, bad, images.labels, preprocess, batch_size, dev, False)
                    res = analyse(out_s, cal, costs, curves=False)
                    entry["severities"][str(s)] = res
                    bar.advance()
                corruptions[kind] = entry

    report: Dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "edgeexit_version": __version__,
        "checkpoint": str(ckpt_path),
        "data": str(data),
        "n": clean["n"],
        "skipped": int(images.skipped),
        "limit": limit,
        "classes": list(ckpt["classes"]),
        "costs": costs.to_dict(),
        "calibration": {k: cal.get(k) for k in ("target", "winner", "temperatures", "n", "cost_source", "split",
                                                 "folds", "created", "confidence")},  # i12: + confidence
        "exit_accuracy": clean["exit_accuracy"],
        "exit_cost": [float(v) for v in costs.single_exit_fractions()],
        "oracle": clean["oracle"],
        "gates": clean["gates"],
        "winner": cal["winner"],
        "comparison": compare_families(clean["gates"]),
        "corruptions": corruptions,
        "plots": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        from .plots import write_report_plots

        report["plots"] = write_report_plots(report, out_dir)
    write_json(out_dir / "report.json", report)
    report["out"] = str(out_dir)
    return report


# ----------------------------------------------------------------------------------------------------------------
# terminal output
# ----------------------------------------------------------------------------------------------------------------
def _pct(x: Any, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}" if _finite(x) else "-"


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "-"


def print_report(report: Dict[str, Any], console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from .calibrate import exits_text, histogram_text

    console = console or Console()
    exits = Table(title=f"Exits on {report['data']} ({report['n']} images)", box=box.SIMPLE_HEAVY)
    exits.add_column("", justify="left")
    for i in range(len(report["exit_accuracy"])):
        exits.add_column(f"exit {i}", justify="right")
    exits.add_row("cost % of plain network (one stage to it)", *[_pct(c) for c in report["exit_cost"]])
    exits.add_row("accuracy %", *[_pct(a) for a in report["exit_accuracy"]])
    console.print(exits)

    final = report["exit_accuracy"][-1]
    t = report["calibration"]["target"] or {}
    goal = (f"accuracy within {t.get('max_drop'):g} pts of the final exit" if t.get("kind") == "accuracy"
            else f"mean cost <= {_pct(t.get('budget'))}%")
    if t.get("confidence") is not None:
        goal += f", held with {100 * t['confidence']:g}% confidence on the calibration split"
    gates = Table(title="Exit gates at their calibrated operating points", box=box.SIMPLE_HEAVY, pad_edge=False)
    for col in ("gate", "exits", "cost %", "acc %", "loss", "calib.", "AUC", "AUROC", "exits %"):
        gates.add_column(col, justify="left" if col in ("gate", "exits") else "right", no_wrap=True)
    for name, g in report["gates"].items():
        won = name == report["winner"]
        c = g.get("calibrated") or {}
        gates.add_row(name + (" *" if won else ""), exits_text(g.get("exits")), _pct(g["mean_cost"]),
                      _pct(g["accuracy"]), _num(g["drop"], 1),
                      f"{_pct(c.get('accuracy'))}/{_pct(c.get('mean_cost'), 0)}", _num(g["auc"]), _num(g["mean_auroc"]),
                      histogram_text(g["histogram"], g.get("exits")), style="bold green" if won else None)
    console.print(gates)
    for line in (  # short lines, not a table caption: they stay readable in an 80-column terminal
        f"target: {goal} ({report['calibration'].get('n')} calibration images)",
        f"final exit {_pct(final)}%; oracle (earliest right exit): {_pct(report['oracle']['accuracy'])}% at "
        f"{_pct(report['oracle']['mean_cost'])}% cost",
        "loss: accuracy points below the final exit; * = calibrated winner",
        "calib.: acc % / cost % on the calibration split",
        "exits: the gate's kept internal exits; exits %: share leaving at each exit (- = not kept)",
        "AUC: area under accuracy vs cost (0..1); AUROC: mean failure-prediction AUROC over internal exits",
        "  (both with every exit kept: comparable across gates)",
    ):
        console.print(line, highlight=False)

    cmp_ = report["comparison"]
    soft, cam = cmp_.get("best_softmax"), cmp_.get("best_cam")
    if soft and cam and cmp_.get("saliency_beats_softmax") is not None:
        verdict = "YES" if cmp_["saliency_beats_softmax"] else "NO"
        console.print(f"Does saliency beat softmax? {verdict}:\n"
                      f"  best CAM gate {cam['gate']}: AUC {_num(cam['auc'])}, AUROC {_num(cam['mean_auroc'])}\n"
                      f"  best softmax gate {soft['gate']}: AUC {_num(soft['auc'])}, AUROC {_num(soft['mean_auroc'])}",
                      highlight=False)

    if report.get("corruptions"):
        names = list(report["gates"])
        from .gates import GATES

        first_of_family = {}  # one gate per family (the registry's first), besides the winner
        for g in names:
            first_of_family.setdefault(GATES[g].family if g in GATES else g, g)
        shown = [report["winner"]] + [g for g in first_of_family.values() if g != report["winner"]]
        table = Table(title="Under corruption (clean-calibrated thresholds)", box=box.SIMPLE_HEAVY,
                      caption="accuracy % / mean cost % per gate; final = the last exit alone")
        for col in ("corruption", "sev", "final", *shown):
            table.add_column(col, justify="left" if col == "corruption" else "right", no_wrap=True)

        def cell(res, g):
            return f"{_pct(res['gates'][g]['accuracy'])}/{_pct(res['gates'][g]['mean_cost'], 0)}"

        table.add_row("clean", "0", _pct(final), *[cell(report, g) for g in shown])
        for kind, entry in report["corruptions"].items():
            for s, res in entry["severities"].items():
                table.add_row(kind, s, _pct(res["exit_accuracy"][-1]), *[cell(res, g) for g in shown])
        console.print(table)
    if report.get("out"):
        console.print(f"report: {Path(report['out']) / 'report.json'}", highlight=False)
        if report.get("plots"):
            console.print(f"plots: {', '.join(report['plots'].values())}", highlight=False)

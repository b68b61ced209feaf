"""PNG plots of an evaluation report (matplotlib, Agg canvas: no display, no global pyplot state).

- ``accuracy_vs_cost.png``: accuracy vs mean cost of every gate (its calibration path applied to the evaluation
  data), the calibrated operating points, each exit on its own and the oracle;
- ``exit_histograms.png``: share of images leaving at each exit, per gate, at the operating point;
- ``auroc_per_exit.png``: failure-prediction AUROC of every gate at every internal exit;
- ``corruption.png`` (with ``--corrupt``): accuracy and mean cost at the operating point vs corruption severity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

__all__ = ["gate_style", "write_report_plots", "plot_accuracy_vs_cost", "plot_exit_histograms", "plot_auroc",
           "plot_corruption", "new_figure", "save_figure"]

_FAMILY_COLOURS = {
    "softmax": ("#1f77b4", "#4a9bd6", "#0b3d66"),
    "saliency": ("#d62728", "#ff7f0e"),
    "coherence": ("#2ca02c", "#17becf"),
    "combined": ("#8c564b", "#e377c2"),
    "agreement": ("#9467bd",),
    "learned": ("#000000",),
}
_FAMILY_STYLE = {"softmax": "-", "saliency": "--", "coherence": "-.", "combined": "-", "agreement": ":", "learned": "-"}


def _param_text(p) -> str:
    """A corruption's severity parameter: a number, or a tuple of numbers (defocus, motion, fog, saturate)."""
    if isinstance(p, (list, tuple)):
        return "(" + ", ".join(f"{v:g}" for v in p) + ")"
    return f"{p:g}"


def gate_style(name: str, family: str) -> Dict[str, Any]:
    """Colour and line style of a gate: one hue family per signal family, fixed across all plots."""
    from .gates import GATES

    colours = _FAMILY_COLOURS.get(family, ("#7f7f7f",))
    same = [g for g, spec in GATES.items() if spec.family == family]
    idx = same.index(name) if name in same else 0
    return {"color": colours[idx % len(colours)], "linestyle": _FAMILY_STYLE.get(family, "-")}


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=120)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _short(path: str, n: int = 40) -> str:
    return path if len(path) <= n else "..." + path[-(n - 3):]


def _kept(g: Dict[str, Any]) -> str:
    """The gate's kept internal exits for a legend: "exits 1,3", "no internal exit", "all exits"."""
    from .calibrate import exits_text

    text = exits_text(g.get("exits"))
    return {"none": "no internal exit", "all": "all exits"}.get(text, f"exits {text}")


def plot_accuracy_vs_cost(report: Dict[str, Any], path: Path) -> None:
    fig = new_figure(10.5, 6.5)
    ax = fig.add_subplot(1, 1, 1)
    unit = report["costs"]["unit"]
    for name, g in report["gates"].items():
        st = gate_style(name, g["family"])
        curve = sorted(g.get("curve") or [], key=lambda p: (p[0], p[1]))
        if curve:
            ax.plot([100 * c for c, _ in curve], [100 * a for _, a in curve], lw=1.6 if name != report["winner"] else 2.6,
                    label=f"{name} ({g['family']}, {_kept(g)}, AUC {g['auc']:.3f})" if _finite(g["auc"])
                    else f"{name} ({_kept(g)})", **st)
        ax.plot(100 * g["mean_cost"], 100 * g["accuracy"], marker="o", ms=9 if name == report["winner"] else 6,
                mec="black", mew=1.2, color=st["color"], linestyle="none")
    costs, accs = report["exit_cost"], report["exit_accuracy"]
    ax.plot([100 * c for c in costs], [100 * a for a in accs], "s", color="#555555", ms=7,
            label="single exit i (one stage straight to it, no gate)")
    for i, (c, a) in enumerate(zip(costs, accs)):
        ax.annotate(f"exit {i}", (100 * c, 100 * a), textcoords="offset points", xytext=(5, -12), fontsize=8,
                    color="#555555")
    o = report["oracle"]
    ax.plot(100 * o["mean_cost"], 100 * o["accuracy"], marker="*", ms=16, color="gold", mec="black",
            linestyle="none", label="oracle (straight to the earliest right exit)")
    ax.plot([], [], marker="o", mec="black", color="white", linestyle="none",
            label=f"calibrated operating point (larger: winner {report['winner']})")
    ax.set_xlabel(f"mean cost per image (% of the plain network's {unit})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy vs mean cost on {_short(report['data'])} ({report['n']} images)\n"
                 "every gate's kept exits and thresholds were fixed on the calibration split\n"
                 "(AUC in the legend: the same search with every exit kept, comparable across gates)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    save_figure(fig, path)


def plot_exit_histograms(report: Dict[str, Any], path: Path) -> None:
    gates = report["gates"]
    n = len(gates)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = new_figure(4.2 * cols, 3.0 * rows + 0.6)
    for k, (name, g) in enumerate(gates.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        total = max(1, sum(g["histogram"]))
        share = [100 * h / total for h in g["histogram"]]
        costs = g.get("exit_cost") or report["exit_cost"]
        labels = [f"{i}\n{100 * c:.0f}%" if _finite(c) else f"{i}\n-" for i, c in enumerate(costs)]
        ax.bar(range(len(share)), share, color=gate_style(name, g["family"])["color"], alpha=0.85)
        ax.set_xticks(range(len(share)), labels, fontsize=8)
        ax.set_ylim(0, 100)
        mark = " (winner)" if name == report["winner"] else ""
        ax.set_title(f"{name}{mark}, {_kept(g)}: acc {100 * g['accuracy']:.1f}%, cost {100 * g['mean_cost']:.0f}%",
                     fontsize=9)
        ax.set_xlabel("exit (cost of leaving there, % of plain network; - = not kept)", fontsize=8)
        ax.set_ylabel("images leaving here (%)", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Where images leave at each gate's calibrated operating point ({report['n']} images)")
    save_figure(fig, path)


def plot_auroc(report: Dict[str, Any], path: Path) -> None:
    fig = new_figure(9.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    k = len(report["exit_accuracy"]) - 1
    xs = list(range(k))
    for name, g in report["gates"].items():
        ys = [a if _finite(a) else float("nan") for a in g["auroc"]]
        ax.plot(xs, ys, marker="o", lw=2.4 if name == report["winner"] else 1.5,
                label=f"{name} (mean {g['mean_auroc']:.3f})" if _finite(g["mean_auroc"]) else name,
                **gate_style(name, g["family"]))
    ax.axhline(0.5, color="grey", lw=1, linestyle=":", label="chance (0.5)")
    ax.set_xticks(xs, [f"exit {i}\n{100 * report['exit_cost'][i]:.0f}% cost" for i in xs])
    ax.set_xlabel("internal exit (cost on its own, % of plain network); every exit kept")
    ax.set_ylabel("AUROC (score separates right from wrong answers)")
    values = [a for g in report["gates"].values() for a in g["auroc"] if _finite(a)]
    ax.set_ylim(min([0.3] + [v - 0.05 for v in values]), 1.02)
    ax.set_title("Failure prediction per exit: does a high (oriented) gate score mean the exit is right?\n"
                 "orientation fixed on the calibration split; 1 = perfect, 0.5 = chance")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    save_figure(fig, path)


def plot_corruption(report: Dict[str, Any], path: Path) -> None:
    kinds = list(report["corruptions"])
    cols = len(kinds)
    fig = new_figure(4.0 * cols + 2.5, 7.0)
    handles = []
    for j, kind in enumerate(kinds):
        entry = report["corruptions"][kind]["severities"]
        sev = [0] + [int(s) for s in entry]
        results = [None] + [entry[s] for s in entry]
        ax_acc = fig.add_subplot(2, cols, j + 1)
        ax_cost = fig.add_subplot(2, cols, cols + j + 1)
        for name, g in report["gates"].items():
            st = gate_style(name, g["family"])
            acc = [g["accuracy"]] + [r["gates"][name]["accuracy"] for r in results[1:]]
            cost = [g["mean_cost"]] + [r["gates"][name]["mean_cost"] for r in results[1:]]
            (h,) = ax_acc.plot(sev, [100 * a for a in acc], marker="o", ms=4, label=name,
                               lw=2.4 if name == report["winner"] else 1.4, **st)
            ax_cost.plot(sev, [100 * c for c in cost], marker="o", ms=4, lw=2.4 if name == report["winner"] else 1.4, **st)
            if j == 0:
                handles.append(h)
        final = [report["exit_accuracy"][-1]] + [r["exit_accuracy"][-1] for r in results[1:]]
        (hf,) = ax_acc.plot(sev, [100 * a for a in final], color="black", lw=1.2, linestyle=(0, (4, 2)),
                            label="final exit only")
        oc = [report["oracle"]["mean_cost"]] + [r["oracle"]["mean_cost"] for r in results[1:]]
        (ho,) = ax_cost.plot(sev, [100 * c for c in oc], color="goldenrod", lw=1.2, linestyle=(0, (1, 1)),
                             label="oracle cost")
        if j == 0:
            handles += [hf, ho]
        params = report["corruptions"][kind].get("params") or []
        ax_acc.set_title(f"{kind}" + (f" (params {', '.join(_param_text(p) for p in params)})" if params else ""), fontsize=9)
        ax_acc.set_ylabel("accuracy (%)")
        ax_cost.set_ylabel("mean cost (% of plain network)")
        ax_cost.set_xlabel("severity (0 = clean)")
        for ax in (ax_acc, ax_cost):
            ax.set_xticks(sev)
            ax.grid(True, alpha=0.3)
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"Exit gates under corruption ({report['n']} images; thresholds calibrated on clean data)")
    save_figure(fig, path)


def write_report_plots(report: Dict[str, Any], out_dir: Path) -> Dict[str, str]:
    """Write every plot of ``report`` into ``out_dir``; returns {plot name: file name}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: Dict[str, str] = {}
    jobs = [("accuracy_vs_cost", plot_accuracy_vs_cost), ("exit_histograms", plot_exit_histograms),
            ("auroc_per_exit", plot_auroc)]
    if report.get("corruptions"):
        jobs.append(("corruption", plot_corruption))
    for name, func in jobs:
        file = f"{name}.png"
        func(report, out_dir / file)
        written[name] = file
    return written

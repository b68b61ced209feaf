"""One picture of the degraded-inputs benchmark: per gate, the cost on unseen degradations against the worst and the
mean drop there, for several runs of ``benchmarks/robust.py`` (model x calibration), with issue 13's target box.

    python benchmarks/robust_plot.py cifar10 cifar10-conf95 cifar10-augmix cifar10-augmix-conf95

Reads benchmarks/results/robust/<name>/robust.json (nothing is re-measured); writes
benchmarks/results/robust/tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from edgeexit.gates import GATES  # noqa: E402
from edgeexit.plots import gate_style, new_figure, save_figure  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P")
TARGET = {"mean": 1.0, "worst": 2.5, "cost": 65.0}


def label_of(result: dict, name: str) -> str:
    args = result["args"]
    model = Path(args["ckpt"]).stem
    level = args.get("confidence")
    held = f"held at {float(level):.0%}" if level not in (None, "None") else "estimate"
    folds = "one kind out" if args.get("folds") == "kind" else "one group out"
    return f"{model}, {held}, {folds}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="results folders under benchmarks/results/robust/")
    ap.add_argument("--out", type=Path, default=RESULTS / "robust" / "tradeoff.png")
    args = ap.parse_args()
    runs = [(n, json.loads((RESULTS / "robust" / n / "robust.json").read_text())) for n in args.names]
    fig = new_figure(12, 5)
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, limit, title in ((axes[0], "worst_drop", TARGET["worst"], "worst unseen condition"),
                                  (axes[1], "mean_drop", TARGET["mean"], "mean over unseen conditions")):
        ax.axvline(TARGET["cost"], color="#2e7d32", linestyle="--", linewidth=1)
        ax.axhline(limit, color="#2e7d32", linestyle="--", linewidth=1)
        ax.fill_between([0, TARGET["cost"]], -5, limit, color="#a5d6a7", alpha=0.5, zorder=0,
                        label="issue 13 target" if key == "worst_drop" else None)
        for m, (name, r) in enumerate(runs):
            for gate in list(r["summary"]):
                if gate in ("baseline_winner_clean", "winner") or gate not in GATES:
                    continue
                v = r["summary"][gate]["robust"]
                style = gate_style(gate, GATES[gate].family)
                ax.scatter(100 * v["mean_cost"], v[key], marker=MARKERS[m % len(MARKERS)], color=style["color"],
                           s=46, edgecolor="black", linewidth=0.4, zorder=3)
            w = r["summary"]["winner"]["robust"]
            ax.scatter(100 * w["mean_cost"], w[key], marker=MARKERS[m % len(MARKERS)], facecolor="none",
                       edgecolor="black", s=190, linewidth=1.4, zorder=4)
        ax.set_xlabel("mean cost on unseen degradations, % of the plain network")
        ax.set_ylabel("drop below full depth, points")
        ax.set_title(title)
        lowest = min(r["summary"][g]["robust"][key] for _, r in runs for g in r["summary"] if g in GATES)
        ax.set_ylim(min(-0.3, lowest - 0.3), None)
        ax.set_xlim(55, 100)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=MARKERS[m % len(MARKERS)], linestyle="", color="#555555", label=label_of(r, n))
               for m, (n, r) in enumerate(runs)]
    gates_seen = [g for g in GATES if any(g in r["summary"] for _, r in runs)]
    handles += [Line2D([], [], marker="o", linestyle="", color=gate_style(g, GATES[g].family)["color"], label=g)
                for g in gates_seen]
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="black",
                          markersize=11, label="winner (cheapest on clean frames)"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle("CIFAR-10, calibrated without some degradation kinds: cost against drop on the kinds never seen")
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Two models side by side, from their gate benchmarks (``benchmarks/gates.py`` results): full-depth accuracy and
one gate's clean-calibrated policy (accuracy, drop below full depth, cost) on clean test images and under every
corruption condition the benchmark ran.

    python benchmarks/compare_models.py --a cifar10 --b cifar10-augmix --gate max_prob

Reads benchmarks/results/<a>/gates.json and <b>/gates.json (nothing is re-measured); writes
benchmarks/results/<b>/versus-<a>.md and .json. Both policies were calibrated on the same held-out training split,
so the comparison is what a user gets from either model with the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_json  # noqa: E402


def rows_of(report: Dict[str, Any], gate: str) -> Dict[str, Dict[str, float]]:
    """condition -> {final, accuracy, drop, cost} in % / points, clean first."""
    def row(block: Dict[str, Any]) -> Dict[str, float]:
        g = block["gates"][gate]
        return {"final": 100 * block["exit_accuracy"][-1], "accuracy": 100 * g["accuracy"],
                "drop": 100 * (block["exit_accuracy"][-1] - g["accuracy"]), "cost": 100 * g["mean_cost"]}

    out = {"clean": row(report["test"])}
    for kind, v in report.get("corruptions", {}).items():
        for sev, block in v["severities"].items():
            out[f"{kind}-{sev}"] = row(block)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="results folder name of the first model (the reference)")
    ap.add_argument("--b", required=True, help="results folder name of the second model")
    ap.add_argument("--gate", default="max_prob")
    args = ap.parse_args()
    reports = [json.loads((RESULTS / n / "gates.json").read_text()) for n in (args.a, args.b)]
    a, b = (rows_of(r, args.gate) for r in reports)
    names = [k for k in a if k in b]
    table: List[List[str]] = []
    for k in names:
        table.append([k] + [f"{r[k]['final']:.1f} / {r[k]['accuracy']:.1f} / {r[k]['drop']:+.2f} / {r[k]['cost']:.1f}"
                            for r in (a, b)])
    degraded = [k for k in names if k != "clean"]
    mean = {n: {m: float(np.mean([r[k][m] for k in degraded])) for m in ("final", "accuracy", "drop", "cost")}
            for n, r in ((args.a, a), (args.b, b))}
    table.append(["**mean over corrupted**"] + [
        f"{mean[n]['final']:.1f} / {mean[n]['accuracy']:.1f} / {mean[n]['drop']:+.2f} / {mean[n]['cost']:.1f}"
        for n in (args.a, args.b)])
    md = [f"# {args.b} versus {args.a}: gate {args.gate}, clean-calibrated", "",
          f"`python benchmarks/compare_models.py --a {args.a} --b {args.b} --gate {args.gate}` (from the two "
          "gates.json; test images: clean and corrupted, as benchmarks/gates.py ran them).", "",
          "Each cell: full-depth accuracy % / the policy's accuracy % / drop below full depth (points) / mean cost % "
          "of the plain network.", "",
          markdown_table(["condition", args.a, args.b], table)]
    out = RESULTS / args.b
    (out / f"versus-{args.a}.md").write_text("\n".join(md) + "\n")
    write_json(out / f"versus-{args.a}.json", {"gate": args.gate, "a": args.a, "b": args.b,
                                               "rows": {args.a: a, args.b: b}, "mean_corrupted": mean})
    print("\n".join(md))


if __name__ == "__main__":
    main()

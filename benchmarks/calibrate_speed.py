"""Calibration time of the exit-subset search, on synthetic outputs the size of the CIFAR-10 held-out split.

    python benchmarks/calibrate_speed.py                 # n = 5000, the demo model's exits, CAM grids and MACs
    python benchmarks/calibrate_speed.py --grid 32       # every CAM 32 x 32 (a heavier case for the coherence pairs)

`edgeexit calibrate` runs the model once over the split, then everything else is numpy: temperatures, signals,
and for every gate and every subset of the internal exits (64 for 7 exits) the cached score columns, the greedy
threshold path and the choice. This script times that numpy part (model pass excluded) with synthetic
``ExitOutputs`` (logits whose exits are right on a growing share of the samples, random CAMs), in two modes run
alternately in each repeat on fresh outputs (cold caches): every subset searched, and one forced subset (all
exits kept, the work before the subset search existed). Writes benchmarks/results/calibrate_speed/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from edgeexit.calibrate import CostModel, DEFAULT_STAGE_OVERHEAD, calibrate_outputs  # noqa: E402
from edgeexit.collect import ExitOutputs  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "edgeexit" / "assets" / "demo" / "bundle" / "manifest.json"


def demo_shape() -> tuple[list[list[int]], CostModel]:
    """The demo bundle's CAM grids and MAC costs (CIFAR-10 ResNet-20, 7 exits)."""
    manifest = json.loads(DEMO.read_text())
    grids = [list(h["cam_shape"]) for h in manifest["heads"]]
    c = manifest["costs"]
    return grids, CostModel(tuple(c["segment_macs"]), tuple(c["head_macs"]), DEFAULT_STAGE_OVERHEAD, "MACs", "demo")


def synthetic_outputs(n: int, grids: list[list[int]], classes: int, seed: int) -> ExitOutputs:
    """Exit i is right on a share rising from 55 % to 89 % (CIFAR-10-like), confident where right; random CAMs."""
    rng = np.random.default_rng(seed)
    e = len(grids)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, e, classes)).astype(np.float32)
    ease = rng.normal(size=n)
    for i, acc in enumerate(np.linspace(0.55, 0.89, e)):
        right = ease + 0.7 * rng.normal(size=n) > np.quantile(ease, 1.0 - acc)
        logits[right, i, labels[right]] += 2.0 + 2.0 * rng.random(int(right.sum()))
    cams = [rng.normal(size=(n, h, w)).astype(np.float32) for h, w in grids]
    return ExitOutputs(logits, cams, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="held-out samples (CIFAR-10: 10 %% of 50000)")
    parser.add_argument("--grid", type=int, default=None, help="every CAM N x N instead of the demo's grids")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "calibrate_speed")
    args = parser.parse_args()

    grids, costs = demo_shape()
    if args.grid:
        grids = [[args.grid, args.grid]] * len(grids)
    e = len(grids)
    modes = {"every subset": None, "all exits kept (one subset)": tuple(range(e - 1))}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    winners: dict[str, dict] = {}
    for r in range(args.repeats):
        for mode, exits in modes.items():  # alternate the modes within each repeat
            outputs = synthetic_outputs(args.n, grids, 10, seed=r)
            t0 = time.perf_counter()
            cal = calibrate_outputs(outputs, costs, max_drop=1.0, exits=exits).calibration
            seconds[mode].append(time.perf_counter() - t0)
            winners[mode] = {g: v["exits"] for g, v in cal["gates"].items()}
            print(f"repeat {r}: {mode}: {seconds[mode][-1]:.2f} s", flush=True)
    rows = [[mode, f"{min(s):.2f}", f"{float(np.median(s)):.2f}", f"{max(s):.2f}"] for mode, s in seconds.items()]
    summary = {
        "machine": machine(), "n": args.n, "exits": e, "gates": 9, "grids": grids, "repeats": args.repeats,
        "stage_overhead_macs": DEFAULT_STAGE_OVERHEAD, "seconds": seconds, "kept_exits_last_repeat": winners,
        "command": "python benchmarks/calibrate_speed.py" + (f" --grid {args.grid}" if args.grid else ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-grid{args.grid}" if args.grid else ""
    write_json(args.out / f"speed{suffix}.json", summary)
    md = [f"# Calibration time (numpy part, model pass excluded){' with ' + str(args.grid) + 'x' + str(args.grid) + ' CAMs' if args.grid else ''}\n",
          f"Synthetic outputs: n = {args.n}, E = {e} exits, 10 classes, CAM grids {grids}, all 9 gates, the demo "
          f"model's MACs + {DEFAULT_STAGE_OVERHEAD:.0f} MACs per stage; {args.repeats} repeats, modes alternated, "
          f"fresh outputs (cold caches) each run. `{summary['command']}`\n",
          markdown_table(["mode", "min s", "median s", "max s"], rows)]
    (args.out / f"speed{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

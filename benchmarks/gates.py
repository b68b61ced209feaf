"""Gate benchmark: calibrate every gate on the held-out part of train/, report on test/ (clean and corrupted).

    python benchmarks/gates.py --ckpt benchmarks/models/cifar10-resnet20.pt --test ../shared/data/cifar10/test --name cifar10
    python benchmarks/gates.py --ckpt runs/canvas-resnet20.pt --test runs/canvas/test --boxes runs/canvas/test/boxes.json --name canvas

Writes benchmarks/results/<name>/: report.json (edgeexit evaluate's), gates.json, gates.md and the plots.
Thresholds, temperatures, directions and learned gates are fitted by `edgeexit calibrate` on the checkpoint's
held-out training split only; the test folder is read once, for the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, pct, write_json  # noqa: E402

from edgeexit.metrics import auroc  # noqa: E402


def gate_rows(report: dict) -> list[list]:
    oracle = report["oracle"]["mean_cost"]
    rows = []
    for name, g in sorted(report["gates"].items(), key=lambda kv: kv[1]["mean_cost"] if kv[1]["mean_cost"] is not None else 9):
        aurocs = " / ".join("—" if a is None or not np.isfinite(a) else f"{a:.3f}" for a in g["auroc"])
        exits = g.get("exits")
        rows.append([
            f"**{name}**" if name == report.get("winner") else name, g.get("family", ""),
            "all" if exits is None else (",".join(map(str, exits)) or "none"),
            pct(g["mean_cost"]), pct(g["accuracy"], 2), f"{g['drop']:.2f}" if g.get("drop") is not None else "—",
            f"{g['mean_cost'] / oracle:.2f}" if g["mean_cost"] and oracle else "—",
            f"{g['auc']:.4f}" if g.get("auc") is not None else "—", aurocs,
        ])
    return rows


GATE_HEADER = ["gate", "family", "kept exits", "mean cost % of plain net", "test acc %", "accuracy loss vs final exit (points)",
               "cost / oracle", "acc-cost AUC", "failure AUROC per internal exit"]


def corruption_rows(report: dict) -> list[list]:
    rows = []
    for kind, entry in (report.get("corruptions") or {}).items():
        for sev, res in entry["severities"].items():
            final = res["exit_accuracy"][-1]
            for name, g in res["gates"].items():
                rows.append([kind, sev, name, pct(g["mean_cost"]), pct(g["accuracy"], 2), f"{100 * (g['accuracy'] - final):+.2f}",
                             f"{g['mean_auroc']:.3f}" if g.get("mean_auroc") is not None else "—"])
    return rows


def pointing_game(ckpt_path: Path, test_root: Path, boxes_path: Path, limit: int | None) -> dict:
    """Per exit: how often the CAM's peak falls inside the object's box, and accuracy when it does / does not."""
    from edgeexit.checkpoint import load_model
    from edgeexit.collect import collect, labelled_images

    model, ckpt = load_model(ckpt_path)
    images = labelled_images(test_root, ckpt, limit=limit)
    outputs = collect(model, images.images, images.labels, _preprocess(ckpt), paths=images.paths)
    boxes = json.loads(boxes_path.read_text())
    size = images.images.shape[1]
    rel = [str(Path(p).relative_to(test_root)) for p in images.paths]
    box = np.array([boxes[r] for r in rel], dtype=np.float64)  # x0 y0 x1 y1 in input pixels
    correct = outputs.correct
    result = []
    for i, cam in enumerate(outputs.cams):
        n, h, w = cam.shape
        flat = cam.reshape(n, -1).argmax(1)
        py, px = (flat // w + 0.5) * size / h, (flat % w + 0.5) * size / w
        hit = (px >= box[:, 0]) & (px < box[:, 2]) & (py >= box[:, 1]) & (py < box[:, 3])
        ok = correct[:, i]
        result.append({
            "exit": i, "grid": [h, w], "hit_rate": float(hit.mean()), "accuracy": float(ok.mean()),
            "accuracy_when_hit": float(ok[hit].mean()) if hit.any() else None,
            "accuracy_when_miss": float(ok[~hit].mean()) if (~hit).any() else None,
            "auroc_hit_predicts_correct": _finite(auroc(hit.astype(float), ok)),
        })
    return {"n": int(len(images)), "per_exit": result}


def _preprocess(ckpt):
    from edgeexit.preprocess import Preprocess

    return Preprocess.from_dict(ckpt["preprocess"])


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--corrupt", default="noise,blur,contrast,jpeg")
    parser.add_argument("--severities", default="1,3,5")
    parser.add_argument("--boxes", type=Path, default=None, help="boxes.json of a canvas test folder: adds the pointing game")
    parser.add_argument("--limit", type=int, default=None, help="at most this many test images (stratified)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgeexit.calibrate import calibrate, print_calibration
    from edgeexit.evaluate import evaluate

    out = args.out or RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    calibrated = out / f"{args.ckpt.stem}-calibrated.pt"
    t0 = time.perf_counter()
    cal = calibrate(args.ckpt, out=calibrated, max_drop=args.max_drop, log=print)
    print_calibration(cal)
    t_cal = time.perf_counter() - t0
    report = evaluate(calibrated, args.test, out=out, corrupt=args.corrupt or None,
                      severities=[int(s) for s in args.severities.split(",")], limit=args.limit, log=print)
    t_eval = time.perf_counter() - t0 - t_cal
    calibrated.unlink()  # the calibrated checkpoint is an intermediate; its policy is in gates.json
    summary = {
        "machine": machine(), "checkpoint": str(args.ckpt), "test_folder": str(args.test), "max_drop_points": args.max_drop,
        "calibration": {"split": cal.get("split"), "winner": cal.get("winner"), "temperatures": cal.get("temperatures"),
                        "exit_accuracy": cal.get("exit_accuracy"), "oracle": cal.get("oracle"),
                        "gates": {k: {kk: v.get(kk) for kk in ("exits", "mean_cost", "accuracy", "drop", "meets_target", "direction", "mean_auroc", "policy")}
                                  for k, v in cal["gates"].items()}},
        "test": {"n": report["n"], "exit_accuracy": report["exit_accuracy"], "exit_cost": report["exit_cost"],
                 "oracle": report["oracle"], "winner": report.get("winner"), "comparison": report.get("comparison"),
                 "gates": {k: {kk: v.get(kk) for kk in ("family", "exits", "mean_cost", "accuracy", "drop", "auc", "auroc", "mean_auroc", "histogram")}
                           for k, v in report["gates"].items()}},
        "seconds": {"calibrate": round(t_cal, 1), "evaluate": round(t_eval, 1)},
    }
    md = [f"# Gates on {args.name}\n",
          f"Thresholds calibrated on the checkpoint's held-out training split (target: at most {args.max_drop} point below the "
          f"final exit); figures measured on {report['n']} test images. Final exit {pct(report['exit_accuracy'][-1], 2)}%, "
          f"oracle cost {pct(report['oracle']['mean_cost'])}% of the plain network.\n",
          "Per-exit test accuracy %: " + ", ".join(pct(a, 1) for a in report["exit_accuracy"]) + "\n",
          markdown_table(GATE_HEADER, gate_rows(report))]
    if report.get("corruptions"):
        md += ["\n## Under corruption (clean-calibrated thresholds)\n",
               markdown_table(["corruption", "severity", "gate", "mean cost %", "acc %", "vs final exit (points)", "mean AUROC"],
                              corruption_rows(report))]
        summary["corruptions"] = report["corruptions"]
    if args.boxes:
        game = pointing_game(args.ckpt, args.test, args.boxes, args.limit)
        summary["pointing_game"] = game
        md += ["\n## Pointing game: does the CAM peak fall inside the object's box?\n",
               markdown_table(["exit", "CAM grid", "hit rate %", "acc %", "acc when hit %", "acc when miss %", "AUROC(hit -> right)"],
                              [[g["exit"], "x".join(map(str, g["grid"])), pct(g["hit_rate"]), pct(g["accuracy"]),
                                pct(g["accuracy_when_hit"]), pct(g["accuracy_when_miss"]),
                                "—" if g["auroc_hit_predicts_correct"] is None else f"{g['auroc_hit_predicts_correct']:.3f}"]
                               for g in game["per_exit"]])]
    write_json(out / "gates.json", summary)
    (out / "gates.md").write_text("\n".join(md))
    print((out / "gates.md").read_text())


if __name__ == "__main__":
    main()

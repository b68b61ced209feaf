"""Camera-resolution photos + torchvision-layout ResNet-18 weights, end to end: train --mode heads, calibrate, export,
run; peak RSS and wall time of every step (``/usr/bin/time -v``).

The photos: CIFAR-10 training images of three classes, seeded sample, each upscaled (bilinear) to a random size of
200-1000 px per side (aspect ratios vary) and saved as JPEG. The weights: a state dict with torchvision's
``resnet18`` key names and shapes (1000 classes), written by ``tests/lookalikes.TVResNet18`` (torchvision itself
does not install against this machine's CPU torch build, and no pretrained file is downloaded): its values are a
random initialisation, so the accuracies measure nothing; the run checks memory, time and that every step works.

    python benchmarks/photos_pretrained.py --cifar ../shared/data/cifar10/train --work runs/photos --name photos

Writes ``benchmarks/results/<name>/acceptance.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine  # noqa: E402


def make_photos(cifar: Path, out: Path, classes: list[str], total: int, seed: int) -> int:
    """``total`` JPEGs (split evenly over ``classes``) of 200-1000 px; returns how many were written."""
    rng = np.random.default_rng(seed)
    per_class = total // len(classes) + (1 if total % len(classes) else 0)
    written = 0
    for c, name in enumerate(classes):
        files = sorted((cifar / name).iterdir())
        pick = rng.choice(len(files), size=min(per_class, len(files), total - written), replace=False)
        (out / name).mkdir(parents=True, exist_ok=True)
        for k in pick:
            w, h = (int(v) for v in rng.integers(200, 1001, 2))
            with Image.open(files[k]) as img:
                img.convert("RGB").resize((w, h), Image.BILINEAR).save(out / name / f"{files[k].stem}.jpg", quality=90)
            written += 1
    return written


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; peak RSS (MB, the largest process of the run), wall seconds, exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return {"command": " ".join(cmd), "peak_rss_mb": int(rss[1]) / 1024 if rss else None, "wall_s": round(wall, 1),
            "stdout_tail": r.stdout.strip().splitlines()[-12:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "train")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "photos")
    ap.add_argument("--name", default="photos")
    ap.add_argument("--classes", default="airplane,automobile,bird")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from lookalikes import TVResNet18

    work = args.work
    photos = work / "photos"
    if not photos.is_dir():
        n = make_photos(args.cifar, photos, args.classes.split(","), args.images, args.seed)
        print(f"wrote {n} photos to {photos}")
    weights = work / "resnet18-torchvision-layout.pt"
    if not weights.is_file():
        torch.manual_seed(args.seed)
        torch.save(TVResNet18(num_classes=1000).state_dict(), weights)
    ckpt, bundle, logs = work / "model.pt", work / "bundle", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in (ckpt, work / "run.jsonl"):
        stale.unlink(missing_ok=True)
    if bundle.exists():
        import shutil

        shutil.rmtree(bundle)
    cli = [sys.executable, "-m", "edgeexit.cli"]
    steps = {
        "train": timed([*cli, "train", "--data", str(photos), "--arch", "resnet18", "--init-weights", str(weights),
                        "--mode", "heads", "--epochs", str(args.epochs), "--batch-size", "32", "--out", str(ckpt),
                        "--quiet"], logs / "train.log"),
        "calibrate": timed([*cli, "calibrate", str(ckpt), "--quiet"], logs / "calibrate.log"),
        "export": timed([*cli, "export", str(ckpt), "--out", str(bundle)], logs / "export.log"),
        "run": timed([*cli, "run", str(bundle), str(photos), "--max-frames", "100", "--out", str(work / "run.jsonl"),
                      "--quiet"], logs / "run.log"),
    }
    sizes = [Image.open(p).size for p in sorted(photos.rglob("*.jpg"))]
    result = {"machine": machine(), "photos": {"count": len(sizes), "min_side": min(min(s) for s in sizes),
                                               "max_side": max(max(s) for s in sizes), "classes": args.classes},
              "epochs": args.epochs, "steps": steps}
    out = RESULTS / args.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceptance.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v['peak_rss_mb']:.0f} | {v['wall_s']:.1f} |" for k, v in steps.items())
    (out / "acceptance.md").write_text(
        f"# Photos at camera resolution, torchvision-layout ResNet-18, --mode heads\n\n"
        f"{len(sizes)} JPEGs of {result['photos']['min_side']}-{result['photos']['max_side']} px in 3 classes "
        f"({args.classes}); {args.epochs} epoch(s); {result['machine']['cpu_count']} CPUs "
        f"({result['machine'].get('cpu_model')}), shared.\n\n"
        "| step | peak RSS (MB) | wall (s) |\n|---|---|---|\n" + rows + "\n\n"
        "Commands: `python benchmarks/photos_pretrained.py` (each step under `/usr/bin/time -v`; see acceptance.json).\n"
        "The weights are a random initialisation in torchvision's layout, so accuracies mean nothing here.\n")
    print((out / "acceptance.md").read_text())


if __name__ == "__main__":
    main()

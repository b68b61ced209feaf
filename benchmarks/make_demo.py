"""Reproduce the demo bundle that ships in the package (what `edgeexit run` with no arguments runs).

    python benchmarks/make_demo.py --cifar ../shared/data/cifar10 [--ckpt benchmarks/models/cifar10-resnet56-augmix.pt]

1. trains the README's CIFAR-10 demo recipe unless --ckpt already exists (ResNet-56 with AugMix, 40 epochs: 138
   minutes on 2 CPU cores; the demo's own weights are committed as ``benchmarks/models/cifar10-resnet56-augmix.pt``,
   which is the default --ckpt),
2. calibrates it on the held-out part of train/ (at most 1 point below the final exit, held with 95% confidence:
   the loss's upper bound, not its estimate, meets the target, since 5,000 held-out images leave an estimate
   +-0.6 points wide; at most 3 internal exits kept, which bounds the worst case, every stage run and no exit
   taken, near 1.1x the plain network on a CPU); the drift guard falls back to full depth (``--degrade all
   --degraded-as guard``, stricter thresholds on the same stages instead, is cheaper on a degraded stretch but
   measured less safe there: README, *Degraded inputs, demo model*),
3. exports it to edgeexit/assets/demo/bundle (checked against torch) with the winner's stages and sal_entropy's (so
   ``edgeexit run --gate sal_entropy`` can switch; one more gate adds about 3.4 MB to the package),
4. copies --per-class images of every class from test/ to edgeexit/assets/demo/samples/<class>/.
Each step is the documented command line, so the demo is exactly what a user gets from the README.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "edgeexit" / "assets" / "demo"
RECIPE = ["--arch", "resnet56", "--augmix", "--epochs", "40", "--distill", "0.5"]
REFERENCE = ROOT / "benchmarks" / "models" / "cifar10-resnet56-augmix.pt"  # the demo bundle's weights


def edgeexit(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgeexit.cli", *args]
    print("$ edgeexit " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--ckpt", type=Path, default=REFERENCE)
    parser.add_argument("--per-class", type=int, default=4)
    args = parser.parse_args()
    if not args.ckpt.exists():
        edgeexit("train", "--data", str(args.cifar / "train"), *RECIPE, "--out", str(args.ckpt))
    calibrated = ROOT / "runs" / (args.ckpt.stem + "-calibrated.pt")
    calibrated.parent.mkdir(exist_ok=True)
    # --data: the held-out split is re-derived from the training folder, wherever the model was trained
    edgeexit("calibrate", str(args.ckpt), "--data", str(args.cifar / "train"), "--max-drop", "1.0", "--confidence",
             "0.95", "--max-kept", "3", "--out", str(calibrated), "--quiet")
    edgeexit("export", str(calibrated), "--out", str(DEMO / "bundle"), "--force", "--gates", "sal_entropy")
    samples = DEMO / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    for class_dir in sorted(p for p in (args.cifar / "test").iterdir() if p.is_dir()):
        (samples / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[: args.per_class]:
            shutil.copy(image, samples / class_dir.name / image.name)
    print(f"demo bundle in {DEMO / 'bundle'}, {args.per_class} samples per class in {samples}")


if __name__ == "__main__":
    main()

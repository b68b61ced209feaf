"""CIFAR-10 objects on a larger cluttered canvas, with the object's box known (the camera-like setting).

Each canvas (default 96x96) is filled with clutter: 16x16 patches cut from other random images of the same split.
The object image is then resized to a random side in [min_scale, max_scale] x canvas and pasted at a random
position. Written as class folders of PNGs (so train / calibrate / evaluate read it like any user data set)
plus ``boxes.json``: {relative path: [x0, y0, x1, y1]} in pixels (x1, y1 exclusive).

    python benchmarks/canvas.py --cifar ../shared/data/cifar10 --out runs/canvas --train-per-class 1000 --test-per-class 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from edgeexit.imageio import load_image, scan_image_folder

PATCH = 16


def make_canvas(obj: np.ndarray, clutter_sources: list[np.ndarray], rng: np.random.Generator, size: int,
                min_scale: float, max_scale: float) -> tuple[np.ndarray, list[int]]:
    """One canvas: clutter patches, then the object at a random scale and position. Returns (image, box)."""
    canvas = np.empty((size, size, 3), np.uint8)
    for y in range(0, size, PATCH):
        for x in range(0, size, PATCH):
            src = clutter_sources[rng.integers(len(clutter_sources))]
            sy, sx = rng.integers(0, src.shape[0] - PATCH + 1), rng.integers(0, src.shape[1] - PATCH + 1)
            patch = src[sy : sy + PATCH, sx : sx + PATCH]
            canvas[y : y + PATCH, x : x + PATCH] = patch[: size - y, : size - x]
    side = int(rng.integers(int(min_scale * size), int(max_scale * size) + 1))
    resized = np.asarray(Image.fromarray(obj).resize((side, side), Image.BILINEAR))
    y0, x0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
    canvas[y0 : y0 + side, x0 : x0 + side] = resized
    return canvas, [x0, y0, x0 + side, y0 + side]


def build_split(src_root: Path, out_root: Path, per_class: int, seed: int, size: int, min_scale: float,
                max_scale: float) -> int:
    """Write ``per_class`` canvases per class from the images of ``src_root``; returns the number written."""
    folder = scan_image_folder(src_root)
    rng = np.random.default_rng(seed)
    labels = np.asarray(folder.labels)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(folder.classes))])
    pool_idx = rng.choice(len(folder.paths), size=min(2000, len(folder.paths)), replace=False)
    clutter = [load_image(folder.paths[i]) for i in pool_idx]
    boxes: dict[str, list[int]] = {}
    for i in chosen:
        obj = load_image(folder.paths[i])
        image, box = make_canvas(obj, clutter, rng, size, min_scale, max_scale)
        rel = f"{folder.classes[labels[i]]}/{folder.paths[i].stem}.png"
        (out_root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out_root / rel)
        boxes[rel] = box
    (out_root / "boxes.json").write_text(json.dumps(boxes))
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10")
    parser.add_argument("--out", type=Path, default=Path("runs/canvas"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--min-scale", type=float, default=0.33)
    parser.add_argument("--max-scale", type=float, default=0.67)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # train canvases only ever use train/ images (objects and clutter); test canvases only test/ images
    n_train = build_split(args.cifar / "train", args.out / "train", args.train_per_class, args.seed, args.size,
                          args.min_scale, args.max_scale)
    n_test = build_split(args.cifar / "test", args.out / "test", args.test_per_class, args.seed + 1, args.size,
                         args.min_scale, args.max_scale)
    print(f"wrote {n_train} training and {n_test} test canvases of {args.size}x{args.size} to {args.out}")


if __name__ == "__main__":
    main()

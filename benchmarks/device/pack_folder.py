"""Pack an image-folder data set (class/<file>.png) into xz parts small enough to travel to a GPU machine.

    python benchmarks/device/pack_folder.py ../shared/data/cifar10/train .gpu/cifar10-train --parts 2
    python benchmarks/device/pack_folder.py --unpack .gpu/cifar10-train /tmp/cifar10/train   # on the GPU machine

Lossless: the pixels are stored planar with a delta filter (about 103 MiB for CIFAR-10's 50,000 training images,
against 198 MiB of PNGs); file names and classes are kept, so the held-out split that calibration uses is the
same on both machines. Only for same-size RGB images (CIFAR-10); not part of the product.
"""

from __future__ import annotations

import argparse
import json
import lzma
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _compress(planes: bytes) -> bytes:
    return lzma.compress(planes, format=lzma.FORMAT_XZ, filters=FILTERS)


def pack(root: Path, out: Path, parts: int) -> None:
    names = sorted(f"{c.name}/{f.name}" for c in root.iterdir() if c.is_dir() for f in c.iterdir())
    pixels = np.stack([np.asarray(Image.open(root / n).convert("RGB")) for n in names])  # (N, H, W, 3)
    chunks = np.array_split(np.arange(len(names)), parts)  # one xz stream per part, compressed in parallel
    with ProcessPoolExecutor(parts) as pool:
        blobs = list(pool.map(_compress, (pixels[c].transpose(3, 0, 1, 2).tobytes() for c in chunks)))
    out.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(blobs):
        (out / f"part{i}.xz").write_bytes(blob)
    index = {"names": names, "shape": list(pixels.shape[1:]), "counts": [len(c) for c in chunks]}
    (out / "index.json.xz").write_bytes(lzma.compress(json.dumps(index).encode()))
    print(f"{len(names)} images -> {sum(map(len, blobs)) / 2**20:.1f} MiB in {parts} parts under {out}")


def _write(args) -> None:
    path, image = args
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def unpack(src: Path, root: Path) -> None:
    index = json.loads(lzma.decompress((src / "index.json.xz").read_bytes()))
    h, w, c = index["shape"]
    pixels = np.concatenate([np.frombuffer(lzma.decompress((src / f"part{i}.xz").read_bytes()), np.uint8)
                             .reshape(c, n, h, w).transpose(1, 2, 3, 0) for i, n in enumerate(index["counts"])])
    n = len(pixels)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write, ((root / name, pixels[i]) for i, name in enumerate(index["names"])), chunksize=500))
    print(f"{n} images written under {root}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--parts", type=int, default=2)
    p.add_argument("--unpack", action="store_true")
    a = p.parse_args()
    unpack(a.src, a.dst) if a.unpack else pack(a.src, a.dst, a.parts)


if __name__ == "__main__":
    main()

"""Shared fixtures: a tiny class-folder data set and a tiny trained multi-exit checkpoint (seconds on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CIFAR = Path(os.environ.get("EDGEEXIT_CIFAR10", CIFAR))


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR / "train").is_dir():
        pytest.skip(f"CIFAR-10 not found at {CIFAR} (set EDGEEXIT_CIFAR10)")
    return CIFAR


def write_folder(root: Path, classes=("circle", "square", "stripes"), per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """A synthetic, learnable class-folder data set: each class is a distinct pattern plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            if c % 3 == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2
            elif c % 3 == 1:
                mask = (abs(yy - cy) < size // 5) & (abs(xx - cx) < size // 5)
            else:
                mask = (xx // 3) % 2 == 0
            img = rng.integers(0, 60, (size, size, 3))
            img[mask] = [200, 80 + 40 * c, 50]
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_folder) -> Path:
    """A resnet20 (width 0.25) with 3 internal exits, trained 2 epochs on the synthetic folder (a few seconds)."""
    from edgeexit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_ckpt") / "tiny.pt"
    cfg = TrainConfig(data=str(tiny_folder), out=str(out), arch="resnet20", width=0.25, exits=[2, 4, 6],
                      input_size=24, epochs=2, batch_size=16, lr=0.05, val_fraction=0.25, seed=0)
    train(cfg, log=lambda _m: None, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt) -> Path:
    """``tiny_ckpt`` exported to a bundle (ONNX files + manifest, checked against torch). Treat as read-only:
    copy it (shutil.copytree) before modifying it."""
    from edgeexit.export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    return export_bundle(tiny_ckpt, out, samples=16, log=lambda _m: None)


def write_photo_folder(root: Path, classes=("circle", "square", "stripes"), per_class: int = 10,
                       sizes=(200, 1000), seed: int = 0) -> Path:
    """Camera-like photos: the synthetic patterns of ``write_folder`` upscaled to random sizes (JPEG, any aspect)."""
    rng = np.random.default_rng(seed)
    small = write_folder(root.parent / f".{root.name}-small", classes, per_class, 32, seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for src in sorted((small / name).iterdir()):
            w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            Image.open(src).resize((w, h), Image.BILINEAR).save(root / name / f"{src.stem}.jpg", quality=90)
    return root

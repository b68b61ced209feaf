"""Class-folder data for training: a reproducible validation split, an in-memory uint8 cache, batch augmentation.

Validation and calibration images go through ``Preprocess`` (numpy), exactly as the runtime does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .imageio import ImageError, ImageFolder, load_image, scan_image_folder
from .preprocess import Preprocess


def split_indices(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of a training folder into (train, validation) indices.

    The same (file list, fraction, seed) always gives the same split; calibration re-derives it from the checkpoint.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"validation fraction must lie in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass
class ImageSet:
    """Decoded images (uint8 N x S x S x C, shorter side resized to S = preprocess.resize, centre square) and labels."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[Path]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def decode_images(paths: Sequence[Path], labels: Sequence[int], preprocess: Preprocess, square: bool = True,
                  progress=None) -> ImageSet:
    """Decode and resize images into memory; unreadable files are skipped with one warning line each.

    ``square=True`` keeps a resize x resize centre square (training crops from it);
    ``square=False`` applies the full evaluation transform (resize + centre crop to ``crop``).
    """
    pre = preprocess if not square else Preprocess(preprocess.channels, preprocess.resize, preprocess.resize,
                                                   preprocess.mean, preprocess.std)
    images, kept_labels, kept_paths, skipped = [], [], [], 0
    for i, (path, label) in enumerate(zip(paths, labels)):
        try:
            images.append(pre.resize_and_crop(load_image(path, preprocess.channels)))
        except ImageError as exc:
            warnings.warn(f"skipped {exc}", stacklevel=2)
            skipped += 1
            continue
        kept_labels.append(label)
        kept_paths.append(Path(path))
        if progress is not None:
            progress(i + 1)
    size = pre.crop
    array = np.stack(images) if images else np.zeros((0, size, size, preprocess.channels), np.uint8)
    return ImageSet(array, np.asarray(kept_labels, dtype=np.int64), kept_paths, skipped)


def load_split(root: Path | str, val_fraction: float, seed: int, classes: Sequence[str] | None = None
               ) -> tuple[ImageFolder, np.ndarray, np.ndarray]:
    """Scan a training folder and return it with its (train, validation) indices."""
    folder = scan_image_folder(root, tuple(classes) if classes else None)
    if folder.labels and folder.labels[0] < 0:
        raise ValueError(f"{root} has no class sub-folders: training needs root/<class>/<image> files")
    train_idx, val_idx = split_indices(folder.labels, val_fraction, seed)
    return folder, train_idx, val_idx


def eval_batches(images: np.ndarray, preprocess: Preprocess, batch_size: int) -> Iterator[torch.Tensor]:
    """Normalised float32 NCHW batches of images already resized and centre-cropped (uint8 N x crop x crop x C)."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(preprocess.normalize(images[start : start + batch_size]))


class Augment:
    """Training augmentation on a uint8 NHWC batch: random crop (with zero padding when crop == resize), flip, normalise."""

    def __init__(self, preprocess: Preprocess, pad: int | None = None, flip: bool = True) -> None:
        self.preprocess = preprocess
        self.pad = (4 if preprocess.crop == preprocess.resize else 0) if pad is None else pad
        self.flip = flip
        self.mean = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocess.std).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)  # N C S S
        x = (x - self.mean) / self.std  # normalise first so padding is the mean colour (zero)
        if self.pad:
            x = torch.nn.functional.pad(x, (self.pad,) * 4)
        n, _, h, w = x.shape
        crop = self.preprocess.crop
        tops = torch.randint(0, h - crop + 1, (n,), generator=generator)
        lefts = torch.randint(0, w - crop + 1, (n,), generator=generator)
        out = torch.stack([x[i, :, t : t + crop, l : l + crop] for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))])
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            out[flip] = out[flip].flip(3)
        return out.contiguous()


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-3)) for v in x.std(0))

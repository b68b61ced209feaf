"""Class-folder data: a reproducible validation split, a streaming loader for training, in-memory decoding for
calibration and evaluation.

Training streams: ``FolderDataset`` decodes one image per item (in DataLoader worker processes), applies the
training augmentation or the evaluation transform, and returns uint8 ``crop x crop x C``; memory is bounded by
the workers' prefetch queues, whatever the data set size. Unreadable files are returned as ``None`` and counted.
Validation and calibration images go through ``Preprocess`` (numpy), exactly as the runtime does.

Augmentation (``--augment``, applied to the uint8 image before normalisation; every draw comes from a per-sample
seed, so a run is reproducible whatever the number of workers):

- ``pad-crop`` (``auto`` below 64 px): shorter side to ``resize``, centre square, padded by crop/8 pixels of the
  mean colour, random crop x crop window, horizontal flip (the CIFAR recipe);
- ``resized-crop`` (``auto`` from 64 px): a random box of 25-100% of the image's area with aspect ratio 3/4-4/3,
  resized to crop x crop, horizontal flip (Inception-style RandomResizedCrop, with a milder lower bound than
  ImageNet training's 8%: data sets here are small and often train on frozen features);
- ``flip``: the evaluation transform (resize + centre crop), horizontal flip;
- ``none``: the evaluation transform only.

``--augmix`` adds AugMix (``augmix.py``) after any of these: mixed chains of geometric and tonal operations that are
none of the corruptions the toolkit evaluates on, so exits stay confident for the right reasons on degraded frames.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
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


# ----------------------------------------------------------------------------------------------------------------
# streaming training data
# ----------------------------------------------------------------------------------------------------------------
AUGMENTATIONS = ("auto", "none", "flip", "pad-crop", "resized-crop")


def resolve_augment(name: str, input_size: int) -> str:
    """``auto`` -> ``pad-crop`` below 64 px (CIFAR-like inputs), ``resized-crop`` from 64 px (photos)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    if name == "auto":
        return "pad-crop" if input_size < 64 else "resized-crop"
    return name


class TrainTransform:
    """uint8 HxWxC image of any size + a seeded numpy Generator -> uint8 crop x crop x C (see the module docstring)."""

    def __init__(self, preprocess: Preprocess, augment: str, area: tuple[float, float] = (0.25, 1.0),
                 augmix: bool = False) -> None:
        self.preprocess = preprocess
        self.augment = resolve_augment(augment, preprocess.crop)
        self.area = area
        self.augmix = augmix
        self.square = Preprocess(preprocess.channels, preprocess.resize, preprocess.resize, preprocess.mean,
                                 preprocess.std)
        self.fill = np.asarray([round(255 * m) for m in preprocess.mean], dtype=np.uint8)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.augment == "pad-crop":
            out = self._pad_crop(image, rng)
        elif self.augment == "resized-crop":
            out = self._resized_crop(image, rng)
        else:
            out = self.preprocess.resize_and_crop(image)
        if self.augment != "none" and rng.random() < 0.5:
            out = out[:, ::-1]
        if self.augmix:
            from .augmix import augmix

            out = augmix(np.ascontiguousarray(out), rng)
        return np.ascontiguousarray(out)

    def _pad_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        square = self.square.resize_and_crop(image)
        crop = self.preprocess.crop
        pad = max(1, round(crop / 8)) if crop == self.preprocess.resize else 0
        if pad:
            padded = np.empty((square.shape[0] + 2 * pad, square.shape[1] + 2 * pad, square.shape[2]), np.uint8)
            padded[...] = self.fill
            padded[pad:-pad, pad:-pad] = square
            square = padded
        top = int(rng.integers(0, square.shape[0] - crop + 1))
        left = int(rng.integers(0, square.shape[1] - crop + 1))
        return square[top : top + crop, left : left + crop]

    def _resized_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        from .imageio import to_channels

        image = to_channels(image, self.preprocess.channels)
        h, w = image.shape[:2]
        box = None
        for _ in range(10):  # as torchvision's RandomResizedCrop: 10 tries, then the centre square
            area = h * w * rng.uniform(*self.area)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            bw, bh = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < bw <= w and 0 < bh <= h:
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                box = (left, top, left + bw, top + bh)
                break
        if box is None:
            side = min(h, w)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        crop = self.preprocess.crop
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        out = np.asarray(pil.resize((crop, crop), Image.BILINEAR, box=box), dtype=np.uint8)
        return out[:, :, None] if out.ndim == 2 else out


class EvalTransform:
    """The evaluation transform (``Preprocess.resize_and_crop``); ignores the generator."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.preprocess.resize_and_crop(image)


class FolderDataset(torch.utils.data.Dataset):
    """Images decoded one at a time. Items are ``(index, seed)`` pairs (or plain indices: seed 0); an item returns
    ``(uint8 crop x crop x C or None, label, index, error or None)``: unreadable files come back as None."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], channels: int, transform) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = [int(v) for v in labels]
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (int(item), 0)
        try:
            image = load_image(self.paths[index], self.channels)
        except ImageError as exc:
            return None, self.labels[index], index, str(exc)
        return self.transform(image, np.random.default_rng(seed)), self.labels[index], index, None


@dataclass
class Batch:
    """A collated batch: uint8 NHWC images (None when every file was unreadable), labels, dataset indices and the
    errors of the files that could not be read."""

    images: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    errors: list[str] = field(default_factory=list)


def collate(samples) -> Batch:
    good = [s for s in samples if s[0] is not None]
    errors = [s[3] for s in samples if s[0] is None]
    images = torch.from_numpy(np.stack([s[0] for s in good])) if good else None
    return Batch(images, torch.tensor([s[1] for s in good], dtype=torch.long),
                 torch.tensor([s[2] for s in good], dtype=torch.long), errors)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(index, seed)`` items for one epoch, replaced with ``set_batches`` before each epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def set_batches(self, batches: list[list[tuple[int, int]]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def default_workers() -> int:
    """DataLoader worker processes: half the CPUs this process may use, 1 to 4 (the rest run the model)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(4, cpus // 2))


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode images; torch's thread pool would only compete with the model


def _worker_context():
    """Workers start from a fork server (a clean single-threaded process that has imported this module), not by
    forking the training process: a fork of a process whose thread pools (OpenMP, ONNX Runtime) are running can
    inherit held locks and crash the child."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["edgeexit.data"])
    return ctx


def make_loader(dataset: FolderDataset, batch_sampler, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with ``workers`` processes (0: in this process), uint8 batches (``collate``)."""
    kwargs = dict(num_workers=workers, collate_fn=collate, batch_sampler=batch_sampler)
    if workers > 0:
        kwargs.update(worker_init_fn=_worker_init, prefetch_factor=2,
                      multiprocessing_context=_worker_context())
    return torch.utils.data.DataLoader(dataset, **kwargs)


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 in order, in batches (evaluation passes)."""
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


class SkipLog:
    """Unreadable files met while streaming: counted, reported once as one warning line."""

    def __init__(self) -> None:
        self.errors: dict[str, None] = {}
        self._reported = 0

    def add(self, errors: Sequence[str]) -> None:
        for e in errors:
            self.errors.setdefault(e, None)

    @property
    def count(self) -> int:
        return len(self.errors)

    def report(self) -> None:
        """Warn once about the files not yet reported: ``skipped N unreadable images: first, ...``."""
        new = list(self.errors)[self._reported :]
        if new:
            more = f" (and {len(new) - 1} more)" if len(new) > 1 else ""
            warnings.warn(f"skipped {len(new)} unreadable image{'s' if len(new) > 1 else ''}: {new[0]}{more}",
                          stacklevel=2)
            self._reported = len(self.errors)


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW: (x / 255 - mean) / std (as ``Preprocess.normalize``)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - mean) / std).contiguous()


def streamed_channel_stats(loader, on_errors=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units over a loader's uint8 batches (running sums: bounded memory);
    ``on_errors`` receives each batch's unreadable-file errors."""
    total, sq, count = None, None, 0
    for batch in loader:
        if on_errors is not None:
            on_errors(batch.errors)
        if batch.images is None:
            continue
        x = batch.images.reshape(-1, batch.images.shape[-1]).double() / 255.0
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        count += x.shape[0]
    if not count:
        raise ValueError("no readable training images")
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)

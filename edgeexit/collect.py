"""Run a multi-exit network over images once and keep what the exit gates need (logits and CAMs of every exit).

``collect`` gives an ``ExitOutputs`` record (numpy); every gate signal, patience count and "is this exit right"
flag is derived from it with the numpy core (``edgeexit.gates``), exactly as the runtime derives them on the device.
``calibration_images`` re-derives a checkpoint's calibration split (the held-out validation part of its training
folder) from ``ckpt["split"]``: calibration never sees any other folder.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from . import gates, stages
from .preprocess import Preprocess

_COHERENCE = [gates.SIGNAL_NAMES.index("coh_cosine"), gates.SIGNAL_NAMES.index("coh_ssim")]

__all__ = ["ExitOutputs", "collect", "calibration_images", "labelled_images", "one_line_warnings", "progress_bar"]


@dataclass
class ExitOutputs:
    """Outputs of every exit on n images.

    - ``logits``: float32 (n, E, C);
    - ``cams``: E float32 arrays (n, h_i, w_i): the CAM of each exit's predicted class;
    - ``labels``: int64 (n,) (-1 where unknown);
    - ``paths``: the image files, when known.
    """

    logits: np.ndarray
    cams: list[np.ndarray]
    labels: np.ndarray
    paths: Optional[list[Path]] = None
    _signal_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.logits = np.asarray(self.logits, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.cams = [np.asarray(c, dtype=np.float32) for c in self.cams]
        if self.logits.ndim != 3:
            raise ValueError(f"logits must be (n, E, C), got shape {self.logits.shape}")
        n, e, _ = self.logits.shape
        if len(self.cams) != e or any(c.ndim != 3 or c.shape[0] != n for c in self.cams):
            raise ValueError(f"cams must be {e} arrays (n={n}, h, w), got {[c.shape for c in self.cams]}")
        if self.labels.shape[0] != n:
            raise ValueError(f"labels must have n = {n} entries, got {self.labels.shape[0]}")

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[2])

    @property
    def classes(self) -> np.ndarray:
        """Predicted class of every exit, int64 (n, E)."""
        return np.argmax(self.logits, axis=2).astype(np.int64)

    @property
    def correct(self) -> np.ndarray:
        """Whether each exit's prediction is right, bool (n, E)."""
        return self.classes == self.labels[:, None]

    @property
    def patience(self) -> np.ndarray:
        """PABEE patience of every exit, int64 (n, E) (``gates.patience_counts``)."""
        return gates.patience_counts(self.classes)

    def exit_accuracy(self) -> np.ndarray:
        """Accuracy of every exit on its own, float64 (E,) in [0, 1] (nan for no images)."""
        if len(self) == 0:
            return np.full(self.num_exits, np.nan)
        return self.correct.mean(axis=0).astype(np.float64)

    def patience_for(self, exits: Optional[Sequence[int]] = None) -> np.ndarray:
        """Patience along the chain that keeps the internal ``exits`` (None: all), int64 (n, E); 0 at exits that
        are not kept (``gates.kept_patience``)."""
        return gates.kept_patience(self.classes, stages.kept_exits(exits, self.num_exits))

    def signals(self, temperatures: Sequence[float] | None = None, exits: Optional[Sequence[int]] = None,
                chunk: int = 4096) -> np.ndarray:
        """All 7 gate signals of every exit, float32 (n, E, 7), as ``gates.exit_signals`` computes them on the
        chain that keeps the internal ``exits`` (None: every exit; ``edgeexit.stages``).

        Exit i's softmax uses ``temperatures[i]`` (all 1 when None). The coherence signals of a kept exit compare
        its CAM with the previous *kept* exit's (0 at the first kept exit); at exits that are not kept they are nan
        (no stage computes them). What does not depend on the kept exits is computed once and cached: the
        softmax columns per temperature vector, the saliency columns, and the coherence of every exit pair.
        """
        temps = self._temperatures(temperatures)
        kept = stages.kept_exits(exits, self.num_exits)
        out = self._free_signals(temps, chunk).copy()
        out[:, :, _COHERENCE] = np.nan
        prev = None
        for k in kept:
            out[:, k, _COHERENCE] = self.coherence(prev, k, chunk)
            prev = k
        return out

    def exit_signals(self, exit_index: int, prev_exit: Optional[int], temperatures: Sequence[float] | None = None,
                     chunk: int = 4096) -> np.ndarray:
        """The 7 signals of one exit when the previous kept exit is ``prev_exit`` (None: it is the first kept
        exit), float32 (n, 7): one column block of ``signals`` without assembling the others."""
        out = self._free_signals(self._temperatures(temperatures), chunk)[:, int(exit_index)].copy()
        out[:, _COHERENCE] = self.coherence(prev_exit, int(exit_index), chunk)
        return out

    def coherence(self, prev_exit: Optional[int], exit_index: int, chunk: int = 4096) -> np.ndarray:
        """``[coh_cosine, coh_ssim]`` of exit ``exit_index``'s CAM against exit ``prev_exit``'s, float32 (n, 2)
        (``gates.map_coherence``; zeros when ``prev_exit`` is None). Cached per exit pair."""
        i = int(exit_index)
        if prev_exit is None:
            return np.zeros((len(self), 2), dtype=np.float32)
        j = int(prev_exit)
        if not 0 <= j < i < self.num_exits:
            raise ValueError(f"the previous kept exit must come before exit {i}, got {prev_exit}")
        key = ("coherence", j, i)
        if key not in self._signal_cache:
            out = np.zeros((len(self), 2), dtype=np.float64)
            for start in range(0, len(self), chunk):
                sl = slice(start, start + chunk)
                out[sl] = gates.map_coherence(self.cams[i][sl], self.cams[j][sl])
            self._signal_cache[key] = out.astype(np.float32)
        return self._signal_cache[key]

    def _temperatures(self, temperatures: Sequence[float] | None) -> tuple:
        e = self.num_exits
        temps = tuple(float(t) for t in (temperatures if temperatures is not None else [1.0] * e))
        if len(temps) != e:
            raise ValueError(f"need {e} temperatures (one per exit), got {len(temps)}")
        return temps

    def _free_signals(self, temps: tuple, chunk: int) -> np.ndarray:
        """Softmax and saliency columns of every exit, float32 (n, E, 7), coherence columns 0: the part of the
        signals that does not depend on which exits are kept. Cached per temperature vector."""
        key = ("free", temps)
        if key in self._signal_cache:
            return self._signal_cache[key]
        n, e = len(self), self.num_exits
        if "saliency" not in self._signal_cache:
            sal = np.zeros((n, e, 2), dtype=np.float64)
            for start in range(0, n, chunk):
                sl = slice(start, start + chunk)
                for i in range(e):
                    sal[sl, i, 0] = gates.spatial_entropy(self.cams[i][sl])
                    sal[sl, i, 1] = gates.spatial_spread(self.cams[i][sl])
            self._signal_cache["saliency"] = sal
        out = np.zeros((n, e, len(gates.SIGNAL_NAMES)), dtype=np.float64)
        out[:, :, 3:5] = self._signal_cache["saliency"]
        for i in range(e):
            out[:, i, 0:3] = gates.softmax_signals(self.logits[:, i], temps[i])
        out = out.astype(np.float32)
        self._signal_cache[key] = out
        return out

    def subset(self, index: np.ndarray) -> "ExitOutputs":
        idx = np.asarray(index)
        paths = [self.paths[int(i)] for i in np.arange(len(self))[idx]] if self.paths is not None else None
        return ExitOutputs(self.logits[idx], [c[idx] for c in self.cams], self.labels[idx], paths)


# ----------------------------------------------------------------------------------------------------------------
# progress and warnings
# ----------------------------------------------------------------------------------------------------------------
class progress_bar:
    """A transient rich progress bar on an interactive stderr; silent otherwise (logs stay readable)."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self._bar = None
        if enabled and total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=True, console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, steps)

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "progress_bar":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def interactive() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show warnings (e.g. skipped unreadable images) as one line each: ``edgeexit: warning: ...``."""

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        print(f"edgeexit: warning: {message}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():  # restores the previous filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


# ----------------------------------------------------------------------------------------------------------------
# running the model
# ----------------------------------------------------------------------------------------------------------------
def collect(
    model,
    images: np.ndarray,
    labels: Optional[Sequence[int]],
    preprocess: Preprocess,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
    paths: Optional[Sequence[Path]] = None,
    description: str = "running exits",
) -> ExitOutputs:
    """Run ``model`` (a MultiExitNet; eval mode, no_grad) over uint8 images (N, crop, crop, C) that are already
    resized and centre-cropped (``Preprocess.resize_and_crop``); normalisation is ``preprocess.normalize``."""
    import torch

    from .data import eval_batches

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"collect needs uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    n = images.shape[0]
    labels_arr = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    model.to(dev)
    logits: list[list[np.ndarray]] = []
    cams: list[list[np.ndarray]] = []
    n_batches = -(-n // max(1, batch_size))
    try:
        with torch.no_grad(), progress_bar(progress and n_batches > 1, description, n_batches) as bar:
            for x in eval_batches(images, preprocess, max(1, batch_size)):
                outs = model.forward_exits(x.to(dev))
                if not logits:
                    logits = [[] for _ in outs]
                    cams = [[] for _ in outs]
                for i, o in enumerate(outs):
                    logits[i].append(o.logits.float().cpu().numpy())
                    cams[i].append(o.cam.float().cpu().numpy())
                bar.advance()
    finally:
        model.train(was_training)
    if not logits:  # no images: shapes from one dummy pass
        with torch.no_grad():
            c, s = preprocess.channels, preprocess.crop
            outs = model.eval().forward_exits(torch.zeros((1, c, s, s), device=dev))
            model.train(was_training)
        return ExitOutputs(
            np.zeros((0, len(outs), outs[0].logits.shape[1]), np.float32),
            [np.zeros((0, *o.cam.shape[1:]), np.float32) for o in outs],
            labels_arr[:0], list(paths) if paths is not None else None,
        )
    stacked = np.stack([np.concatenate(z) for z in logits], axis=1)
    return ExitOutputs(stacked, [np.concatenate(c) for c in cams], labels_arr,
                       [Path(p) for p in paths] if paths is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------
def _stratified(indices: np.ndarray, labels: Sequence[int], limit: Optional[int], seed: int) -> np.ndarray:
    from .train import _subset

    return _subset(np.asarray(indices), labels, limit, seed)


def calibration_images(ckpt: dict, data: Optional[Path | str] = None, progress: bool = False):
    """The checkpoint's calibration split as an ``ImageSet`` (uint8, evaluation transform applied).

    Re-derived from ``ckpt["split"]`` (training folder, seed, validation fraction, limit) with ``data.load_split``,
    so it is exactly the validation part held out during training. ``data`` points at the training folder when it
    has moved since training. Raises FileNotFoundError with a one-line hint when the folder is gone.
    """
    from .data import decode_images, load_split

    split = ckpt.get("split")
    if not isinstance(split, dict) or "data" not in split:
        raise ValueError("the checkpoint records no training split (ckpt['split']): cannot re-derive the calibration data")
    root = Path(data) if data is not None else Path(split["data"])
    if not root.is_dir():
        hint = "" if data is not None else " (recorded in the checkpoint); pass --data to point at the moved training folder"
        raise FileNotFoundError(f"training folder not found: {root}{hint}")
    val_fraction = float(split.get("val_fraction", 0.1))
    seed = int(split.get("seed", 0))
    if val_fraction <= 0:
        raise ValueError("the checkpoint was trained without a validation split (val_fraction 0): nothing to calibrate on")
    folder, _train_idx, val_idx = load_split(root, val_fraction, seed, ckpt.get("classes"))
    limit = split.get("limit")
    val_idx = _stratified(val_idx, folder.labels, None if limit is None else max(100, int(limit) // 5), seed)
    if len(val_idx) == 0:
        raise ValueError(f"the calibration split of {root} is empty")
    expected = split.get("num_val")
    if expected is not None and int(expected) != len(val_idx):
        warnings.warn(f"the calibration split of {root} has {len(val_idx)} images, training held out {expected}: "
                      "has the folder changed since training?", stacklevel=2)
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    paths = [folder.paths[i] for i in val_idx]
    labels = [folder.labels[i] for i in val_idx]
    from .train import check_split

    check_split(split, folder.root, paths, "the checkpoint")
    with progress_bar(progress and len(paths) > 500, "decoding calibration images", len(paths)) as bar:
        images = decode_images(paths, labels, preprocess, square=False, progress=bar.update)
    if len(images) == 0:
        raise ValueError(f"no readable images in the calibration split of {root}")
    return images


def labelled_images(root: Path | str, ckpt: dict, limit: Optional[int] = None, seed: int = 0, progress: bool = False):
    """A labelled class folder (the model's classes) decoded with the evaluation transform; ``limit``: at most that
    many images (stratified, seeded)."""
    from .data import decode_images
    from .imageio import scan_image_folder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    folder = scan_image_folder(root, tuple(ckpt["classes"]))
    if folder.labels and folder.labels[0] < 0:
        raise ValueError(f"{root} has no class sub-folders: evaluation needs labelled images DIR/<class>/<image>")
    idx = np.arange(len(folder))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be positive, got {limit}")
        idx = _stratified(idx, folder.labels, int(limit), seed)
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    paths = [folder.paths[i] for i in idx]
    labels = [folder.labels[i] for i in idx]
    with progress_bar(progress and len(paths) > 500, "decoding images", len(paths)) as bar:
        images = decode_images(paths, labels, preprocess, square=False, progress=bar.update)
    if len(images) == 0:
        raise ValueError(f"no readable images in {root}")
    return images

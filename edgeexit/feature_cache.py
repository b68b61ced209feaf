"""Heads-only training on a frozen backbone: each exit head's input computed once, then reused every epoch.

With the backbone frozen in eval mode and no augmentation, the input of head i is a fixed function of the image, so
one backbone pass per image suffices for the whole run. What is stored per exit is the output of the head's
leading parameter-free layers (its average pooling to about ``head_grid`` x ``head_grid``), so the cache is small;
for a head without trainable layers before its classifier (the backbone's own GAP + linear) the stored value is
the globally pooled feature vector, since ``fc(mean(F))`` only needs the mean. Training the rest of each head on
the stored values gives exactly the logits ``head(segment output)`` would.

The cache lives in memory up to ``limit_mb`` (float32) and in memory-mapped files under a temporary directory
beyond that (removed by ``close``).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["split_head", "HeadFeatureCache"]


def split_head(head) -> tuple[nn.Module, nn.Module, bool]:
    """(frozen prefix, trainable rest, pooled) of a ``CamHead``'s block: the prefix is its leading layers without
    parameters or buffers; ``pooled`` when nothing trainable precedes the classifier (the cache then stores the
    spatial mean)."""
    layers = list(head.block) if isinstance(head.block, nn.Sequential) else [head.block]
    k = 0
    while k < len(layers) and not any(True for _ in layers[k].parameters()) and not any(True for _ in layers[k].buffers()):
        k += 1
    return nn.Sequential(*layers[:k]), nn.Sequential(*layers[k:]), k == len(layers)


class HeadFeatureCache:
    """Per exit, the frozen prefix of each head applied to its segment's output, for every readable image."""

    def __init__(self, arrays: list[np.ndarray], labels: np.ndarray, pooled: list[bool], directory: str | None) -> None:
        self.arrays = arrays
        self.labels = labels
        self.pooled = pooled
        self.directory = directory

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def describe(self) -> str:
        where = f"on disk under {self.directory}" if self.directory else "in memory"
        return f"{len(self)} images, {self.nbytes / 2**20:.0f} MB {where}"

    @classmethod
    @torch.no_grad()
    def build(cls, model, loader, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
              memory_format: torch.memory_format, limit_mb: float, on_errors: Callable[[Sequence[str]], None],
              progress=None) -> "HeadFeatureCache":
        """One pass of the frozen backbone over ``loader`` (evaluation-transformed uint8 batches)."""
        from .data import to_model_input

        model.eval()
        parts = [split_head(h) for h in model.heads]
        n_max = len(loader.dataset)
        arrays: list[np.ndarray] | None = None
        directory = None
        labels = np.zeros(n_max, dtype=np.int64)
        n = 0
        try:
            for batch in loader:
                on_errors(batch.errors)
                if batch.images is not None:
                    x = to_model_input(batch.images, mean, std).to(device, memory_format=memory_format)
                    feats = [cls._prefix(prefix, pooled, f) for (prefix, _rest, pooled), f
                             in zip(parts, model.forward_intermediates(x))]
                    if arrays is None:
                        arrays, directory = cls._allocate([f.shape[1:] for f in feats], n_max, limit_mb)
                    b = feats[0].shape[0]
                    for a, f in zip(arrays, feats):
                        a[n : n + b] = f.float().cpu().numpy()
                    labels[n : n + b] = batch.labels.numpy()
                    n += b
                if progress is not None:
                    progress.advance()
        except BaseException:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            if progress is not None:
                progress.close()
        if arrays is None:
            return cls([], labels[:0], [p[2] for p in parts], None)
        return cls([a[:n] for a in arrays], labels[:n], [p[2] for p in parts], directory)

    @staticmethod
    def _prefix(prefix: nn.Module, pooled: bool, features: torch.Tensor) -> torch.Tensor:
        out = prefix(features)
        return out.mean(dim=(2, 3), keepdim=True) if pooled else out

    @staticmethod
    def _allocate(shapes, n: int, limit_mb: float) -> tuple[list[np.ndarray], str | None]:
        total = 4 * n * sum(math.prod(s) for s in shapes)
        if total <= limit_mb * 2**20:
            return [np.zeros((n, *s), dtype=np.float32) for s in shapes], None
        directory = tempfile.mkdtemp(prefix="edgeexit-features-")
        return [np.lib.format.open_memmap(str(Path(directory) / f"exit_{i}.npy"), mode="w+", dtype=np.float32,
                                          shape=(n, *s)) for i, s in enumerate(shapes)], directory

    def epoch_batches(self, batch_size: int, steps: int, generator: torch.Generator) -> list[np.ndarray]:
        """A seeded permutation of the cached images cut into ``steps`` batches (sorted within a batch: memory-
        mapped reads stay sequential)."""
        order = torch.randperm(len(self), generator=generator)[: steps * batch_size].view(steps, batch_size)
        return [np.sort(o.numpy()) for o in order]

    def forward_heads(self, model, rows: np.ndarray, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Logits of every exit for the cached images ``rows`` (heads in their current mode), and their labels."""
        logits = []
        for head, a in zip(model.heads, self.arrays):
            _prefix, rest, _pooled = split_head(head)
            x = torch.from_numpy(np.ascontiguousarray(a[rows])).to(device)
            logits.append(head.fc(rest(x).mean(dim=(2, 3))))
        return logits, torch.from_numpy(self.labels[rows]).to(device)

    def close(self) -> None:
        """Release the arrays and remove the on-disk copy, if any."""
        self.arrays = []
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

"""Preprocessing, in numpy: the single definition used for validation, calibration, export checks and the runtime.

Evaluation-time transform (what the runtime does to every frame):
    1. convert to the model's channel count (RGB or grayscale),
    2. resize so the shorter side equals ``resize`` (bilinear, PIL),
    3. centre-crop to ``crop`` x ``crop``,
    4. x = (pixel / 255 - mean_c) / std_c, laid out as float32 NCHW.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .imageio import to_channels


@dataclass(frozen=True)
class Preprocess:
    """The model's input contract: stored in checkpoints and bundle manifests."""

    channels: int = 3
    resize: int = 32
    crop: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if min(self.std) <= 0:
            raise ValueError("std values must be positive")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.crop, self.crop)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        return cls(
            channels=int(data["channels"]),
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def resize_and_crop(self, image: np.ndarray) -> np.ndarray:
        """Steps 1-3: uint8 HxWxC in, uint8 crop x crop x channels out."""
        image = to_channels(image, self.channels)
        h, w = image.shape[:2]
        scale = self.resize / min(h, w)
        new_h, new_w = max(self.crop, round(h * scale)), max(self.crop, round(w * scale))
        if (new_h, new_w) != (h, w):
            pil = Image.fromarray(image[:, :, 0] if self.channels == 1 else image)
            image = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR), dtype=np.uint8)
            if image.ndim == 2:
                image = image[:, :, None]
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        return image[top : top + self.crop, left : left + self.crop]

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """Step 4 on uint8 NxHxWxC (or HxWxC): float32 NCHW (or CHW)."""
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (images.astype(np.float32) / np.float32(255.0) - mean) / std
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One uint8 HxWxC image -> float32 CxHxW."""
        return self.normalize(self.resize_and_crop(image))

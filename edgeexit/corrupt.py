"""Common image corruptions for robustness checks of exit gates (numpy + pillow, torch-free).

Four corruptions in the spirit of CIFAR-10-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR 2019), with their CIFAR-10-C severity parameters (``make_cifar_c.py``).
Pixels are worked on as x = pixel / 255 in [0, 1]; results are clipped to [0, 1] and rounded back to uint8.

=============  ============================================================  ===================================
kind           operation                                                     severity 1 .. 5
=============  ============================================================  ===================================
``noise``      x + N(0, sigma^2), i.i.d. per pixel and channel                sigma = 0.04, 0.06, 0.08, 0.09, 0.10
``blur``       separable Gaussian filter, edges repeated ("nearest"),         sigma = 0.4, 0.6, 0.7, 0.8, 1.0 px
               kernel truncated at 4 sigma                                    at 32 px (scaled by min(H, W) / 32)
``contrast``   (x - m) * c + m, m = per-image, per-channel mean               c = 0.75, 0.50, 0.40, 0.30, 0.15
``jpeg``       PIL JPEG encode + decode (4:2:0 chroma subsampling)            quality = 80, 65, 58, 50, 40
=============  ============================================================  ===================================

The blur sigmas of CIFAR-10-C are defined for 32 x 32 images; for larger inputs sigma is multiplied by
``max(1, min(H, W) / 32)`` so that a severity blurs the same fraction of the image whatever the input size.

Determinism: the only random corruption is ``noise``; it draws from ``numpy.random.default_rng(seed)``, so the same
(images, kind, severity, seed) always give the same output. The same seed gives the same standard-normal draw at
every severity (only its scale changes), so the distortion grows monotonically with severity.
Corruptions are applied to the model's input (images already resized and centre-cropped by ``Preprocess``).
"""

from __future__ import annotations

import io
import math
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image

__all__ = ["KINDS", "ALIASES", "SEVERITY_PARAMS", "corrupt", "parse_kinds"]

SEVERITY_PARAMS: Dict[str, Tuple[float, ...]] = {
    "noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive Gaussian noise on [0, 1] pixels
    "blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # Gaussian sigma in pixels at 32 x 32
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor about the image mean
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}
KINDS: Tuple[str, ...] = tuple(SEVERITY_PARAMS)
ALIASES: Dict[str, str] = {
    "gaussian_noise": "noise",
    "gaussian_blur": "blur",
    "jpeg_compression": "jpeg",
    "jpg": "jpeg",
}


def _canonical(kind: str) -> str:
    k = str(kind).strip().lower()
    k = ALIASES.get(k, k)
    if k not in SEVERITY_PARAMS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {', '.join(KINDS)}")
    return k


def parse_kinds(text: str) -> list[str]:
    """``"noise,blur"`` (or ``"all"``) -> canonical kind names, in the given order, without duplicates."""
    if text.strip().lower() == "all":
        return list(KINDS)
    out: list[str] = []
    for part in text.split(","):
        if part.strip():
            k = _canonical(part)
            if k not in out:
                out.append(k)
    if not out:
        raise ValueError("no corruption named (use noise, blur, contrast, jpeg or all)")
    return out


def _to_unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _to_uint8(_to_unit(images) + sigma * rng.standard_normal(images.shape))


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    radius = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    xp = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for j, w in enumerate(kernel):
        out += w * np.take(xp, np.arange(j, j + n), axis=axis)
    return out


def _blur(images: np.ndarray, sigma32: float, _seed: int) -> np.ndarray:
    h, w = images.shape[1:3]
    sigma = sigma32 * max(1.0, min(h, w) / 32.0)
    k = _gaussian_kernel(sigma)
    x = _filter_axis(_to_unit(images), k, axis=1)
    x = _filter_axis(x, k, axis=2)
    return _to_uint8(x)


def _contrast(images: np.ndarray, c: float, _seed: int) -> np.ndarray:
    x = _to_unit(images)
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((x - means) * c + means)


def _jpeg(images: np.ndarray, quality: float, _seed: int) -> np.ndarray:
    out = np.empty_like(images)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as dec:
            arr = np.asarray(dec.convert("L" if img.shape[2] == 1 else "RGB"), dtype=np.uint8)
        out[i] = arr[:, :, None] if arr.ndim == 2 else arr
    return out


_FUNCS: Dict[str, Callable[[np.ndarray, float, int], np.ndarray]] = {
    "noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "jpeg": _jpeg,
}


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, C) or one image (H, W, C) with C = 1 or 3; returns uint8 of the same shape.

    ``kind``: noise, blur, contrast or jpeg (aliases: gaussian_noise, gaussian_blur, jpeg_compression);
    ``severity``: 1 (mild) .. 5 (strong), parameters in ``SEVERITY_PARAMS``; ``seed``: the noise draw.
    The input is not modified.
    """
    k = _canonical(kind)
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"corrupt needs uint8 images, got {arr.dtype}")
    single = arr.ndim == 3
    batch = arr[None] if single else arr
    if batch.ndim != 4 or batch.shape[3] not in (1, 3):
        raise ValueError(f"corrupt needs images (N, H, W, C) with C = 1 or 3, got shape {arr.shape}")
    if batch.shape[0] == 0:
        return arr.copy()
    out = _FUNCS[k](batch, SEVERITY_PARAMS[k][int(severity) - 1], int(seed))
    return out[0] if single else out

"""Common image corruptions for robustness checks of exit gates (numpy + pillow, torch-free).

Eleven corruptions of CIFAR-10-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019), with its CIFAR-10 severity parameters (``make_cifar_c.py``), in numpy
and Pillow only. Pixels are worked on as x = pixel / 255 in [0, 1]; results are clipped to [0, 1] and rounded back
to uint8.

=============  ============================================================  ===================================
kind           operation                                                     severity 1 .. 5
=============  ============================================================  ===================================
``noise``      x + N(0, sigma^2), i.i.d. per pixel and channel                sigma = 0.04, 0.06, 0.08, 0.09, 0.10
``shot``       Poisson(x * lam) / lam, per pixel and channel                  lam = 500, 250, 100, 75, 50
``blur``       separable Gaussian filter, edges repeated ("nearest"),         sigma = 0.4, 0.6, 0.7, 0.8, 1.0 px
               kernel truncated at 4 sigma
``defocus``    disk kernel of radius r (x^2 + y^2 <= r^2) smoothed by a       (r, s) = (0.3, 0.4), (0.4, 0.5),
               3 x 3 Gaussian of sigma s ("aliased disk"), edges reflected    (0.5, 0.6), (1, 0.2), (1.5, 0.1) px
``motion``     one-sided line kernel of length L at a random angle in         (L, sigma) = (10, 1), (10, 1.5),
               [-45, 45] deg, weights exp(-t^2 / 2 sigma^2), t = 0..L-1       (10, 2), (10, 2.5), (12, 3) px
``contrast``   (x - m) * c + m, m = per-image, per-channel mean               c = 0.75, 0.50, 0.40, 0.30, 0.15
``brightness`` HSV value channel V + b (grayscale: x + b)                     b = 0.05, 0.10, 0.15, 0.20, 0.30
``saturate``   HSV saturation S * a + b (grayscale: unchanged)                (a, b) = (0.3, 0), (0.1, 0),
                                                                             (1.5, 0), (2, 0.1), (2.5, 0.2)
``fog``        x + f * plasma, plasma = diamond-square fractal in [0, 1]      (f, d) = (0.2, 3), (0.5, 3),
               with roughness decay d; then x * M / (M + f), M = max(x)       (0.75, 2.5), (1, 2), (1.5, 1.75)
``pixelate``   box-downscale to round(p * size), box-upscale back (PIL)       p = 0.95, 0.90, 0.85, 0.75, 0.65
``jpeg``       PIL JPEG encode + decode (4:2:0 chroma subsampling)            quality = 80, 65, 58, 50, 40
=============  ============================================================  ===================================

Sizes: the pixel parameters (blur sigma, defocus radius, motion length) are defined for 32 x 32 images; for larger
inputs they are multiplied by ``max(1, min(H, W) / 32)`` so that a severity distorts the same fraction of the
image whatever the input size. Fog's fractal is drawn on the next power of two >= max(H, W) and cropped.

Differences from the reference code, on purpose: ``motion`` follows the numpy re-implementation of ImageMagick's
motion blur used by later ImageNet-C code (integer shifts along the angle, weights normalised to sum 1, edges
repeated) rather than calling ImageMagick; ``fog`` is the reference diamond-square plasma fractal
(``plasma_fractal``, wibble 100) drawn from our seeded generator. ``saturate`` is not ordered by distortion in
CIFAR-10-C (severities 1-2 desaturate, 3-5 oversaturate); every other kind distorts more at each higher severity.

Determinism: the random kinds (noise, shot, motion angle, fog fractal) draw from
``numpy.random.default_rng(seed)``, so the same (images, kind, severity, seed) always give the same output. The
same seed gives the same draw at every severity (only its scale changes), so the distortion grows with severity.
Corruptions are applied to the model's input (images already resized and centre-cropped by ``Preprocess``).
"""

from __future__ import annotations

import io
import math
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image

__all__ = ["KINDS", "ALIASES", "SEVERITY_PARAMS", "corrupt", "parse_kinds", "plasma_fractal"]

SEVERITY_PARAMS: Dict[str, Tuple[float, ...]] = {
    "noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive Gaussian noise on [0, 1] pixels
    "blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # Gaussian sigma in pixels at 32 x 32
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor about the image mean
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "shot": (500, 250, 100, 75, 50),  # Poisson photon count at x = 1
    "defocus": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias-blur sigma
    "motion": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),  # kernel length, weight sigma (px at 32)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation * a + b
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog strength, fractal roughness decay
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
}
KINDS: Tuple[str, ...] = tuple(SEVERITY_PARAMS)
ALIASES: Dict[str, str] = {
    "gaussian_noise": "noise",
    "gaussian_blur": "blur",
    "jpeg_compression": "jpeg",
    "jpg": "jpeg",
    "shot_noise": "shot",
    "defocus_blur": "defocus",
    "motion_blur": "motion",
    "saturation": "saturate",
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
        raise ValueError(f"no corruption named (use {', '.join(KINDS)} or all)")
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


def _scale(images: np.ndarray) -> float:
    """Pixel parameters are defined at 32 x 32: factor for larger inputs."""
    return max(1.0, min(images.shape[1:3]) / 32.0)


def _shot(images: np.ndarray, lam: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _to_uint8(rng.poisson(_to_unit(images) * lam) / lam)


def _filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every image of x (N, H, W, C) with a small 2-D kernel, edges reflected."""
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    xp = np.pad(x, [(0, 0), (ry, ry), (rx, rx), (0, 0)], mode="reflect")
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    for dy, dx in zip(*np.nonzero(kernel)):
        out += kernel[dy, dx] * xp[:, dy:dy + h, dx:dx + w]
    return out


def _defocus(images: np.ndarray, params: Tuple[float, float], _seed: int) -> np.ndarray:
    scale = _scale(images)
    radius, alias = params[0] * scale, params[1] * scale
    half = int(math.ceil(radius)) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    g = _gaussian_kernel(alias, truncate=1.0 / alias)  # a 3 x 3 Gaussian, as cv2.GaussianBlur(ksize=(3, 3))
    disk = _filter_axis(_filter_axis(disk[None, :, :, None], g, 1), g, 2)[0, :, :, 0]
    return _to_uint8(_filter2d(_to_unit(images), disk / disk.sum()))


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x (H, W, C) moved by (dy, dx) pixels, edges repeated."""
    h, w = x.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return x[ys][:, xs]


def _motion(images: np.ndarray, params: Tuple[float, float], seed: int) -> np.ndarray:
    scale = _scale(images)
    length, sigma = max(1, int(round(params[0] * scale))), params[1] * scale
    rng = np.random.default_rng(seed)
    angles = np.deg2rad(rng.uniform(-45.0, 45.0, size=images.shape[0]))
    t = np.arange(length, dtype=np.float64)
    weights = np.exp(-t ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    x = _to_unit(images)
    out = np.zeros_like(x)
    for n, a in enumerate(angles):
        for i, wgt in enumerate(weights):
            dy, dx = -math.ceil(i * math.sin(a) - 0.5), -math.ceil(i * math.cos(a) - 0.5)
            out[n] += wgt * _shift(x[n], dy, dx)
    return _to_uint8(out)


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    c = v - x.min(axis=-1)
    s = np.where(v > 0, c / np.where(v > 0, v, 1), 0.0)
    safe = np.where(c > 0, c, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape)
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        out[..., 0] = np.where(m, r, out[..., 0])
        out[..., 1] = np.where(m, g, out[..., 1])
        out[..., 2] = np.where(m, b, out[..., 2])
    return out


def _brightness(images: np.ndarray, b: float, _seed: int) -> np.ndarray:
    x = _to_unit(images)
    if x.shape[3] == 1:
        return _to_uint8(x + b)
    hsv = _rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + b, 0, 1)
    return _to_uint8(_hsv_to_rgb(hsv))


def _saturate(images: np.ndarray, params: Tuple[float, float], _seed: int) -> np.ndarray:
    if images.shape[3] == 1:  # a gray image has no saturation to change
        return images.copy()
    hsv = _rgb_to_hsv(_to_unit(images))
    hsv[..., 1] = np.clip(hsv[..., 1] * params[0] + params[1], 0, 1)
    return _to_uint8(_hsv_to_rgb(hsv))


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square plasma fractal (CIFAR-10-C's ``plasma_fractal``), float64 (mapsize, mapsize) in [0, 1];
    ``mapsize`` a power of two; a larger ``wibbledecay`` gives a smoother map."""
    maparray = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while step >= 2:
        half = step // 2
        corners = maparray[0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        maparray[half::step, half::step] = wibbled_mean(square)
        centres = maparray[half::step, half::step]
        corners = maparray[0::step, 0::step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        maparray[0::step, half::step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maparray[half::step, 0::step] = wibbled_mean(top)
        step //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / max(maparray.max(), 1e-12)


def _fog(images: np.ndarray, params: Tuple[float, float], seed: int) -> np.ndarray:
    strength, decay = params
    h, w = images.shape[1:3]
    size = 1 << max(1, int(math.ceil(math.log2(max(h, w)))))
    rng = np.random.default_rng(seed)
    x = _to_unit(images)
    out = np.empty_like(x)
    for n in range(x.shape[0]):
        fogged = x[n] + strength * plasma_fractal(size, decay, rng)[:h, :w, None]
        top = x[n].max()
        out[n] = fogged * top / (top + strength)
    return _to_uint8(out)


def _pixelate(images: np.ndarray, p: float, _seed: int) -> np.ndarray:
    h, w = images.shape[1:3]
    small = (max(1, int(round(w * p))), max(1, int(round(h * p))))
    out = np.empty_like(images)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        back = np.asarray(pil.resize(small, Image.BOX).resize((w, h), Image.BOX), dtype=np.uint8)
        out[i] = back[:, :, None] if back.ndim == 2 else back
    return out


_FUNCS: Dict[str, Callable[[np.ndarray, float, int], np.ndarray]] = {
    "noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "jpeg": _jpeg,
    "shot": _shot,
    "defocus": _defocus,
    "motion": _motion,
    "brightness": _brightness,
    "saturate": _saturate,
    "fog": _fog,
    "pixelate": _pixelate,
}


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, C) or one image (H, W, C) with C = 1 or 3; returns uint8 of the same shape.

    ``kind``: one of ``KINDS`` (aliases: the CIFAR-10-C names, e.g. gaussian_noise, motion_blur);
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

"""AugMix (Hendrycks, Mu, Cubuk, Zoph, Gilmer, Lakshminarayanan, ICLR 2020): training images that teach a network
to keep its features, and so its exits' confidence, steady when the picture degrades.

For an image x, ``width`` chains each apply ``depth`` (1-3 at random) operations drawn from ``OPERATIONS``; the
chains are mixed with Dirichlet(alpha) weights w and the mix is blended with the original by m ~ Beta(alpha, alpha):

    x_augmix = (1 - m) * x + m * sum_i w_i * chain_i(x)

The operations are the paper's: none of them is one of the CIFAR-10-C corruptions (noise, blur, weather, contrast,
brightness, saturation, JPEG, pixelation; the paper leaves out contrast, colour, brightness and sharpness for that
reason), so a network trained with them is still evaluated, and calibrated, on degradations it never saw. This is
AugMix's augmentation without the paper's Jensen-Shannon consistency loss, which would triple the forward passes of
every training step. Parameters follow the paper's code: severity 3, width 3, depth 1-3, alpha 1.

Every draw comes from the caller's numpy Generator, so training stays reproducible with any number of workers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageOps

__all__ = ["OPERATIONS", "augmix"]


def _level(rng: np.random.Generator, severity: float, maxval: float) -> float:
    """The paper's ``sample_level`` scaled to an operation's range: U(0.1, severity) * maxval / 10."""
    return float(rng.uniform(0.1, severity)) * maxval / 10


def _signed(rng: np.random.Generator, value: float) -> float:
    return -value if rng.random() < 0.5 else value


def autocontrast(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return ImageOps.equalize(img)


def posterize(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    """Keep 4 - int(level) bits, level in [0, 4)."""
    return ImageOps.posterize(img, 4 - int(_level(rng, severity, 4)))


def solarize(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    """Invert pixels above 256 - int(level), level in [0, 256)."""
    return ImageOps.solarize(img, 256 - int(_level(rng, severity, 256)))


def rotate(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    """Rotate by +-int(level) degrees, level in [0, 30)."""
    return img.rotate(_signed(rng, int(_level(rng, severity, 30))), resample=Image.BILINEAR)


def _affine(img: Image.Image, coefficients: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coefficients, resample=Image.BILINEAR)


def shear_x(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    """Shear by +-level, level in [0, 0.3)."""
    return _affine(img, (1, _signed(rng, _level(rng, severity, 0.3)), 0, 0, 1, 0))


def shear_y(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return _affine(img, (1, 0, 0, _signed(rng, _level(rng, severity, 0.3)), 1, 0))


def translate_x(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    """Shift by +-int(level) pixels, level in [0, width / 3)."""
    return _affine(img, (1, 0, _signed(rng, int(_level(rng, severity, img.size[0] / 3))), 0, 1, 0))


def translate_y(img: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, _signed(rng, int(_level(rng, severity, img.size[1] / 3)))))


Operation = Callable[[Image.Image, np.random.Generator, float], Image.Image]
OPERATIONS: tuple[Operation, ...] = (autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y,
                                     translate_x, translate_y)


def augmix(image: np.ndarray, rng: np.random.Generator, severity: float = 3, width: int = 3, depth: int = -1,
           alpha: float = 1.0) -> np.ndarray:
    """uint8 HxWxC (C = 1 or 3) -> the AugMix blend of the module docstring, rounded back to uint8 (mixing pixel
    values is mixing normalised inputs: normalisation is affine and the weights sum to one)."""
    gray = image.shape[2] == 1
    pil = Image.fromarray(image[:, :, 0] if gray else image)
    weights = rng.dirichlet([alpha] * width)
    m = float(rng.beta(alpha, alpha))
    mix = np.zeros(image.shape, np.float32)
    for w in weights:
        chain = pil
        for _ in range(depth if depth > 0 else int(rng.integers(1, 4))):
            chain = OPERATIONS[int(rng.integers(len(OPERATIONS)))](chain, rng, severity)
        out = np.asarray(chain, dtype=np.float32)
        mix += w * (out[:, :, None] if gray else out)
    blended = (1 - m) * image.astype(np.float32) + m * mix
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)

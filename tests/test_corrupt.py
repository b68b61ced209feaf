"""Tests for edgeexit.corrupt (numpy / PIL only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgeexit.corrupt import KINDS, SEVERITY_PARAMS, corrupt, parse_kinds


def natural_images(n: int = 4, size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth gradients, a bright disc and mild texture: enough structure for blur / JPEG to act on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1)
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        base = np.stack([(0.2 + 0.6 * xx), (0.3 + 0.5 * yy), (0.5 + 0.3 * xx * yy)][:channels], axis=-1)
        cy, cx = rng.uniform(0.3, 0.7, 2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 0.04)[..., None]
        img = np.where(disc, 0.95, base) + 0.05 * rng.standard_normal((size, size, channels))
        out[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


ORDERED = [k for k in KINDS if k != "saturate"]  # CIFAR-10-C's saturate desaturates at 1-2, oversaturates at 3-5


@pytest.mark.parametrize("kind", ORDERED)
def test_distortion_grows_with_severity(kind):
    images = natural_images()
    diffs = [mad(corrupt(images, kind, s, seed=1), images) for s in range(1, 6)]
    assert diffs[0] > 0, f"{kind} severity 1 changed nothing"
    assert all(b > a for a, b in zip(diffs, diffs[1:])), f"{kind}: {diffs}"


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_shape_and_dtype(kind):
    images = natural_images()
    before = images.copy()
    a = corrupt(images, kind, 3, seed=7)
    b = corrupt(images, kind, 3, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(images, before)  # input untouched
    assert a.shape == images.shape and a.dtype == np.uint8
    single = corrupt(images[0], kind, 3, seed=7)  # one HWC image
    assert single.shape == images[0].shape
    gray = natural_images(2, channels=1)
    assert corrupt(gray, kind, 2).shape == gray.shape


def test_noise_seed_changes_draw_only():
    images = natural_images()
    a, b = corrupt(images, "noise", 2, seed=0), corrupt(images, "noise", 2, seed=1)
    assert not np.array_equal(a, b)
    assert abs(mad(a, images) - mad(b, images)) < 1.0


def test_blur_sigma_scales_with_image_size():
    small = natural_images(2, size=32)
    from PIL import Image

    big = np.stack([np.asarray(Image.fromarray(im).resize((128, 128), Image.BILINEAR)) for im in small])
    # the same severity blurs the same fraction of the image: downsampled results stay close
    blurred = corrupt(big, "blur", 5)
    down = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BOX)) for im in blurred])
    assert mad(down, corrupt(small, "blur", 5)) < 6.0


def test_aliases_and_errors():
    assert parse_kinds("noise, gaussian_blur,jpeg_compression,contrast,noise") == ["noise", "blur", "jpeg", "contrast"]
    assert parse_kinds("all") == list(KINDS)
    assert set(SEVERITY_PARAMS) == set(KINDS) and all(len(v) == 5 for v in SEVERITY_PARAMS.values())
    images = natural_images(1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "frost", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "noise", 6)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "noise", 0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.astype(np.float32), "noise", 1)
    with pytest.raises(ValueError):
        parse_kinds("snow")
    assert corrupt(images[:0], "jpeg", 1).shape == (0, 32, 32, 3)


def test_torch_free():
    code = "import sys, edgeexit.corrupt; assert 'torch' not in sys.modules, 'corrupt imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_saturate_follows_cifar10c_order():
    images = natural_images()
    def saturation(x):
        x = x.astype(np.float64) / 255
        v = x.max(-1)
        return float(np.where(v > 0, (v - x.min(-1)) / np.maximum(v, 1e-9), 0).mean())
    base = saturation(images)
    s = [saturation(corrupt(images, "saturate", k)) for k in range(1, 6)]
    assert s[1] < s[0] < base < s[2] < s[3] < s[4], (base, s)
    gray = natural_images(2, channels=1)
    np.testing.assert_array_equal(corrupt(gray, "saturate", 5), gray)  # gray has no saturation


def test_new_kinds_act_as_documented():
    images = natural_images()
    bright = corrupt(images, "brightness", 5)
    assert bright.astype(int).mean() > images.astype(int).mean() + 40  # V + 0.3
    assert np.array_equal(corrupt(images, "motion", 3, seed=0), corrupt(images, "motion", 3, seed=0))
    assert not np.array_equal(corrupt(images, "motion", 3, seed=0), corrupt(images, "motion", 3, seed=1))
    fog = corrupt(images, "fog", 5)
    assert fog.astype(float).std() < images.astype(float).std()  # fog flattens the image
    pix = corrupt(images, "pixelate", 5)
    assert pix.shape == images.shape
    shot = [corrupt(images, "shot", 3, seed=s) for s in (0, 1)]
    assert not np.array_equal(*shot)
    big = natural_images(1, size=64)  # pixel parameters scale with the image
    assert corrupt(big, "defocus", 5).shape == big.shape
    assert corrupt(natural_images(1, size=48, channels=1), "fog", 3).shape == (1, 48, 48, 1)
    assert parse_kinds("motion_blur,shot_noise,defocus_blur,saturation") == ["motion", "shot", "defocus", "saturate"]

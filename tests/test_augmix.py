"""AugMix: reproducible from the per-sample generator, shape- and mode-preserving, none of its operations one of
the corruptions evaluation uses, and wired into training (``--augmix``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeexit.augmix import OPERATIONS, augmix
from edgeexit.corrupt import KINDS
from edgeexit.data import TrainTransform
from edgeexit.preprocess import Preprocess


def _image(channels: int = 3, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size * size * channels).reshape(size, size, channels)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_operation_keeps_size_and_mode(channels):
    image = _image(channels)
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    for op in OPERATIONS:
        out = op(pil, np.random.default_rng(3), 3)
        assert out.size == pil.size and out.mode == pil.mode, op.__name__


@pytest.mark.parametrize("channels", [1, 3])
def test_augmix_is_reproducible_and_mixes_towards_the_original(channels):
    image = _image(channels)
    a = augmix(image, np.random.default_rng(7))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, augmix(image, np.random.default_rng(7)))
    outs = [augmix(image, np.random.default_rng(s)) for s in range(20)]
    assert len({o.tobytes() for o in outs}) == 20  # every draw differs
    # the blend keeps part of the original: on average closer to it than an unrelated image is
    gap = np.mean([np.abs(o.astype(int) - image).mean() for o in outs])
    assert 0 < gap < np.abs(image.astype(int) - image[::-1, ::-1]).mean()


def test_no_operation_is_an_evaluation_corruption():
    names = {op.__name__ for op in OPERATIONS}
    assert not names & set(KINDS)
    assert not names & {"contrast", "brightness", "color", "sharpness", "blur", "noise", "jpeg", "pixelate"}


def test_train_transform_applies_augmix_after_the_crop():
    pre = Preprocess(3, 32, 32, (0.5,) * 3, (0.5,) * 3)
    image = _image(3, 40)
    plain = TrainTransform(pre, "pad-crop")(image, np.random.default_rng(1))
    mixed = TrainTransform(pre, "pad-crop", augmix=True)(image, np.random.default_rng(1))
    assert mixed.shape == plain.shape == (32, 32, 3) and mixed.flags.c_contiguous
    assert not np.array_equal(mixed, plain)
    assert np.array_equal(mixed, TrainTransform(pre, "pad-crop", augmix=True)(image, np.random.default_rng(1)))

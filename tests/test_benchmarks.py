"""The benchmarks tune nothing on test/: the calibration split is part of train/ and shares no image with test/."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeexit.data import load_split
from edgeexit.imageio import load_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _pixel_hashes(paths) -> set[str]:
    return {hashlib.sha1(load_image(p).tobytes()).hexdigest() for p in paths}


@pytest.mark.slow
def test_calibration_split_is_disjoint_from_test(cifar_root):
    # the split every benchmark calibrates on: the checkpoint's seed 0, 10% of train/ (the README recipe)
    folder, train_idx, val_idx = load_split(cifar_root / "train", 0.1, 0)
    val_paths = [folder.paths[i] for i in val_idx]
    assert len(val_paths) == 5000 and not set(train_idx) & set(val_idx)
    test_root = (cifar_root / "test").resolve()
    assert all(test_root not in Path(p).resolve().parents for p in val_paths)
    test_paths = sorted(p for p in test_root.rglob("*.png"))
    assert len(test_paths) == 10000
    assert not _pixel_hashes(val_paths) & _pixel_hashes(test_paths)


def test_canvas_boxes_hold_the_object(tmp_path, tiny_folder):
    from canvas import build_split

    n = build_split(tiny_folder, tmp_path / "c", per_class=3, seed=0, size=64, min_scale=0.4, max_scale=0.6)
    import json

    boxes = json.loads((tmp_path / "c" / "boxes.json").read_text())
    assert n == 9 and len(boxes) == 9
    for rel, (x0, y0, x1, y1) in boxes.items():
        image = load_image(tmp_path / "c" / rel)
        assert image.shape == (64, 64, 3)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert 0.4 * 64 - 1 <= x1 - x0 <= 0.6 * 64 + 1 and x1 - x0 == y1 - y0


def test_geometric_ensemble_of_exits():
    """gate_ceiling's Zero-Time-Waste ensemble: exit i answers with the weighted mean of the log-softmax of exits
    0..i (weights decay ** (i - j)); decay 0 leaves every exit's own prediction, the first exit is never changed."""
    from gate_ceiling import geometric_ensemble

    from edgeexit.collect import ExitOutputs

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3, 4)).astype(np.float32)
    outputs = ExitOutputs(logits, [np.zeros((5, 2, 2), np.float32)] * 3, np.zeros(5, np.int64))
    logp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    equal = geometric_ensemble(outputs, 1.0).logits
    np.testing.assert_allclose(equal[:, 0], logp[:, 0], atol=1e-5)
    np.testing.assert_allclose(equal[:, 2], logp.mean(axis=1), atol=1e-5)
    half = geometric_ensemble(outputs, 0.5).logits
    np.testing.assert_allclose(half[:, 1], (0.5 * logp[:, 0] + logp[:, 1]) / 1.5, atol=1e-5)
    np.testing.assert_array_equal(geometric_ensemble(outputs, 0.0).classes, outputs.classes)

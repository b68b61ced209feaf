"""Camera-resolution data: streaming loader, input size per architecture, augmentation, heads-mode feature cache,
bounded memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeexit.data import (EvalTransform, FolderDataset, TrainTransform, fixed_batches, make_loader, resolve_augment,
                           to_model_input)
from edgeexit.feature_cache import HeadFeatureCache
from edgeexit.models import multi_exit
from edgeexit.preprocess import Preprocess

from .conftest import write_photo_folder


def test_augment_auto_follows_the_resolution_and_keeps_the_size():
    assert resolve_augment("auto", 32) == "pad-crop" and resolve_augment("auto", 224) == "resized-crop"
    with pytest.raises(ValueError, match="--augment must be one of"):
        resolve_augment("mixup", 32)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    pre = Preprocess(3, 256, 224, (0.5,) * 3, (0.5,) * 3)
    for name in ("none", "flip", "pad-crop", "resized-crop"):
        out = TrainTransform(pre, name)(image, np.random.default_rng(1))
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # "none" is exactly the evaluation transform; the random ones differ between seeds
    assert np.array_equal(TrainTransform(pre, "none")(image, np.random.default_rng(1)), pre.resize_and_crop(image))
    a = TrainTransform(pre, "resized-crop")(image, np.random.default_rng(1))
    b = TrainTransform(pre, "resized-crop")(image, np.random.default_rng(2))
    assert not np.array_equal(a, b)
    # pad-crop at 32 px pads with the mean colour, by crop/8 = 4 pixels
    small = Preprocess(3, 32, 32, (0.0, 0.5, 1.0), (1.0,) * 3)
    outs = [TrainTransform(small, "pad-crop")(image, np.random.default_rng(s)) for s in range(40)]
    assert any((o[0, 0] == [0, 128, 255]).all() for o in outs)


def test_loader_streams_any_size_and_counts_unreadable_files(tmp_path):
    data = write_photo_folder(tmp_path / "photos", per_class=2)
    (data / "circle" / "bad.jpg").write_bytes(b"nope")
    paths = sorted(p for p in data.rglob("*.jpg"))
    pre = Preprocess(3, 64, 64, (0.5,) * 3, (0.5,) * 3)
    loader = make_loader(FolderDataset(paths, [0] * len(paths), 3, EvalTransform(pre)), fixed_batches(len(paths), 4), 1)
    batches = list(loader)
    assert sum(len(b.labels) for b in batches) == len(paths) - 1
    assert [e for b in batches for e in b.errors] and all(b.images is None or b.images.shape[1:] == (64, 64, 3)
                                                          for b in batches)


def _heads_and_loader(tmp_path):
    data = write_photo_folder(tmp_path / "photos", per_class=3)
    paths = sorted(p for p in data.rglob("*.jpg"))
    pre = Preprocess(3, 96, 96, (0.5,) * 3, (0.25,) * 3)
    loader = make_loader(FolderDataset(paths, [i % 3 for i in range(len(paths))], 3, EvalTransform(pre)),
                         fixed_batches(len(paths), 4), 0)
    return multi_exit("resnet18", 3, 96, width=0.25, exit_fractions=[0.2, 0.5]).eval(), loader, pre


@pytest.mark.parametrize("limit_mb", [1024, 0])
def test_feature_cache_gives_the_model_s_own_logits(tmp_path, limit_mb):
    model, loader, pre = _heads_and_loader(tmp_path)
    mean, std = torch.tensor(pre.mean).view(1, -1, 1, 1), torch.tensor(pre.std).view(1, -1, 1, 1)
    cache = HeadFeatureCache.build(model, loader, mean, std, torch.device("cpu"), torch.contiguous_format, limit_mb,
                                   lambda _e: None)
    assert len(cache) == 9 and (cache.directory is None) == (limit_mb > 0)
    directory = cache.directory
    # the internal heads store their pooled (about head_grid x head_grid) inputs, the last one a vector
    assert cache.arrays[-1].shape[2:] == (1, 1) and cache.arrays[0].shape[2] <= 12
    images = torch.cat([b.images for b in make_loader(loader.dataset, fixed_batches(9, 9), 0)])
    with torch.no_grad():
        expected = model(to_model_input(images, mean, std))
        got, labels = cache.forward_heads(model, np.arange(9), torch.device("cpu"))
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-4)
    assert labels.tolist() == [i % 3 for i in range(9)]
    cache.close()
    assert directory is None or not Path(directory).exists()


def test_input_size_defaults_per_architecture_and_bad_arch_fails_before_reading(tmp_path):
    from edgeexit.train import TrainConfig, train

    with pytest.raises(ValueError, match="unknown architecture 'resnet21'"):
        # the data folder does not even exist: the architecture is checked first
        train(TrainConfig(data=str(tmp_path / "none"), out=str(tmp_path / "m.pt"), arch="resnet21"), log=print)


def test_pretrained_heads_training_on_photos_stays_under_3_gb(tmp_path):
    """The issue's acceptance run, smaller: ImageNet-layout resnet18 weights, photos of 200-1000 px, --mode heads,
    default input size; peak RSS of the training process (and its loader workers) under 3 GB."""
    from edgeexit.checkpoint import load_checkpoint

    from .lookalikes import TVResNet18

    data = write_photo_folder(tmp_path / "photos", per_class=16)
    torch.save(TVResNet18(num_classes=1000).state_dict(), tmp_path / "resnet18-imagenet.pt")
    out = tmp_path / "m.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "edgeexit.cli", "train", "--data", str(data), "--out", str(out),
                        "--arch", "resnet18", "--init-weights", str(tmp_path / "resnet18-imagenet.pt"), "--mode",
                        "heads", "--epochs", "2", "--batch-size", "16", "--quiet"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kb < 3 * 2**20, f"peak RSS {peak_kb / 2**20:.2f} GB"
    assert "input: 224x224 px from the pretrained weights' configuration (torchvision-resnet)" in r.stdout
    assert "heads mode: each exit's input features cached once" in r.stdout
    assert "classifier not loaded: 1000 classes in the weights, 3 in the model" in r.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["preprocess"] == {"channels": 3, "resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225]}
    assert ckpt["pretrained"]["layout"] == "torchvision-resnet" and ckpt["augment"] == "none"
    assert len(ckpt["history"][-1]["extra"]["exit_ce"]) == ckpt["config"]["exits"].__len__() + 1

"""Pretrained weights: torchvision / timm / edgeexit layouts into the built-in backbones (against look-alike models)."""

from __future__ import annotations

import pytest
import torch

from edgeexit.models import multi_exit
from edgeexit.models.pretrained import WeightsError, read_init_weights
from edgeexit.train import load_init_weights

from .lookalikes import TimmMobileNetV2, TVMobileNetV2, TVResNet18


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch, make, layout", [
    ("resnet18", TVResNet18, "torchvision-resnet"),
    ("mobilenetv2", TVMobileNetV2, "torchvision-mobilenetv2"),
    ("mobilenetv2", TimmMobileNetV2, "timm-mobilenetv2"),
])
def test_foreign_layouts_load_exactly(tmp_path, arch, make, layout):
    torch.manual_seed(0)
    reference = _randomise_bn(make(num_classes=3))
    path = tmp_path / "w.pt"
    torch.save(reference.state_dict(), path)
    weights = read_init_weights(path)
    assert weights.layout == layout and weights.arch == arch
    assert weights.preprocess == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": 224,
                                  "resize": 256}
    model = multi_exit(arch, 3, 96, exit_fractions=[0.3, 0.6])
    loaded, total, notes = load_init_weights(model, weights)
    assert loaded == total == len(reference.state_dict()) and notes == []
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x)[-1], reference(x), atol=1e-4)


def test_imagenet_classifier_is_left_out_with_a_note(tmp_path):
    path = tmp_path / "imagenet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in TVResNet18(num_classes=1000).state_dict().items()}}, path)
    model = multi_exit("resnet18", 3, 96, exits=[2])
    loaded, total, notes = load_init_weights(model, str(path))
    assert loaded == total - 2 and notes == ["classifier not loaded: 1000 classes in the weights, 3 in the model "
                                             "(trained from scratch)"]


def test_keys_that_do_not_fit_are_named(tmp_path):
    state = TVResNet18(num_classes=3).state_dict()
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match=r"key layer5\.0\.conv1\.weight does not fit a resnet18"):
        read_init_weights(tmp_path / "extra.pt")
    torch.save(TVResNet18(num_classes=3, widths=(32, 64, 128, 256)).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(WeightsError, match=r"key conv1\.weight has shape \(32, 3, 7, 7\), the resnet18 model needs "
                                           r"\(64, 3, 7, 7\)"):
        load_init_weights(multi_exit("resnet18", 3, 96, exits=[2]), str(tmp_path / "narrow.pt"))
    torch.save(TVResNet18(num_classes=3).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="holds resnet18 weights .* the model is mobilenetv2"):
        load_init_weights(multi_exit("mobilenetv2", 3, 96, exits=[2]), str(tmp_path / "r18.pt"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match="unknown weights layout"):
        read_init_weights(tmp_path / "odd.pt")


def test_own_checkpoint_and_backbone_layouts(tmp_path, tiny_ckpt):
    from edgeexit.checkpoint import load_model

    source, ckpt = load_model(tiny_ckpt)
    weights = read_init_weights(tiny_ckpt)
    assert weights.layout == "edgeexit-checkpoint" and weights.preprocess["input_size"] == 24
    # other exit placement: segments are renumbered through the plain unit list
    target = multi_exit("resnet20", 3, 24, width=0.25, exits=[4])
    loaded, total, _ = load_init_weights(target, weights)
    assert loaded == total
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(target.eval()(x)[-1], source(x)[-1], atol=1e-5)


def test_own_checkpoint_with_the_same_exits_brings_its_heads(tiny_ckpt):
    """Fine-tuning an edgeexit checkpoint starts from everything it learned: with the same exits every exit computes
    what the source computes; with other exits the internal heads start fresh, and the note says so."""
    from edgeexit.checkpoint import load_model

    source, ckpt = load_model(tiny_ckpt)
    same = multi_exit("resnet20", 3, 24, width=0.25, exits=[2, 4, 6])
    _, _, notes = load_init_weights(same, str(tiny_ckpt))
    assert notes == ["internal heads of exits [2, 4, 6] loaded too"]
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for mine, theirs in zip(same.eval()(x), source(x)):
            assert torch.allclose(mine, theirs, atol=1e-5)
    other = multi_exit("resnet20", 3, 24, width=0.25, exits=[2, 4])
    fresh = other.heads[0].fc.weight.detach().clone()
    _, _, notes = load_init_weights(other, str(tiny_ckpt))
    assert notes == ["internal heads not loaded: exits [2, 4, 6] in the weights, [2, 4] in the model"]
    assert torch.equal(other.heads[0].fc.weight, fresh)
    wide = multi_exit("resnet20", 3, 24, width=0.25, exits=[2, 4, 6], head_width=3)
    _, _, notes = load_init_weights(wide, str(tiny_ckpt))
    assert notes[-1].startswith("internal heads not loaded: their layers differ")

"""Backbones, CAM-ready heads, exit placement, cost accounting and bring-your-own backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeexit.models import (
    build_backbone, count_macs, exits_from_fractions, from_backbone, multi_exit,
)
from edgeexit.models.heads import exit_head

SMALL = [("resnet20", 0.25, 32), ("resnet32", 0.25, 16), ("resnet56", 0.25, 16), ("resnet18", 0.125, 32),
         ("mobilenetv2", 0.25, 32)]


@pytest.mark.parametrize("arch,width,size", SMALL)
@pytest.mark.parametrize("chans", [1, 3])
def test_forward_shapes_and_cam_identity(arch, width, size, chans):
    torch.manual_seed(0)
    model = multi_exit(arch, 7, size, in_chans=chans, width=width).eval()
    x = torch.randn(3, chans, size, size)
    with torch.no_grad():
        logits = model(x)
        outs = model.forward_exits(x)
    assert len(logits) == len(outs) == model.num_exits == len(model.config["exits"]) + 1
    for z, out, head in zip(logits, outs, model.heads):
        assert z.shape == (3, 7)
        torch.testing.assert_close(out.logits, z)
        pred = z.argmax(1)
        w, b = head.fc.weight, head.fc.bias
        # CAM by hand: sum_k W[pred, k] F[k, y, x]
        by_hand = torch.stack([(w[p][:, None, None] * f).sum(0) for p, f in zip(pred, out.features)])
        torch.testing.assert_close(out.cam, by_hand, rtol=1e-5, atol=1e-5)
        # its spatial mean is the logit minus the bias
        torch.testing.assert_close(out.cam.mean(dim=(1, 2)), z.gather(1, pred[:, None])[:, 0] - b[pred], rtol=1e-4, atol=1e-5)


def test_last_exit_equals_plain_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 10, width=0.25).eval()
    model = multi_exit("resnet20", 10, 32, width=0.25).eval()
    model.load_state_dict(model.state_dict())
    # copy the backbone's weights into the multi-exit model unit by unit
    from edgeexit.train import backbone_state_names

    own = model.state_dict()
    for plain, name in backbone_state_names(model).items():
        own[name] = backbone.state_dict()[plain]
    model.load_state_dict(own)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], backbone(x))


def test_mac_count_matches_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    macs, out = count_macs(model, torch.zeros(1, 3, 8, 8))
    hand = 8 * 8 * 4 * 3 * 9 + 4 * 4 * 4 * (4 // 2) * 9 + 4 * 5
    assert macs == hand and out.shape == (1, 5)


def test_head_mac_count_and_cheapness():
    head = exit_head(16, 10, spatial=32, grid=8)  # pool 4x4 -> 8x8, dw3x3 16, pw 16->32, fc 32->10
    macs, _ = count_macs(head, torch.zeros(1, 16, 32, 32))
    assert macs == 8 * 8 * 16 * 9 + 8 * 8 * 16 * 32 + 32 * 10
    costs = multi_exit("resnet20", 10, 32).costs()
    heads_share = sum(costs.head_macs[:-1]) / costs.reference_macs
    assert heads_share < 0.06  # every internal head together costs a few percent of the network


def test_costs_are_cumulative_and_count_heads():
    costs = multi_exit("resnet20", 10, 32, width=0.5).costs()
    cum = costs.cumulative_macs
    assert cum[0] == costs.segment_macs[0] + costs.head_macs[0]
    assert all(b > a for a, b in zip(cum, cum[1:]))
    assert cum[-1] == sum(costs.segment_macs) + sum(costs.head_macs)
    assert costs.reference_macs == sum(costs.segment_macs) + costs.head_macs[-1]


def test_exit_placement_by_mac_fractions():
    assert exits_from_fractions([10] * 10, [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]) in ([1, 2, 4, 5, 7, 8], [0, 2, 3, 5, 6, 8])
    assert exits_from_fractions([50, 10, 10, 10, 20], [0.5, 0.52]) == [0]  # duplicates collapse
    model = multi_exit("resnet56", 10, 32, width=0.25, exit_fractions=[0.25, 0.5, 0.75])
    fractions = [sum(model.costs().segment_macs[: i + 1]) / sum(model.costs().segment_macs) for i in range(3)]
    assert all(abs(f - t) < 0.03 for f, t in zip(fractions, [0.25, 0.5, 0.75]))
    with pytest.raises(ValueError, match="fractions"):
        exits_from_fractions([1, 1, 1], [1.5])


def test_exit_placement_by_indices_and_errors():
    model = multi_exit("resnet20", 10, 32, width=0.25, exits=[2, 5])
    assert model.num_exits == 3 and model.config["exits"] == [2, 5]
    with pytest.raises(ValueError, match="exit indices"):
        multi_exit("resnet20", 10, 32, exits=[9])
    with pytest.raises(ValueError, match="unknown architecture"):
        multi_exit("vgg99", 10, 32)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(self.stem(x)))), 1))


class SkipNet(TinyResNet):
    def forward(self, x):  # a skip across children: cannot be cut at them
        h = self.layer1(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(self.layer2(h + 1.0)), 1))


def test_bring_your_own_backbone():
    torch.manual_seed(0)
    user = TinyResNet().eval()
    model = from_backbone(user, ["stem", "layer1"], (3, 16, 16)).eval()
    assert model.num_exits == 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], user(x))
        assert model.forward_exits(x)[0].cam.shape[0] == 2
    with pytest.raises(ValueError, match="does not run through its children"):
        from_backbone(SkipNet(), ["stem"], (3, 16, 16))
    with pytest.raises(ValueError, match="cannot cut after nope"):
        from_backbone(user, ["nope"], (3, 16, 16))
    with pytest.raises(ValueError, match="forward order"):
        from_backbone(user, ["layer1", "stem"], (3, 16, 16))


@pytest.mark.parametrize("make, size, exits, cut_names", [
    ("TVResNet18", 64, [0, 1, 2], ["layer1", "layer2", "layer3"]),  # functional flatten between pool and fc
    ("TVMobileNetV2", 64, [3, 6, 13], ["features.3", "features.6", "features.13"]),  # functional pool; Dropout+Linear
    ("TVMobileNetV3Like", 32, [1, 2], ["features.1", "features.2"]),  # MLP classifier after the pool
    ("TVEfficientNetLike", 32, [0, 2], ["features.0", "features.2"]),
    ("TimmStyleResNet", 32, [0, 2], ["act1", "layer2"]),  # forward_intermediates / feature_info stages
    ("TimmMobileNetV2", 64, [1, 2, 3], ["blocks.1", "blocks.2", "blocks.4"]),  # stages inside a container
])
def test_from_backbone_understands_torchvision_and_timm_shapes(make, size, exits, cut_names):
    from . import lookalikes

    torch.manual_seed(0)
    user = getattr(lookalikes, make)(num_classes=5).eval()
    model = from_backbone(user, exits=exits, input_shape=(3, size, size)).eval()
    assert model.num_exits == len(exits) + 1 and model.config["cut_after"] == cut_names
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], user(x), atol=1e-4, rtol=1e-4)
        outs = model.forward_exits(x)
    for head, o in zip(model.heads, outs):  # every exit stays CAM-ready: mean of its map = logit of its class - bias
        pred = o.logits.argmax(1)
        torch.testing.assert_close(o.cam.mean(dim=(1, 2)), o.logits.gather(1, pred[:, None])[:, 0] - head.fc.bias[pred],
                                   atol=1e-4, rtol=1e-4)
    by_name = from_backbone(user, cut_names, (3, size, size))
    assert [len(s) for s in by_name.segments] == [len(s) for s in model.segments]
    with pytest.raises(ValueError, match="stage index 99 out of range"):
        from_backbone(user, exits=[99], input_shape=(3, size, size))


def test_from_backbone_keeps_an_mlp_classifier_exact_as_a_pooled_neck():
    from edgeexit.models.multiexit import PooledNeck

    from .lookalikes import TVMobileNetV3Like

    model = from_backbone(TVMobileNetV3Like(num_classes=5).eval(), exits=[1], input_shape=(3, 32, 32))
    assert isinstance(model.segments[-1][-1], PooledNeck)
    assert model.forward_exits(torch.randn(1, 3, 32, 32))[-1].cam.shape[1:] == (1, 1)

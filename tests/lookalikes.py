"""Stand-ins for torchvision and timm models (neither installs against this machine's CPU torch build).

Each class reproduces the real model's module structure, state-dict key names, tensor shapes and forward pass
(torchvision 0.2x ``resnet18``, ``mobilenet_v2``, ``mobilenet_v3_small``-style and ``efficientnet``-style
classifiers; timm ``mobilenetv2_100`` and a timm-style ResNet with ``forward_intermediates`` / ``feature_info``),
so the mapping code is tested against the same names the real libraries write.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------------ torchvision ResNet
class TVBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TVResNet18(nn.Module):
    """torchvision.models.resnet18: conv1/bn1/relu/maxpool/layer1-4/avgpool/fc; flatten is functional."""

    def __init__(self, num_classes: int = 1000, widths=(64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(TVBasicBlock(cin, w, 1 if i == 0 else 2), TVBasicBlock(w, w)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------- torchvision MobileNetV2
class ConvNormAct(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: keys 0 (conv), 1 (bn)."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class TVInvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = cin * t
        layers = [] if t == 1 else [ConvNormAct(cin, hidden, 1)]
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class TVMobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2: features (19 children) -> functional pool + flatten -> classifier."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features = [ConvNormAct(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in MBV2:
            for i in range(n):
                features.append(TVInvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvNormAct(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class TVMobileNetV3Like(nn.Module):
    """torchvision mobilenet_v3 shape: features, avgpool, classifier = Linear -> Hardswish -> Dropout -> Linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvNormAct(3, 16, stride=2, act=nn.Hardswish), ConvNormAct(16, 24, stride=2),
                                      ConvNormAct(24, 40, stride=2), ConvNormAct(40, 96, 1, act=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TVEfficientNetLike(nn.Module):
    """torchvision efficientnet shape: features, avgpool, classifier = Dropout -> Linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvNormAct(3, 16, stride=2, act=nn.SiLU), ConvNormAct(16, 24, stride=2, act=nn.SiLU),
                                      ConvNormAct(24, 40, stride=2, act=nn.SiLU), ConvNormAct(40, 64, 1, act=nn.SiLU))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------------------------------------ timm MobileNetV2
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: BatchNorm then an activation, in one module (state-dict keys of a BatchNorm2d)."""

    def __init__(self, num_features, act: bool = True):
        super().__init__(num_features)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(super().forward(x))


class TimmDSConv(nn.Module):
    """timm DepthwiseSeparableConv (first block of mobilenetv2_100): conv_dw, bn1, conv_pw, bn2."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.bn1 = BatchNormAct2d(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = BatchNormAct2d(cout, act=False)

    def forward(self, x):
        return self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))


class TimmIR(nn.Module):
    """timm InvertedResidual: conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3."""

    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = cin * t
        self.conv_pw = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = BatchNormAct2d(hidden)
        self.conv_pwl = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + out if self.has_skip else out


class SelectAdaptivePool2d(nn.Module):
    """timm's global_pool (average, flattened)."""

    def forward(self, x):
        return x.mean((2, 3))


class TimmMobileNetV2(nn.Module):
    """timm mobilenetv2_100: conv_stem, bn1, blocks (7 stages), conv_head, bn2, global_pool, classifier; its
    ``feature_info`` stages are blocks 0, 1, 2, 4 and 6 (reductions 2-32) and it offers ``forward_intermediates``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(32)
        stages, cin = [], 32
        for k, (t, c, n, s) in enumerate(MBV2):
            blocks = []
            for i in range(n):
                blocks.append(TimmDSConv(cin, c) if k == 0 else TimmIR(cin, c, s if i == 0 else 1, t))
                cin = c
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self.bn2 = BatchNormAct2d(1280)
        self.global_pool = SelectAdaptivePool2d()
        self.classifier = nn.Linear(1280, num_classes)
        self.feature_info = [{"num_chs": c, "reduction": 2 ** (i + 1), "module": f"blocks.{b}"}
                             for i, (b, c) in enumerate(((0, 16), (1, 24), (2, 32), (4, 96), (6, 320)))]

    def get_classifier(self):
        return self.classifier

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        wanted = {int(d["module"].split(".")[1]) for d in self.feature_info}
        x, outs = self.bn1(self.conv_stem(x)), []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in wanted:
                outs.append(x)
        return outs if intermediates_only else (self.bn2(self.conv_head(x)), outs)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(self.global_pool(x))


# ------------------------------------------------------------------------------- timm-style model with intermediates
class TimmStyleResNet(nn.Module):
    """A timm-style ResNet: ``feature_info`` lists the stage modules, ``forward_intermediates`` returns their outputs,
    ``forward_head`` pools and classifies (``get_classifier`` is the Linear)."""

    def __init__(self, num_classes: int = 4, widths=(8, 16, 24)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(TVBasicBlock(cin, w, 1 if i == 0 else 2)))
            cin = w
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.feature_info = [{"num_chs": widths[0], "reduction": 1, "module": "act1"}] + [
            {"num_chs": w, "reduction": 2 ** (i + 1), "module": f"layer{i + 1}"} for i, w in enumerate(widths)]

    def get_classifier(self):
        return self.fc

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        outs = []
        x = self.act1(self.bn1(self.conv1(x)))
        outs.append(x)
        x = self.maxpool(x)
        for i in range(len(self.feature_info) - 1):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs if intermediates_only else (x, outs)

    def forward_features(self, x):
        return self.forward_intermediates(x)[0]

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

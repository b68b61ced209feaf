"""Multi-exit networks: a backbone cut into segments, with a CAM-ready exit head after each segment."""

from __future__ import annotations

import copy
import re
from typing import Sequence

import torch
from torch import nn

from .backbones import Backbone, build_backbone
from .costs import Costs, count_macs, count_params
from .heads import CamHead, HeadOutput, exit_head, final_head

SDN_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)


class MultiExitNet(nn.Module):
    """``segments[i]`` feeds ``segments[i+1]``; ``heads[i]`` reads the output of ``segments[i]``.

    The last head is the backbone's own classifier. ``config`` rebuilds the network with ``build_model``.
    """

    def __init__(self, segments: Sequence[nn.Module], heads: Sequence[CamHead], config: dict) -> None:
        super().__init__()
        if len(segments) != len(heads) or not segments:
            raise ValueError("a multi-exit network needs one head per segment")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.config = dict(config)

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (int(self.config["in_chans"]), int(self.config["input_size"]), int(self.config["input_size"]))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every segment."""
        outputs = []
        for segment in self.segments:
            x = segment(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in order."""
        return [head(f) for head, f in zip(self.heads, self.forward_intermediates(x))]

    def forward_exits(self, x: torch.Tensor) -> list[HeadOutput]:
        """Logits, CAM of the predicted class, and head features of every exit."""
        return [head.forward_cam(f) for head, f in zip(self.heads, self.forward_intermediates(x))]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.segments for p in s.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for h in self.heads for p in h.parameters()]

    def costs(self) -> Costs:
        """MACs and parameters of every segment and head on an input of the configured size."""
        was_training = self.training
        self.eval()
        x = torch.zeros((1, *self.input_shape), device=next(self.parameters()).device)
        seg_macs, head_macs = [], []
        for segment, head in zip(self.segments, self.heads):
            macs, x = count_macs(segment, x)
            seg_macs.append(macs)
            head_macs.append(count_macs(head, x)[0])
        self.train(was_training)
        return Costs(
            tuple(seg_macs),
            tuple(head_macs),
            tuple(count_params(s) for s in self.segments),
            tuple(count_params(h) for h in self.heads),
        )


def unit_macs(units: Sequence[nn.Module], input_shape: tuple[int, int, int]) -> tuple[list[int], list[torch.Tensor]]:
    """MACs and batch-1 output of every unit, run in order."""
    x = torch.zeros((1, *input_shape))
    macs, outputs = [], []
    for unit in units:
        m, x = count_macs(unit, x)
        macs.append(m)
        outputs.append(x)
    return macs, outputs


def exits_from_fractions(macs: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """Unit indices whose cumulative MAC fraction is closest to each fraction (Shallow-Deep Networks placement).

    The last unit is never an internal exit (the final classifier sits there); duplicates are removed.
    """
    total = float(sum(macs))
    cumulative, running = [], 0
    for m in macs:
        running += m
        cumulative.append(running / total)
    chosen: list[int] = []
    for f in fractions:
        if not 0 < f < 1:
            raise ValueError(f"exit fractions must lie in (0, 1), got {f}")
        best = min(range(len(macs) - 1), key=lambda k: abs(cumulative[k] - f))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def _validate_exits(exits: Sequence[int], num_units: int) -> list[int]:
    exits = sorted(int(e) for e in exits)
    if len(set(exits)) != len(exits):
        raise ValueError(f"exit indices must be distinct, got {exits}")
    if exits and (exits[0] < 0 or exits[-1] >= num_units - 1):
        raise ValueError(f"exit indices must lie in 0..{num_units - 2} (the last unit feeds the final classifier), got {exits}")
    return exits


def assemble(
    units: Sequence[nn.Module],
    fc: nn.Linear,
    exits: Sequence[int],
    input_shape: tuple[int, int, int],
    config: dict,
    head_grid: int = 8,
    head_width: int | None = None,
) -> MultiExitNet:
    """Cut ``units`` after each index in ``exits`` and attach a head to every segment."""
    exits = _validate_exits(exits, len(units))
    _, outputs = unit_macs(units, input_shape)
    bounds = [-1, *exits, len(units) - 1]
    segments, heads = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        segments.append(nn.Sequential(*units[start + 1 : end + 1]))
        out = outputs[end]
        if end == len(units) - 1:
            heads.append(final_head(fc))
        else:
            heads.append(exit_head(out.shape[1], fc.out_features, min(out.shape[2:]), head_grid, head_width))
    config = {**config, "exits": exits, "head_grid": head_grid, "head_width": head_width}
    return MultiExitNet(segments, heads, config)


def build_model(config: dict) -> MultiExitNet:
    """Build a multi-exit network from its config (the dict stored in every checkpoint).

    Keys: ``arch``, ``num_classes``, ``in_chans``, ``input_size``, ``width``, ``small_input``, and either
    ``exits`` (unit indices) or ``exit_fractions`` (of the backbone's MACs), ``head_grid``, ``head_width``.
    """
    if config.get("arch") == "custom":
        raise ValueError("a bring-your-own model cannot be rebuilt from its config: rebuild it with from_backbone()")
    backbone = build_backbone(
        config["arch"],
        num_classes=int(config["num_classes"]),
        in_chans=int(config.get("in_chans", 3)),
        width=float(config.get("width", 1.0)),
        small_input=bool(config.get("small_input", False)),
    )
    input_shape = (int(config.get("in_chans", 3)), int(config["input_size"]), int(config["input_size"]))
    exits = config.get("exits")
    if exits is None:
        macs, _ = unit_macs(backbone.units, input_shape)
        exits = exits_from_fractions(macs, config.get("exit_fractions") or SDN_FRACTIONS)
    base = {k: v for k, v in config.items() if k not in ("exits", "head_grid", "head_width")}
    return assemble(
        list(backbone.units), backbone.fc, exits, input_shape, base,
        int(config.get("head_grid", 8)), config.get("head_width"),
    )


def multi_exit(
    arch: str,
    num_classes: int,
    input_size: int,
    *,
    in_chans: int = 3,
    width: float = 1.0,
    small_input: bool | None = None,
    exits: Sequence[int] | None = None,
    exit_fractions: Sequence[float] | None = None,
    head_grid: int = 8,
    head_width: int | None = None,
) -> MultiExitNet:
    """Convenience constructor for the built-in backbones (exit placement by indices or MAC fractions)."""
    if exits is not None and exit_fractions is not None:
        raise ValueError("give exits or exit_fractions, not both")
    config = {
        "arch": arch, "num_classes": num_classes, "input_size": input_size, "in_chans": in_chans,
        "width": width, "small_input": input_size <= 64 if small_input is None else small_input,
        "exits": list(exits) if exits is not None else None,
        "exit_fractions": list(exit_fractions) if exit_fractions is not None else (None if exits is not None else list(SDN_FRACTIONS)),
        "head_grid": head_grid, "head_width": head_width,
    }
    return build_model(config)


_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity)
_CLASSIFIER_NAMES = ("fc", "classifier", "head")


class PooledNeck(nn.Module):
    """Layers a classifier applies after global average pooling (e.g. MobileNetV3's Linear -> Hardswish before its
    last Linear), as a unit of the feature path: GAP, the layers, then a 1 x 1 map, so the final exit stays
    GAP + linear (CAM-ready; its map is 1 x 1) and computes exactly what the original classifier did."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.mean(dim=(2, 3)))[:, :, None, None]


def _is_pooling(name: str, module: nn.Module) -> bool:
    return isinstance(module, _POOLING) or name.endswith("global_pool")


def _flat_children(model: nn.Module, expand: set[str]) -> list[tuple[str, nn.Module]]:
    """Top-level children in definition order, the containers named in ``expand`` replaced by their children."""
    out = []
    for name, child in model.named_children():
        if name in expand:
            out += [(f"{name}.{k}", c) for k, c in child.named_children()]
        else:
            out.append((name, child))
    return out


def _split_classifier(name: str, module: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
    """(layers before the last Linear, that Linear) of a classifier: a Linear, or a Sequential such as
    Dropout -> Linear (MobileNetV2, EfficientNet) or Linear -> Hardswish -> Dropout -> Linear (MobileNetV3)."""
    if isinstance(module, nn.Linear):
        return [], module
    layers = [m for m in module.children()] if isinstance(module, nn.Sequential) else []
    while layers and isinstance(layers[-1], _PASS_THROUGH):
        layers.pop()
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ValueError(f"classifier {name!r} must be an nn.Linear or a Sequential ending in one, got "
                         f"{type(module).__name__}")
    return [m for m in layers[:-1] if not isinstance(m, _PASS_THROUGH)], layers[-1]


def _structure(model: nn.Module, classifier: str) -> tuple[list[tuple[str, nn.Module]], str, list[int]]:
    """(feature path as (name, module) units, classifier child name, unit index of every stage).

    Stages: timm's ``feature_info`` modules when the model offers ``forward_intermediates``; the children of
    ``features`` (torchvision MobileNet / EfficientNet); ``layerN`` children (ResNet family); else every unit."""
    children = dict(model.named_children())
    timm_like = hasattr(model, "forward_intermediates") and hasattr(model, "feature_info")
    stage_names: list[str] = []
    if timm_like:
        stage_names = [str(d["module"]) for d in model.feature_info]
        expand = {n.split(".")[0] for n in stage_names if "." in n}
    else:
        expand = {"features"} if isinstance(children.get("features"), nn.Sequential) else set()
    if classifier == "auto":
        found = ""
        if timm_like and hasattr(model, "get_classifier"):
            head = model.get_classifier()
            found = next((n for n, c in children.items() if c is head), "")
        classifier = found or next((n for n in _CLASSIFIER_NAMES if n in children), "")
        if not classifier:
            raise ValueError(f"model has no classifier child ({', '.join(_CLASSIFIER_NAMES)}); pass classifier=NAME "
                             f"(children: {', '.join(children)})")
    if classifier not in children:
        raise ValueError(f"model has no child named {classifier!r} (children: {', '.join(children)})")
    flat = _flat_children(model, expand)
    names = [n for n, _ in flat]
    end = names.index(classifier)
    for tail_name in names[end + 1 :]:
        raise ValueError(f"child {tail_name!r} comes after the classifier {classifier!r}: cannot cut this model")
    before = flat[:end]
    pool = next((k for k, (n, m) in enumerate(before) if _is_pooling(n, m)), len(before))
    neck = [m for n, m in before[pool + 1 :] if not isinstance(m, _PASS_THROUGH)]
    units = before[:pool]
    more, fc = _split_classifier(classifier, children[classifier])
    if neck or more:
        units.append(("neck", PooledNeck([*neck, *more])))
    unit_names = [n for n, _ in units]
    if not stage_names:
        stage_names = ([n for n in unit_names if n.startswith("features.")] if expand else
                       [n for n in unit_names if re.fullmatch(r"layer\d+", n)]) or unit_names
    missing = [n for n in stage_names if n not in unit_names]
    if missing:
        raise ValueError(f"stage {missing[0]!r} is not a child on the feature path ({', '.join(unit_names)})")
    return units, fc, [unit_names.index(n) for n in stage_names]


def from_backbone(
    model: nn.Module,
    cut_after: Sequence[str] | None = None,
    input_shape: tuple[int, int, int] = (3, 224, 224),
    *,
    exits: Sequence[int] | None = None,
    classifier: str = "auto",
    head_grid: int = 8,
    head_width: int | None = None,
    atol: float = 1e-4,
) -> MultiExitNet:
    """Cut a user's torch model into segments and attach CAM-ready exit heads after them.

    Understood shapes (``classifier="auto"`` finds ``fc``, ``classifier`` or ``head``, or timm's
    ``get_classifier()``):

    - ResNet family (torchvision, timm): ``conv1, bn1, relu, maxpool, layer1..4, avgpool, fc``; stages ``layerN``;
    - ``features`` + pooling + ``classifier`` (torchvision MobileNetV2/V3, EfficientNet); stages = the children of
      ``features``; a classifier with layers before its last Linear (MobileNetV3) keeps them as a last unit
      applied after pooling (``PooledNeck``);
    - any model offering timm's ``forward_intermediates`` and ``feature_info``: stages = its ``feature_info``
      modules (children, or children of one container such as ``blocks``).

    Exits: ``cut_after`` names units (``"layer2"``, ``"features.6"``, ``"blocks.3"``) or ``exits`` gives stage
    indices (``exits=[0, 1, 2]``: after the first three stages). The model must compute
    ``classifier(pool(units...(x)))`` with nothing else in between (flatten and dropout aside): this is checked
    numerically, and a model whose forward does anything else (functional ops, skips across children) is
    rejected with a clear error. The model is deep-copied; its weights are shared with nothing.
    """
    if (cut_after is None) == (exits is None):
        raise ValueError("give cut_after (unit names) or exits (stage indices), one of them")
    model = copy.deepcopy(model).eval()
    named, fc, stages = _structure(model, classifier)
    feature_names = [n for n, _ in named]
    if exits is not None:
        bad = [e for e in exits if not 0 <= int(e) < len(stages)]
        if bad:
            raise ValueError(f"stage index {bad[0]} out of range: the model has {len(stages)} stages "
                             f"({', '.join(feature_names[i] for i in stages)})")
        cut_after = [feature_names[stages[int(e)]] for e in exits]
    missing = [n for n in cut_after if n not in feature_names]
    if missing:
        raise ValueError(f"cannot cut after {', '.join(missing)}: feature children are {', '.join(feature_names)}")
    indices = [feature_names.index(n) for n in cut_after]
    if indices != sorted(indices) or len(set(indices)) != len(indices):
        raise ValueError(f"cut points must be distinct and in forward order, got {list(cut_after)}")
    units = [m for _, m in named]
    _check_sequential(model, units, fc, input_shape, atol)
    config = {
        "arch": "custom", "model_class": type(model).__name__, "cut_after": list(cut_after),
        "num_classes": fc.out_features, "in_chans": input_shape[0], "input_size": input_shape[1],
    }
    return assemble(units, fc, indices, input_shape, config, head_grid, head_width)


def _check_sequential(model: nn.Module, units: list[nn.Module], fc: nn.Linear, input_shape, atol: float) -> None:
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            expected = model(x)
        except Exception as exc:  # the user's forward failed on the configured input size
            raise ValueError(f"the model's forward failed on an input of shape {tuple(x.shape)}: {exc}") from None
        f = x
        for unit in units:
            f = unit(f)
        if f.dim() != 4:
            raise ValueError("the last feature child must return (B, C, H, W) features for CAM-ready heads")
        rebuilt = fc(f.mean(dim=(2, 3)))
    if not isinstance(expected, torch.Tensor) or expected.shape != rebuilt.shape or not torch.allclose(expected, rebuilt, atol=atol):
        raise ValueError(
            f"{type(model).__name__}.forward does not run through its children in order followed by "
            "global average pooling and the classifier, so it cannot be cut at child modules"
        )

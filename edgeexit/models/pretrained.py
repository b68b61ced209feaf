"""Pretrained weights for the built-in backbones: torchvision, timm and edgeexit layouts.

``read_init_weights(path, arch)`` reads a state dict (plain, or wrapped as ``{"state_dict": ...}`` /
``{"model": ...}``, ``module.`` prefixes stripped), recognises its layout from its key names and renames every key
to the plain ``Backbone`` naming (``units.K.*``, ``fc.*``):

| layout | recognised by | arch |
|---|---|---|
| ``edgeexit`` | ``units.0.*`` (a ``Backbone`` state dict) | any |
| ``edgeexit-checkpoint`` | an ``edgeexit train`` checkpoint: its segments and final classifier | the checkpoint's |
| ``torchvision-resnet`` | ``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``fc`` (timm's ResNets use the same names) | resnet18 |
| ``torchvision-mobilenetv2`` | ``features.0.0``, ``features.K.conv.J`` ..., ``classifier.1`` | mobilenetv2 |
| ``timm-mobilenetv2`` | ``conv_stem``, ``blocks.S.B.conv_pw`` ..., ``conv_head``, ``classifier`` | mobilenetv2 |

Weights trained elsewhere carry their preprocessing: torchvision's and timm's ImageNet models expect ImageNet
mean/std at 224 px, centre-cropped from a 256 px shorter side (crop fraction 0.875); a ``pretrained_cfg`` /
``default_cfg`` dict saved beside the state dict (timm's names: ``mean``, ``std``, ``input_size``, ``crop_pct``)
overrides that. edgeexit checkpoints carry their own ``preprocess``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from ..errors import EdgeexitError

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": 224, "crop_pct": 0.875}
BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
RESNET18_BLOCKS = 2  # basic blocks per stage
MOBILENETV2_BLOCKS = (1, 2, 3, 4, 3, 3, 1)  # inverted residual blocks per stage (MOBILENETV2_SETTINGS)


class WeightsError(EdgeexitError, ValueError):
    """Weights that cannot be read or do not fit the model (one line)."""


@dataclass
class InitWeights:
    """A state dict renamed to the ``Backbone`` naming. ``names[backbone key]`` is the key in the file (for errors);
    ``preprocess`` is ``{"mean", "std", "input_size", "resize"}`` the weights expect, or None (no opinion)."""

    path: str
    layout: str
    state: dict[str, torch.Tensor]
    names: dict[str, str]
    preprocess: dict | None = None
    arch: str | None = None
    notes: list[str] = field(default_factory=list)
    exit_heads: dict | None = None  # an edgeexit checkpoint's internal heads: {"exits": [...], "state": {heads.K.*}}


def _preprocess_from_cfg(cfg: dict) -> dict:
    size = cfg.get("input_size", IMAGENET["input_size"])
    size = int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
    crop_pct = float(cfg.get("crop_pct", IMAGENET["crop_pct"]))
    return {"mean": tuple(float(v) for v in cfg.get("mean", IMAGENET["mean"])),
            "std": tuple(float(v) for v in cfg.get("std", IMAGENET["std"])),
            "input_size": size, "resize": int(round(size / crop_pct))}


# ----------------------------------------------------------------------------------------------- key mappings


def _resnet_key(key: str, _value: torch.Tensor) -> str | None:
    """torchvision / timm ResNet-18 name -> Backbone name (None: not a key of this layout)."""
    if key.startswith("fc."):
        return key
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if m:
        return f"units.0.{0 if m[1] == 'conv1' else 1}.{m[2]}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(\w+)", key)
    if not m or int(m[2]) >= RESNET18_BLOCKS:
        return None
    unit = 1 + RESNET18_BLOCKS * (int(m[1]) - 1) + int(m[2])
    part = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv2.0", "bn2": "conv2.1",
            "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}[m[3]]
    return f"units.{unit}.{part}.{m[4]}"


def _tv_mobilenet_key(key: str, value: torch.Tensor) -> str | None:
    """torchvision MobileNetV2 name -> Backbone name. Its blocks are ``conv.J.{0,1}`` (conv + BN + ReLU6) then a
    plain ``conv.L`` and ``conv.L+1`` (the linear projection and its BN); ours are ``block.J.{0,1}`` throughout."""
    m = re.fullmatch(r"classifier\.1\.(weight|bias)", key)
    if m:
        return f"fc.{m[1]}"
    m = re.fullmatch(r"features\.(\d+)\.([01])\.(\w+)", key)
    if m:
        return f"units.{m[1]}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.([01])\.(\w+)", key)
    if m:
        return f"units.{m[1]}.block.{m[2]}.{m[3]}.{m[4]}"
    m = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(\w+)", key)
    if m:  # conv.L.weight is the projection; conv.L+1.* its BatchNorm
        is_bn = m[3] != "weight" or value.ndim == 1
        return f"units.{m[1]}.block.{int(m[2]) - is_bn}.{int(is_bn)}.{m[3]}"
    return None


def _timm_mobilenet_key(key: str, _value: torch.Tensor) -> str | None:
    """timm mobilenetv2_100 name -> Backbone name."""
    top = {"conv_stem.weight": "units.0.0.weight", "conv_head.weight": f"units.{sum(MOBILENETV2_BLOCKS) + 1}.0.weight"}
    if key in top:
        return top[key]
    m = re.fullmatch(r"(bn1|bn2)\.(\w+)", key)
    if m:
        return f"units.{0 if m[1] == 'bn1' else sum(MOBILENETV2_BLOCKS) + 1}.1.{m[2]}"
    if key.startswith("classifier."):
        return "fc." + key.removeprefix("classifier.")
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)", key)
    if not m or int(m[1]) >= len(MOBILENETV2_BLOCKS) or int(m[2]) >= MOBILENETV2_BLOCKS[int(m[1])]:
        return None
    stage, block = int(m[1]), int(m[2])
    unit = 1 + sum(MOBILENETV2_BLOCKS[:stage]) + block
    parts = ({"conv_dw": "0.0", "bn1": "0.1", "conv_pw": "1.0", "bn2": "1.1"} if stage == 0 else
             {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "conv_pwl": "2.0", "bn3": "2.1"})
    if m[3] not in parts:
        return None
    return f"units.{unit}.block.{parts[m[3]]}.{m[4]}"


LAYOUTS: dict[str, tuple[str, Callable[[str, torch.Tensor], str | None]]] = {
    "torchvision-resnet": ("resnet18", _resnet_key),
    "torchvision-mobilenetv2": ("mobilenetv2", _tv_mobilenet_key),
    "timm-mobilenetv2": ("mobilenetv2", _timm_mobilenet_key),
}


def detect_layout(state: dict) -> str:
    keys = set(state)
    if any(k.startswith("units.") for k in keys):
        return "edgeexit"
    if "layer1.0.conv1.weight" in keys:
        return "torchvision-resnet"
    if "features.0.0.weight" in keys:
        return "torchvision-mobilenetv2"
    if "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm-mobilenetv2"
    raise WeightsError(f"unknown weights layout (first keys: {', '.join(list(state)[:3])}); edgeexit reads its own, "
                       "torchvision's and timm's resnet18 and mobilenetv2 state dicts")


# ----------------------------------------------------------------------------------------------- reading


def _unwrap(obj) -> tuple[dict, dict | None, dict | None]:
    """(state dict, timm-style pretrained config or None, edgeexit checkpoint or None)."""
    if isinstance(obj, dict) and obj.get("format") == "edgeexit-checkpoint":
        return obj["state_dict"], None, obj
    cfg = None
    if isinstance(obj, dict):
        cfg = next((obj[k] for k in ("pretrained_cfg", "default_cfg") if isinstance(obj.get(k), dict)), None)
        for k in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("is not a state dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, cfg, None


def _from_checkpoint(ckpt: dict) -> tuple[dict, dict]:
    """An edgeexit checkpoint's segments and final classifier, renamed to the Backbone naming."""
    config = ckpt["config"]
    state = ckpt["state_dict"]
    num_segments = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("segments."))
    bounds = [-1, *[int(e) for e in config["exits"]]]
    out, names = {}, {}
    for key, value in state.items():
        m = re.fullmatch(r"segments\.(\d+)\.(\d+)\.(.+)", key)
        if m:
            new = f"units.{bounds[int(m[1])] + 1 + int(m[2])}.{m[3]}"
        elif key.startswith(f"heads.{num_segments - 1}.fc."):
            new = "fc." + key.split(".fc.", 1)[1]
        else:
            continue  # internal exit heads are not part of the backbone
        out[new], names[new] = value, key
    return out, names


def read_init_weights(path: Path | str) -> InitWeights:
    """Read and rename a weights file (see the module docstring). Errors are one-line ``WeightsError``s."""
    path = str(path)
    if not Path(path).is_file():
        raise WeightsError(f"init weights not found: {path}")
    from ..checkpoint import CheckpointError, read_torch_file

    try:
        obj = read_torch_file(path, "init weights")
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    try:
        state, cfg, ckpt = _unwrap(obj)
    except WeightsError as exc:
        raise WeightsError(f"{path} {exc}") from None
    if ckpt is not None:
        renamed, names = _from_checkpoint(ckpt)
        pre = ckpt.get("preprocess") or {}
        preprocess = {"mean": tuple(pre["mean"]), "std": tuple(pre["std"]), "input_size": int(pre["crop"]),
                      "resize": int(pre["resize"])} if pre else None
        heads = {k: v for k, v in ckpt["state_dict"].items()
                 if k.startswith("heads.") and int(k.split(".")[1]) < len(ckpt["config"]["exits"])}
        return InitWeights(path, "edgeexit-checkpoint", renamed, names, preprocess, ckpt["config"].get("arch"),
                           exit_heads={"exits": list(ckpt["config"]["exits"]), "state": heads})
    try:
        layout = detect_layout(state)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    if layout == "edgeexit":
        return InitWeights(path, layout, dict(state), {k: k for k in state}, _preprocess_from_cfg(cfg) if cfg else None)
    arch, rename = LAYOUTS[layout]
    renamed, names = {}, {}
    for key, value in state.items():
        new = rename(key, value)
        if new is None:
            raise WeightsError(f"{path}: key {key} does not fit a {arch} ({layout} layout)")
        renamed[new], names[new] = value, key
    return InitWeights(path, layout, renamed, names, _preprocess_from_cfg(cfg or IMAGENET), arch)


def load_into(model, weights: InitWeights, target: dict[str, str]) -> tuple[int, list[str]]:
    """Copy ``weights`` into ``model`` (``target``: Backbone name -> model name). A classifier whose number of
    classes differs from the model's is left as initialised (transfer learning); any other key that is missing in
    the model or has another shape is a one-line error naming the file's key. Returns (tensors loaded, notes)."""
    arch = model.config.get("arch")
    if weights.arch is not None and weights.arch != arch:
        raise WeightsError(f"{weights.path} holds {weights.arch} weights ({weights.layout} layout), the model is {arch}")
    own = model.state_dict()
    loaded, notes = 0, []
    fc_keys = [k for k in weights.state if k.startswith("fc.")]
    if fc_keys and "fc.weight" in weights.state and "fc.weight" in target and \
            weights.state["fc.weight"].shape[0] != own[target["fc.weight"]].shape[0]:
        notes.append(f"classifier not loaded: {weights.state['fc.weight'].shape[0]} classes in the weights, "
                     f"{own[target['fc.weight']].shape[0]} in the model (trained from scratch)")
        skip = set(fc_keys)
    else:
        skip = set()
    for key, value in weights.state.items():
        if key in skip:
            continue
        original = weights.names.get(key, key)
        if key not in target:
            raise WeightsError(f"{weights.path}: key {original} does not fit a {arch} backbone (no such layer)")
        name = target[key]
        if own[name].shape != value.shape:
            raise WeightsError(f"{weights.path}: key {original} has shape {tuple(value.shape)}, the {arch} model "
                               f"needs {tuple(own[name].shape)} (another width or channel count?)")
        own[name] = value
        loaded += 1
    model.load_state_dict(own)
    return loaded, notes

"""Checkpoints: one file holds everything later steps need (config, weights, classes, preprocessing, split, costs).

Files are written atomically (temporary file + rename) and read with ``torch.load(weights_only=True)``,
so an untrusted checkpoint cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .jsonio import atomic_write_bytes
from .errors import EdgeexitError

FORMAT = "edgeexit-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "version", "config", "state_dict", "classes", "preprocess")


class CheckpointError(EdgeexitError, ValueError):
    """A checkpoint that is missing, unreadable or not an edgeexit checkpoint."""


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


# First bytes of files people pass by mistake, to name them in the error.
_NOT_TORCH = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
              b"BM": "a BMP image", b"\x08\x01\x12": "an ONNX model", b"{": "a JSON file"}


def read_torch_file(path: Path | str, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors: a file that is not a torch file (an image, an
    ONNX model ...) is named as such, and torch's multi-line weights_only advice is not passed on."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive, or a legacy pickle
        kind = next((name for magic, name in _NOT_TORCH.items() if head.startswith(magic)), "not a file torch.save wrote")
        raise CheckpointError(f"cannot read {what} {path}: it is {kind}" if kind.startswith("a") else
                              f"cannot read {what} {path}: {kind}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        if "Weights only load failed" in text:  # keep torch's reason, drop its advice
            reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(" Please use")[0] \
                if "WeightsUnpickler error:" in text else "it holds objects other than tensors and plain containers"
        else:
            reason = text.splitlines()[0] if text else exc.__class__.__name__
        raise CheckpointError(f"cannot read {what} {path}: {reason[:200]}") from None


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load and check a checkpoint; every failure is a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = read_torch_file(path, "checkpoint")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgeexit checkpoint (a plain state dict? use --init-weights for those)")
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}, this edgeexit reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    _check_fields(path, data)
    return data


def _check_fields(path: Path, data: dict[str, Any]) -> None:
    """The fields later steps parse: a config mapping, a list of class names, a preprocessing that parses (and
    whose mean/std are finite); one-line CheckpointError otherwise (a tampered or hand-edited checkpoint)."""
    import math

    from .preprocess import Preprocess

    if not isinstance(data["config"], dict):
        raise CheckpointError(f"{path}: malformed config (a mapping expected, got {type(data['config']).__name__})")
    classes = data["classes"]
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: malformed classes (a non-empty list of names expected)")
    try:
        pre = Preprocess.from_dict(data["preprocess"])
        if not all(math.isfinite(v) for v in (*pre.mean, *pre.std)):
            raise ValueError("mean and std must be finite")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        reason = f"missing {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())
        raise CheckpointError(f"{path}: malformed preprocess: {reason[:200]}") from None


def load_model(path: Path | str):
    """Rebuild the multi-exit model of a checkpoint, in eval mode. Returns (model, checkpoint dict)."""
    from .models import build_model

    data = load_checkpoint(path)
    try:
        model = build_model(data["config"])
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, OverflowError) as exc:
        reason = f"missing {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())
        raise CheckpointError(f"{path}: malformed config: {reason[:200]}") from None
    try:
        model.load_state_dict(data["state_dict"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit its model config: {str(exc).splitlines()[0][:200]}") from None
    outputs = int(model.heads[-1].fc.out_features)
    if outputs != len(data["classes"]):
        raise CheckpointError(f"{path}: {len(data['classes'])} class names for a model with {outputs} outputs")
    return model.eval(), data

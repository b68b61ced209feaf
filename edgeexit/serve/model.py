"""The Triton model's inference callable: requests -> the runtime's decisions (torch-free, PyTriton-free).

One Triton request carries B frames in exactly one of two inputs:

- ``image``: BYTES (B, 1), each an encoded image (PNG, JPEG, BMP, WebP), decoded with :mod:`edgeexit.imageio`;
- ``frame``: UINT8 (B, H, W, C), raw frames with the bundle's channel count (C = 3: RGB).

Triton's dynamic batcher hands the callable several requests at once; their frames are preprocessed per request,
stacked into one batch and run by :meth:`StageRunner.run_batch` (early exit with compaction inside the batch), then
split back per request. Every output is (B, 1), one row per frame, named as the fields of ``Decision.to_dict()``:
``class_id``, ``label``, ``confidence``, ``exit``, ``gate_score`` (NaN where the decision has none),
``latency_ms`` (the frame's share of the batch's inference time on the server), ``macs`` and ``failed``
(empty, or the reason).

Triton itself rejects a request whose dtype or shape does not match the model config, for that request only. A
request that passes those checks but cannot be classified (an undecodable image, no input or both inputs, an
empty frame) is answered in-band: every row has ``class_id = exit = -1`` and ``failed`` names the problem. It
cannot get a Triton error of its own: PyTriton 0.7.0 turns an exception raised by the callable into the same error
for every request of the batch, so raising would fail the other cameras' requests too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import EdgeexitError
from ..imageio import ImageError, decode_image

IMAGE_INPUT, FRAME_INPUT = "image", "frame"

# output name -> numpy dtype on the wire (object: Triton BYTES); float64 so values equal the local to_dict()
OUTPUTS: Tuple[Tuple[str, Any], ...] = (
    ("class_id", np.int32),
    ("label", np.object_),
    ("confidence", np.float64),
    ("exit", np.int32),
    ("gate_score", np.float64),
    ("latency_ms", np.float64),
    ("macs", np.int64),
    ("failed", np.object_),
)


class BadRequest(EdgeexitError, ValueError):
    """A request that cannot be classified; answered in-band (see the module docstring)."""


@dataclass
class ExitCounters:
    """Per-model counters since start: requests, frames, bad requests, failed frames, batches, exits taken and
    the summed MACs of the frames answered. ``mean_cost = mean MACs / reference_macs`` (the plain network's MACs,
    as its decisions report them). Shared by every model instance (threads), hence the lock."""

    num_exits: int
    reference_macs: Optional[int] = None
    requests: int = 0
    bad_requests: int = 0
    frames: int = 0
    failed: int = 0
    batches: int = 0
    batched_requests: int = 0
    macs_sum: int = 0
    exits: List[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.exits = [0] * self.num_exits

    def add_batch(self, requests: int, bad: int, decisions: Sequence[Mapping[str, Any]]) -> None:
        with self.lock:
            self.batches += 1
            self.batched_requests += requests
            self.requests += requests
            self.bad_requests += bad
            for d in decisions:
                self.frames += 1
                if d["failed"] is not None:
                    self.failed += 1
                    continue
                self.exits[d["exit"]] += 1
                self.macs_sum += int(d["macs"])

    def snapshot(self) -> Dict[str, Any]:
        """``mean_cost``: mean cost of the frames answered (failed ones excluded), as a fraction of the plain
        network; ``mean_requests_per_batch``: how many requests Triton's dynamic batcher grouped on average."""
        with self.lock:
            answered = self.frames - self.failed
            mean_macs = self.macs_sum / answered if answered else None
            return {
                "requests": self.requests, "bad_requests": self.bad_requests, "frames": self.frames,
                "failed": self.failed, "batches": self.batches,
                "mean_requests_per_batch": round(self.batched_requests / self.batches, 3) if self.batches else None,
                "exits": list(self.exits),
                "mean_macs": None if mean_macs is None else round(mean_macs, 1),
                "mean_cost": round(mean_macs / self.reference_macs, 6) if mean_macs and self.reference_macs else None,
            }


def request_frames(request: Mapping[str, np.ndarray], channels: int) -> List[np.ndarray]:
    """The uint8 HxWxC frames of one request, or BadRequest naming what is wrong."""
    names = set(request.keys())  # PyTriton's Request is a mapping without .get()
    images = request[IMAGE_INPUT] if IMAGE_INPUT in names else None
    frames = request[FRAME_INPUT] if FRAME_INPUT in names else None
    if (images is None) == (frames is None):
        raise BadRequest(f"send exactly one of the inputs {IMAGE_INPUT!r} (encoded images) and {FRAME_INPUT!r} "
                         "(uint8 frames)")
    if frames is not None:
        if frames.ndim != 4 or frames.shape[1] == 0 or frames.shape[2] == 0:
            raise BadRequest(f"frames must be (B, H, W, {channels}) with H, W > 0, got {frames.shape}")
        return list(frames)
    out = []
    for i, data in enumerate(np.asarray(images).reshape(-1)):
        try:
            out.append(decode_image(data, channels=channels))
        except (ImageError, TypeError) as exc:
            raise BadRequest(f"image {i} of the request: {exc}") from None
    return out


class ServeModel:
    """The inference callable of one Triton model instance: ``model(requests) -> responses`` (PyTriton's
    list-of-requests interface: each request and each response maps a tensor name to an array).

    ``runner``: an StageRunner of its own (one per instance, since backends are not shared between threads);
    ``counters``: shared by the instances of one model.
    """

    def __init__(self, runner: Any, counters: ExitCounters):
        self.runner = runner
        self.counters = counters
        self.channels = int(runner.prepare([np.zeros((1, 1, 3), dtype=np.uint8)]).shape[1])

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]) -> List[Dict[str, np.ndarray]]:
        inputs: List[Optional[np.ndarray]] = []
        errors: List[Optional[str]] = []
        for request in requests:
            try:
                frames = request_frames(request, self.channels)
                inputs.append(self.runner.prepare(frames))
                errors.append(None)
            except (BadRequest, ImageError, ValueError) as exc:  # prepare raises ValueError on degenerate frames
                inputs.append(None)
                errors.append(" ".join(str(exc).split()))
        good = [x for x in inputs if x is not None]
        decisions = [d.to_dict() for d in self.runner.run_batch(np.concatenate(good))] if good else []
        responses, start = [], 0
        for request, x, error in zip(requests, inputs, errors):
            if x is None:
                responses.append(bad_response(_rows(request), error or "bad request"))
            else:
                responses.append(decisions_response(decisions[start : start + len(x)]))
                start += len(x)
        self.counters.add_batch(len(requests), sum(e is not None for e in errors), decisions)
        return responses


def _rows(request: Mapping[str, np.ndarray]) -> int:
    """Rows to answer for a bad request: its batch size (1 when it has no input at all)."""
    sizes = [np.asarray(request[name]).shape[0] for name in request.keys() if np.asarray(request[name]).ndim >= 1]
    return max(sizes) if sizes else 1


def decisions_response(decisions: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
    """Decision dicts (``to_dict()``) -> one (B, 1) array per output."""
    out: Dict[str, np.ndarray] = {}
    for name, dtype in OUTPUTS:
        values = [_wire(name, d[name]) for d in decisions]
        out[name] = np.array(values, dtype=dtype).reshape(-1, 1)
    return out


def bad_response(rows: int, reason: str) -> Dict[str, np.ndarray]:
    """The in-band answer to a bad request: class and exit -1, ``failed`` = the reason, on every row."""
    row = {"class_id": -1, "label": "", "confidence": None, "exit": -1, "gate_score": None, "latency_ms": 0.0,
           "macs": 0, "failed": reason}
    return decisions_response([row] * rows)


def _wire(name: str, value: Any) -> Any:
    if name in ("label", "failed"):
        return ("" if value is None else str(value)).encode("utf-8")
    if value is None:
        return float("nan")
    return value


def response_rows(outputs: Mapping[str, np.ndarray]) -> List[Dict[str, Any]]:
    """Client side: a response's (B, 1) outputs -> B dicts with the fields and types of ``Decision.to_dict()``
    (``gate_score`` / ``confidence`` None where NaN, ``failed`` None where empty)."""
    columns = {name: np.asarray(outputs[name]).reshape(-1) for name, _ in OUTPUTS}
    rows = []
    for i in range(len(columns["class_id"])):
        row: Dict[str, Any] = {}
        for name, _ in OUTPUTS:
            value = columns[name][i]
            if name in ("label", "failed"):
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                row[name] = None if (name == "failed" and not text) else text
            elif name in ("class_id", "exit", "macs"):
                row[name] = int(value)
            else:
                row[name] = None if not np.isfinite(value) else float(value)
        rows.append(row)
    return rows

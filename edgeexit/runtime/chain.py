"""The stage chain: run stage 0 -> read one score -> leave, or stage 1 -> ... and really stop (torch-free).

A bundle's pipeline holds one graph per kept exit (``edgeexit.stages``): stage j runs the backbone segments since
the previous kept exit and that exit's head, and returns the next stage's features, the exit's class and
confidence and only the gate signals its policy reads::

    runner = StageRunner(bundle, open_backend(bundle))
    decisions = runner.run_images([rgb_uint8_frame, ...])     # or runner.run_batch(x), runner.run_one(x[0])

Batch 1, the camera case (:meth:`StageRunner.run_one`): every stage's buffers are bound once (stage j's
``features`` buffer *is* stage j+1's input), the frame is copied in, each stage is one engine call, and the exit
decision compares one number with its threshold: ``sign * score >= threshold`` (``ExitPolicy.passes``), with the
score read from the stage's bound output. Nothing is allocated per frame. Patience and the learned gate use
``gates.next_patience`` / ``gates.gate_score``, exactly as calibration did.

Batches (:meth:`StageRunner.run_batch`): samples that leave are dropped before the next stage (*compaction*);
decisions come back in input order and equal those of batch size 1.

``full=True`` is the plain-network baseline: the bundle's monolithic ``full.onnx``, one call per frame. A frame
whose outputs are not finite is marked failed (with the reason) and leaves; the others go on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import one_line
from ..gates import SIGNAL_NAMES, gate_score, gate_spec, next_patience
from ..policy import ExitPolicy
from ..preprocess import Preprocess
from .engine import Backend, Buffer

__all__ = ["Decision", "StageRunner", "bind_stages", "parse_thresholds", "run_source"]


@dataclass
class Decision:
    """The runtime's answer for one frame; the field names are those of the JSON lines.

    ``class_id`` / ``label``: the prediction of the exit taken (``exit``, an exit index of the model);
    ``confidence``: its max softmax probability (with the exit's temperature); ``gate_score``: the raw gate
    score at that exit (None at the last exit, which takes every frame, and in ``full`` mode); ``latency_ms``:
    inference time (batches: each stage's time divided among the frames in it); ``macs``: the cost of the exit
    taken (stages passed, kept heads included); ``failed``: None, or why this frame has no answer (non-finite
    outputs, an engine error); ``cam``: that exit's class activation map when the runner draws (not in JSON).
    """

    class_id: int
    label: str
    confidence: float
    exit: int
    gate_score: Optional[float] = None
    latency_ms: float = 0.0
    macs: int = 0
    failed: Optional[str] = None
    cam: Optional[np.ndarray] = None

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-line fields (no CAM)."""
        return {
            "class_id": None if self.failed else int(self.class_id),
            "label": None if self.failed else self.label,
            "confidence": None if self.failed else _num(self.confidence),
            "exit": int(self.exit),
            "gate_score": None if self.failed else _num(self.gate_score),
            "latency_ms": _num(self.latency_ms, 4),
            "macs": int(self.macs),
            "failed": self.failed,
        }


def _num(value: Optional[float], digits: int = 6) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def parse_thresholds(text: Union[None, str, float, Sequence[float]]) -> Union[None, float, List[float]]:
    """``"0.9"`` -> 0.9, ``"0.9,0.8,0.7"`` -> [0.9, 0.8, 0.7] ("inf" / "-inf" allowed); numbers pass through."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    if not isinstance(text, str):
        return [float(v) for v in text]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--threshold needs a number or a comma-separated list, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--threshold needs a number or a comma-separated list of numbers, got {text!r}") from None
    if any(math.isnan(v) for v in values):
        raise ValueError("--threshold must not be nan")
    return values[0] if len(values) == 1 and "," not in text else values


def runner_policy(pipeline_policy: ExitPolicy, threshold: Union[None, float, str, Sequence[float]] = None,
                  max_exit: Optional[int] = None) -> ExitPolicy:
    """The pipeline's calibrated policy with ``--threshold`` / ``--max-exit`` applied. The signs stay the
    calibrated ones. ``threshold``: one value for every kept internal exit, or one per kept internal exit."""
    values = parse_thresholds(threshold) if isinstance(threshold, str) else threshold
    kept = pipeline_policy.kept_internal
    if isinstance(values, list):
        if len(values) != len(kept):
            raise ValueError(f"--threshold has {len(values)} values; this pipeline has {len(kept)} internal exits "
                             f"({', '.join(map(str, kept)) or 'none'})")
        full = [math.inf] * (pipeline_policy.num_exits - 1)
        for k, v in zip(kept, values):
            full[k] = v
        values = full
    elif values is not None:
        values = [float(values) if i in kept else math.inf for i in range(pipeline_policy.num_exits - 1)]
    if values is None and max_exit is None:
        return pipeline_policy
    return pipeline_policy.override(thresholds=values, max_exit=max_exit)


class StageRunner:
    """Runs a bundle pipeline's stages on a backend with an exit policy (see the module docstring).

    ``gate``: an exported gate (its own stages and calibrated policy; default the bundle's); ``threshold``: one
    value or one per kept internal exit (the calibrated signs stay); ``max_exit``: a kept exit where every frame
    reaching it leaves; ``full``: the monolithic plain network; ``keep_cam``: each decision carries the CAM of its
    exit (computed by the exit's small CAM graph for those frames only).
    """

    def __init__(self, bundle: Any, backend: Backend, gate: Optional[str] = None,
                 threshold: Union[None, float, str, Sequence[float]] = None, max_exit: Optional[int] = None,
                 full: bool = False, keep_cam: bool = False) -> None:
        self.bundle = bundle
        self.backend = backend
        self.pipeline = bundle.pipeline(gate)
        self.policy: ExitPolicy = runner_policy(self.pipeline.policy, threshold, max_exit)
        self.full = bool(full)
        self.keep_cam = bool(keep_cam) and not self.full
        self.classes = tuple(bundle.classes)
        self.preprocess: Preprocess = bundle.preprocess
        self.input_shape = tuple(bundle.input_shape)
        self.num_exits = int(bundle.num_exits)
        self.reference_macs = int(bundle.reference_macs)
        self.exits = tuple(self.policy.kept)  # the exit each stage ends at
        self.exit_macs = tuple(bundle.exit_macs(self.pipeline.gate))
        gate_spec(self.policy.gate)  # an unknown gate is a one-line error here
        self.columns = tuple(self.pipeline.signals)
        self._single = self.policy.gate in SIGNAL_NAMES  # the score is the stage's one signals column
        self._learned = [None if p is None else {k: (np.asarray(v, np.float64) if isinstance(v, list) else v)
                                                  for k, v in p.items()} for p in (self.policy.learned or [])]
        internal = self.exits[:-1]
        self._thresholds = [float(self.policy.thresholds[k]) for k in internal]
        self._signs = [float(self.policy.signs[k]) for k in internal]
        self._temperature = float(self.policy.temperatures[-1])
        if self.full:
            self._mono = backend.engine(bundle.monolithic)
        else:
            self._stages = [backend.engine(f) for f in self.pipeline.stages]
        self._bound: Optional[List[Callable[[], None]]] = None

    # -- public -----------------------------------------------------------------------------------------------
    @property
    def max_batch(self) -> Optional[int]:
        return self.backend.max_batch

    def exit_fraction(self, exit_index: int) -> float:
        """Cost of leaving at an exit (MACs, kept heads included) as a fraction of the plain network."""
        if self.full:
            return 1.0
        if exit_index not in self.exits:
            return float("nan")
        return self.exit_macs[self.exits.index(exit_index)] / self.reference_macs

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 HxWxC frames (any size, 1/3/4 channels) -> float32 NCHW exactly as the manifest states."""
        crops = [self.preprocess.resize_and_crop(np.asarray(img)) for img in images]
        if not crops:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        return self.preprocess.normalize(np.stack(crops))

    def run_images(self, images: Sequence[np.ndarray]) -> List[Decision]:
        return self.run_batch(self.prepare(images))

    def warmup(self, batch: int = 1, repeats: int = 2) -> float:
        """Run every engine ``repeats`` times on zeros at the batch actually used (lazy initialisation, caches,
        clocks), so the first real frame is not an outlier. Returns the seconds spent."""
        t0 = time.perf_counter()
        x = np.zeros((max(1, int(batch)), *self.input_shape), dtype=np.float32)
        for _ in range(max(0, int(repeats))):
            if int(batch) <= 1:
                self._run_one(x[0], force_all=True)
            else:
                self._run_batch(x[: self.max_batch or len(x)], force_all=True)
        return time.perf_counter() - t0

    def run_one(self, x: np.ndarray) -> Decision:
        """The decision for one preprocessed image (C, H, W): the lean, pre-bound path."""
        return self._run_one(np.asarray(x, dtype=np.float32))

    def run_batch(self, x: np.ndarray, batch_size: Optional[int] = None) -> List[Decision]:
        """Decisions for a float32 (B, C, H, W) batch, in input order, run ``batch_size`` (default: all, split by
        the backend's max batch) frames at a time; batches of 1 take the pre-bound path."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected a batch of shape (B, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = int(batch_size) if batch_size else (self.max_batch or max(1, x.shape[0]))
        step = min(step, self.max_batch or step)
        out: List[Decision] = []
        for start in range(0, x.shape[0], step):
            part = x[start : start + step]
            out += [self._run_one(part[0])] if part.shape[0] == 1 else self._run_batch(part)
        return out

    # -- batch 1 ----------------------------------------------------------------------------------------------
    def _bind(self) -> List[Callable[[], None]]:
        """Buffers for batch 1, bound once: the frame, each stage's outputs (features feed the next stage)."""
        backend = self.backend
        if self.full:
            mono = self._mono
            self._in = backend.buffer((1, *self.input_shape), np.float32)
            self._logits = backend.buffer((1, len(self.classes)), np.float32)
            return [mono.bind({"input": self._in}, {"logits": self._logits})]
        self._in, calls, self._outs = bind_stages(backend, self._stages, self.pipeline.stages, 1,
                                                  host_features=self.keep_cam)
        return calls

    def _run_one(self, x: np.ndarray, force_all: bool = False) -> Decision:
        if self._bound is None:
            self._bound = self._bind()
            self._at = 0  # the stage running (the general path), for naming a failing engine
            if not self.full:
                # per internal stage, what the loop touches: (call, score view, sign, threshold); plain tuples and
                # pre-made views keep the per-frame path to one engine call and one comparison per stage
                self._steps = [(call, outs["signals"].host.reshape(-1) if "signals" in outs else None, sign, thr)
                               for call, outs, sign, thr in zip(self._bound, self._outs, self._signs, self._thresholds)]
        t0 = time.perf_counter()
        np.copyto(self._in.host[0], x)
        if self.full:
            return self._decide_full(t0)
        score: Optional[float] = None
        j = 0
        try:
            if self._single and not force_all:
                for j, (call, view, sign, thr) in enumerate(self._steps):
                    call()
                    score = float(view[0])
                    if sign * score >= thr:
                        break
                else:
                    j, score = len(self._steps), None
                    self._bound[j]()
            else:
                j, score = self._run_one_general(force_all)
        except Exception as exc:  # noqa: BLE001 (an engine error fails this frame, the run goes on)
            j = j if self._single and not force_all else self._at
            return self._failed(j, f"{self.pipeline.stages[j].file}: {type(exc).__name__}: {exc}", t0)
        outs = self._outs[j]
        cls = int(outs["class"].host[0])
        conf = float(outs["confidence"].host[0])
        k = self.exits[j]
        reason = self._check(cls, conf, score, self.pipeline.stages[j].file)
        cam = self._cam(k, outs["features"].host) if self.keep_cam and reason is None else None
        return Decision(cls, self._label(cls), conf, k, score, (time.perf_counter() - t0) * 1e3,
                        self.exit_macs[j], reason, None if cam is None else cam[0])

    def _run_one_general(self, force_all: bool) -> tuple:
        """Batch 1 for patience and the learned gate (and warm-up): the score needs more than one number."""
        last = len(self._bound) - 1
        prev_cls: Optional[np.ndarray] = None
        pat: Optional[np.ndarray] = None
        for j, call in enumerate(self._bound):
            self._at = j
            call()
            if j == last:
                return j, None
            outs = self._outs[j]
            cls = outs["class"].host.reshape(-1)
            pat = next_patience(pat, prev_cls, cls)
            prev_cls = cls.copy()
            sig = outs["signals"].host if "signals" in outs else np.zeros((1, 0), np.float32)
            score = float(self._score(j, sig, pat)[0])
            if not force_all and self._signs[j] * score >= self._thresholds[j]:
                return j, score
        return last, None

    def _decide_full(self, t0: float) -> Decision:
        try:
            self._bound[0]()
        except Exception as exc:  # noqa: BLE001
            return self._failed(self.num_exits - 1, f"{self.bundle.monolithic.file}: {type(exc).__name__}: {exc}", t0)
        logits = self._logits.host[0]
        cls, conf = self._softmax_top(logits)
        reason = self._check(cls, conf, None, self.bundle.monolithic.file)
        return Decision(cls, self._label(cls), conf, self.num_exits - 1, None, (time.perf_counter() - t0) * 1e3,
                        self.reference_macs, reason)

    # -- batches ----------------------------------------------------------------------------------------------
    def _run_batch(self, x: np.ndarray, force_all: bool = False) -> List[Decision]:
        n = x.shape[0]
        results: List[Optional[Decision]] = [None] * n
        spent = np.zeros(n, dtype=np.float64)
        if self.full:
            t0 = time.perf_counter()
            try:
                logits = self._mono.run({"input": x}, ["logits"])["logits"]
            except Exception as exc:  # noqa: BLE001
                reason = one_line(f"{self.bundle.monolithic.file}: {type(exc).__name__}: {exc}")
                return [Decision(-1, "", float("nan"), self.num_exits - 1, failed=reason, macs=self.reference_macs)
                        for _ in range(n)]
            share = (time.perf_counter() - t0) * 1e3 / n
            out = []
            for row in logits:
                cls, conf = self._softmax_top(row)
                out.append(Decision(cls, self._label(cls), conf, self.num_exits - 1, None, share, self.reference_macs,
                                    self._check(cls, conf, None, self.bundle.monolithic.file)))
            return out
        alive = np.arange(n)
        feats: np.ndarray = x
        prev_cam: Optional[np.ndarray] = None
        prev_cls: Optional[np.ndarray] = None
        pat: Optional[np.ndarray] = None
        last = len(self._stages) - 1
        for j, (engine, f) in enumerate(zip(self._stages, self.pipeline.stages)):
            t0 = time.perf_counter()
            feeds = {f.input_names[0]: feats}
            if f.has_input("prev_cam"):
                feeds["prev_cam"] = prev_cam
            try:
                out = engine.run(feeds)
            except Exception as exc:  # noqa: BLE001
                spent[alive] += (time.perf_counter() - t0) / alive.size
                for pos in alive:
                    results[pos] = Decision(-1, "", float("nan"), self.exits[j], failed=one_line(
                        f"{f.file}: {type(exc).__name__}: {exc}"), macs=self.exit_macs[j])
                break
            cls = out["class"].astype(np.int64).reshape(-1)
            conf = out["confidence"].reshape(-1)
            scores: Optional[np.ndarray] = None
            if j < last:
                if self._single:
                    scores = out["signals"][:, 0].astype(np.float64)
                else:
                    pat = next_patience(pat, prev_cls, cls)
                    scores = self._score(j, out.get("signals", np.zeros((cls.size, 0), np.float32)), pat)
                with np.errstate(invalid="ignore"):
                    leave = (self._signs[j] * scores >= self._thresholds[j]) if not force_all else np.zeros(cls.size, bool)
            else:
                leave = np.ones(cls.size, dtype=bool)
            spent[alive] += (time.perf_counter() - t0) / alive.size
            rows = np.flatnonzero(leave)
            cams = self._cam(self.exits[j], out["features"][rows]) if self.keep_cam and rows.size else None
            for r_i, r in enumerate(rows):
                score = None if scores is None else float(scores[r])
                c = int(cls[r])
                reason = self._check(c, float(conf[r]), score, f.file)
                results[alive[r]] = Decision(c, self._label(c), float(conf[r]), self.exits[j], score, 0.0,
                                             self.exit_macs[j], reason, None if cams is None else cams[r_i])
            stay = np.flatnonzero(~leave)
            if stay.size == 0:
                break
            feats = out["features"][stay]
            prev_cam = out["cam"][stay] if "cam" in out else None
            prev_cls = cls[stay]
            pat = None if pat is None else pat[stay]
            alive = alive[stay]
        for pos, d in enumerate(results):
            if d is None:  # cannot happen unless an engine misbehaves; never return holes
                results[pos] = d = Decision(-1, "", float("nan"), self.exits[-1], failed="no exit reached")
            d.latency_ms = float(spent[pos] * 1e3)
        return results  # type: ignore[return-value]

    # -- shared pieces ----------------------------------------------------------------------------------------
    def _score(self, j: int, signals: np.ndarray, patience: Optional[np.ndarray]) -> np.ndarray:
        k = self.exits[j]
        params = self._learned[k] if self.policy.gate == "learned" else None
        return gate_score(self.policy.gate, signals, patience, params, columns=self.columns)

    def _softmax_top(self, logits: np.ndarray) -> tuple:
        z = np.asarray(logits, np.float64) / self._temperature
        cls = int(np.argmax(z))
        e = np.exp(z - z[cls])
        return cls, float(1.0 / e.sum())

    def _cam(self, exit_index: int, features: np.ndarray) -> Optional[np.ndarray]:
        f = self.pipeline.cam(exit_index)
        if f is None:
            return None
        return self.backend.engine(f).run({"features": np.ascontiguousarray(features)}, ["cam"])["cam"]

    def _check(self, cls: int, conf: float, score: Optional[float], file: str) -> Optional[str]:
        if not math.isfinite(conf) or (score is not None and not math.isfinite(score)):
            return f"non-finite output of {file}"
        if not 0 <= cls < len(self.classes):
            return f"invalid class {cls} from {file} ({len(self.classes)} classes)"
        return None

    def _failed(self, j: int, reason: str, t0: float) -> Decision:
        k = self.exits[j] if not self.full else self.num_exits - 1
        return Decision(-1, "", float("nan"), k, None, (time.perf_counter() - t0) * 1e3,
                        self.reference_macs if self.full else self.exit_macs[j], one_line(reason))

    def _label(self, cls: int) -> str:
        return self.classes[cls] if 0 <= cls < len(self.classes) else str(cls)


def bind_stages(backend: Backend, engines: Sequence[Any], files: Sequence[Any], batch: int,
                host_features: bool = False) -> tuple:
    """Bind a pipeline's stages once at ``batch`` rows: ``(input buffer, calls, outputs per stage)``. Stage j's
    ``features`` buffer is stage j+1's input and its ``cam`` the next ``prev_cam``; both stay on the device unless
    ``host_features`` (drawing needs the features on the host); class, confidence and signals have host views."""
    feed: Buffer = backend.buffer((batch, *files[0].inputs[0].static_shape), np.float32)
    first, calls, outs_per_stage = feed, [], []
    cam: Optional[Buffer] = None
    for engine, f in zip(engines, files):
        outs: Dict[str, Buffer] = {}
        for spec in f.outputs:
            on_device = spec.name == "cam" or (spec.name == "features" and not host_features)
            outs[spec.name] = backend.buffer((batch, *spec.static_shape), np.dtype(spec.dtype), host=not on_device)
        inputs = {f.input_names[0]: feed}
        if f.has_input("prev_cam"):
            inputs["prev_cam"] = cam
        calls.append(engine.bind(inputs, outs))
        outs_per_stage.append(outs)
        feed, cam = outs["features"], outs.get("cam")
    return first, calls, outs_per_stage



# --------------------------------------------------------------------------------------------------------------
# frames from a source -> decisions


def run_source(
    runner: StageRunner,
    frames: Any,
    batch_size: int = 1,
    on_decision: Optional[Any] = None,
    on_skip: Optional[Any] = None,
) -> int:
    """Run every frame of ``frames`` (an iterable of ``sources.Frame``, e.g. a Source) through ``runner`` in
    batches of ``batch_size``; call ``on_decision(frame, decision)`` per frame, in source order, right after its
    batch, and ``on_skip(frame, reason)`` for frames that cannot be used (unreadable files, frames the
    preprocessing rejects). Returns the number of frames decided. A KeyboardInterrupt propagates: frames of the
    batch being assembled are not decided."""
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    pending_frames: List[Any] = []
    pending_x: List[np.ndarray] = []
    done = 0

    def flush() -> None:
        nonlocal done
        if not pending_frames:
            return
        x = np.stack(pending_x)
        decided = runner.run_batch(x)
        todo = list(zip(pending_frames, decided))
        pending_frames.clear()
        pending_x.clear()
        for frame, decision in todo:
            done += 1
            if on_decision is not None:
                on_decision(frame, decision)

    for frame in frames:
        if frame.error is not None or frame.image is None:
            if on_skip is not None:
                on_skip(frame, frame.error or "no image")
            continue
        try:
            x = runner.preprocess(frame.image)
        except Exception as exc:  # noqa: BLE001 (a frame the preprocessing rejects is skipped, not fatal)
            if on_skip is not None:
                on_skip(frame, one_line(f"cannot preprocess {frame.name}: {type(exc).__name__}: {exc}"))
            continue
        pending_frames.append(frame)
        pending_x.append(x)
        if len(pending_frames) >= batch_size:
            flush()
    flush()
    return done

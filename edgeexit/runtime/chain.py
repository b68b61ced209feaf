"""The exit chain: run segment 0 -> head 0 -> gate -> leave, or segment 1 -> ... and really stop (torch-free).

``ExitRunner(bundle, backend, gate=..., threshold=..., max_exit=..., full=...)`` runs batches of preprocessed
images (float32 NCHW) through the backend's engines::

    runner = ExitRunner(bundle, open_backend(bundle))
    decisions = runner.run_images([rgb_uint8_frame, ...])     # or runner.run_batch(x)

Per exit i: segment i runs on the samples still in the batch; head i computes ``class``, ``signals`` (the 7 gate
signals, with the temperature baked into the graph) and ``cam``; the gate reads those signals with the bundle's
:class:`~edgeexit.policy.ExitPolicy` (patience by :func:`~edgeexit.gates.next_patience`, the learned score by
:func:`~edgeexit.gates.gate_score`, exactly as calibration did). Samples that leave are dropped from the batch
(*compaction*) before segment i+1, so later segments run on fewer rows; decisions come back in input order and
equal those of batch size 1. The last exit takes every sample still there.

``full=True`` is the plain-network baseline: every segment runs and only the last head (comparable to the
bundle's monolithic ``full.onnx``). A frame whose head output is not finite is marked failed (with the reason)
and leaves the batch; the others go on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..gates import SIGNAL_NAMES, gate_score, next_patience
from ..policy import ExitPolicy
from ..preprocess import Preprocess
from .backends import Backend, bundle_manifest

__all__ = ["Decision", "ExitRunner", "parse_thresholds", "run_source"]

HEAD_OUTPUTS = ("class", "signals", "cam")


@dataclass
class Decision:
    """The runtime's answer for one frame.

    ``class_id`` / ``label``: the prediction of the exit taken (``exit_index``); ``confidence``: its probability
    (softmax with the exit's temperature, the ``max_prob`` signal); ``gate_score``: the raw gate score at that exit
    (None in ``full`` mode and where the gate has no score: the learned gate at the last exit); ``cam``: that exit's
    class activation map (when the runner keeps CAMs); ``failed`` / ``reason``: an engine produced non-finite
    values or raised; ``latency_ms``: this frame's share of the batch's inference time (each step's time divided
    among the frames that were in it); ``macs``: the cumulative MACs of the exit taken.
    """

    class_id: int
    label: str
    confidence: float
    exit_index: int
    gate_score: Optional[float] = None
    cam: Optional[np.ndarray] = None
    failed: bool = False
    reason: Optional[str] = None
    latency_ms: float = 0.0
    macs: int = 0
    signals: Optional[np.ndarray] = field(default=None, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able fields (no CAM, no signals)."""
        return {
            "class_id": int(self.class_id),
            "label": self.label,
            "confidence": _num(self.confidence),
            "exit": int(self.exit_index),
            "gate_score": _num(self.gate_score),
            "latency_ms": _num(self.latency_ms),
            "macs": int(self.macs),
            "failed": self.reason if self.failed else None,
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


def _bundle_attr(bundle: Any, name: str, default: Any = None) -> Any:
    return getattr(bundle, name, default)


class ExitRunner:
    """Chains a backend's engines for one bundle with an exit policy (see the module docstring).

    Overrides of the manifest policy: ``gate`` (the calibrated policy of that gate when the bundle has one, else it
    needs ``threshold``), ``threshold`` (one value for
    every internal exit, or one per internal exit), ``max_exit`` (every sample reaching that exit leaves there),
    ``full`` (every segment, only the last head). ``keep_cam``: return each decision's CAM (for drawing).
    """

    def __init__(
        self,
        bundle: Any,
        backend: Backend,
        gate: Optional[str] = None,
        threshold: Union[None, float, str, Sequence[float]] = None,
        max_exit: Optional[int] = None,
        full: bool = False,
        keep_cam: bool = False,
    ):
        self.bundle = bundle
        self.backend = backend
        manifest = bundle_manifest(bundle)
        policy = _bundle_attr(bundle, "policy")
        if policy is None:
            policy = ExitPolicy.from_dict(manifest["policy"])
        self.base_policy: ExitPolicy = policy
        thresholds = parse_thresholds(threshold) if isinstance(threshold, str) else threshold
        calibrated = (manifest.get("gate_policies") or {}).get(gate) if gate not in (None, policy.gate) else None
        if calibrated is not None and thresholds is None:  # that gate's own calibrated thresholds
            policy, gate = ExitPolicy.from_dict(calibrated), None
        if gate is not None or thresholds is not None or max_exit is not None:
            policy = policy.override(gate=gate, thresholds=thresholds, max_exit=max_exit)
        self.policy: ExitPolicy = policy
        self.full = bool(full)
        self.keep_cam = bool(keep_cam)
        # learned-gate weights as arrays once, not per batch (the per-frame path only does arithmetic)
        self._learned = None if policy.learned is None else [
            {k: (np.asarray(v, dtype=np.float64) if isinstance(v, (list, tuple)) else v) for k, v in params.items()}
            for params in policy.learned]
        self.num_exits = backend.num_exits
        if self.policy.num_exits != self.num_exits:
            raise ValueError(f"the policy has {self.policy.num_exits} exits, the backend {self.num_exits}")
        self.classes = tuple(_bundle_attr(bundle, "classes") or manifest["classes"])
        pre = _bundle_attr(bundle, "preprocess")
        if pre is None:
            inp = manifest["input"]
            pre = Preprocess(channels=int(inp["shape"][0]), resize=int(inp["resize"]), crop=int(inp["crop"]),
                             mean=tuple(inp["mean"]), std=tuple(inp["std"]))
        self.preprocess: Preprocess = pre
        self.input_shape = tuple(int(v) for v in manifest["input"]["shape"])
        cumulative = _bundle_attr(bundle, "cumulative_macs") or manifest["costs"]["cumulative_macs"]
        self.cumulative_macs = tuple(int(v) for v in cumulative)
        seg_macs = [int(s.get("macs", 0)) for s in sorted(manifest["segments"], key=lambda s: int(s["index"]))]
        head_macs = [int(h.get("macs", 0)) for h in sorted(manifest["heads"], key=lambda h: int(h["index"]))]
        reference = _bundle_attr(bundle, "reference_macs") or manifest["costs"].get("reference_macs")
        self.reference_macs = int(reference or (sum(seg_macs) + head_macs[-1]))
        self.full_macs = int(sum(seg_macs) + head_macs[-1]) if any(seg_macs) else self.reference_macs
        names = tuple(_bundle_attr(bundle, "signals") or manifest.get("signals") or SIGNAL_NAMES)
        missing = [n for n in SIGNAL_NAMES if n not in names]
        if missing:
            raise ValueError(f"the bundle's head signals lack {', '.join(missing)}")
        order = [names.index(n) for n in SIGNAL_NAMES]
        self._signal_order = None if order == list(range(len(SIGNAL_NAMES))) else np.asarray(order)
        self._max_prob = SIGNAL_NAMES.index("max_prob")  # column after reordering
        # the shape of a head's prev_cam when the previous head did not run (full mode)
        self._prev_cam_shapes: List[Optional[tuple]] = []
        for head in backend.heads:
            shape = head.input_shapes.get("prev_cam") if "prev_cam" in head.input_names else None
            self._prev_cam_shapes.append(None if shape is None else tuple(shape[1:]))
        self.batches = 0

    # ------------------------------------------------------------------------------------------------------------

    @property
    def max_batch(self) -> Optional[int]:
        return self.backend.max_batch

    def exit_fraction(self, exit_index: int) -> float:
        """Cost of leaving at an exit as a fraction of the plain network."""
        return self.cumulative_macs[exit_index] / self.reference_macs if self.reference_macs else float("nan")

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 HxWxC frames (any size, 1/3/4 channels) -> float32 NCHW exactly as the manifest states."""
        crops = [self.preprocess.resize_and_crop(np.asarray(img)) for img in images]
        if not crops:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        return self.preprocess.normalize(np.stack(crops))

    def warmup(self, batch: int = 1, repeats: int = 2) -> float:
        """Run every segment and head ``repeats`` times on a zero batch (lazy initialisation, caches, clocks), so
        the first real frame's latency is not an outlier. Returns the seconds spent."""
        t0 = time.perf_counter()
        limit = self.max_batch or batch
        x = np.zeros((max(1, min(int(batch), limit)), *self.input_shape), dtype=np.float32)
        for _ in range(max(0, int(repeats))):
            feats: Any = x
            cam: Any = None
            for i in range(self.num_exits):
                seg, head = self.backend.segments[i], self.backend.heads[i]
                feats = seg.run({seg.input_names[0]: feats}, outputs=(seg.output_names[0],),
                                keep=("features",))[seg.output_names[0]]
                feeds = {"features": feats}
                if "prev_cam" in head.input_names:
                    feeds["prev_cam"] = cam if cam is not None else np.zeros((x.shape[0], *self._prev_cam_shapes[i]),
                                                                              dtype=np.float32)
                cam = head.run(feeds, outputs=HEAD_OUTPUTS, keep=("cam",))["cam"]
        return time.perf_counter() - t0

    def run_images(self, images: Sequence[np.ndarray]) -> List[Decision]:
        return self.run_batch(self.prepare(images))

    def run_batch(self, x: np.ndarray) -> List[Decision]:
        """Decisions for a float32 (B, C, H, W) batch, in input order (split by the backend's max batch)."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected a batch of shape (B, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        limit = self.max_batch
        if limit and x.shape[0] > limit:
            out: List[Decision] = []
            for start in range(0, x.shape[0], limit):
                out += self._run(x[start : start + limit])
            return out
        return self._run(x)

    # ------------------------------------------------------------------------------------------------------------

    def _gate_raw(self, i: int, signals: np.ndarray, patience: np.ndarray) -> Optional[np.ndarray]:
        """Raw gate scores at exit i (None where the gate has no score there)."""
        gate = self.policy.gate
        params = None
        if gate == "learned":
            if self._learned is None or i >= len(self._learned):
                return None
            params = self._learned[i]
        return gate_score(gate, signals, patience, params)

    def _run(self, x: np.ndarray) -> List[Decision]:
        backend, n_exits = self.backend, self.num_exits
        batch = x.shape[0]
        self.batches += 1
        results: List[Optional[Decision]] = [None] * batch
        if batch == 0:
            return []
        spent = np.zeros(batch, dtype=np.float64)  # seconds of inference time attributed to each sample
        alive = np.arange(batch)  # input positions of the rows in the current batch
        feats: Any = x
        prev_cam: Any = None
        prev_cls: Optional[np.ndarray] = None
        prev_pat: Optional[np.ndarray] = None
        last = n_exits - 1
        keep = ("features",)

        def finish(rows: np.ndarray, i: int, cls: np.ndarray, sig: np.ndarray, raw: Optional[np.ndarray],
                   cams: Optional[np.ndarray], reasons: Optional[List[Optional[str]]] = None) -> None:
            macs = self.full_macs if self.full else self.cumulative_macs[i]
            for k in rows:
                pos = int(alive[k])
                c = int(cls[k])
                label = self.classes[c] if 0 <= c < len(self.classes) else str(c)
                reason = reasons[k] if reasons is not None else None
                results[pos] = Decision(
                    class_id=c,
                    label=label,
                    confidence=float(sig[k, self._max_prob]),
                    exit_index=i,
                    gate_score=None if raw is None else float(raw[k]),
                    cam=None if cams is None else np.array(cams[k], dtype=np.float32),
                    failed=reason is not None,
                    reason=reason,
                    macs=macs,
                    signals=np.array(sig[k], dtype=np.float32),
                )

        def fail_all(i: int, reason: str) -> None:
            for k in range(alive.size):
                pos = int(alive[k])
                results[pos] = Decision(-1, "", float("nan"), i, None, None, True, reason,
                                        macs=self.full_macs if self.full else self.cumulative_macs[i])

        for i in range(n_exits):
            # ---- segment i
            seg = backend.segments[i]
            t0 = time.perf_counter()
            try:
                out = seg.run({seg.input_names[0]: feats}, outputs=(seg.output_names[0],), keep=keep)
            except Exception as exc:  # noqa: BLE001 (an engine error fails these frames, the run goes on)
                spent[alive] += (time.perf_counter() - t0) / alive.size
                fail_all(i, _one_line(f"{seg.name}: {type(exc).__name__}: {exc}"))
                break
            feats = out[seg.output_names[0]]
            spent[alive] += (time.perf_counter() - t0) / alive.size
            if self.full and i < last:
                continue
            # ---- head i
            head = backend.heads[i]
            t0 = time.perf_counter()
            feeds = {"features": feats}
            if "prev_cam" in head.input_names:
                if prev_cam is None:  # full mode: the previous head did not run
                    shape = self._prev_cam_shapes[i]
                    prev_cam = np.zeros((alive.size, *shape), dtype=np.float32)
                feeds["prev_cam"] = prev_cam
            try:
                hout = head.run(feeds, outputs=HEAD_OUTPUTS, keep=("cam",))
                cls = np.asarray(backend.to_host(hout["class"])).astype(np.int64).reshape(-1)
                sig = np.asarray(backend.to_host(hout["signals"]), dtype=np.float32)
                cam_dev = hout["cam"]
                if self._signal_order is not None:
                    sig = sig[:, self._signal_order]
            except Exception as exc:  # noqa: BLE001
                spent[alive] += (time.perf_counter() - t0) / alive.size
                fail_all(i, _one_line(f"{head.name}: {type(exc).__name__}: {exc}"))
                break
            bad = ~np.all(np.isfinite(sig), axis=1) | (cls < 0) | (cls >= len(self.classes))
            pat = next_patience(prev_pat, prev_cls, cls)
            raw = None if self.full else self._gate_raw(i, sig, pat)  # computed once: decision and report
            if i == last:
                leave = np.ones(alive.size, dtype=bool)
            else:
                leave = np.asarray(self.policy.passes(i, raw), dtype=bool)
            leave = leave | bad
            cams = backend.to_host(cam_dev) if self.keep_cam and leave.any() else None  # only when drawn
            spent[alive] += (time.perf_counter() - t0) / alive.size
            reasons: Optional[List[Optional[str]]] = None
            if bad.any():
                reasons = [
                    _nonfinite_reason(head.name, sig[k], int(cls[k]), len(self.classes)) if bad[k] else None
                    for k in range(alive.size)
                ]
            finish(np.flatnonzero(leave), i, cls, sig, raw, cams, reasons)
            stay = np.flatnonzero(~leave)
            if stay.size == 0:
                break
            if stay.size < alive.size:  # compaction: only the samples that go on run the next segment
                feats = backend.take(feats, stay)
                prev_cam = backend.take(cam_dev, stay)
                cls, pat = cls[stay], pat[stay]
                alive = alive[stay]
            else:
                prev_cam = cam_dev
            prev_cls, prev_pat = cls, pat
        for pos, d in enumerate(results):
            if d is not None:
                d.latency_ms = float(spent[pos] * 1000.0)
        missing = [pos for pos, d in enumerate(results) if d is None]
        if missing:  # cannot happen unless an engine misbehaves; never return holes
            for pos in missing:
                results[pos] = Decision(-1, "", float("nan"), last, failed=True, reason="no exit reached",
                                        latency_ms=float(spent[pos] * 1000.0))
        return results  # type: ignore[return-value]


def _nonfinite_reason(name: str, sig: np.ndarray, cls: int, num_classes: int) -> str:
    if not np.all(np.isfinite(sig)):
        bad = [SIGNAL_NAMES[j] for j in range(min(len(sig), len(SIGNAL_NAMES))) if not math.isfinite(float(sig[j]))]
        return f"non-finite output of {name} (signals: {', '.join(bad)})"
    return f"invalid class {cls} from {name} ({num_classes} classes)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


# --------------------------------------------------------------------------------------------------------------
# frames from a source -> decisions


def run_source(
    runner: ExitRunner,
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
                on_skip(frame, _one_line(f"cannot preprocess {frame.name}: {type(exc).__name__}: {exc}"))
            continue
        pending_frames.append(frame)
        pending_x.append(x)
        if len(pending_frames) >= batch_size:
            flush()
    flush()
    return done


# --------------------------------------------------------------------------------------------------------------
# `edgeexit run`

DEMO_BUNDLE = ("assets", "demo", "bundle")
DEMO_SAMPLES = ("assets", "demo", "samples")


def demo_path(parts: Sequence[str]) -> Any:
    """A path inside the installed package (``importlib.resources``), e.g. the demo bundle and samples."""
    from importlib import resources  # noqa: PLC0415

    ref = resources.files("edgeexit")
    for part in parts:
        ref = ref.joinpath(part)
    return ref


def resolve_inputs(bundle_path: Optional[str], source_uri: Optional[str]) -> Tuple[str, str, bool]:
    """(bundle, source, is_demo) as `run` and `profile` take them: the demo bundle and samples by default, and
    `edgeexit run clip.mp4` (one argument that is a source) runs the demo bundle on that input."""
    demo = False
    if bundle_path is not None and source_uri is None and _looks_like_source(str(bundle_path)):
        bundle_path, source_uri = None, str(bundle_path)
    if bundle_path is None:
        ref = demo_path(DEMO_BUNDLE)
        if not ref.joinpath("manifest.json").is_file():
            raise FileNotFoundError(f"the demo bundle is not installed (edgeexit/{'/'.join(DEMO_BUNDLE)} missing): "
                                    "pass a BUNDLE directory")
        bundle_path, demo = str(ref), True
    if source_uri is None:
        ref = demo_path(DEMO_SAMPLES)
        if not ref.is_dir():
            raise FileNotFoundError(f"the demo samples are not installed (edgeexit/{'/'.join(DEMO_SAMPLES)} missing): "
                                    "pass a SOURCE (image, folder, video, camera)")
        source_uri = str(ref)
    return str(bundle_path), str(source_uri), demo


def _looks_like_source(text: str) -> bool:
    """A positional argument that is clearly an input rather than a bundle directory."""
    from pathlib import Path  # noqa: PLC0415

    if "://" in text or text.isdigit() or text.startswith("/dev/video"):
        return True
    return Path(text).expanduser().is_file()


def _quiet_opencv() -> None:
    """Keep OpenCV's own warnings ("can't open camera by index" ...) off stderr: errors are reported in one line."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # read when cv2 logs first
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        except Exception:  # noqa: BLE001 (older builds)
            pass


def run_command(
    bundle_path: Optional[str] = None,
    source_uri: Optional[str] = None,
    *,
    out: Optional[str] = None,
    save: Optional[str] = None,
    batch: int = 1,
    gate: Optional[str] = None,
    threshold: Optional[str] = None,
    max_exit: Optional[int] = None,
    full: bool = False,
    backend: str = "auto",
    providers: Optional[str] = None,
    threads: Optional[int] = None,
    loop: bool = False,
    max_frames: Optional[int] = None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    fps: Optional[float] = None,
    quiet: bool = False,
    stdout: Any = None,
    stderr: Any = None,
    capture_factory: Any = None,
) -> int:
    """``edgeexit run``: bundle + source -> one JSON line per frame (stdout or ``out``), annotated frames under
    ``save``, and a summary table at the end (stderr when the lines go to stdout). Returns the exit code: 0, or
    130 when interrupted (Ctrl-C or SIGTERM; the summary is printed and every line already written is kept).

    Expected problems raise one-line errors for the caller to print: BundleError (invalid bundle), SourceError
    (missing input, camera that cannot be opened), BackendError, ValueError (bad options), FileNotFoundError
    (the demo assets are not installed).
    """
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .backends import open_backend  # noqa: PLC0415
    from .bundle import load_bundle  # noqa: PLC0415
    from .guards import InterruptGuard, check_bounds, check_output_paths, report_unknown_folders, warmup_batch  # noqa: PLC0415
    from .outputs import FrameSaver, JsonlWriter, frame_record  # noqa: PLC0415
    from .sources import open_source  # noqa: PLC0415
    from .summary import RunStats  # noqa: PLC0415

    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr

    def info(message: str) -> None:
        if not quiet:
            print(message, file=stderr, flush=True)

    def warn(message: str) -> None:
        print(message, file=stderr, flush=True)

    _quiet_opencv()
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"--max-frames must be >= 0, got {max_frames}")
    check_bounds(batch, threads)  # issue 11: --batch and --threads within sane limits
    bundle_path, source_uri, _demo = resolve_inputs(bundle_path, source_uri)
    check_output_paths({"--out": out, "--save": save}, (source_uri, bundle_path))  # issue 11: never clobber inputs

    bundle = load_bundle(bundle_path)
    engines = open_backend(bundle, backend, providers=providers, threads=threads, max_batch=max(batch, 1))
    source = None
    writer = saver = None
    stats: Optional[RunStats] = None
    interrupted = False
    guard = InterruptGuard()  # issue 11: the first SIGINT/SIGTERM stops the run, later ones cannot lose the summary
    try:
        runner = ExitRunner(bundle, engines, gate=gate, threshold=threshold, max_exit=max_exit, full=full,
                            keep_cam=save is not None)
        source = open_source(source_uri, loop=loop, max_frames=max_frames, classes=tuple(runner.classes),
                             width=width, height=height, fps=fps, capture_factory=capture_factory)
        writer = JsonlWriter(out, stream=stdout)
        if save is not None:
            saver = FrameSaver(save, source, runner.preprocess, warn=warn)
        summary_file = stderr if writer.to_stdout else stdout
        stats = RunStats(runner.num_exits, [runner.exit_fraction(i) for i in range(runner.num_exits)], full=full)
        report_unknown_folders(source, stats, warn)  # issue 11: class folders the model does not know
        policy = runner.policy
        mode = "full depth (every segment, last head only)" if full else (
            f"gate {policy.gate}, thresholds {', '.join(f'{t:g}' for t in policy.thresholds) or '-'}")
        info(f"edgeexit: bundle {bundle_path} ({runner.num_exits} exits, {len(runner.classes)} classes); "
             f"{engines.describe()}; {mode}")
        info(f"edgeexit: input {source.describe()}" + (f" -> {out}" if out else ""))

        def on_decision(frame: Any, decision: Decision) -> None:
            writer.write(frame_record(frame, decision, runner.classes))  # the line first: it is what must survive
            stats.add(decision, frame.label)
            if saver is not None and frame.image is not None:
                saver.save(frame, decision)

        def on_skip(frame: Any, reason: str) -> None:
            stats.add_skipped()
            warn(f"edgeexit: warning: skipped {frame.name}: {reason}")

        try:
            guard.install()  # issue 11
            runner.warmup(warmup_batch(batch, source))  # issue 11: warm up at the batch really used
            stats.start()
            run_source(runner, source, batch, on_decision, on_skip)
            guard.hold()  # issue 11
        except KeyboardInterrupt:
            interrupted = True
        except BrokenPipeError:  # `edgeexit run ... | head`: the reader left; stop quietly
            if writer.to_stdout and stdout is sys.stdout:
                import os  # noqa: PLC0415

                try:  # Python's advice: point stdout at devnull so the exit-time flush does not fail again
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())
                except (OSError, ValueError):
                    pass
        stats.stop()
    except BaseException:  # issue 11: no summary follows, so give the signals back
        guard.release()
        raise
    finally:
        guard.hold()  # issue 11: signals from here on are ignored (the clean-up and the summary go through)
        if source is not None:
            source.close()
        for closable in (saver, writer):
            if closable is not None:
                try:
                    closable.close()
                except (OSError, ValueError):
                    pass
        engines.close()
    stats.interrupted = interrupted
    stats.dropped = int(getattr(source, "dropped", 0))
    stats.ended_reason = None if interrupted else getattr(source, "ended_reason", None)
    try:
        stats.render(summary_file, title=f"edgeexit run: {Path(str(bundle_path)).name} on {source.display}")
        if saver is not None and saver.saved:
            where = saver.video_path or saver.directory
            print(f"annotated frames: {where}", file=summary_file, flush=True)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        guard.release()  # issue 11
    return 130 if interrupted else 0

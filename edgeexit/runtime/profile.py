"""``edgeexit profile``: latency and energy of a stage bundle on this device, fed back into calibration (torch-free).

What it measures, in one process, on the frames of one SOURCE (decoded and preprocessed once, kept in memory so
that decoding is not timed). An image folder is sampled without replacement in a seeded random order over the
whole folder (``seed``), so the frames are spread across its classes, not the first N files of the first class;
a video or camera gives its first frames, shuffled the same way; a source with fewer frames is cycled.

1. **Warm-up** (as trtexec): every stage of the pipeline (``gate``, default the bundle's) and the monolithic
   ``full.onnx`` run on real frames through their bound buffers for ``warmup_ms`` (at least one pass), then the
   adaptive, full and chain runners once.
2. **Each stage alone and full.onnx alone**, ``iterations`` timed calls each, at ``batch`` rows per call, through
   buffers bound once (``engine.bind``, the call the camera path makes). Stage j's input is the features stage
   j - 1 produced for a real frame: before each chunk of calls a real frame is copied in and stages 0..j-1 run
   once (untimed, marked "prep", outside the stage's energy window), so on a GPU the input is on the device as
   in the chain. ``time.perf_counter_ns`` around each call. With a sampled power meter each loop also runs until
   it spans ``MIN_WINDOW_SAMPLES`` meter samples. Statistics as trtexec reports them: min, mean, median, p90,
   p95, p99, max, coefficient of variation.
3. **The per-call overhead** ``boundary`` (``edgeexit.stages``: the cost of one engine call that MACs do not
   count: launch, copies in and out, layout conversions at the graph's edges) from step 2, per frame::

       T_s = sum_j stage_j        (S stages, each alone: every segment, the kept heads, S calls)
       T_m = full.onnx            (every segment, the last head, 1 call)
       h   = MACs of the kept internal heads / MACs of full.onnx
       boundary = (T_s - T_m - h * T_m) / (S - 1 - h)

   i.e. the solution of T_s = r * M_s + S * b and T_m = r * M_m + b with one compute rate r (ms per MAC) for the
   whole network: chaining costs S - 1 extra calls plus the kept internal heads, and the heads are charged at the
   network's rate. It measures what cutting the network into stages really costs (the layout conversions of the
   features passed between stages included), which a call of an empty graph would miss. Clamped at 0 (noise on a
   tiny model); undefined for a pipeline of one stage (no costs.json then: nothing to calibrate).
4. **Adaptive, full and chain on the same frames, interleaved** in rotating blocks of ``block`` frames (rounded
   up to whole batches; the order of the modes rotates each block): ``adaptive`` the pipeline with its policy, ``full`` the monolithic
   ``full.onnx`` (the plain network, as ``run --full``), ``chain`` every stage with no exit taken (the worst case
   of the pipeline). Latency per batch (= per frame at batch 1), throughput over the summed time, exit
   histogram, energy per frame from the meter's marks (one window per block, per rail where the meter has
   rails), the savings of adaptive over full, and what the stage costs predict for this exit mix.

The cost of a stage / full.onnx is its **median** latency per frame (``COST_STATISTIC``): the cost model subtracts
sums of stage times, and on a shared host the mean of a loop is dominated by preemptions (measured on this 2-core
machine: stage means 2-4x their medians, which made the boundary negative); on a quiet device with locked clocks
mean and median agree. Every statistic is reported. Energy of a stage / full.onnx = the meter's mean power during
its timing loop x that latency (W x ms = mJ).
With ``--meter constant --power-watts W`` every energy figure is an *estimate* and says so ("label": "estimate").

``costs.json`` (docs/architecture.md, "Device costs"; :func:`costs_from_profile`) holds compute-only costs per
segment and per head for all E exits of the model plus the measured ``boundary``. A stage bundle holds only the
kept exits' stages, so each stage's compute (its latency minus one boundary) is split among the segments it runs
and its head in proportion to their MACs (``bundle.segment_macs`` / ``head_macs``); a head that was not kept gets
its MAC share at the ms-per-MAC rate of the stage it sits in ("split": "stage time by MAC share"). Then
``stages.exit_costs(segments, heads, kept, boundary)`` gives back each kept exit's measured cumulative latency.

The command (options, meter, files, signals) is ``edgeexit.runtime.commands.profile_command``; this module holds
the measurement and the result documents.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from ..stages import exit_costs, reference_cost, stage_ranges

__all__ = [
    "COSTS_SCHEMA",
    "PROFILE_SCHEMA",
    "COST_METRICS",
    "MODES",
    "latency_summary",
    "boundary_estimate",
    "split_stage_costs",
    "costs_from_profile",
    "build_result",
    "load_frames",
    "render_table",
    "write_json",
    "describe_device",
    "describe_versions",
    "clocks_value",
    "clocks_text",
    "Profiler",
]

COSTS_SCHEMA = "edgeexit-costs/2"
PROFILE_SCHEMA = "edgeexit-profile/2"
COST_METRICS = ("latency_ms", "energy_mj")
MODES = ("adaptive", "full", "chain")
STAT_KEYS = ("count", "min", "mean", "median", "p90", "p95", "p99", "max", "std", "cv")
RECORD_FRAMES = 32  # distinct real frames fed to the per-stage loops (one chunk of timed calls each)
MIN_WINDOW_SAMPLES = 10  # a sampled meter's per-part window spans at least this many sample periods
MAX_PART_SECONDS = 30.0  # a per-part loop that has its iterations stops extending its window after this
TRACE_POINTS = 20000  # power-trace points kept in profile.json (decimated beyond)
BLOCK_FRAMES = 25  # frames per block of one mode in the interleaved runs
COST_STATISTIC = "median"  # of each part's latencies: what the cost model and costs.json use (module docstring)
SPLIT_RULE = "stage time by MAC share"
MONOLITHIC = "full.onnx"


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------
def latency_summary(values_ms: Sequence[float]) -> Dict[str, Any]:
    """trtexec-style summary of latencies (ms): count, min, mean, median, p90, p95, p99, max, std and the
    coefficient of variation ``cv = std / mean`` (population std; NumPy's linear-interpolation percentiles).
    Non-finite values are dropped; an empty list gives NaN statistics and count 0."""
    v = np.asarray([float(x) for x in values_ms], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        out: Dict[str, Any] = {k: float("nan") for k in STAT_KEYS}
        out["count"] = 0
        return out
    mean = float(v.mean())
    std = float(v.std())
    p50, p90, p95, p99 = (float(x) for x in np.percentile(v, [50, 90, 95, 99]))
    return {
        "count": int(v.size), "min": float(v.min()), "mean": mean, "median": p50, "p90": p90, "p95": p95,
        "p99": p99, "max": float(v.max()), "std": std, "cv": std / mean if mean > 0 else float("nan"),
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _sig(x: float, digits: int = 6) -> float:
    """``x`` rounded to ``digits`` significant digits (keeps tiny energies, drops float noise)."""
    return float(f"{float(x):.{digits}g}")


def _energy_label(is_estimate: bool) -> str:
    return "estimate" if is_estimate else "measured"


# ----------------------------------------------------------------------------------------------------------------
# device description
# ----------------------------------------------------------------------------------------------------------------
def _read_small(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            text = fh.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    text = text.replace("\x00", "").strip()
    return text or None


def describe_device() -> Dict[str, Any]:
    """platform.node / processor / machine, the OS, Python, and the Jetson model and L4T release when present."""
    l4t = _read_small("/etc/nv_tegra_release")
    return {
        "node": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "model": _read_small("/proc/device-tree/model"),  # the board (Jetson module) where a device tree exists
        "l4t": l4t.splitlines()[0] if l4t else None,
    }


def _device_string(dev: Dict[str, Any]) -> str:
    what = dev.get("model") or dev.get("processor") or dev.get("machine") or "unknown"
    return f"{dev.get('node') or 'unknown host'} ({what})"


def _dist_version(*names: str) -> Optional[str]:
    from importlib import metadata  # noqa: PLC0415

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - broken metadata must not stop a profile
            continue
    return None


def describe_versions(backend_kind: str) -> Dict[str, Optional[str]]:
    """Versions from package metadata (nothing heavy is imported for it)."""
    from .. import __version__  # noqa: PLC0415

    ort = sys.modules.get("onnxruntime")
    versions: Dict[str, Optional[str]] = {
        "edgeexit": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": getattr(ort, "__version__", None) or _dist_version("onnxruntime", "onnxruntime-gpu"),
        "tensorrt": None,
    }
    trt = sys.modules.get("tensorrt")
    if trt is not None or backend_kind == "tensorrt":
        versions["tensorrt"] = getattr(trt, "__version__", None) or _dist_version("tensorrt")
    return versions


def clocks_value(locked: Optional[bool]) -> Any:
    return "unknown" if locked is None else bool(locked)


def clocks_text(value: Any) -> str:
    if value is True:
        return "locked"
    if value is False:
        return "NOT locked (run `sudo jetson_clocks` for stable numbers)"
    return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# the profiler
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PartResult:
    """One stage (``kind`` "stage", ``index`` j) or the monolithic model (``kind`` "monolithic") measured alone."""

    kind: str
    index: int
    rows: int  # batch rows per call
    times_ms: List[float]
    macs: int = 0
    exit: int = -1  # the exit a stage ends at
    segments: Tuple[int, int] = (-1, -1)
    notes: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"stage_{self.index}" if self.kind == "stage" else MONOLITHIC


@dataclass
class RunResult:
    """One mode (adaptive, full, chain) over all frames."""

    mode: str
    frames: int
    batch_ms: List[float]
    wall_s: float  # summed time of this mode's batches (the modes are interleaved)
    exits: List[int]
    failed: int
    correct: Optional[int]
    labelled: int


class BoundChain:
    """Every stage of a pipeline bound once at ``batch`` rows (stage j's ``features`` buffer is stage j+1's input,
    features and CAMs stay where the backend wants them), and full.onnx bound beside it. ``calls[j]()`` runs stage
    j; ``load(x)`` copies frames into both inputs."""

    def __init__(self, bundle: Any, backend: Any, pipeline: Any, batch: int) -> None:
        from .chain import bind_stages  # noqa: PLC0415

        b = int(batch)
        shape = (b, *bundle.input_shape)
        engines = [backend.engine(f) for f in pipeline.stages]
        self.input, self.calls, _outs = bind_stages(backend, engines, pipeline.stages, b)
        mono = bundle.monolithic
        self.mono_input = backend.buffer(shape, np.float32)
        outs = {s.name: backend.buffer((b, *s.static_shape), np.dtype(s.dtype)) for s in mono.outputs}
        self.mono = backend.engine(mono).bind({mono.input_names[0]: self.mono_input}, outs)

    def load(self, x: np.ndarray) -> None:
        np.copyto(self.input.host, x)
        np.copyto(self.mono_input.host, x)


class Profiler:
    """Runs the measurement steps on an open backend; results accumulate in attributes as each step finishes, so
    an interrupted profile still reports what it measured."""

    def __init__(self, bundle: Any, backend: Any, meter: Any = None, *, gate: Optional[str] = None, batch: int = 1,
                 warmup_ms: float = 200.0, iterations: int = 200, block: int = BLOCK_FRAMES,
                 log: Callable[[str], None] = lambda _m: None, min_window_s: Optional[float] = None):
        from .chain import StageRunner  # noqa: PLC0415

        self.bundle = bundle
        self.backend = backend
        self.meter = meter
        self.pipeline = bundle.pipeline(gate)
        self.batch = int(batch)
        self.warmup_ms = float(warmup_ms)
        self.iterations = int(iterations)
        self.block = math.ceil(max(1, int(block)) / self.batch) * self.batch  # whole batches per block
        self.log = log
        gate = self.pipeline.gate
        self.runners = {"adaptive": StageRunner(bundle, backend, gate=gate),
                        "full": StageRunner(bundle, backend, gate=gate, full=True),
                        "chain": StageRunner(bundle, backend, gate=gate, threshold=math.inf)}  # never leaves early
        self.adaptive = self.runners["adaptive"]
        self.num_exits = int(bundle.num_exits)
        sampled = meter is not None and not getattr(meter, "is_estimate", False) and hasattr(meter, "rate_hz")
        if min_window_s is None:
            min_window_s = MIN_WINDOW_SAMPLES / float(meter.rate_hz) if sampled else 0.0
        self.min_window_s = float(min_window_s)
        self.chain: Optional[BoundChain] = None
        self.frames: Optional[np.ndarray] = None  # up to RECORD_FRAMES real frames, batch-sized chunks
        self.warmup_s = 0.0
        self.warmup_passes = 0
        self.parts: List[PartResult] = []
        self.runs: Dict[str, RunResult] = {}
        self.reading: Any = None
        self.notes: List[str] = []

    # -- meter
    def mark(self, label: str) -> None:
        if self.meter is not None:
            try:
                self.meter.mark(label)
            except Exception as exc:  # noqa: BLE001 - a meter must never stop a profile
                self.notes.append(f"meter mark {label!r} failed: {exc}")

    def start_meter(self) -> None:
        if self.meter is not None:
            self.meter.start()

    def stop_meter(self) -> Any:
        if self.meter is not None and self.reading is None and getattr(self.meter, "running", True):
            try:
                self.reading = self.meter.stop()
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"meter stop failed: {exc}")
        return self.reading

    # -- step 1
    def _chunks(self) -> List[np.ndarray]:
        b = self.batch
        return [self.frames[i:i + b] for i in range(0, self.frames.shape[0] - b + 1, b)]

    def warmup(self, x: np.ndarray) -> None:
        """Bind the chain at ``batch`` rows, keep the first RECORD_FRAMES frames (cycled up to one batch) for the
        per-part loops, run every stage and full.onnx on them until ``warmup_ms`` have passed; then each runner
        once."""
        self.mark("warmup")
        t0 = time.perf_counter()
        b = self.batch
        n = max(b, min(x.shape[0], max(RECORD_FRAMES, b)) // b * b)
        self.frames = np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])), dtype=np.float32)
        self.log(f"warm-up {self.warmup_ms:g} ms on {n} frames, {len(self.pipeline.stages)} stages + {MONOLITHIC} "
                 f"bound at batch {b}")
        self.chain = BoundChain(self.bundle, self.backend, self.pipeline, b)
        chunks = self._chunks()
        j = 0
        while j < len(chunks) or (time.perf_counter() - t0) * 1e3 < self.warmup_ms:
            self.chain.load(chunks[j % len(chunks)])
            for call in self.chain.calls:
                call()
            self.chain.mono()
            j += 1
        self.warmup_passes = math.ceil(j / len(chunks))
        for runner in self.runners.values():
            runner.run_batch(x[:b])
        self.warmup_s = time.perf_counter() - t0

    # -- step 2
    def time_part(self, kind: str, j: int = 0) -> PartResult:
        """``iterations`` timed calls of stage j (``kind`` "stage") or of full.onnx (``kind`` "monolithic"),
        cycling over the real frames chunk by chunk (see the module docstring)."""
        chain = self.chain
        timed = chain.mono if kind == "monolithic" else chain.calls[j]
        before = [] if kind == "monolithic" else chain.calls[:j]
        chunks = self._chunks()
        per_chunk = max(1, math.ceil(self.iterations / len(chunks)))
        label = MONOLITHIC if kind == "monolithic" else f"stage_{j}"
        times: List[float] = []
        timed_ns = 0
        t_loop = time.perf_counter()
        c = 0
        done = False
        while not done:
            self.mark("prep")
            chain.load(chunks[c % len(chunks)])
            for call in before:
                call()
            self.mark(label)
            for _ in range(per_chunk):
                t0 = time.perf_counter_ns()
                timed()
                dt = time.perf_counter_ns() - t0
                times.append(dt / 1e6)
                timed_ns += dt
                if len(times) >= self.iterations and (
                    timed_ns / 1e9 >= self.min_window_s or time.perf_counter() - t_loop > MAX_PART_SECONDS
                ):
                    done = True
                    break
            c += 1
        self.mark("idle")
        if kind == "monolithic":
            part = PartResult(kind, 0, self.batch, times, macs=int(self.bundle.monolithic.macs or self.bundle.reference_macs))
        else:
            f = self.pipeline.stages[j]
            part = PartResult(kind, j, self.batch, times, macs=int(f.macs), exit=int(f.exit),
                              segments=tuple(int(v) for v in f.segments))
        if len(times) > self.iterations:
            part.notes.append(f"ran {len(times)} iterations so the power window spans {MIN_WINDOW_SAMPLES} meter samples")
        self.parts.append(part)
        return part

    def time_parts(self) -> None:
        """Each stage alone, then full.onnx alone."""
        todo = [("stage", j) for j in range(len(self.pipeline.stages))] + [("monolithic", 0)]
        for kind, j in todo:
            part = self.time_part(kind, j)
            s = latency_summary(part.times_ms)
            self.log(f"{part.label}: mean {s['mean']:.4f} ms, median {s['median']:.4f} ms, "
                     f"p99 {s['p99']:.4f} ms ({s['count']} runs)")

    # -- step 4
    def run_modes(self, x: np.ndarray, labels: Optional[np.ndarray]) -> None:
        """Every mode on every frame, in blocks of ``block`` frames; the mode order rotates each block."""
        n, b = x.shape[0], self.batch
        acc = {m: {"batch_ms": [], "exits": [], "failed": 0, "correct": 0, "ns": 0} for m in MODES}
        starts = list(range(0, n, self.block))
        for k, s0 in enumerate(starts):
            block = x[s0:s0 + self.block]
            order = MODES[k % len(MODES):] + MODES[:k % len(MODES)]
            for mode in order:
                a, runner = acc[mode], self.runners[mode]
                self.mark(mode)
                for s in range(0, block.shape[0], b):
                    t0 = time.perf_counter_ns()
                    decisions = runner.run_batch(block[s:s + b])
                    dt = time.perf_counter_ns() - t0
                    a["ns"] += dt
                    a["batch_ms"].append(dt / 1e6)
                    for i, d in enumerate(decisions):
                        if labels is not None:
                            a["correct"] += int(d.class_id == labels[s0 + s + i])
                        a["exits"].append(int(d.exit))
                        a["failed"] += int(bool(d.failed))
        self.mark("end")
        for mode in MODES:
            a = acc[mode]
            self.runs[mode] = RunResult(mode, n, a["batch_ms"], a["ns"] / 1e9, a["exits"], a["failed"],
                                        a["correct"] if labels is not None else None,
                                        int(labels.size) if labels is not None else 0)
            s = latency_summary(a["batch_ms"])
            self.log(f"{mode}: mean {s['mean']:.4f} ms per batch, {n / (a['ns'] / 1e9) if a['ns'] else float('nan'):.1f} "
                     f"frames/s")


# ----------------------------------------------------------------------------------------------------------------
# frames
# ----------------------------------------------------------------------------------------------------------------
def load_frames(source_uri: str, preprocess: Callable[[np.ndarray], np.ndarray], classes: Sequence[str], frames: int,
                seed: int = 0, warn: Callable[[str], None] = lambda _m: None
                ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, Any]]:
    """``frames`` usable frames of the source, preprocessed into one float32 (N, C, H, W) array, in a seeded random
    order: an image folder is sampled over all its files (``ImageFilesSource.sample``), another source gives its
    first ``frames`` frames, shuffled. A source with fewer frames is cycled. Labels (folder classes) when every
    frame has one."""
    from .sources import open_source  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    xs: List[np.ndarray] = []
    labels: List[Optional[int]] = []
    skipped = 0
    with open_source(source_uri, loop=False, classes=tuple(classes)) as source:
        sampled = hasattr(source, "sample")
        if sampled:
            source.sample(frames, rng)
        else:
            source.max_frames = frames
        info = {"uri": source_uri, "description": source.describe(), "kind": getattr(source, "kind", None),
                "selection": f"random sample of the whole source, seed {seed}" if sampled
                else f"first {frames} frames, shuffled with seed {seed}", "seed": seed}
        for frame in source:
            if frame.error is not None or frame.image is None:
                skipped += 1
                warn(f"edgeexit: warning: skipped {frame.name}: {frame.error or 'no image'}")
                continue
            try:
                xs.append(preprocess(frame.image))
            except Exception as exc:  # noqa: BLE001
                skipped += 1
                warn(f"edgeexit: warning: skipped {frame.name}: cannot preprocess: {type(exc).__name__}: {exc}")
                continue
            labels.append(frame.label)
    if not xs:
        raise ValueError(f"no usable frame in {source_uri}")
    order = rng.permutation(len(xs))
    distinct = len(xs)
    x = np.stack(xs)[order]
    labels = [labels[i] for i in order]
    reps = math.ceil(frames / distinct)
    if reps > 1:
        x = np.concatenate([x] * reps)[:frames]
        labels = (labels * reps)[:frames]
    x = np.ascontiguousarray(x, dtype=np.float32)
    lab = np.asarray(labels, dtype=np.int64) if all(v is not None for v in labels) else None
    info.update(frames=int(x.shape[0]), distinct_frames=distinct, skipped=skipped, labelled=lab is not None)
    return x, lab, info


# ----------------------------------------------------------------------------------------------------------------
# energy from the reading
# ----------------------------------------------------------------------------------------------------------------
def _rails(reading: Any) -> List[str]:
    names: List[str] = []
    for _, w in getattr(reading, "samples", []) or []:
        for k in w:
            if k != "total" and k not in names:
                names.append(k)
    return names


def _label_energy(reading: Any, label: str) -> Dict[str, Any]:
    """Joules and seconds of every window labelled ``label`` (per rail too), summed over the windows."""
    if reading is None:
        return {"joules": float("nan"), "seconds": 0.0, "per_rail": {}, "windows": 0}
    joules, seconds, windows = 0.0, 0.0, 0
    per_rail: Dict[str, float] = {r: 0.0 for r in _rails(reading)}
    for seg in reading.segments():
        if seg["label"] != label:
            continue
        windows += 1
        joules += seg["joules"]
        seconds += seg["duration_s"]
        for r in per_rail:
            per_rail[r] += reading.energy_between(seg["start"], seg["end"], rail=r)
    if windows == 0:
        joules = float("nan")
    return {"joules": joules, "seconds": seconds, "per_rail": per_rail, "windows": windows}


# ----------------------------------------------------------------------------------------------------------------
# the cost model: boundary and per-segment / per-head costs from stage times
# ----------------------------------------------------------------------------------------------------------------
def boundary_estimate(stage_values: Sequence[float], monolithic: float, internal_head_macs: float,
                      monolithic_macs: float) -> Tuple[Optional[float], Optional[str]]:
    """The per-call overhead from the stages alone and full.onnx alone (module docstring, step 3)::

        boundary = (T_s - T_m - h * T_m) / (S - 1 - h),   h = internal_head_macs / monolithic_macs

    clamped to [0, the cheapest stage]. Returns (boundary, note): (None, why) for a single stage or missing
    values; a note when it was clamped."""
    values = [float(v) for v in stage_values]
    s = len(values)
    if s < 2:
        return None, "one stage: the per-call overhead cannot be separated from compute (export internal exits)"
    if not all(_finite(v) for v in values + [monolithic]) or not monolithic_macs > 0:
        return None, "stage or full.onnx value missing"
    h = float(internal_head_macs) / float(monolithic_macs)
    t_s, t_m = sum(values), float(monolithic)
    b = (t_s - t_m - h * t_m) / (s - 1 - h)
    top = min(values + [t_m])
    if b < 0:
        return 0.0, (f"chaining measured no overhead ({b:.3g} from the formula, noise): boundary set to 0")
    if b > top:
        return top, f"boundary {b:.3g} from the formula exceeds the cheapest call {top:.3g}: clamped"
    return b, None


def split_stage_costs(stage_values: Sequence[float], boundary: float, segment_macs: Sequence[int],
                      head_macs: Sequence[int], kept_internal: Sequence[int]) -> Tuple[List[float], List[float]]:
    """(segments, heads): one compute-only cost per segment and per head of all E exits. Stage j's compute
    ``stage_values[j] - boundary`` (floored at 0) is divided among its segments and its head by MACs; a head that
    is not kept gets its MACs x the rate of the stage its exit sits in. With these,
    ``stages.exit_costs(segments, heads, kept_internal, boundary)[j] == sum(stage_values[:j + 1])``."""
    e = len(segment_macs)
    ranges = stage_ranges(kept_internal, e)
    if len(ranges) != len(stage_values):
        raise ValueError(f"{len(stage_values)} stage values for a pipeline of {len(ranges)} stages")
    segments, heads = [0.0] * e, [0.0] * e
    for (first, last), value in zip(ranges, stage_values):
        macs = sum(int(segment_macs[i]) for i in range(first, last + 1)) + int(head_macs[last])
        rate = max(0.0, float(value) - float(boundary)) / macs if macs > 0 else 0.0
        for i in range(first, last + 1):
            segments[i] = rate * int(segment_macs[i])
            heads[i] = rate * int(head_macs[i])  # i < last: a head this pipeline does not run, at its stage's rate
    return segments, heads


def _cost_model(stage_values: List[Any], mono: Any, ctx: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Boundary, segments and heads of one metric (None when a value is missing or the boundary is undefined)."""
    if not stage_values or not all(_finite(v) for v in stage_values) or not _finite(mono):
        return None
    kept = list(ctx["kept_internal"])
    head_macs = ctx["head_macs"]
    b, note = boundary_estimate(stage_values, mono, sum(head_macs[k] for k in kept), ctx["monolithic_macs"])
    if b is None:
        return {"boundary": None, "note": note}
    segments, heads = split_stage_costs(stage_values, b, ctx["segment_macs"], head_macs, kept)
    predicted = exit_costs(segments, heads, kept, b)
    return {"segments": segments, "heads": heads, "boundary": b, "note": note, "split": SPLIT_RULE,
            "exit_costs": [float(v) for v in predicted],
            "reference": reference_cost(segments, heads, b)}


# ----------------------------------------------------------------------------------------------------------------
# result assembly
# ----------------------------------------------------------------------------------------------------------------
def _part_dict(part: PartResult, reading: Any, is_estimate: bool, rate_hz: Optional[float]) -> Dict[str, Any]:
    stats = latency_summary(part.times_ms)
    d: Dict[str, Any] = {
        "index": part.index, "name": part.label, "rows": part.rows, "macs": part.macs,
        "latency_ms": stats,
        "latency_ms_per_frame": stats[COST_STATISTIC] / part.rows if part.rows else float("nan"),
        "energy_mj": None,
        "notes": list(part.notes),
    }
    if part.kind == "stage":
        d.update(exit=part.exit, segments=list(part.segments))
    if reading is not None:
        e = _label_energy(reading, part.label)
        watts = e["joules"] / e["seconds"] if e["seconds"] > 0 else float("nan")
        per_call = watts * stats[COST_STATISTIC]  # W x ms = mJ
        d["energy_mj"] = {
            "per_call": per_call,
            "per_frame": per_call / part.rows if part.rows else float("nan"),
            "mean_watts": watts,
            "per_rail_per_frame": {r: (j / e["seconds"]) * stats[COST_STATISTIC] / part.rows if e["seconds"] > 0 else None
                                   for r, j in e["per_rail"].items()},
            "window_s": e["seconds"],
            "label": _energy_label(is_estimate),
        }
        if rate_hz and not is_estimate and e["seconds"] * rate_hz < MIN_WINDOW_SAMPLES:
            d["notes"].append(f"power window {e['seconds'] * 1e3:.1f} ms spans fewer than {MIN_WINDOW_SAMPLES} "
                              f"samples at {rate_hz:g} Hz: energy is coarse")
    return d


def _run_dict(run: RunResult, reading: Any, is_estimate: bool, num_exits: int, batch: int) -> Dict[str, Any]:
    stats = latency_summary(run.batch_ms)
    hist = [0] * num_exits
    for e in run.exits:
        if 0 <= e < num_exits:
            hist[e] += 1
    d: Dict[str, Any] = {
        "frames": run.frames,
        "batches": len(run.batch_ms),
        "batch": batch,
        "latency_ms": stats,  # per batch call = what a frame waits for its decision (per frame at batch 1)
        "throughput_fps": run.frames / run.wall_s if run.wall_s > 0 else float("nan"),
        "wall_s": run.wall_s,
        "exit_histogram": hist,
        "mean_exit": float(np.mean(run.exits)) if run.exits else float("nan"),
        "failed": run.failed,
        "accuracy": (run.correct / run.labelled) if run.correct is not None and run.labelled else None,
        "energy_mj_per_frame": None,
    }
    if reading is not None:
        e = _label_energy(reading, run.mode)
        d["energy_mj_per_frame"] = {
            "total": e["joules"] * 1e3 / run.frames if run.frames else float("nan"),
            "per_rail": {r: j * 1e3 / run.frames for r, j in e["per_rail"].items()} if run.frames else {},
            "mean_watts": e["joules"] / e["seconds"] if e["seconds"] > 0 else float("nan"),
            "joules": e["joules"],
            "window_s": e["seconds"],
            "windows": e["windows"],
            "label": _energy_label(is_estimate),
        }
    return d


def _ratio_saving(a: Any, f: Any) -> Optional[float]:
    if _finite(a) and _finite(f) and f > 0:
        return 1.0 - float(a) / float(f)
    return None


def _savings(runs: Dict[str, Dict[str, Any]], stages: List[Dict[str, Any]], mono: Optional[Dict[str, Any]],
             kept: Sequence[int], is_estimate: bool) -> Dict[str, Any]:
    a, f = runs.get("adaptive"), runs.get("full")
    if not a or not f:
        return {}
    out: Dict[str, Any] = {
        "latency_mean": _ratio_saving(a["latency_ms"]["mean"], f["latency_ms"]["mean"]),
        "latency_p50": _ratio_saving(a["latency_ms"]["median"], f["latency_ms"]["median"]),
        "latency_p95": _ratio_saving(a["latency_ms"]["p95"], f["latency_ms"]["p95"]),
        "wall_time": _ratio_saving(a["wall_s"], f["wall_s"]),
        "speedup": (f["latency_ms"]["mean"] / a["latency_ms"]["mean"]) if _finite(a["latency_ms"]["mean"])
        and a["latency_ms"]["mean"] > 0 else None,
        "throughput_gain": (a["throughput_fps"] / f["throughput_fps"]) if _finite(a["throughput_fps"])
        and _finite(f["throughput_fps"]) and f["throughput_fps"] > 0 else None,
        "energy": None,
        "energy_label": None,
    }
    ea, ef = a.get("energy_mj_per_frame"), f.get("energy_mj_per_frame")
    if ea and ef:
        out["energy"] = _ratio_saving(ea["total"], ef["total"])
        out["energy_label"] = _energy_label(is_estimate)
    c = runs.get("chain")
    if c:
        out["chain_over_full"] = (c["latency_ms"]["mean"] / f["latency_ms"]["mean"]
                                  if _finite(c["latency_ms"]["mean"]) and f["latency_ms"]["mean"] > 0 else None)
    # what the stages alone predict for this exit mix (each kept exit: the stages up to it)
    if stages and mono:
        hist = np.asarray([a["exit_histogram"][k] for k in kept], dtype=np.float64)
        pred: Dict[str, Any] = {}
        for key, get in (("latency_ms", lambda p: p["latency_ms_per_frame"]),
                         ("energy_mj", lambda p: (p["energy_mj"] or {}).get("per_frame"))):
            values = [get(p) for p in stages]
            m = get(mono)
            if not all(_finite(v) for v in values + [m]) or hist.sum() <= 0:
                continue
            cum = np.cumsum(values)
            adaptive = float(np.dot(hist, cum) / hist.sum())
            pred[key] = {"adaptive": adaptive, "full": float(m), "chain": float(cum[-1]),
                         "saving": _ratio_saving(adaptive, m)}
            if key == "latency_ms":  # measured per-frame time (same statistic) minus what the calls alone take
                for mode, p in (("adaptive", adaptive), ("full", float(m)), ("chain", float(cum[-1]))):
                    run = runs.get(mode)
                    if run:
                        per_frame = run["latency_ms"][COST_STATISTIC] / run["batch"]
                        pred[key][f"measured_{mode}"] = per_frame
                        pred[key][f"overhead_{mode}"] = per_frame - p
        out["predicted_from_stages"] = pred
    return out


def _trace(reading: Any) -> Optional[Dict[str, Any]]:
    if reading is None or not reading.samples:
        return None
    samples = reading.samples
    step = max(1, math.ceil(len(samples) / TRACE_POINTS))
    kept = samples[::step]
    if kept[-1] is not samples[-1]:
        kept.append(samples[-1])
    t0 = reading.start_time
    keys = ["total"] + _rails(reading)
    trace: Dict[str, Any] = {"t": [t - t0 for t, _ in kept]}
    for k in keys:
        trace[k] = [w.get(k, float("nan")) for _, w in kept]
    trace["spans"] = [{"label": s["label"], "start": s["start"] - t0, "end": s["end"] - t0}
                      for s in reading.segments()]
    trace["decimated_by"] = step
    return trace


def costs_from_profile(result: Dict[str, Any], metric: str = "latency_ms") -> Dict[str, Any]:
    """The ``costs.json`` document (schema ``edgeexit-costs/2``, docs/architecture.md "Device costs") of a complete
    profile: per-frame compute-only costs of every segment and head of the model (stage time split by MAC
    share, module docstring) and the per-call ``boundary``; ``segments``/``heads``/``boundary`` hold ``metric``.
    ValueError (one line) when the chosen metric could not be derived."""
    if metric not in COST_METRICS:
        raise ValueError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, got {metric!r}")
    model = result.get("cost_model") or {}
    stages = result.get("stages") or []
    e = result["bundle"]["num_exits"]
    if not stages or not result.get("monolithic"):
        raise ValueError("the profile is incomplete: costs.json needs every stage and full.onnx")
    meter = result.get("meter") or {}
    is_estimate = bool(meter.get("is_estimate"))
    batch = result["settings"]["batch"]

    def entry(key: str, extra: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        m = model.get(key)
        if not m or m.get("boundary") is None:
            return None
        return {"segments": [_sig(v) for v in m["segments"]], "heads": [_sig(v) for v in m["heads"]],
                "boundary": _sig(m["boundary"]), "split": SPLIT_RULE, "per": "frame", "batch": batch, **extra}

    latency = entry("latency_ms", {"statistic": COST_STATISTIC, "label": "measured"})
    if latency is None:
        why = (model.get("latency_ms") or {}).get("note") or "latency could not be measured for every stage"
        raise ValueError(f"costs.json needs the per-call overhead: {why}")
    measured: Dict[str, Any] = {
        "latency_ms": latency,
        "energy_mj": entry("energy_mj", {"statistic": f"mean power x {COST_STATISTIC} latency", "meter": meter.get("name"),
                                         "is_estimate": is_estimate, "label": _energy_label(is_estimate)})
        if meter else None,
    }
    chosen = measured[metric]
    if chosen is None:
        raise ValueError("energy_mj was not measured (no power meter, or its readings failed): "
                         "profile with --meter (or --meter constant --power-watts W for an estimate), "
                         "or use --cost-metric latency_ms")
    kept = list(result["bundle"]["kept_exits"])
    return {
        "schema": COSTS_SCHEMA,
        "metric": metric,
        "device": _device_string(result["device"]),
        "backend": result["backend"]["description"],
        "segments": list(chosen["segments"]),
        "heads": list(chosen["heads"]),
        "boundary": chosen["boundary"],
        "split": SPLIT_RULE,
        "gate": result["bundle"].get("gate"),
        "stages": [{"exits": kept, "index": s["index"], "exit": s["exit"], "segments": s["segments"],
                    "latency_ms": _sig(s["latency_ms_per_frame"]),
                    "energy_mj": _sig(s["energy_mj"]["per_frame"]) if s.get("energy_mj")
                    and _finite(s["energy_mj"].get("per_frame")) else None}
                   for s in stages],
        "measured": measured,
        "label": chosen["label"],
        "is_estimate": metric == "energy_mj" and is_estimate,
        "bundle": result["bundle"]["name"],
        "num_exits": e,
        "batch": batch,
        "clocks_locked": result["clocks_locked"],
        "created": result["created"],
        "edgeexit_version": result["versions"]["edgeexit"],
    }


def _exit_rows(stages: List[Dict[str, Any]], mono: Optional[Dict[str, Any]], ctx: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Leaving at each kept exit (the stages up to it, measured alone) against full.onnx."""
    if not stages or mono is None:
        return []
    ref_ms = mono["latency_ms_per_frame"]
    ref_mj = (mono["energy_mj"] or {}).get("per_frame")
    ref_macs = ctx.get("reference_macs") or 0
    rows, cum_ms, cum_mj = [], 0.0, 0.0
    for s, macs in zip(stages, ctx.get("exit_macs") or [None] * len(stages)):
        cum_ms += s["latency_ms_per_frame"]
        mj = (s["energy_mj"] or {}).get("per_frame")
        cum_mj = cum_mj + mj if _finite(mj) and cum_mj is not None else None
        rows.append({"index": s["exit"], "stages": s["index"] + 1, "cumulative_latency_ms": cum_ms,
                     "latency_fraction": cum_ms / ref_ms if _finite(ref_ms) and ref_ms > 0 else None,
                     "cumulative_energy_mj": cum_mj, "cumulative_macs": macs,
                     "macs_fraction": macs / ref_macs if macs is not None and ref_macs else None})
    rows.append({"index": "full", "stages": None, "cumulative_latency_ms": ref_ms, "latency_fraction": 1.0,
                 "cumulative_energy_mj": ref_mj if _finite(ref_mj) else None, "cumulative_macs": ref_macs or None,
                 "macs_fraction": 1.0 if ref_macs else None})
    return rows


def build_result(prof: Optional[Profiler], ctx: Dict[str, Any], complete: bool, interrupted: bool) -> Dict[str, Any]:
    """profile.json as a dict (numbers may still be NaN: ``_clean`` before writing)."""
    reading = prof.reading if prof is not None else None
    meter = ctx.get("meter_obj")
    is_estimate = bool(getattr(meter, "is_estimate", False))
    rate = getattr(meter, "rate_hz", None) if meter is not None and not is_estimate else None
    parts = prof.parts if prof is not None else []
    stages = [_part_dict(p, reading, is_estimate, rate) for p in parts if p.kind == "stage"]
    monos = [_part_dict(p, reading, is_estimate, rate) for p in parts if p.kind == "monolithic"]
    mono = monos[0] if monos else None
    e = ctx["num_exits"]
    kept = list(ctx["kept"])
    cost_model: Dict[str, Any] = {}
    if mono is not None and len(stages) == len(kept):
        cost_model["latency_ms"] = _cost_model([s["latency_ms_per_frame"] for s in stages],
                                               mono["latency_ms_per_frame"], ctx)
        cost_model["energy_mj"] = _cost_model([(s["energy_mj"] or {}).get("per_frame") for s in stages],
                                              (mono["energy_mj"] or {}).get("per_frame"), ctx)
    runs = {m: _run_dict(r, reading, is_estimate, e, ctx["batch"]) for m, r in (prof.runs.items() if prof else [])}
    meter_info = None
    if meter is not None:
        meter_info = {
            "name": getattr(meter, "name", "?"), "spec": ctx["meter_spec"], "description": getattr(meter, "description", ""),
            "is_estimate": is_estimate, "label": _energy_label(is_estimate), "rate_hz": rate, "rails": _rails(reading),
            "reading": reading.to_dict() if reading is not None else None,
        }
        if is_estimate:
            meter_info["watts"] = getattr(meter, "watts", None)
    notes = list(ctx.get("notes", [])) + (list(prof.notes) if prof else [])
    for p in stages + monos:
        notes += [f"{p['name']}: {n}" for n in p["notes"]]
    for key, m in cost_model.items():
        if m and m.get("note"):
            notes.append(f"boundary ({key}): {m['note']}")
    noisy = [p["name"] for p in stages + monos if _finite(p["latency_ms"]["cv"]) and p["latency_ms"]["cv"] > 0.5]
    if noisy:
        notes.append(f"latency varies a lot (CV > 50%) for {', '.join(noisy)}: outliers (other load, clock changes) "
                     "widen every statistic; close other programs, lock clocks, or raise --iterations")
    if is_estimate:
        notes.append("energy figures are estimates (constant power x time), not measurements; with a constant power "
                     "energy costs are proportional to latency")
    return {
        "schema": PROFILE_SCHEMA,
        "created": ctx["created"],
        "complete": complete,
        "interrupted": interrupted,
        "bundle": {"path": ctx["bundle_path"], "name": ctx["bundle_name"], "num_exits": e,
                   "num_classes": ctx.get("num_classes"), "input_shape": ctx.get("input_shape"),
                   "edgeexit_version": ctx.get("bundle_version"), "gate": ctx.get("gate"), "kept_exits": kept,
                   "segment_macs": list(ctx["segment_macs"]), "head_macs": list(ctx["head_macs"]),
                   "policy": ctx.get("policy")},
        "source": ctx.get("source"),
        "device": ctx["device"],
        "backend": ctx["backend"],
        "versions": ctx["versions"],
        "meter": meter_info,
        "energy_label": _energy_label(is_estimate) if meter is not None else None,
        "clocks_locked": ctx["clocks_locked"],
        "settings": {
            "batch": ctx["batch"], "frames": ctx.get("frames"), "warmup_ms": ctx["warmup_ms"],
            "warmup_actual_ms": prof.warmup_s * 1e3 if prof else None,
            "warmup_passes": prof.warmup_passes if prof else None,
            "iterations": ctx["iterations"], "block": ctx.get("block"), "seed": ctx.get("seed"),
            "cost_metric": ctx["cost_metric"], "timer": "time.perf_counter_ns", "cost_statistic": COST_STATISTIC,
            "bound_buffers": True,
        },
        "stages": stages,
        "monolithic": mono,
        "cost_model": cost_model,
        "exits": _exit_rows(stages, mono, ctx),
        "runs": runs,
        "savings": _savings(runs, stages, mono, kept, is_estimate),
        "power_trace": _trace(reading),
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------------------------
def _ms(v: Any) -> str:
    if not _finite(v):
        return "-"
    v = float(v)
    return f"{v:.4f}" if v < 10 else f"{v:.2f}"


def _mj(v: Any) -> str:
    if not _finite(v):
        return "-"
    v = float(v)
    return f"{v:.4g}"


def _pct(v: Any) -> str:
    return f"{100 * float(v):+.1f}%" if _finite(v) else "-"


def _stat_cells(s: Dict[str, Any]) -> List[str]:
    return [_ms(s["mean"]), _ms(s["median"]), _ms(s["p90"]), _ms(s["p95"]), _ms(s["p99"]), _ms(s["min"]),
            _ms(s["max"]), f"{100 * s['cv']:.1f}" if _finite(s["cv"]) else "-"]


def table_rows(result: Dict[str, Any]) -> Tuple[List[str], List[List[List[str]]]]:
    """Header and sections of rows of the profile table (strings)."""
    label = result.get("energy_label")
    energy_head = "energy/frame mJ" + (f" ({label})" if label == "estimate" else "")
    header = ["part", "runs", "mean ms", "median", "p90", "p95", "p99", "min", "max", "CV %", energy_head, "notes"]
    parts: List[List[str]] = []
    for p in result["stages"] + ([result["monolithic"]] if result.get("monolithic") else []):
        s = p["latency_ms"]
        en = p["energy_mj"]
        what = (f"exit {p['exit']}, segments {p['segments'][0]}-{p['segments'][1]}" if "exit" in p
                else "the plain network, one call")
        parts.append([
            p["name"] + (f" (x{p['rows']})" if p["rows"] != 1 else ""), str(s["count"]), *_stat_cells(s),
            (_mj(en["per_frame"]) + (" est." if en["label"] == "estimate" else "")) if en else "-",
            "; ".join([what] + ([f"avg {en['mean_watts']:.3g} W"] if en and _finite(en.get("mean_watts")) else [])
                      + list(p.get("notes") or [])),
        ])
    lat = (result.get("cost_model") or {}).get("latency_ms") or {}
    mj = (result.get("cost_model") or {}).get("energy_mj") or {}
    if lat:
        parts.append(["boundary (per call)", "", _ms(lat.get("boundary")), "", "", "", "", "", "", "",
                      _mj(mj.get("boundary")) if mj else "-",
                      lat.get("note") or "(stages summed - full.onnx - heads at its rate) / extra calls"])
    exits: List[List[str]] = []
    for x in result.get("exits", []):
        name = "leave at full.onnx" if x["index"] == "full" else f"leave at exit {x['index']}"
        frac = x.get("latency_fraction")
        mfrac = x.get("macs_fraction")
        est = " est." if label == "estimate" and _finite(x.get("cumulative_energy_mj")) else ""
        exits.append([name, "", _ms(x["cumulative_latency_ms"]), "", "", "", "", "", "", "",
                      _mj(x.get("cumulative_energy_mj")) + est,
                      (f"{100 * frac:.0f}% of full.onnx time" if _finite(frac) else "")
                      + (f"; MACs {100 * mfrac:.0f}%" if _finite(mfrac) else "")])
    runs: List[List[str]] = []
    for mode in MODES:
        r = result["runs"].get(mode)
        if not r:
            continue
        s = r["latency_ms"]
        en = r["energy_mj_per_frame"]
        extra = f"{r['throughput_fps']:.1f} fps; exits {r['exit_histogram']}"
        if r.get("accuracy") is not None:
            extra += f"; acc {100 * r['accuracy']:.1f}%"
        if r.get("failed"):
            extra += f"; {r['failed']} failed"
        runs.append([f"{mode} (batch {r['batch']})", str(r["frames"]), *_stat_cells(s),
                     (_mj(en["total"]) + (" est." if en["label"] == "estimate" else "")) if en else "-", extra])
    sv = result.get("savings") or {}
    if sv:
        extra = f"speedup x{sv['speedup']:.2f}" if _finite(sv.get("speedup")) else ""
        if _finite(sv.get("throughput_gain")):
            extra += f"; throughput x{sv['throughput_gain']:.2f}"
        if _finite(sv.get("chain_over_full")):
            extra += f"; chain / full x{sv['chain_over_full']:.2f}"
        pred = (sv.get("predicted_from_stages") or {}).get("latency_ms")
        if pred and _finite(pred.get("saving")):
            extra += f"; stages alone predict {_pct(-pred['saving'])}"
            if _finite(pred.get("overhead_adaptive")) and _finite(pred.get("overhead_full")):
                extra += (f"; host overhead {pred['overhead_adaptive']:.3g} / {pred['overhead_full']:.3g} "
                          f"ms per frame")
        # savings are reductions: shown as negative changes of adaptive vs full
        neg = lambda v: _pct(-v) if _finite(v) else "-"  # noqa: E731
        runs.append(["adaptive vs full (change)", "", neg(sv.get("latency_mean")), neg(sv.get("latency_p50")), "",
                     neg(sv.get("latency_p95")), "", "", "", "",
                     neg(sv.get("energy")) + (" est." if sv.get("energy_label") == "estimate" and
                                              sv.get("energy") is not None else ""), extra])
    return header, [parts, exits, runs]


def render_table(result: Dict[str, Any], file: Optional[TextIO] = None) -> None:
    """Print the profile table (rich when available, else plain text)."""
    file = file if file is not None else sys.stdout
    header, sections = table_rows(result)
    dev = result["device"]
    meter = result.get("meter")
    mtxt = "no power meter" if not meter else f"meter {meter['name']}" + (" (ESTIMATE)" if meter["is_estimate"] else "")
    b = result["bundle"]
    title = (f"edgeexit profile: {b['name']} (gate {b.get('gate')}, stages end at exits "
             f"{', '.join(map(str, b.get('kept_exits') or []))}) on {_device_string(dev)}, "
             f"{result['backend']['description']}; {mtxt}; clocks {clocks_text(result['clocks_locked'])}")
    if not result.get("complete"):
        title += " [INTERRUPTED: partial]"
    try:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        print(title, file=file)
        widths = [max(len(str(r[c])) for r in [header] + [row for sec in sections for row in sec])
                  for c in range(len(header))]
        for sec in [[header]] + sections:
            for row in sec:
                print("  ".join(str(v).ljust(w) if c in (0, len(row) - 1) else str(v).rjust(w)
                                for c, (v, w) in enumerate(zip(row, widths))).rstrip(),
                      file=file)
        file.flush()
        return
    table = Table()  # the title goes on a line of its own: as a table title it would wrap at the table's width
    for c, name in enumerate(header):
        table.add_column(name, justify="left" if c in (0, len(header) - 1) else "right")
    first = True
    for sec in sections:
        if not sec:
            continue
        if not first:
            table.add_section()
        first = False
        for row in sec:
            table.add_row(*row)
    isatty = hasattr(file, "isatty") and file.isatty()
    console = Console(file=file, width=None if isatty else 170, highlight=False)
    console.print(title, markup=False)
    console.print(table)
    if result.get("notes"):
        for n in result["notes"]:
            console.print(f"note: {n}", markup=False)




def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Strict JSON (numbers rounded to 9 significant digits, NaN -> null), written atomically."""
    from ..jsonio import write_json as _write  # noqa: PLC0415

    _write(path, data, digits=9)

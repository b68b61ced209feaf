"""``edgeexit profile``: latency and energy of a bundle on this device, fed back into calibration (torch-free).

What it measures, in one process, on the frames of one SOURCE (read once, preprocessed, kept in memory so that
decoding is not timed; a source with fewer frames than ``--frames`` is cycled):

1. **Warm-up** (as trtexec): every segment and head runs on real frames for ``warmup_ms`` (at least one pass).
   The first pass records what each engine sees in the chain: the features segment i-1 produces for real frames
   (segment i's input) and head i-1's CAM (head i's ``prev_cam``), for up to ``RECORD_FRAMES`` frames.
2. **Each segment alone, each head alone** on those recorded inputs, ``iterations`` timed calls each
   (``time.perf_counter_ns`` around ``engine.run``, exactly the call the chain makes, kept outputs included).
   On a GPU backend the recorded input is first put back on the device by running the producing engine once
   (untimed, outside the energy window), so a timed call pays what it pays inside the chain: no host copy.
   With a sampled power meter each loop also runs until it spans ``MIN_WINDOW_SAMPLES`` meter samples.
   Statistics as trtexec reports them: min, mean, median, p90, p95, p99, max, coefficient of variation.
3. **Adaptive and full depth on the same frames**, back to back (``full``: every segment, last head only, the
   plain network): latency per batch (= per frame at batch 1), throughput over the wall time, exit histogram,
   energy per frame from the meter's marks ("adaptive", "full") and ``EnergyReading.segments()``, per rail where
   the meter has rails, and the saving of adaptive over full.

Energy of a segment / head = the meter's mean power during its timing loop x its mean latency
(W x ms = mJ). With ``--meter constant --power-watts W`` every energy figure is an *estimate* and says so
("label": "estimate") in the table, ``profile.json``, ``costs.json`` and the plot titles.

Outputs (``out`` directory): ``profile.json`` (everything), ``costs.json`` (docs/architecture.md "Device costs",
read by ``edgeexit calibrate --costs``), and three PNG plots (``edgeexit.runtime.plots_profile``; skipped with one
line when matplotlib is missing). Files are written atomically. Ctrl-C / SIGTERM: what was measured so far is
printed (and written to profile.json, marked incomplete; costs.json needs every segment and head), exit code 130.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

__all__ = [
    "COSTS_SCHEMA",
    "PROFILE_SCHEMA",
    "COST_METRICS",
    "latency_summary",
    "costs_from_profile",
    "profile_command",
    "render_table",
    "Profiler",
]

COSTS_SCHEMA = "edgeexit-costs/1"
PROFILE_SCHEMA = "edgeexit-profile/1"
COST_METRICS = ("latency_ms", "energy_mj")
STAT_KEYS = ("count", "min", "mean", "median", "p90", "p95", "p99", "max", "std", "cv")
RECORD_FRAMES = 32  # distinct real frames whose intermediate tensors are recorded for the per-part loops
MIN_WINDOW_SAMPLES = 10  # a sampled meter's per-part window spans at least this many sample periods
MAX_PART_SECONDS = 30.0  # a per-part loop that has its iterations stops extending its window after this
TRACE_POINTS = 20000  # power-trace points kept in profile.json (decimated beyond)
HEAD_OUTPUTS = ("class", "signals", "cam")


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


def _clean(value: Any) -> Any:
    """Strict-JSON copy: numpy -> Python, non-finite floats -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return _sig(f, 9) if math.isfinite(f) else None
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    return value


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


def _clocks_value(locked: Optional[bool]) -> Any:
    return "unknown" if locked is None else bool(locked)


def _clocks_text(value: Any) -> str:
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
    """One segment or head measured alone."""

    kind: str  # "segment" | "head"
    index: int
    rows: int  # batch rows per call
    times_ms: List[float]
    macs: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind}_{self.index}"


@dataclass
class RunResult:
    """The adaptive chain or the full-depth baseline over all frames."""

    mode: str  # "adaptive" | "full"
    frames: int
    batch_ms: List[float]
    wall_s: float
    exits: List[int]
    failed: int
    correct: Optional[int]
    labelled: int


class Profiler:
    """Runs the measurement steps on an open backend; results accumulate in attributes as each step finishes, so
    an interrupted profile still reports what it measured."""

    def __init__(self, bundle: Any, backend: Any, meter: Any = None, *, batch: int = 1, warmup_ms: float = 200.0,
                 iterations: int = 200, log: Callable[[str], None] = lambda _m: None,
                 min_window_s: Optional[float] = None):
        from .chain import ExitRunner  # noqa: PLC0415

        self.bundle = bundle
        self.backend = backend
        self.meter = meter
        self.batch = int(batch)
        self.warmup_ms = float(warmup_ms)
        self.iterations = int(iterations)
        self.log = log
        self.adaptive = ExitRunner(bundle, backend)
        self.full = ExitRunner(bundle, backend, full=True)
        self.num_exits = backend.num_exits
        sampled = meter is not None and not getattr(meter, "is_estimate", False) and hasattr(meter, "rate_hz")
        if min_window_s is None:
            min_window_s = MIN_WINDOW_SAMPLES / float(meter.rate_hz) if sampled else 0.0
        self.min_window_s = float(min_window_s)
        self.records: List[Dict[str, Any]] = []
        self.warmup_s = 0.0
        self.warmup_passes = 0
        self.parts: List[PartResult] = []
        self.runs: Dict[str, RunResult] = {}
        self.reading: Any = None
        self.notes: List[str] = []
        self._staged = backend.device != "cpu"  # GPU: put recorded inputs back on the device before a loop

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

    # -- engines
    def _run_segment(self, i: int, value: Any, keep: bool) -> Any:
        seg = self.backend.segments[i]
        name = seg.output_names[0]
        return seg.run({seg.input_names[0]: value}, outputs=(name,), keep=(name,) if keep else ())[name]

    def _head_feeds(self, i: int, features: Any, prev_cam: Any) -> Dict[str, Any]:
        head = self.backend.heads[i]
        feeds = {"features": features}
        if "prev_cam" in head.input_names:
            feeds["prev_cam"] = prev_cam
        return feeds

    def _run_head(self, i: int, feeds: Dict[str, Any], keep: bool) -> Dict[str, Any]:
        return self.backend.heads[i].run(feeds, outputs=HEAD_OUTPUTS, keep=("cam",) if keep else ())

    def _pass(self, x: np.ndarray, record: bool) -> None:
        """Every segment and head once on ``x`` (host copies of each engine's inputs kept when ``record``)."""
        rec: Dict[str, Any] = {"rows": int(x.shape[0]), "seg_in": [], "head_in": []}
        feats: Any = x
        cam: Any = None
        for i in range(self.num_exits):
            if record:
                rec["seg_in"].append(feats)
            feats = self.backend.to_host(self._run_segment(i, feats, keep=False))
            feeds = self._head_feeds(i, feats, cam)
            if record:
                rec["head_in"].append(feeds)
            cam = self.backend.to_host(self._run_head(i, feeds, keep=False)["cam"])
        if record:
            self.records.append(rec)

    # -- step 1
    def warmup(self, x: np.ndarray) -> None:
        """Record the chain's intermediate tensors for up to RECORD_FRAMES frames (first pass), then keep running
        every segment and head on real frames until ``warmup_ms`` have passed; then each runner once."""
        self.mark("warmup")
        t0 = time.perf_counter()
        n = x.shape[0]
        b = min(self.batch, n)
        k = max(1, min(n // b, math.ceil(RECORD_FRAMES / b)))
        self.log(f"warm-up {self.warmup_ms:g} ms; recording the inputs of every segment and head for {k * b} frames")
        for j in range(k):
            self._pass(x[j * b:(j + 1) * b], record=True)
        self.warmup_passes = 1
        j = 0
        while (time.perf_counter() - t0) * 1e3 < self.warmup_ms:
            start = (j * b) % max(1, n - b + 1)
            self._pass(x[start:start + b], record=False)
            j += 1
            if j % k == 0:
                self.warmup_passes += 1
        self.adaptive.run_batch(x[:b])
        self.full.run_batch(x[:b])
        self.warmup_s = time.perf_counter() - t0

    # -- step 2
    def _feeds_for(self, kind: str, i: int, rec: Dict[str, Any]) -> Dict[str, Any]:
        """The timed engine's feeds for one recorded batch: host copies on CPU backends; on GPU backends the
        producing engines run once (untimed) so the inputs are device values, as inside the chain."""
        if kind == "segment":
            value = rec["seg_in"][i]
            if self._staged and i > 0:
                value = self._run_segment(i - 1, rec["seg_in"][i - 1], keep=True)
            return {self.backend.segments[i].input_names[0]: value}
        feeds = dict(rec["head_in"][i])
        if self._staged:
            feeds["features"] = self._run_segment(i, rec["seg_in"][i], keep=True)
            if "prev_cam" in feeds and i > 0:
                feeds["prev_cam"] = self._run_head(i - 1, rec["head_in"][i - 1], keep=True)["cam"]
        return feeds

    def time_part(self, kind: str, i: int) -> PartResult:
        engine = self.backend.segments[i] if kind == "segment" else self.backend.heads[i]
        label = f"{kind}_{i}"
        if kind == "segment":
            out = engine.output_names[0]
            outputs, keep = (out,), (out,)
        else:
            outputs, keep = HEAD_OUTPUTS, ("cam",)
        k = len(self.records)
        per_chunk = max(1, math.ceil(self.iterations / k))
        times: List[float] = []
        timed_ns = 0
        t_loop = time.perf_counter()
        chunk = 0
        done = False
        while not done:
            rec = self.records[chunk % k]
            if self._staged:
                self.mark("stage")
            feeds = self._feeds_for(kind, i, rec)
            if self._staged or chunk == 0:
                self.mark(label)
            for _ in range(per_chunk):
                t0 = time.perf_counter_ns()
                engine.run(feeds, outputs=outputs, keep=keep)
                dt = time.perf_counter_ns() - t0
                times.append(dt / 1e6)
                timed_ns += dt
                if len(times) >= self.iterations and (
                    timed_ns / 1e9 >= self.min_window_s or time.perf_counter() - t_loop > MAX_PART_SECONDS
                ):
                    done = True
                    break
            chunk += 1
        self.mark("idle")
        rows = int(self.records[0]["rows"])
        entry = (self.bundle.segments if kind == "segment" else self.bundle.heads)[i]
        part = PartResult(kind, i, rows, times, macs=int(getattr(entry, "macs", 0) or 0))
        if len(times) > self.iterations:
            part.notes.append(f"ran {len(times)} iterations so the power window spans "
                              f"{MIN_WINDOW_SAMPLES} meter samples")
        self.parts.append(part)
        return part

    def time_parts(self) -> None:
        for kind in ("segment", "head"):
            for i in range(self.num_exits):
                part = self.time_part(kind, i)
                s = latency_summary(part.times_ms)
                self.log(f"{part.label}: mean {s['mean']:.4f} ms, median {s['median']:.4f} ms, "
                         f"p99 {s['p99']:.4f} ms ({s['count']} runs)")

    # -- step 3
    def run_modes(self, x: np.ndarray, labels: Optional[np.ndarray]) -> None:
        n, b = x.shape[0], self.batch
        slices = [x[s:s + b] for s in range(0, n, b)]
        for mode, runner in (("adaptive", self.adaptive), ("full", self.full)):
            batch_ms: List[float] = []
            exits: List[int] = []
            failed = 0
            correct = 0
            self.mark(mode)
            t_start = time.perf_counter_ns()
            for xb in slices:
                t0 = time.perf_counter_ns()
                decisions = runner.run_batch(xb)
                batch_ms.append((time.perf_counter_ns() - t0) / 1e6)
                for d in decisions:
                    exits.append(int(d.exit_index))
                    failed += int(bool(d.failed))
                    if labels is not None:
                        correct += int(d.class_id == labels[len(exits) - 1])
            wall_s = (time.perf_counter_ns() - t_start) / 1e9
            self.runs[mode] = RunResult(mode, n, batch_ms, wall_s, exits, failed,
                                        correct if labels is not None else None,
                                        int(labels.size) if labels is not None else 0)
            s = latency_summary(batch_ms)
            self.log(f"{mode}: mean {s['mean']:.4f} ms per batch, {n / wall_s if wall_s > 0 else float('nan'):.1f} "
                     f"frames/s")
        self.mark("end")


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
# result assembly
# ----------------------------------------------------------------------------------------------------------------
def _part_dict(part: PartResult, reading: Any, is_estimate: bool, rate_hz: Optional[float]) -> Dict[str, Any]:
    stats = latency_summary(part.times_ms)
    d: Dict[str, Any] = {
        "index": part.index, "name": part.label, "rows": part.rows, "macs": part.macs,
        "latency_ms": stats,
        "latency_ms_per_frame": stats["mean"] / part.rows if part.rows else float("nan"),
        "energy_mj": None,
        "notes": list(part.notes),
    }
    if reading is not None:
        e = _label_energy(reading, part.label)
        watts = e["joules"] / e["seconds"] if e["seconds"] > 0 else float("nan")
        per_call = watts * stats["mean"]  # W x ms = mJ
        d["energy_mj"] = {
            "per_call": per_call,
            "per_frame": per_call / part.rows if part.rows else float("nan"),
            "mean_watts": watts,
            "per_rail_per_frame": {r: (j / e["seconds"]) * stats["mean"] / part.rows if e["seconds"] > 0 else None
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
            "label": _energy_label(is_estimate),
        }
    return d


def _ratio_saving(a: Any, f: Any) -> Optional[float]:
    if _finite(a) and _finite(f) and f > 0:
        return 1.0 - float(a) / float(f)
    return None


def _savings(runs: Dict[str, Dict[str, Any]], segments: List[Dict[str, Any]], heads: List[Dict[str, Any]],
             is_estimate: bool) -> Dict[str, Any]:
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
    # what the per-part costs predict for this exit histogram (the model calibration uses)
    if len(segments) == len(heads) and segments:
        hist = np.asarray(a["exit_histogram"], dtype=np.float64)
        pred: Dict[str, Any] = {}
        for key, get in (("latency_ms", lambda p: p["latency_ms_per_frame"]),
                         ("energy_mj", lambda p: (p["energy_mj"] or {}).get("per_frame"))):
            seg = [get(p) for p in segments]
            hd = [get(p) for p in heads]
            if not all(_finite(v) for v in seg + hd) or hist.sum() <= 0:
                continue
            cum = np.cumsum(seg) + np.cumsum(hd)
            full = float(np.sum(seg) + hd[-1])
            adaptive = float(np.dot(hist, cum) / hist.sum())
            pred[key] = {"adaptive": adaptive, "full": full, "saving": _ratio_saving(adaptive, full)}
            if key == "latency_ms":  # measured per-frame time (wall / frames) minus what the engines alone take
                for mode, run, p in (("adaptive", a, adaptive), ("full", f, full)):
                    per_frame = run["wall_s"] * 1e3 / run["frames"] if run["frames"] else float("nan")
                    pred[key][f"measured_{mode}"] = per_frame
                    pred[key][f"overhead_{mode}"] = per_frame - p
        out["predicted_from_parts"] = pred
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
    """The ``costs.json`` document (docs/architecture.md, "Device costs") of a complete profile: per-frame mean
    latency (ms) and energy (mJ) of every segment and head; ``segments``/``heads`` hold the chosen ``metric``."""
    if metric not in COST_METRICS:
        raise ValueError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, got {metric!r}")
    segs, heads = result["segments"], result["heads"]
    e = result["bundle"]["num_exits"]
    if len(segs) != e or len(heads) != e:
        raise ValueError("the profile is incomplete: costs.json needs every segment and head")
    meter = result.get("meter") or {}
    is_estimate = bool(meter.get("is_estimate"))
    batch = result["settings"]["batch"]

    def values(get) -> Optional[List[float]]:
        seg = [get(p) for p in segs]
        hd = [get(p) for p in heads]
        if not all(_finite(v) and v >= 0 for v in seg + hd) or sum(seg) + hd[-1] <= 0:
            return None
        return [_sig(v) for v in seg] + [_sig(v) for v in hd]

    lat = values(lambda p: p["latency_ms_per_frame"])
    if lat is None:
        raise ValueError("latency could not be measured for every segment and head")
    measured: Dict[str, Any] = {
        "latency_ms": {"segments": lat[:e], "heads": lat[e:], "statistic": "mean", "per": "frame",
                       "batch": batch, "label": "measured"},
        "energy_mj": None,
    }
    en = values(lambda p: (p["energy_mj"] or {}).get("per_frame")) if meter else None
    if en is not None:
        measured["energy_mj"] = {"segments": en[:e], "heads": en[e:], "statistic": "mean power x mean latency",
                                 "per": "frame", "batch": batch, "meter": meter.get("name"),
                                 "is_estimate": is_estimate, "label": _energy_label(is_estimate)}
    chosen = measured[metric]
    if chosen is None:
        raise ValueError("energy_mj was not measured (no power meter, or its readings failed): "
                         "profile with --meter (or --meter constant --power-watts W for an estimate), "
                         "or use --cost-metric latency_ms")
    return {
        "schema": COSTS_SCHEMA,
        "metric": metric,
        "device": _device_string(result["device"]),
        "backend": result["backend"]["description"],
        "segments": list(chosen["segments"]),
        "heads": list(chosen["heads"]),
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


def build_result(prof: Optional[Profiler], ctx: Dict[str, Any], complete: bool, interrupted: bool) -> Dict[str, Any]:
    """profile.json as a dict (numbers may still be NaN: ``_clean`` before writing)."""
    reading = prof.reading if prof is not None else None
    meter = ctx.get("meter_obj")
    is_estimate = bool(getattr(meter, "is_estimate", False))
    rate = getattr(meter, "rate_hz", None) if meter is not None and not is_estimate else None
    parts = prof.parts if prof is not None else []
    segments = [_part_dict(p, reading, is_estimate, rate) for p in parts if p.kind == "segment"]
    heads = [_part_dict(p, reading, is_estimate, rate) for p in parts if p.kind == "head"]
    e = ctx["num_exits"]
    exits = []
    if len(segments) == e and len(heads) == e:
        seg_ms = [p["latency_ms_per_frame"] for p in segments]
        head_ms = [p["latency_ms_per_frame"] for p in heads]
        full_ms = sum(seg_ms) + head_ms[-1]
        seg_mj = [(p["energy_mj"] or {}).get("per_frame") for p in segments]
        head_mj = [(p["energy_mj"] or {}).get("per_frame") for p in heads]
        have_mj = all(_finite(v) for v in seg_mj + head_mj)
        macs = ctx.get("cumulative_macs") or []
        ref_macs = ctx.get("reference_macs") or 0
        for i in range(e):
            cum_ms = sum(seg_ms[:i + 1]) + sum(head_ms[:i + 1])
            cum_mj = sum(seg_mj[:i + 1]) + sum(head_mj[:i + 1]) if have_mj else None
            exits.append({
                "index": i, "cumulative_latency_ms": cum_ms, "latency_fraction": cum_ms / full_ms if full_ms else None,
                "cumulative_energy_mj": cum_mj,
                "cumulative_macs": macs[i] if i < len(macs) else None,
                "macs_fraction": macs[i] / ref_macs if i < len(macs) and ref_macs else None,
            })
        exits.append({"index": "full", "cumulative_latency_ms": full_ms, "latency_fraction": 1.0,
                      "cumulative_energy_mj": (sum(seg_mj) + head_mj[-1]) if have_mj else None,
                      "cumulative_macs": ref_macs or None, "macs_fraction": 1.0 if ref_macs else None})
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
    for p in segments + heads:
        notes += [f"{p['name']}: {n}" for n in p["notes"]]
    noisy = [p["name"] for p in segments + heads if _finite(p["latency_ms"]["cv"]) and p["latency_ms"]["cv"] > 0.5]
    if noisy:
        notes.append(f"latency varies a lot (CV > 50%) for {', '.join(noisy)}: outliers (other load, clock changes) "
                     "raise the means costs.json holds; close other programs, lock clocks, or raise --iterations")
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
                   "edgeexit_version": ctx.get("bundle_version"), "policy": ctx.get("policy")},
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
            "iterations": ctx["iterations"], "recorded_batches": len(prof.records) if prof else None,
            "cost_metric": ctx["cost_metric"], "timer": "time.perf_counter_ns", "cost_statistic": "mean",
            "device_inputs": bool(prof._staged) if prof else None,
        },
        "segments": segments,
        "heads": heads,
        "exits": exits,
        "runs": runs,
        "savings": _savings(runs, segments, heads, is_estimate),
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


def table_rows(result: Dict[str, Any]) -> Tuple[List[str], List[List[List[str]]]]:
    """Header and sections of rows of the profile table (strings)."""
    label = result.get("energy_label")
    energy_head = "energy/frame mJ" + (f" ({label})" if label == "estimate" else "")
    header = ["part", "runs", "mean ms", "median", "p90", "p95", "p99", "min", "max", "CV %", energy_head, "notes"]
    parts: List[List[str]] = []
    for p in result["segments"] + result["heads"]:
        s = p["latency_ms"]
        en = p["energy_mj"]
        parts.append([
            p["name"] + (f" (x{p['rows']})" if p["rows"] != 1 else ""), str(s["count"]), _ms(s["mean"]),
            _ms(s["median"]), _ms(s["p90"]), _ms(s["p95"]), _ms(s["p99"]), _ms(s["min"]), _ms(s["max"]),
            f"{100 * s['cv']:.1f}" if _finite(s["cv"]) else "-",
            (_mj(en["per_frame"]) + (" est." if en["label"] == "estimate" else "")) if en else "-",
            "; ".join(([f"avg {en['mean_watts']:.3g} W"] if en and _finite(en.get("mean_watts")) else [])
                      + list(p.get("notes") or [])),
        ])
    exits: List[List[str]] = []
    for x in result.get("exits", []):
        name = "leave at full" if x["index"] == "full" else f"leave at exit {x['index']}"
        frac = x.get("latency_fraction")
        mfrac = x.get("macs_fraction")
        est = " est." if label == "estimate" and _finite(x.get("cumulative_energy_mj")) else ""
        exits.append([name, "", _ms(x["cumulative_latency_ms"]), "", "", "", "", "", "", "",
                      _mj(x.get("cumulative_energy_mj")) + est,
                      (f"{100 * frac:.0f}% of full time" if _finite(frac) else "")
                      + (f"; MACs {100 * mfrac:.0f}%" if _finite(mfrac) else "")])
    runs: List[List[str]] = []
    for mode in ("adaptive", "full"):
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
        runs.append([f"{mode} (batch {r['batch']})", str(r["frames"]), _ms(s["mean"]), _ms(s["median"]), _ms(s["p90"]),
                     _ms(s["p95"]), _ms(s["p99"]), _ms(s["min"]), _ms(s["max"]),
                     f"{100 * s['cv']:.1f}" if _finite(s["cv"]) else "-",
                     (_mj(en["total"]) + (" est." if en["label"] == "estimate" else "")) if en else "-", extra])
    sv = result.get("savings") or {}
    if sv:
        extra = f"speedup x{sv['speedup']:.2f}" if _finite(sv.get("speedup")) else ""
        if _finite(sv.get("throughput_gain")):
            extra += f"; throughput x{sv['throughput_gain']:.2f}"
        pred = (sv.get("predicted_from_parts") or {}).get("latency_ms")
        if pred and _finite(pred.get("saving")):
            extra += f"; engines alone predict {_pct(-pred['saving'])}"
            if _finite(pred.get("overhead_adaptive")) and _finite(pred.get("overhead_full")):
                extra += (f"; host overhead {pred['overhead_adaptive']:.3g} / {pred['overhead_full']:.3g} "
                          f"ms per frame")
        energy = _pct(sv.get("energy")) if sv.get("energy") is not None else "-"
        if sv.get("energy_label") == "estimate" and energy != "-":
            energy += " est."
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
    title = (f"edgeexit profile: {result['bundle']['name']} on {_device_string(dev)}, {result['backend']['description']}; "
             f"{mtxt}; clocks {_clocks_text(result['clocks_locked'])}")
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


# ----------------------------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------------------------
def _resolve_paths(bundle_path: Optional[str], source_uri: Optional[str]) -> Tuple[str, str, bool]:
    """Bundle and source as ``edgeexit run`` resolves them (the demo bundle / samples by default)."""
    from .chain import resolve_inputs  # noqa: PLC0415

    return resolve_inputs(bundle_path, source_uri)


def _load_frames(source_uri: str, runner: Any, frames: int, warn: Callable[[str], None]
                 ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, Any]]:
    """Up to ``frames`` usable frames of the source (a folder's drawn in a seeded random order), preprocessed into one
    float32 (N, C, H, W) array; a source with fewer frames is cycled. Labels (folder classes) when every frame has one."""
    from .sources import open_source  # noqa: PLC0415

    xs: List[np.ndarray] = []
    labels: List[Optional[int]] = []
    skipped = 0
    # Seeded shuffle: a folder sorted by class would otherwise give the first --frames of its first classes only.
    with open_source(source_uri, loop=False, max_frames=frames, classes=tuple(runner.classes), shuffle_seed=0) as source:
        info = {"uri": source_uri, "description": source.describe(), "kind": getattr(source, "kind", None)}
        for frame in source:
            if frame.error is not None or frame.image is None:
                skipped += 1
                warn(f"edgeexit: warning: skipped {frame.name}: {frame.error or 'no image'}")
                continue
            try:
                xs.append(runner.preprocess(frame.image))
            except Exception as exc:  # noqa: BLE001
                skipped += 1
                warn(f"edgeexit: warning: skipped {frame.name}: cannot preprocess: {type(exc).__name__}: {exc}")
                continue
            labels.append(frame.label)
    if not xs:
        raise ValueError(f"no usable frame in {source_uri}")
    distinct = len(xs)
    reps = math.ceil(frames / distinct)
    x = np.stack(xs)
    if reps > 1:
        x = np.concatenate([x] * reps)[:frames]
        labels = (labels * reps)[:frames]
    x = np.ascontiguousarray(x, dtype=np.float32)
    lab = np.asarray(labels, dtype=np.int64) if all(v is not None for v in labels) else None
    info.update(frames=int(x.shape[0]), distinct_frames=distinct, skipped=skipped, labelled=lab is not None)
    return x, lab, info


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    from .bundle import atomic_write_text  # noqa: PLC0415

    atomic_write_text(path, json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")


def profile_command(
    bundle_path: Optional[str] = None,
    source_uri: Optional[str] = None,
    *,
    out: Optional[str] = None,
    backend: str = "auto",
    providers: Optional[str] = None,
    threads: Optional[int] = None,
    batch: int = 1,
    frames: int = 200,
    warmup_ms: float = 200.0,
    iterations: int = 200,
    meter: str = "auto",
    power_watts: Optional[float] = None,
    rate_hz: float = 100.0,
    cost_metric: str = "latency_ms",
    plots: bool = True,
    quiet: bool = False,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
    meter_root: str = "/",
) -> int:
    """``edgeexit profile`` (see the module docstring). Returns 0, or 130 when interrupted (Ctrl-C / SIGTERM).

    Expected problems raise one-line errors: ValueError (options), FileNotFoundError, BundleError, SourceError,
    BackendError, MeterError."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from .backends import open_backend  # noqa: PLC0415
    from .bundle import load_bundle  # noqa: PLC0415
    from .meters import METER_SPECS, jetson_clocks_locked, open_meter  # noqa: PLC0415

    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr

    def info(message: str) -> None:
        if not quiet:
            print(f"edgeexit: {message}", file=stderr, flush=True)

    def warn(message: str) -> None:
        print(message, file=stderr, flush=True)

    # ---- options
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {iterations}")
    if not (math.isfinite(warmup_ms) and warmup_ms >= 0):
        raise ValueError(f"--warmup-ms must be >= 0, got {warmup_ms}")
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"--rate-hz must be > 0, got {rate_hz}")
    if cost_metric not in COST_METRICS:
        raise ValueError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, got {cost_metric!r}")
    spec = (meter or "auto").strip().lower()
    if spec not in METER_SPECS:
        raise ValueError(f"--meter must be one of {', '.join(METER_SPECS)}, got {meter!r}")
    if power_watts is not None and not (math.isfinite(power_watts) and power_watts >= 0):
        raise ValueError(f"--power-watts must be a finite number >= 0, got {power_watts}")
    if power_watts is not None and spec not in ("auto", "constant"):
        raise ValueError("--power-watts goes with --meter constant (or auto, as the fallback)")

    bundle_path, source_uri, demo = _resolve_paths(bundle_path, source_uri)
    bundle_name = "demo" if demo else (Path(bundle_path).resolve().name or "bundle")
    out_dir = Path(out) if out else Path(f"profile-{bundle_name}")

    # ---- meter first: a missing sensor fails before any engine is loaded
    power = open_meter(spec, power_watts=power_watts, root=meter_root, rate_hz=rate_hz)
    if power is None and cost_metric == "energy_mj":
        raise ValueError("--cost-metric energy_mj needs a power meter (none found with --meter "
                         f"{spec}); pass --meter jetson|nvml|rapl, or --meter constant --power-watts W for an estimate")
    clocks = _clocks_value(jetson_clocks_locked(meter_root))

    bundle = load_bundle(bundle_path)
    engines = open_backend(bundle, backend, providers=providers, threads=threads, max_batch=batch)
    prof: Optional[Profiler] = None
    interrupted = False
    previous_handler: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    ctx: Dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle_path": str(bundle_path), "bundle_name": bundle_name, "num_exits": engines.num_exits,
        "num_classes": len(bundle.classes), "input_shape": list(bundle.input_shape),
        "bundle_version": getattr(bundle, "edgeexit_version", None),
        "cumulative_macs": list(getattr(bundle, "cumulative_macs", ()) or ()),
        "reference_macs": int(getattr(bundle, "reference_macs", 0) or 0),
        "device": describe_device(),
        "backend": {"kind": getattr(engines, "kind", "?"), "description": engines.describe(),
                    "providers": list(getattr(engines, "providers", []) or []),
                    "device": getattr(engines, "device", None), "threads": threads},
        "versions": describe_versions(getattr(engines, "kind", "")),
        "meter_obj": power, "meter_spec": spec, "clocks_locked": clocks,
        "batch": batch, "frames": frames, "warmup_ms": warmup_ms, "iterations": iterations,
        "cost_metric": cost_metric, "notes": [],
    }
    if clocks is False:
        ctx["notes"].append("Jetson clocks are not locked: latencies vary with DVFS (sudo jetson_clocks)")

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        if in_main:
            previous_handler = signal.signal(signal.SIGTERM, on_term)
        try:
            prof = Profiler(bundle, engines, power, batch=batch, warmup_ms=warmup_ms, iterations=iterations, log=info)
            pol = prof.adaptive.policy
            ctx["policy"] = {"gate": pol.gate, "thresholds": [float(t) for t in pol.thresholds]}
            mdesc = "no power meter" if power is None else power.description
            info(f"bundle {bundle_path} ({engines.num_exits} exits); {engines.describe()}; {mdesc}; "
                 f"clocks {_clocks_text(clocks)}")
            x, labels, src = _load_frames(source_uri, prof.adaptive, frames, warn)
            ctx["source"] = src
            ctx["frames"] = int(x.shape[0])
            info(f"input {src['description']}: {src['frames']} frames ({src['distinct_frames']} distinct), batch {batch}")
            prof.start_meter()
            prof.warmup(x)
            prof.time_parts()
            prof.run_modes(x, labels)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if prof is not None:
                prof.stop_meter()
    finally:
        if in_main and previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        engines.close()
        if power is not None:
            try:
                power.close()
            except Exception:  # noqa: BLE001
                pass

    complete = (not interrupted and prof is not None and len(prof.parts) == 2 * engines.num_exits
                and len(prof.runs) == 2)
    result = build_result(prof, ctx, complete=complete, interrupted=interrupted)
    code = 130 if interrupted else 0
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files: Dict[str, str] = {"profile": str(out_dir / "profile.json")}
        if complete:
            try:
                costs = costs_from_profile(result, cost_metric)
            except ValueError as exc:
                warn(f"edgeexit: warning: costs.json not written: {exc}")
                code = 1
            else:
                _write_json(out_dir / "costs.json", costs)
                files["costs"] = str(out_dir / "costs.json")
        if complete and plots:
            try:
                from .plots_profile import write_plots  # noqa: PLC0415

                files.update(write_plots(result, out_dir, warn=warn))
            except ImportError as exc:
                warn(f"edgeexit: matplotlib is not installed ({exc}): plots skipped (pip install 'edgeexit[plots]')")
            except Exception as exc:  # noqa: BLE001 - a plot must not lose the measurements
                warn(f"edgeexit: warning: plots failed: {type(exc).__name__}: {exc}")
        result["files"] = files
        _write_json(out_dir / "profile.json", result)
        render_table(result, stdout)
        for kind, path in files.items():
            print(f"{kind}: {path}", file=stdout)
        if interrupted:
            warn("edgeexit: interrupted: partial profile written (costs.json needs a complete profile)")
        stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        pass
    return code

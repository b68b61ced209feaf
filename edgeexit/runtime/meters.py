"""Power and energy meters behind one interface (torch-free: stdlib + numpy; ``pynvml`` imported lazily).

Meters
------
``JetsonINA3221Meter``  Jetson INA3221 rails (JetPack 5/6 hwmon driver, JetPack 4 IIO driver ``ina3221x``).
``NvmlMeter``           NVIDIA GPU via NVML: energy-counter difference when supported, else sampled power.
``RaplMeter``           Linux powercap RAPL package counters (``intel-rapl:<i>``), wrap-around handled.
``ConstantMeter``       ``watts * duration``: an *estimate*, never a measurement (``is_estimate=True``).

The sampled meters share one background sampler (default 100 Hz, ``time.monotonic()`` timestamps). A sample is
taken at ``start()`` and at ``stop()`` so the window is covered exactly; energy is the trapezoid integral of the
sampled power (except for counter-based meters, whose energy comes from the counters). ``mark(label)`` records a
named time mark (e.g. "adaptive" / "full" runs) returned in the reading. After ``start()`` a meter never raises
because of a sensor: a failed read is counted (``EnergyReading.failed_samples``) and the run goes on.

For deterministic tests every sampled meter takes ``clock=`` (a zero-argument callable returning seconds) and
``threaded=False``; ``sample_now()`` then takes one sample at the clock's current time.

Not verified on real hardware here (no Jetson, no RAPL-capable host, no pynvml in the development machine): the
sysfs layouts and the NVML calls follow the kernel / NVIDIA documentation summarised in the project reference.
"""
from __future__ import annotations

import abc
import glob
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from ..errors import EdgeexitError

__all__ = [
    "MeterError",
    "EnergyReading",
    "PowerMeter",
    "SampledMeter",
    "JetsonINA3221Meter",
    "NvmlMeter",
    "RaplMeter",
    "ConstantMeter",
    "available_meters",
    "open_meter",
    "jetson_clocks_locked",
    "METER_SPECS",
]

METER_SPECS = ("auto", "jetson", "nvml", "rapl", "constant", "none")

Sample = Tuple[float, Dict[str, float]]


class MeterError(EdgeexitError, RuntimeError):
    """A meter cannot be opened or used. The message is one line, meant to be printed without a traceback."""


# ----------------------------------------------------------------------------------------------- file helpers
def _read_text(path: str) -> str:
    """Read a small sysfs file (module-level so tests can patch it, e.g. to simulate a permission error)."""
    with open(path, "r") as f:
        return f.read().strip()


def _read_float(path: str) -> float:
    return float(_read_text(path))


def _join(root: str, rel: str) -> str:
    return os.path.join(root, rel.lstrip("/"))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


_NC_RE = re.compile(r"(^|[^A-Za-z])NC([^A-Za-z]|$)")


def _is_nc(name: str) -> bool:
    """Rail names containing the token "NC" (not connected) are ignored ("NC", "NC_2", "VDD_NC"; not "VDD_SYNC")."""
    return bool(_NC_RE.search(name))


# ------------------------------------------------------------------------------------------------ reading
def _integrate(ts: np.ndarray, ws: np.ndarray, t0: float, t1: float) -> float:
    """Trapezoid integral of the piecewise-linear trace (ts, ws) over [t0, t1]; values held constant outside."""
    if len(ts) == 0:
        return float("nan")
    if t1 <= t0:
        return 0.0
    if len(ts) == 1:
        return float(ws[0]) * (t1 - t0)
    inside = (ts > t0) & (ts < t1)
    t = np.concatenate(([t0], ts[inside], [t1]))
    w = np.concatenate(([np.interp(t0, ts, ws)], ws[inside], [np.interp(t1, ts, ws)]))
    return float(np.sum((w[1:] + w[:-1]) * np.diff(t)) / 2.0)


@dataclass
class EnergyReading:
    """Result of one ``start()``/``stop()`` window.

    ``joules`` is the total energy (NaN when nothing could be read), ``per_rail_joules`` the energy of every rail
    (not including "total"), ``samples`` the power trace ``(monotonic time, {rail: watts, ..., "total": watts})``,
    ``marks`` the ``(time, label)`` marks, ``method`` "trapezoid" | "counter" | "constant".
    """

    joules: float
    per_rail_joules: Dict[str, float]
    duration_s: float
    samples: List[Sample]
    is_estimate: bool
    meter: str
    marks: List[Tuple[float, str]] = field(default_factory=list)
    start_time: float = float("nan")
    stop_time: float = float("nan")
    failed_samples: int = 0
    last_error: Optional[str] = None
    method: str = "trapezoid"
    notes: List[str] = field(default_factory=list)

    @property
    def mean_watts(self) -> float:
        if not self.duration_s > 0:
            return float("nan")
        return self.joules / self.duration_s

    @property
    def ok(self) -> bool:
        """True when the energy is finite and no sample failed."""
        return math.isfinite(self.joules) and self.failed_samples == 0

    def energy_between(self, t0: float, t1: float, rail: str = "total") -> float:
        """Trapezoid energy of ``rail`` over [t0, t1] from the trace (linear interpolation at the ends)."""
        pts = [(t, w[rail]) for t, w in self.samples if rail in w]
        if not pts:
            return float("nan")
        arr = np.asarray(pts, dtype=np.float64)
        return _integrate(arr[:, 0], arr[:, 1], float(t0), float(t1))

    def mark_times(self, label: str) -> List[float]:
        return [t for t, lab in self.marks if lab == label]

    def segments(self) -> List[Dict[str, Any]]:
        """Windows between consecutive marks (the last one ends at stop): label, start, end, duration, joules
        (from the trace) and mean watts. E.g. ``mark("adaptive")`` ... ``mark("full")`` ... ``stop()``."""
        out = []
        marks = sorted(self.marks)
        for i, (t, label) in enumerate(marks):
            end = marks[i + 1][0] if i + 1 < len(marks) else self.stop_time
            j = self.energy_between(t, end)
            d = end - t
            out.append({"label": label, "start": t, "end": end, "duration_s": d, "joules": j,
                        "mean_watts": j / d if d > 0 else float("nan")})
        return out

    def to_dict(self, include_samples: bool = False) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "meter": self.meter,
            "is_estimate": self.is_estimate,
            "method": self.method,
            "joules": self.joules,
            "mean_watts": self.mean_watts,
            "duration_s": self.duration_s,
            "per_rail_joules": dict(self.per_rail_joules),
            "n_samples": len(self.samples),
            "failed_samples": self.failed_samples,
            "last_error": self.last_error,
            "marks": [{"t": t - self.start_time, "label": lab} for t, lab in self.marks],
            "notes": list(self.notes),
        }
        if include_samples:
            d["samples"] = [{"t": t - self.start_time, **w} for t, w in self.samples]
        return d


# ---------------------------------------------------------------------------------------------- interface
class PowerMeter(abc.ABC):
    """One power meter. ``with meter: ...`` starts and stops it; the reading is then in ``meter.last_reading``."""

    name: str = "meter"
    is_estimate: bool = False
    rails: List[str]

    def __init__(self) -> None:
        self.rails = []
        self.last_reading: Optional[EnergyReading] = None
        self.description: str = ""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin a measurement window."""

    @abc.abstractmethod
    def stop(self) -> EnergyReading:
        """End the window and return its reading (also kept in ``last_reading``)."""

    @abc.abstractmethod
    def read_power(self) -> Dict[str, float]:
        """Instantaneous watts per rail plus "total" (raises MeterError when the sensors cannot be read)."""

    def mark(self, label: str) -> None:  # pragma: no cover - overridden by every meter here
        """Record a named time mark in the running window."""

    def close(self) -> None:
        """Release resources (NVML handle); a no-op for sysfs meters."""

    def __enter__(self) -> "PowerMeter":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} rails={self.rails}>"


class SampledMeter(PowerMeter):
    """Shared sampler: a background thread samples ``_sample_power`` at ``rate_hz``; energy = trapezoid.

    Subclasses implement ``_sample_power(t) -> dict | None`` (watts per rail incl. "total"; None = no trace point
    for this sample, e.g. the first read of a counter) and may override ``_on_start`` / ``_finish``.
    """

    def __init__(self, rate_hz: float = 100.0, clock: Optional[Callable[[], float]] = None,
                 threaded: bool = True) -> None:
        super().__init__()
        if not (rate_hz and rate_hz > 0 and math.isfinite(rate_hz)):
            raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.rate_hz = float(rate_hz)
        self.clock: Callable[[], float] = clock or time.monotonic
        self.threaded = bool(threaded)
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._reset()

    # -- state
    def _reset(self) -> None:
        self._samples: List[Sample] = []
        self._marks: List[Tuple[float, str]] = []
        self._failed = 0
        self._last_error: Optional[str] = None
        self._t_start = float("nan")
        self._notes: List[str] = []

    @property
    def running(self) -> bool:
        return self._running

    # -- hooks
    @abc.abstractmethod
    def _sample_power(self, t: float) -> Optional[Dict[str, float]]:
        ...

    def _on_start(self) -> None:
        """Reset per-window state of the subclass (called before the first sample)."""

    def _finish(self, reading: EnergyReading) -> EnergyReading:
        return reading

    # -- sampling
    def sample_now(self) -> Optional[Dict[str, float]]:
        """Take one sample at ``clock()`` (thread-safe). Never raises: a failure is counted. No-op when stopped."""
        if not self._running:
            return None
        with self._lock:
            t = self.clock()
            self._last_t = t
            try:
                p = self._sample_power(t)
            except Exception as e:  # noqa: BLE001 - a sensor must never crash a run
                self._failed += 1
                self._last_error = f"{type(e).__name__}: {e}"
                return None
            if p is not None:
                self._samples.append((t, dict(p)))
            return p

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.monotonic() + period
        while not self._stop_event.wait(max(0.0, next_t - time.monotonic())):
            try:
                self.sample_now()
            except BaseException:  # pragma: no cover - sample_now already swallows sensor errors
                self._failed += 1
            next_t += period
            now = time.monotonic()
            if next_t < now:  # fell behind (loaded CPU): skip missed ticks instead of bursting
                next_t = now + period

    def start(self) -> None:
        if self._running:
            raise MeterError(f"{self.name} meter already started")
        with self._lock:
            self._reset()
            try:
                self._on_start()
            except Exception as e:  # noqa: BLE001
                self._failed += 1
                self._last_error = f"{type(e).__name__}: {e}"
            self._running = True
            self.sample_now()
            self._t_start = self._last_t
        if self.threaded:
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._run, name=f"edgeexit-meter-{self.name}", daemon=True)
            self._thread.start()

    def mark(self, label: str) -> None:
        """Record ``(time, label)``; a sample is taken at the mark so window boundaries are on the trace."""
        if not self._running:
            raise MeterError(f"{self.name} meter is not running: call start() before mark()")
        with self._lock:
            self.sample_now()
            self._marks.append((self._last_t, str(label)))

    def stop(self) -> EnergyReading:
        if not self._running:
            raise MeterError(f"{self.name} meter was not started")
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            self.sample_now()
            t_stop = self._last_t
            self._running = False
            reading = self._build_reading(self._t_start, t_stop)
            reading = self._finish(reading)
        self.last_reading = reading
        return reading

    def _build_reading(self, t0: float, t1: float) -> EnergyReading:
        samples = list(self._samples)
        keys: List[str] = []
        for _, w in samples:
            for k in w:
                if k not in keys:
                    keys.append(k)
        per_rail: Dict[str, float] = {}
        total = float("nan")
        for k in keys:
            pts = np.asarray([(t, w[k]) for t, w in samples if k in w], dtype=np.float64)
            e = _integrate(pts[:, 0], pts[:, 1], t0, t1)
            if k == "total":
                total = e
            else:
                per_rail[k] = e
        notes = list(self._notes)
        if self._failed:
            notes.append(f"{self._failed} sample(s) failed; last error: {self._last_error}")
        if not samples:
            notes.append("no sample could be read: energy unknown")
        return EnergyReading(
            joules=total, per_rail_joules=per_rail, duration_s=float(t1 - t0), samples=samples,
            is_estimate=self.is_estimate, meter=self.name, marks=list(self._marks), start_time=t0,
            stop_time=t1, failed_samples=self._failed, last_error=self._last_error, method="trapezoid",
            notes=notes,
        )


# ------------------------------------------------------------------------------------------------ Jetson
_HWMON_GLOB = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
_IIO_GLOB = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass
class _Channel:
    rail: str
    kind: str  # "hwmon" (mV * mA), "iio_power" (mW), "iio_vi" (mV * mA)
    paths: Tuple[str, ...]
    device: str = ""

    def watts(self) -> float:
        if self.kind == "iio_power":
            return _read_float(self.paths[0]) / 1e3
        return _read_float(self.paths[0]) * _read_float(self.paths[1]) / 1e6


def _discover_ina3221(root: str) -> Tuple[List[_Channel], List[str]]:
    """Channels of every INA3221 under ``root`` (hwmon first, then IIO) and the directories that were seen."""
    channels: List[_Channel] = []
    seen: List[str] = []
    for d in sorted(glob.glob(_join(root, _HWMON_GLOB)), key=_natural_key):
        seen.append(d)
        dev = os.path.basename(os.path.dirname(os.path.dirname(d)))
        for k in (1, 2, 3):
            label = os.path.join(d, f"in{k}_label")
            if not os.path.exists(label):
                continue
            enable = os.path.join(d, f"in{k}_enable")
            try:
                if os.path.exists(enable) and _read_text(enable) == "0":
                    continue
                name = _read_text(label)
            except OSError:
                continue
            if not name or _is_nc(name):
                continue
            channels.append(_Channel(name, "hwmon", (os.path.join(d, f"in{k}_input"),
                                                     os.path.join(d, f"curr{k}_input")), dev))
    for d in sorted(glob.glob(_join(root, _IIO_GLOB)), key=_natural_key):
        seen.append(d)
        dev = os.path.basename(os.path.dirname(d))
        for k in (0, 1, 2):
            label = os.path.join(d, f"rail_name_{k}")
            if not os.path.exists(label):
                continue
            try:
                name = _read_text(label)
            except OSError:
                continue
            if not name or _is_nc(name):
                continue
            p = os.path.join(d, f"in_power{k}_input")
            if os.path.exists(p):
                channels.append(_Channel(name, "iio_power", (p,), dev))
            else:
                channels.append(_Channel(name, "iio_vi", (os.path.join(d, f"in_voltage{k}_input"),
                                                         os.path.join(d, f"in_current{k}_input")), dev))
    # duplicate rail names across devices: suffix with the device directory
    counts: Dict[str, int] = {}
    for c in channels:
        counts[c.rail] = counts.get(c.rail, 0) + 1
    for c in channels:
        if counts[c.rail] > 1:
            c.rail = f"{c.rail}@{c.device}"
    return channels, seen


def _sysfs_error(what: str, e: OSError) -> MeterError:
    if isinstance(e, PermissionError):
        return MeterError(f"needs root: {what} not readable ({e.filename or e})")
    return MeterError(f"{what} unreadable: {e}")


class JetsonINA3221Meter(SampledMeter):
    """Jetson on-module INA3221 power monitors.

    JetPack 5/6 (hwmon): ``in{k}_label``, ``in{k}_input`` (mV), ``curr{k}_input`` (mA), k = 1..3, several devices
    (e.g. 1-0040 and 1-0041 on AGX Orin). JetPack 4 (IIO ``ina3221x``): ``rail_name_{k}``, ``in_power{k}_input``
    (mW) or ``in_voltage{k}_input`` x ``in_current{k}_input``, k = 0..2. "NC" rails are ignored. The total is
    VDD_IN / POM_5V_IN when present (module input), else the sum of the rails.
    """

    name = "jetson-ina3221"

    def __init__(self, root: str = "/", rate_hz: float = 100.0, clock: Optional[Callable[[], float]] = None,
                 threaded: bool = True) -> None:
        super().__init__(rate_hz=rate_hz, clock=clock, threaded=threaded)
        self.root = root
        channels, seen = _discover_ina3221(root)
        if not channels:
            if seen:
                raise MeterError(f"not found: INA3221 device(s) present ({len(seen)}) but no readable, connected "
                                 f"rail labels")
            raise MeterError("not found: no INA3221 power monitor under /sys/bus/i2c/drivers/ina3221 "
                             "(JetPack 5/6) or ina3221x (JetPack 4); not a Jetson?")
        self._channels = channels
        self.rails = [c.rail for c in channels]
        self.total_rail: Optional[str] = next((r for r in _TOTAL_RAILS if r in self.rails), None)
        try:
            self._read_raw()
        except OSError as e:
            raise _sysfs_error("INA3221 sensor files", e) from None
        except ValueError as e:
            raise MeterError(f"INA3221 sensor files hold unexpected values: {e}") from None
        layout = "hwmon" if channels[0].kind == "hwmon" else "iio"
        total = self.total_rail or "sum of rails"
        self.description = f"INA3221 {layout}: {', '.join(self.rails)} (total = {total})"

    def _read_raw(self) -> Dict[str, float]:
        out = {c.rail: c.watts() for c in self._channels}
        out["total"] = out[self.total_rail] if self.total_rail else float(sum(out.values()))
        return out

    def read_power(self) -> Dict[str, float]:
        try:
            return self._read_raw()
        except (OSError, ValueError) as e:
            raise MeterError(f"{self.name}: cannot read power: {e}") from None

    def _sample_power(self, t: float) -> Dict[str, float]:
        return self._read_raw()


# -------------------------------------------------------------------------------------------------- NVML
def _import_pynvml():
    try:
        import pynvml  # type: ignore  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise MeterError("not found: pynvml not installed (pip install nvidia-ml-py)") from None
    return pynvml


class NvmlMeter(SampledMeter):
    """NVIDIA GPU board power through NVML.

    Energy = difference of ``nvmlDeviceGetTotalEnergyConsumption`` (mJ, Volta and newer) when supported, else the
    trapezoid of sampled ``nvmlDeviceGetPowerUsage`` (mW). The counter updates every 20-100 ms, so windows much
    shorter than a second are imprecise (a note says so). ``nvml`` may be any object implementing the pynvml
    functions used here (tests pass a fake); None imports ``pynvml``.
    """

    name = "nvml"
    COUNTER_MIN_WINDOW_S = 1.0

    def __init__(self, device_index: int = 0, rate_hz: float = 100.0, clock: Optional[Callable[[], float]] = None,
                 threaded: bool = True, nvml: Any = None) -> None:
        super().__init__(rate_hz=rate_hz, clock=clock, threaded=threaded)
        self._nvml = nvml if nvml is not None else _import_pynvml()
        self.device_index = int(device_index)
        nv = self._nvml
        try:
            nv.nvmlInit()
        except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise MeterError(f"not found: NVML init failed ({type(e).__name__}: {e}); no NVIDIA driver?") from None
        self._initialised = True
        try:
            self._handle = nv.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as e:  # noqa: BLE001
            self.close()
            raise MeterError(f"not found: NVML GPU {self.device_index} ({type(e).__name__}: {e})") from None
        try:
            gpu = nv.nvmlDeviceGetName(self._handle)
            self.gpu_name = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
        except Exception:  # noqa: BLE001
            self.gpu_name = "unknown GPU"
        self.has_energy_counter = self._supported(nv.nvmlDeviceGetTotalEnergyConsumption)
        self.has_power = self._supported(nv.nvmlDeviceGetPowerUsage)
        if not (self.has_energy_counter or self.has_power):
            self.close()
            raise MeterError(f"not supported: GPU {self.device_index} ({self.gpu_name}) reports neither total "
                             f"energy nor power usage through NVML")
        self.rails = ["gpu"]
        how = "energy counter" if self.has_energy_counter else "sampled power"
        self.description = f"NVML GPU {self.device_index} ({self.gpu_name}): {how}"

    def _supported(self, fn) -> bool:
        try:
            fn(self._handle)
            return True
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends
            return False

    def close(self) -> None:
        if getattr(self, "_initialised", False):
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def _counter_mj(self) -> float:
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def read_power(self) -> Dict[str, float]:
        try:
            if self.has_power:
                w = float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1e3
            else:
                e0, t0 = self._counter_mj(), time.monotonic()
                time.sleep(0.2)
                e1, t1 = self._counter_mj(), time.monotonic()
                w = (e1 - e0) / 1e3 / max(t1 - t0, 1e-9)
        except Exception as e:  # noqa: BLE001
            raise MeterError(f"nvml: cannot read power: {type(e).__name__}: {e}") from None
        return {"gpu": w, "total": w}

    def _on_start(self) -> None:
        self._first_counter: Optional[Tuple[float, float]] = None
        self._last_counter: Optional[Tuple[float, float]] = None

    def _sample_power(self, t: float) -> Optional[Dict[str, float]]:
        nv = self._nvml
        prev = self._last_counter
        if self.has_energy_counter:
            e = self._counter_mj()
            self._last_counter = (t, e)
            if self._first_counter is None:
                self._first_counter = (t, e)
        if self.has_power:
            w = float(nv.nvmlDeviceGetPowerUsage(self._handle)) / 1e3
        elif prev is not None and t > prev[0]:
            w = (self._last_counter[1] - prev[1]) / 1e3 / (t - prev[0])  # type: ignore[index]
        else:
            return None
        return {"gpu": w, "total": w}

    def _finish(self, r: EnergyReading) -> EnergyReading:
        if not self.has_energy_counter:
            return r
        first, last = self._first_counter, self._last_counter
        if first is None or last is None or last[0] <= first[0]:
            r.notes.append("NVML energy counter could not be read at both ends; energy from sampled power")
            return r
        covers = first[0] == r.start_time and last[0] == r.stop_time
        if not covers and math.isfinite(r.joules):
            r.notes.append("NVML energy counter missed an end of the window; energy from sampled power")
            return r
        j = (last[1] - first[1]) / 1e3
        r.joules = j
        r.per_rail_joules = {"gpu": j}
        r.method = "counter"
        if r.duration_s < self.COUNTER_MIN_WINDOW_S:
            r.notes.append(f"NVML energy counter updates every 20-100 ms; a {r.duration_s:.3g} s window is "
                           f"too short for a precise value")
        return r


# -------------------------------------------------------------------------------------------------- RAPL
_RAPL_GLOB = "sys/class/powercap/intel-rapl:*"
_RAPL_TOP = re.compile(r"^intel-rapl:\d+$")


def _rapl_delta(start: float, end: float, max_range: float) -> float:
    """Counter difference with one wrap-around: end < start -> end + max_range - start."""
    if end < start:
        return end + max_range - start
    return end - start


class RaplMeter(SampledMeter):
    """Linux powercap RAPL: top-level domains ``intel-rapl:<i>`` (packages; subdomains ``intel-rapl:0:0`` are
    skipped). Energy comes from the ``energy_uj`` counters (per-interval differences, wrap-around at
    ``max_energy_range_uj`` handled); the trace holds each interval's mean power at the interval's end. The total is
    the "psys" (platform) domain when present, else the sum of the domains. Reading ``energy_uj`` usually needs root.
    """

    name = "rapl"

    def __init__(self, root: str = "/", rate_hz: float = 100.0, clock: Optional[Callable[[], float]] = None,
                 threaded: bool = True) -> None:
        super().__init__(rate_hz=rate_hz, clock=clock, threaded=threaded)
        self.root = root
        dirs = [d for d in glob.glob(_join(root, _RAPL_GLOB)) if _RAPL_TOP.match(os.path.basename(d))]
        dirs.sort(key=_natural_key)
        if not dirs:
            raise MeterError("not found: no /sys/class/powercap/intel-rapl:* (no RAPL on this machine)")
        self._domains: List[Tuple[str, str, float]] = []  # (rail, energy_uj path, max range)
        names: Dict[str, int] = {}
        for d in dirs:
            try:
                name = _read_text(os.path.join(d, "name"))
            except OSError:
                name = os.path.basename(d)
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                name = f"{name}@{os.path.basename(d)}"
            path = os.path.join(d, "energy_uj")
            try:
                _read_float(path)
            except OSError as e:
                raise _sysfs_error("RAPL energy_uj", e) from None
            except ValueError as e:
                raise MeterError(f"RAPL energy_uj holds an unexpected value: {e}") from None
            try:
                max_range = _read_float(os.path.join(d, "max_energy_range_uj"))
            except (OSError, ValueError):
                max_range = float(2 ** 32)  # the usual 32-bit counter; only used when a wrap happens
            self._domains.append((name, path, max_range))
        self.rails = [n for n, _, _ in self._domains]
        self.total_rail: Optional[str] = "psys" if "psys" in self.rails else None
        self.description = f"RAPL: {', '.join(self.rails)} (total = {self.total_rail or 'sum of domains'})"

    def _counters(self) -> List[float]:
        return [_read_float(p) for _, p, _ in self._domains]

    def _total(self, per: Dict[str, float]) -> float:
        return per[self.total_rail] if self.total_rail else float(sum(per.values()))

    def read_power(self, interval_s: float = 0.05) -> Dict[str, float]:
        try:
            c0, t0 = self._counters(), time.monotonic()
            time.sleep(interval_s)
            c1, t1 = self._counters(), time.monotonic()
        except (OSError, ValueError) as e:
            raise MeterError(f"rapl: cannot read energy_uj: {e}") from None
        dt = max(t1 - t0, 1e-9)
        out = {n: _rapl_delta(a, b, m) / 1e6 / dt for (n, _, m), a, b in zip(self._domains, c0, c1)}
        out["total"] = self._total(out)
        return out

    def _on_start(self) -> None:
        self._prev: Optional[Tuple[float, List[float]]] = None
        self._first_t: Optional[float] = None
        self._acc = {n: 0.0 for n in self.rails}

    def _sample_power(self, t: float) -> Optional[Dict[str, float]]:
        c = self._counters()
        prev = self._prev
        self._prev = (t, c)
        if prev is None:
            self._first_t = t
            return None
        dt = t - prev[0]
        watts: Dict[str, float] = {}
        for (n, _, m), a, b in zip(self._domains, prev[1], c):
            d = _rapl_delta(a, b, m) / 1e6
            self._acc[n] += d
            if dt > 0:
                watts[n] = d / dt
        if dt <= 0:
            return None
        watts["total"] = self._total(watts)
        return watts

    def _finish(self, r: EnergyReading) -> EnergyReading:
        if self._prev is None or self._first_t is None:
            r.joules = float("nan")
            r.per_rail_joules = {}
            r.notes.append("RAPL counters could not be read: energy unknown")
            return r
        r.per_rail_joules = dict(self._acc)
        r.joules = self._total(self._acc)
        r.method = "counter"
        if self._first_t != r.start_time or self._prev[0] != r.stop_time:
            r.notes.append("RAPL counters missed an end of the window; energy covers a shorter time")
        return r


# ---------------------------------------------------------------------------------------------- constant
class ConstantMeter(SampledMeter):
    """A fixed power figure (e.g. a datasheet number): energy = watts x duration. An estimate, not a measurement."""

    name = "constant-estimate"
    is_estimate = True

    def __init__(self, watts: float, clock: Optional[Callable[[], float]] = None) -> None:
        super().__init__(rate_hz=1.0, clock=clock, threaded=False)  # nothing to sample between start and stop
        watts = float(watts)
        if not (math.isfinite(watts) and watts >= 0):
            raise MeterError(f"constant meter needs a finite power >= 0 W, got {watts!r}")
        self.watts = watts
        self.rails = ["total"]
        self.description = f"constant {watts:g} W (estimate, not measured)"

    def read_power(self) -> Dict[str, float]:
        return {"total": self.watts}

    def _sample_power(self, t: float) -> Dict[str, float]:
        return {"total": self.watts}

    def _finish(self, r: EnergyReading) -> EnergyReading:
        r.joules = self.watts * r.duration_s
        r.per_rail_joules = {}
        r.method = "constant"
        r.notes.append(f"estimate: constant {self.watts:g} W x duration, not a measurement")
        return r


# ---------------------------------------------------------------------------------------- selection
def _probe(spec: str, root: str, power_watts: Optional[float], nvml: Any, device_index: int,
           rate_hz: float, clock, threaded: bool) -> PowerMeter:
    if spec == "jetson":
        return JetsonINA3221Meter(root=root, rate_hz=rate_hz, clock=clock, threaded=threaded)
    if spec == "nvml":
        return NvmlMeter(device_index=device_index, rate_hz=rate_hz, clock=clock, threaded=threaded, nvml=nvml)
    if spec == "rapl":
        return RaplMeter(root=root, rate_hz=rate_hz, clock=clock, threaded=threaded)
    if spec == "constant":
        if power_watts is None:
            raise MeterError("needs a power figure: pass power_watts (--power-watts W); the result is an estimate")
        return ConstantMeter(power_watts, clock=clock)
    raise MeterError(f"unknown meter {spec!r} (choose one of: {', '.join(METER_SPECS)})")


def available_meters(root: str = "/", power_watts: Optional[float] = None, nvml: Any = None,
                     device_index: int = 0) -> List[Tuple[str, bool, str]]:
    """``[(name, available, reason), ...]`` for jetson, nvml, rapl, constant (for ``edgeexit doctor``)."""
    out: List[Tuple[str, bool, str]] = []
    for spec in ("jetson", "nvml", "rapl", "constant"):
        try:
            m = _probe(spec, root, power_watts, nvml, device_index, 100.0, None, False)
        except MeterError as e:
            out.append((spec, False, str(e)))
        except Exception as e:  # noqa: BLE001 - doctor must not crash
            out.append((spec, False, f"{type(e).__name__}: {e}"))
        else:
            out.append((spec, True, m.description))
            m.close()
    return out


def open_meter(spec: Optional[str], power_watts: Optional[float] = None, root: str = "/", rate_hz: float = 100.0,
               *, nvml: Any = None, device_index: int = 0, clock: Optional[Callable[[], float]] = None,
               threaded: bool = True) -> Optional[PowerMeter]:
    """Open a meter by name: "auto" | "jetson" | "nvml" | "rapl" | "constant" | "none".

    "auto" picks jetson > nvml > rapl > constant (when ``power_watts`` is given) > None. An explicit meter that is
    not available raises ``MeterError`` with a one-line reason; "none" returns None.
    """
    s = (spec or "auto").strip().lower()
    if s == "none":
        return None
    if s == "auto":
        for cand in ("jetson", "nvml", "rapl"):
            try:
                return _probe(cand, root, power_watts, nvml, device_index, rate_hz, clock, threaded)
            except MeterError:
                continue
        if power_watts is not None:
            return _probe("constant", root, power_watts, nvml, device_index, rate_hz, clock, threaded)
        return None
    if s not in METER_SPECS:
        raise MeterError(f"unknown meter {spec!r} (choose one of: {', '.join(METER_SPECS)})")
    try:
        return _probe(s, root, power_watts, nvml, device_index, rate_hz, clock, threaded)
    except MeterError as e:
        raise MeterError(f"{s} meter unavailable: {e}") from None


# ------------------------------------------------------------------------------------------- clocks
_GPU_DEVFREQ_NAMES = ("gpu", "ga10b", "gv11b", "gp10b", "gm20b")


def jetson_clocks_locked(root: str = "/") -> Optional[bool]:
    """Whether CPU and GPU clocks look locked (min == max, what ``jetson_clocks`` sets).

    Compares ``cpufreq/scaling_min_freq`` with ``scaling_max_freq`` for every CPU and ``min_freq`` with
    ``max_freq`` of the GPU devfreq device (``/sys/class/devfreq/*gpu*``, ``17000000.ga10b``, ``57000000.gpu``,
    ...). True if every readable pair is equal, False if any differs, None if nothing is readable.
    """
    pairs: List[Tuple[str, str]] = []
    for d in glob.glob(_join(root, "sys/devices/system/cpu/cpu[0-9]*/cpufreq")):
        pairs.append((os.path.join(d, "scaling_min_freq"), os.path.join(d, "scaling_max_freq")))
    for d in glob.glob(_join(root, "sys/class/devfreq/*")):
        if any(k in os.path.basename(d).lower() for k in _GPU_DEVFREQ_NAMES):
            pairs.append((os.path.join(d, "min_freq"), os.path.join(d, "max_freq")))
    seen = False
    for lo, hi in pairs:
        try:
            a, b = _read_float(lo), _read_float(hi)
        except (OSError, ValueError):
            continue
        seen = True
        if a != b:
            return False
    return True if seen else None

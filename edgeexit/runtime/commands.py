"""The runtime commands behind ``edgeexit profile`` (and ``edgeexit run``): one options dataclass each, and a
function that checks them, opens what the command needs, calls the core modules and writes the outputs
(torch-free). ``edgeexit/cli.py`` only builds the options and maps the expected errors to one line.

Expected problems raise one-line errors: ValueError (options), FileNotFoundError, BundleError, SourceError,
BackendError, MeterError.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

from .profile import BLOCK_FRAMES

__all__ = ["ProfileOptions", "profile_command"]


@dataclass
class ProfileOptions:
    """``edgeexit profile`` (see ``edgeexit.runtime.profile``). ``bundle`` / ``source`` default to the demo bundle
    and samples; ``gate`` picks another exported pipeline; ``out`` defaults to ``profile-<bundle name>``."""

    bundle: Optional[str] = None
    source: Optional[str] = None
    out: Optional[str] = None
    gate: Optional[str] = None
    backend: str = "auto"
    providers: Optional[str] = None
    threads: Optional[int] = 1
    batch: int = 1
    frames: int = 200
    seed: int = 0
    block: int = BLOCK_FRAMES
    warmup_ms: float = 200.0
    iterations: int = 200
    meter: str = "auto"
    power_watts: Optional[float] = None
    rate_hz: float = 100.0
    cost_metric: str = "latency_ms"
    plots: bool = True
    quiet: bool = False
    meter_root: str = "/"

    def check(self) -> None:
        """One-line ValueError for an option out of range."""
        from .meters import METER_SPECS  # noqa: PLC0415
        from .profile import COST_METRICS  # noqa: PLC0415

        for name in ("batch", "frames", "iterations", "block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.warmup_ms) and self.warmup_ms >= 0):
            raise ValueError(f"--warmup-ms must be >= 0, got {self.warmup_ms}")
        if not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise ValueError(f"--rate-hz must be > 0, got {self.rate_hz}")
        if self.cost_metric not in COST_METRICS:
            raise ValueError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, got {self.cost_metric!r}")
        if self.meter_spec not in METER_SPECS:
            raise ValueError(f"--meter must be one of {', '.join(METER_SPECS)}, got {self.meter!r}")
        if self.power_watts is not None and not (math.isfinite(self.power_watts) and self.power_watts >= 0):
            raise ValueError(f"--power-watts must be a finite number >= 0, got {self.power_watts}")
        if self.power_watts is not None and self.meter_spec not in ("auto", "constant"):
            raise ValueError("--power-watts goes with --meter constant (or auto, as the fallback)")

    @property
    def meter_spec(self) -> str:
        return (self.meter or "auto").strip().lower()


def profile_command(options: ProfileOptions, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> int:
    """``edgeexit profile``: measure, then write profile.json, costs.json and the plots under ``options.out`` and
    print the table. Returns 0, 1 when costs.json could not be derived, or 130 when interrupted (Ctrl-C /
    SIGTERM: what was measured so far is printed and written to profile.json, marked incomplete)."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from . import profile as prof  # noqa: PLC0415
    from .backends import open_backend  # noqa: PLC0415
    from .bundle import load_bundle  # noqa: PLC0415
    from .chain import resolve_inputs  # noqa: PLC0415
    from .meters import jetson_clocks_locked, open_meter  # noqa: PLC0415

    o = options
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr

    def info(message: str) -> None:
        if not o.quiet:
            print(f"edgeexit: {message}", file=stderr, flush=True)

    def warn(message: str) -> None:
        print(message, file=stderr, flush=True)

    o.check()
    bundle_path, source_uri, demo = resolve_inputs(o.bundle, o.source)
    bundle_name = "demo" if demo else (Path(bundle_path).resolve().name or "bundle")
    out_dir = Path(o.out) if o.out else Path(f"profile-{bundle_name}")

    # the meter first: a missing sensor fails before any engine is loaded
    power = open_meter(o.meter_spec, power_watts=o.power_watts, root=o.meter_root, rate_hz=o.rate_hz)
    if power is None and o.cost_metric == "energy_mj":
        raise ValueError("--cost-metric energy_mj needs a power meter (none found with --meter "
                         f"{o.meter_spec}); pass --meter jetson|nvml|rapl, or --meter constant --power-watts W for an estimate")
    clocks = prof.clocks_value(jetson_clocks_locked(o.meter_root))

    bundle = load_bundle(bundle_path)
    pipeline = bundle.pipeline(o.gate)
    engines = open_backend(bundle, o.backend, providers=o.providers, threads=o.threads, max_batch=o.batch,
                           gate=pipeline.gate)
    ctx = _context(bundle, pipeline, engines, o, bundle_path, bundle_name, power, clocks)
    profiler: Optional[prof.Profiler] = None
    interrupted = False
    previous_handler: Any = None
    in_main = threading.current_thread() is threading.main_thread()

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        if in_main:
            previous_handler = signal.signal(signal.SIGTERM, on_term)
        try:
            profiler = prof.Profiler(bundle, engines, power, gate=pipeline.gate, batch=o.batch, warmup_ms=o.warmup_ms,
                                     iterations=o.iterations, block=o.block, log=info)
            mdesc = "no power meter" if power is None else power.description
            info(f"bundle {bundle_path} ({bundle.num_exits} exits; gate {pipeline.gate}, stages end at exits "
                 f"{', '.join(map(str, pipeline.kept))}); {engines.describe()}; {mdesc}; clocks {prof.clocks_text(clocks)}")
            runner = profiler.adaptive
            x, labels, src = prof.load_frames(source_uri, runner.preprocess, runner.classes, o.frames, o.seed, warn)
            ctx["source"] = src
            ctx["frames"] = int(x.shape[0])
            info(f"input {src['description']}: {src['frames']} frames ({src['distinct_frames']} distinct, "
                 f"{src['selection']}), batch {o.batch}")
            profiler.start_meter()
            profiler.warmup(x)
            profiler.time_parts()
            profiler.run_modes(x, labels)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if profiler is not None:
                profiler.stop_meter()
    finally:
        if in_main and previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        engines.close()
        if power is not None:
            try:
                power.close()
            except Exception:  # noqa: BLE001
                pass

    complete = (not interrupted and profiler is not None and len(profiler.parts) == len(pipeline.stages) + 1
                and len(profiler.runs) == len(prof.MODES))
    result = prof.build_result(profiler, ctx, complete=complete, interrupted=interrupted)
    try:
        code = _write_outputs(result, out_dir, o, complete, warn)
        prof.render_table(result, stdout)
        for kind, path in result["files"].items():
            print(f"{kind}: {path}", file=stdout)
        if interrupted:
            warn("edgeexit: interrupted: partial profile written (costs.json needs a complete profile)")
            code = 130
        stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        code = 130 if interrupted else 0
    return code


def _context(bundle: Any, pipeline: Any, engines: Any, o: ProfileOptions, bundle_path: str, bundle_name: str,
             power: Any, clocks: Any) -> Dict[str, Any]:
    """What build_result needs besides the measurements."""
    from .profile import describe_device, describe_versions  # noqa: PLC0415

    policy = pipeline.policy
    ctx: Dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle_path": str(bundle_path), "bundle_name": bundle_name, "num_exits": int(bundle.num_exits),
        "num_classes": len(bundle.classes), "input_shape": list(bundle.input_shape),
        "bundle_version": bundle.edgeexit_version, "gate": pipeline.gate,
        "kept": list(pipeline.kept), "kept_internal": list(policy.kept_internal),
        "segment_macs": [int(v) for v in bundle.segment_macs], "head_macs": [int(v) for v in bundle.head_macs],
        "reference_macs": int(bundle.reference_macs),
        "monolithic_macs": int(bundle.monolithic.macs or bundle.reference_macs),
        "exit_macs": list(bundle.exit_macs(pipeline.gate)),
        "policy": {"gate": policy.gate, "kept": list(policy.kept),
                   "thresholds": [float(policy.thresholds[k]) for k in policy.kept_internal]},
        "device": describe_device(),
        "backend": {"kind": getattr(engines, "kind", "?"), "description": engines.describe(),
                    "providers": list(getattr(engines, "providers", []) or []),
                    "device": getattr(engines, "device", None), "threads": o.threads},
        "versions": describe_versions(getattr(engines, "kind", "")),
        "meter_obj": power, "meter_spec": o.meter_spec, "clocks_locked": clocks,
        "batch": o.batch, "frames": o.frames, "warmup_ms": o.warmup_ms, "iterations": o.iterations,
        "block": o.block, "seed": o.seed, "cost_metric": o.cost_metric, "notes": [],
    }
    if clocks is False:
        ctx["notes"].append("Jetson clocks are not locked: latencies vary with DVFS (sudo jetson_clocks)")
    return ctx


def _write_outputs(result: Dict[str, Any], out_dir: Path, o: ProfileOptions, complete: bool, warn: Any) -> int:
    """costs.json (complete profiles), the plots, then profile.json (listing the files); returns 0, or 1 when
    costs.json could not be derived."""
    from .profile import costs_from_profile, write_json  # noqa: PLC0415

    code = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    files: Dict[str, str] = {"profile": str(out_dir / "profile.json")}
    if complete:
        try:
            costs = costs_from_profile(result, o.cost_metric)
        except ValueError as exc:
            warn(f"edgeexit: warning: costs.json not written: {exc}")
            code = 1
        else:
            write_json(out_dir / "costs.json", costs)
            files["costs"] = str(out_dir / "costs.json")
    if complete and o.plots:
        try:
            from .plots_profile import write_plots  # noqa: PLC0415

            files.update(write_plots(result, out_dir, warn=warn))
        except ImportError as exc:
            warn(f"edgeexit: matplotlib is not installed ({exc}): plots skipped (pip install matplotlib)")
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the measurements
            warn(f"edgeexit: warning: plots failed: {type(exc).__name__}: {exc}")
    result["files"] = files
    write_json(out_dir / "profile.json", result)
    return code

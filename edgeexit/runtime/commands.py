"""The command layer of the runtime: each command's options as a dataclass and the body that wires bundle,
backend, runner, source and outputs together (torch-free; ``edgeexit/cli.py`` only parses options into these and
maps the expected errors to one line).

The core modules (``chain``, ``profile``, ``sources``, ``outputs``) know nothing of command lines. Expected
problems raise one-line errors: ValueError (options), FileNotFoundError, BundleError, SourceError, BackendError,
MeterError.
"""

from __future__ import annotations

import datetime as _dt
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, TextIO, Tuple

from .backends import open_backend
from .bundle import load_bundle
from .chain import Decision, StageRunner, run_source
from .outputs import FrameSaver, JsonlWriter, frame_record
from .profile import BLOCK_FRAMES
from .sources import open_source, quiet_native_logs
from .summary import RunStats

__all__ = ["RunOptions", "run_command", "ProfileOptions", "profile_command", "resolve_inputs", "demo_path"]


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



@dataclass
class RunOptions:
    """Everything ``edgeexit run`` takes (the CLI's options, one field each; see ``edgeexit run --help``)."""

    bundle: Optional[str] = None
    source: Optional[str] = None
    out: Optional[str] = None
    save: Optional[str] = None
    batch: int = 1
    gate: Optional[str] = None
    threshold: Optional[str] = None
    max_exit: Optional[int] = None
    full: bool = False
    backend: str = "auto"
    providers: Optional[str] = None
    threads: Optional[int] = 1
    cuda_graphs: bool = False
    loop: bool = False
    max_frames: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[float] = None
    quiet: bool = False
    drift_window: Optional[int] = None
    no_drift: bool = False


def drift_runner(runner: StageRunner, bundle: Any, engines: Any, options: RunOptions) -> Tuple[Any, Any]:
    """(runner, DriftGuard or None): the calibrated runner wrapped with a conservative one on the same backend
    when the pipeline has a drift reference and the run uses its calibrated policy (``runtime.drift``)."""
    from .drift import DriftGuard, DriftReference, SwitchingRunner  # noqa: PLC0415

    o = options
    if o.drift_window is not None and o.drift_window < 1:
        raise ValueError(f"--drift-window must be >= 1, got {o.drift_window}")
    reference = runner.pipeline.drift
    if o.no_drift or o.full or reference is None or o.threshold is not None or o.max_exit is not None:
        if o.drift_window is not None and reference is None and not o.no_drift:
            raise ValueError(f"--drift-window: the {runner.pipeline.gate} pipeline of this bundle has no drift "
                             "reference (export a checkpoint calibrated with this version)")
        return runner, None
    ref = DriftReference.from_dict(reference)
    guard = DriftGuard(ref, o.drift_window)
    if ref.conservative_thresholds is None:  # full depth: the plain network in one call, not every stage
        conservative = StageRunner(bundle, engines, gate=o.gate, full=True)
    else:
        conservative = StageRunner(bundle, engines, gate=o.gate, threshold=list(ref.conservative_thresholds),
                                   keep_cam=runner.keep_cam)
    return SwitchingRunner(runner, conservative, guard), guard


def run_command(options: RunOptions, *, stdout: Any = None, stderr: Any = None, capture_factory: Any = None) -> int:
    """``edgeexit run``: bundle + source -> one JSON line per frame (stdout or ``out``), annotated frames under
    ``save``, and a summary table at the end (stderr when the lines go to stdout). Returns the exit code: 0, or
    130 when interrupted (Ctrl-C or SIGTERM; the summary is printed and every line already written is kept).

    Expected problems raise one-line errors for the caller to print: BundleError (invalid bundle), SourceError
    (missing input, camera that cannot be opened), BackendError, ValueError (bad options), FileNotFoundError
    (the demo assets are not installed).
    """
    o = options
    bundle_path, source_uri, out, save, batch = o.bundle, o.source, o.out, o.save, o.batch
    gate, threshold, max_exit, full, backend, providers = o.gate, o.threshold, o.max_exit, o.full, o.backend, o.providers
    threads, loop, max_frames, quiet = o.threads, o.loop, o.max_frames, o.quiet
    width, height, fps = o.width, o.height, o.fps
    from .guards import InterruptGuard, check_bounds, check_output_paths, report_unknown_folders, warmup_batch  # noqa: PLC0415

    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr

    def info(message: str) -> None:
        if not quiet:
            print(message, file=stderr, flush=True)

    def warn(message: str) -> None:
        print(message, file=stderr, flush=True)

    quiet_native_logs()
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"--max-frames must be >= 0, got {max_frames}")
    check_bounds(batch, threads)  # issue 11: --batch and --threads within sane limits
    bundle_path, source_uri, _demo = resolve_inputs(bundle_path, source_uri)
    check_output_paths({"--out": out, "--save": save}, (source_uri, bundle_path))  # issue 11: never clobber inputs

    bundle = load_bundle(bundle_path)
    extra = {"cuda_graphs": True} if o.cuda_graphs else {}
    if o.cuda_graphs and backend not in ("tensorrt", "auto"):
        raise ValueError("--cuda-graphs applies to the tensorrt backend")
    engines = open_backend(bundle, backend, providers=providers, threads=threads, max_batch=max(batch, 1), gate=gate,
                           full=full, **extra)
    source = None
    writer = saver = None
    stats: Optional[RunStats] = None
    drift = None
    interrupted = False
    guard = InterruptGuard()  # issue 11: the first SIGINT/SIGTERM stops the run, later ones cannot lose the summary
    try:
        runner = StageRunner(bundle, engines, gate=gate, threshold=threshold, max_exit=max_exit, full=full,
                             keep_cam=save is not None)
        runner, drift = drift_runner(runner, bundle, engines, o)  # issue 13: conservative policy under drift
        source = open_source(source_uri, loop=loop, max_frames=max_frames, classes=tuple(runner.classes),
                             width=width, height=height, fps=fps, capture_factory=capture_factory)
        writer = JsonlWriter(out, stream=stdout)
        if save is not None:
            saver = FrameSaver(save, source, runner.preprocess, warn=warn)
        summary_file = stderr if writer.to_stdout else stdout
        stats = RunStats(runner.num_exits, [runner.exit_fraction(i) for i in range(runner.num_exits)], full=full)
        report_unknown_folders(source, stats, warn)  # issue 11: class folders the model does not know
        policy = runner.policy
        mode = "plain network (full.onnx, one call per frame)" if full else (
            f"gate {policy.gate}, stages ending at exits {', '.join(map(str, runner.exits))}, thresholds "
            f"{', '.join(f'{policy.thresholds[k]:g}' for k in runner.exits[:-1]) or '-'}")
        info(f"edgeexit: bundle {bundle_path} ({len(runner.exits)} stages, {len(runner.classes)} classes); "
             f"{engines.describe()}; {mode}")
        info(f"edgeexit: input {source.describe()}" + (f" -> {out}" if out else ""))

        if drift is not None:
            info(f"edgeexit: drift guard on (window {drift.window}, |z| > {drift.reference.bound:.2f} switches to "
                 + ("full depth" if drift.reference.conservative_thresholds is None else "the conservative thresholds")
                 + "; --no-drift turns it off)")

        def on_decision(frame: Any, decision: Decision) -> None:
            record = frame_record(frame, decision, runner.classes)
            if drift is not None:
                event = drift.update(None if decision.failed else decision.confidence)
                record["drift"] = drift.record(event)
                if event is not None:
                    info(f"edgeexit: drift guard: {event} at frame {drift.frames - 1} (z = {drift.z:+.2f})")
            writer.write(record)  # the line first: it is what must survive
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
        if drift is not None:
            print(drift.summary(), file=summary_file, flush=True)
        if saver is not None and saver.saved:
            where = saver.video_path or saver.directory
            print(f"annotated frames: {where}", file=summary_file, flush=True)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        guard.release()  # issue 11
    return 130 if interrupted else 0


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
    from . import profile as prof  # noqa: PLC0415
    from .backends import open_backend  # noqa: PLC0415
    from .bundle import load_bundle  # noqa: PLC0415
    from .meters import jetson_clocks_locked, open_meter  # noqa: PLC0415

    o = options
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr

    def info(message: str) -> None:
        if not o.quiet:
            print(f"edgeexit: {message}", file=stderr, flush=True)

    def warn(message: str) -> None:
        print(message, file=stderr, flush=True)

    from .guards import check_bounds, check_output_paths  # noqa: PLC0415

    o.check()
    check_bounds(o.batch, o.threads)  # --batch and --threads within sane limits
    o.batch = min(o.batch, o.frames)  # never allocate or warm up a batch larger than the frames profiled
    bundle_path, source_uri, demo = resolve_inputs(o.bundle, o.source)
    bundle_name = "demo" if demo else (Path(bundle_path).resolve().name or "bundle")
    out_dir = Path(o.out) if o.out else Path(f"profile-{bundle_name}")
    check_output_paths({"--out": str(out_dir)}, (source_uri, bundle_path))  # never write into the inputs

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

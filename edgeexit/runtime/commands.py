"""The command layer of the runtime: each command's options as a dataclass and the body that wires bundle,
backend, runner, source and outputs together (``edgeexit/cli.py`` only parses options into these).

The core modules (``chain``, ``profile``, ``sources``, ``outputs``) know nothing of command lines.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from .backends import open_backend
from .bundle import load_bundle
from .chain import Decision, StageRunner, run_source
from .outputs import FrameSaver, JsonlWriter, frame_record
from .sources import open_source
from .summary import RunStats

__all__ = ["RunOptions", "run_command", "resolve_inputs", "demo_path"]


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
    bundle_path, source_uri, _demo = resolve_inputs(bundle_path, source_uri)

    bundle = load_bundle(bundle_path)
    extra = {"cuda_graphs": True} if o.cuda_graphs else {}
    if o.cuda_graphs and backend not in ("tensorrt", "auto"):
        raise ValueError("--cuda-graphs applies to the tensorrt backend")
    engines = open_backend(bundle, backend, providers=providers, threads=threads, max_batch=max(batch, 1), gate=gate,
                           full=full, **extra)
    source = None
    writer = saver = None
    stats: Optional[RunStats] = None
    interrupted = False
    previous_handler: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    try:
        runner = StageRunner(bundle, engines, gate=gate, threshold=threshold, max_exit=max_exit, full=full,
                             keep_cam=save is not None)
        source = open_source(source_uri, loop=loop, max_frames=max_frames, classes=tuple(runner.classes),
                             width=width, height=height, fps=fps, capture_factory=capture_factory)
        writer = JsonlWriter(out, stream=stdout)
        if save is not None:
            saver = FrameSaver(save, source, runner.preprocess, warn=warn)
        summary_file = stderr if writer.to_stdout else stdout
        stats = RunStats(runner.num_exits, [runner.exit_fraction(i) for i in range(runner.num_exits)], full=full)
        policy = runner.policy
        mode = "plain network (full.onnx, one call per frame)" if full else (
            f"gate {policy.gate}, stages ending at exits {', '.join(map(str, runner.exits))}, thresholds "
            f"{', '.join(f'{policy.thresholds[k]:g}' for k in runner.exits[:-1]) or '-'}")
        info(f"edgeexit: bundle {bundle_path} ({len(runner.exits)} stages, {len(runner.classes)} classes); "
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

        def on_term(_signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt

        if in_main:
            previous_handler = signal.signal(signal.SIGTERM, on_term)
        try:
            runner.warmup(batch)
            stats.start()
            run_source(runner, source, batch, on_decision, on_skip)
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
    finally:
        if in_main and previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
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
    return 130 if interrupted else 0

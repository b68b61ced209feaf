"""The ``edgeexit`` command line: train -> calibrate -> export -> run / profile.

Workstation commands import torch lazily, so the runtime commands work on a device without it.
Every expected failure is one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EdgeexitError, one_line
from .imageio import DEFAULT_MAX_PIXELS
from .gates import GATE_NAMES

GATE_LIST = ", ".join(GATE_NAMES)  # help texts name the gates of the registry (edgeexit.gates.GATES)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Early-exit CNN classifiers for edge cameras.")

# Exceptions that mean "bad input or environment": printed as one line, exit code 2. Every error edgeexit raises on
# purpose is an EdgeexitError (errors.py); ValueError and OSError come from the libraries and the system.
USER_ERRORS: tuple[type[BaseException], ...] = (EdgeexitError, ValueError, OSError)


class _Command(typer.core.TyperCommand):
    """Usage lines in the usual style, ``CKPT IMAGE... [BUNDLE]``: typer 0.29 writes required arguments as ``{ckpt}``
    and a list argument's type as ``<list[Path]>``."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
        return pieces

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "nargs", 1) != 1 and hasattr(param, "display_type_rich"):
                param.display_type_rich = lambda ctx=None: "<path>..."  # not <list[Path]>
        return params


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Early-exit CNN classifiers for edge cameras: train -> calibrate -> export -> run / profile."""
    if version:
        from . import __version__

        typer.echo(f"edgeexit {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"edgeexit: error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def one_line_errors(interrupted: str = "interrupted"):
    """Every command's error contract: a user error is one line and exit code 2, never a traceback; Ctrl-C is exit
    code 130 with ``interrupted`` (which says what was kept)."""
    try:
        yield
    except USER_ERRORS as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(interrupted, 130)


def exit_with(code: int) -> None:
    """Pass a command's non-zero status (e.g. 1: a run that saw unreadable frames) to the shell."""
    if code:
        raise typer.Exit(code)


def _parse_list(text: Optional[str], kind=float, name: str = "value") -> Optional[list]:
    if text is None or text == "":
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}")


def _set_max_pixels(limit: int) -> None:
    from .imageio import set_max_pixels

    try:
        set_max_pixels(limit)
    except ValueError as exc:
        fail(str(exc))


def _need_torch(command: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        fail(f"`edgeexit {command}` needs the training extra: pip install 'edgeexit[train]' (and torch)")


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Training folder: DATA/<class>/<image>. A validation split is held out of it."),
    out: Path = typer.Option(Path("runs/model.pt"), "--out", help="Checkpoint to write (atomically, after every epoch)."),
    arch: str = typer.Option("resnet20", help="Backbone: resnet20, resnet32, resnet56, resnet18, mobilenetv2."),
    exits: Optional[str] = typer.Option(None, help="Internal exits after these backbone unit indices, e.g. '2,5,8'."),
    exit_fractions: Optional[str] = typer.Option(None, help="Internal exits at these fractions of the backbone's MACs "
                                                 "[default: 0.15,0.3,0.45,0.6,0.75,0.9, the Shallow-Deep Networks placement]."),
    width: float = typer.Option(1.0, help="Channel width multiplier of the backbone."),
    input_size: Optional[int] = typer.Option(None, help="Square input size; images of any size are resized and "
                                             "cropped to it [default: the pretrained weights' size, else 32 for the "
                                             "CIFAR ResNets and 224 for resnet18 and mobilenetv2]."),
    resize: Optional[int] = typer.Option(None, help="Resize the shorter side to this before cropping [default: the "
                                         "pretrained weights' (256 for 224), else the input size]."),
    channels: int = typer.Option(3, help="Input channels: 3 (RGB) or 1 (grayscale)."),
    head_grid: int = typer.Option(8, help="Exit heads average-pool their input to about this many positions per side."),
    epochs: int = typer.Option(30, help="Training epochs."),
    batch_size: int = typer.Option(128, help="Global batch size (split across processes under torchrun)."),
    lr: float = typer.Option(0.1, help="Peak learning rate (SGD, Nesterov momentum 0.9, warm-up then cosine decay)."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay of weights (not biases or BatchNorm)."),
    mode: str = typer.Option("joint", help="joint: backbone and heads together; heads: frozen backbone (eval mode), heads only."),
    schedule: str = typer.Option("sdn", help="Exit-loss weights: sdn (internal weights ramp 0.01 -> MAC fraction) or constant."),
    distill: float = typer.Option(0.0, help="Self-distillation weight alpha in [0, 1) of internal exits from the last exit."),
    distill_temperature: float = typer.Option(3.0, help="Temperature of self-distillation."),
    init_weights: Optional[Path] = typer.Option(None, help="Pretrained backbone to start from: a torchvision or timm "
                                                "resnet18 / mobilenetv2 state dict, an edgeexit checkpoint or backbone "
                                                "state dict (units.N.*, fc.*). Its preprocessing is used unless "
                                                "overridden."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint at --out after its last saved epoch."),
    seed: int = typer.Option(0, help="Seed of initialisation, split, order and augmentation (runs are reproducible on CPU)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of the training folder held out (validation and calibration)."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many training images (stratified; quick runs)."),
    normalize: str = typer.Option("auto", help="Normalisation: auto (the pretrained weights' mean/std, else data), "
                                  "data (statistics of the training images), imagenet, half (0.5/0.5)."),
    augment: str = typer.Option("auto", help="Training augmentation: auto (pad-crop below 64 px, resized-crop "
                                "from 64 px), none, flip, pad-crop (pad, random crop, flip), resized-crop (random "
                                "box of 25-100% of the area, resized; flip). --mode heads with auto or none caches "
                                "the backbone's features once and trains without augmentation."),
    augmix: bool = typer.Option(False, "--augmix", help="Add AugMix (Hendrycks et al. 2020) after --augment: mixed "
                                "chains of geometric and tonal operations, none of them a corruption that evaluate "
                                "--corrupt applies. Steadier exits on degraded frames; ~0.3 ms per image of loader CPU."),
    workers: Optional[int] = typer.Option(None, help="Image-decoding processes (0: decode in the training process) "
                                          "[default: half the CPUs, 1 to 4]."),
    cache_mb: int = typer.Option(1024, "--cache-mb", help="--mode heads: keep cached features in memory up to this "
                                 "many MB, on disk (a temporary folder) beyond."),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu, cuda, cuda:1 ..."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Skip (and count) images with more "
                                   "pixels than this; JPEGs are decoded reduced when that fits."),
) -> None:
    """Train a multi-exit network on a class-folder data set.

    Several GPUs or machines: torchrun --nproc_per_node N -m edgeexit.cli train ...
    """
    _need_torch("train")
    _set_max_pixels(max_pixels)
    import torch

    from .collect import one_line_warnings
    from .train import TrainConfig, train as run_training

    if threads:
        torch.set_num_threads(threads)
    if out.exists() and not resume:
        fail(f"{out} exists: pass --resume to continue it, or choose another --out")
    cfg = TrainConfig(
        data=str(data), out=str(out), arch=arch, exits=_parse_list(exits, int, "--exits"),
        exit_fractions=_parse_list(exit_fractions, float, "--exit-fractions"), width=width, input_size=input_size,
        resize=resize, channels=channels, head_grid=head_grid, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, mode=mode, schedule=schedule, distill=distill, distill_temperature=distill_temperature,
        init_weights=str(init_weights) if init_weights else None, resume=resume, seed=seed, val_fraction=val_fraction,
        limit=limit, normalize=normalize, device=device, augment=augment, augmix=augmix, workers=workers,
        cache_mb=cache_mb,
    )
    with one_line_errors(f"interrupted; the last finished epoch is saved in {out} (continue with --resume)"):
        with one_line_warnings():
            ckpt = run_training(cfg, log=lambda m: typer.echo(m), progress=not quiet and sys.stderr.isatty())
    if ckpt:
        _print_exit_table(ckpt)


@app.command(cls=_Command)
def calibrate(
    ckpt: Path = typer.Argument(..., metavar="CKPT", help="Checkpoint from edgeexit train."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Target: accuracy at most this many points below "
                                             "the final exit's on the calibration split [default: 1.0]."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Target instead: the most accurate policy whose mean "
                                           "cost is at most this fraction of the plain network (e.g. 0.5)."),
    costs: Optional[Path] = typer.Option(None, "--costs", help="costs.json from edgeexit profile (measured per-segment "
                                         "and per-head costs and, in edgeexit-costs/2, the per-call overhead) "
                                         "[default: the model's MACs]."),
    cost_metric: Optional[str] = typer.Option(None, "--cost-metric", help="latency_ms or energy_mj: which measured "
                                              "cost of --costs to use [default: the file's metric]."),
    data: Optional[Path] = typer.Option(None, "--data", help="The training folder, if it moved since training (the "
                                        "calibration split is re-derived from it; never a test folder)."),
    gates: str = typer.Option("all", "--gates", help=f"Gates to calibrate: all, or a list of {GATE_LIST}."),
    stage_overhead: Optional[float] = typer.Option(None, "--stage-overhead", help="Cost of one engine call (one "
                                                   "stage) in MAC-equivalents, added per stage run when costs are "
                                                   "MACs. The default 2000000 is ~25-30 us, the per-call overhead "
                                                   "of ONNX Runtime on a 2-core x86 CPU at ~70 GMAC/s; with --costs "
                                                   "the file's measured overhead is used instead. [default: 2000000]"),
    exits: Optional[str] = typer.Option(None, "--exits", help="Keep these internal exits (e.g. 2,4; none = the plain "
                                        "network) instead of choosing, per gate, the cheapest subset that meets "
                                        "the target."),
    max_kept: Optional[int] = typer.Option(None, "--max-kept", help="Try only subsets of at most this many internal "
                                           "exits."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the calibrated checkpoint here [default: update CKPT "
                                       "in place, atomically]."),
    folds: int = typer.Option(5, help="Cross-fitting folds of the learned gate."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda, auto ..."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    degrade: Optional[str] = typer.Option(None, "--degrade", help="Also calibrate on corrupted copies of the split "
                                          "(kinds of edgeexit.corrupt, comma-separated, or all), so that the target "
                                          "holds on degraded frames too."),
    severities: str = typer.Option("1,3,5", "--severities", help="Severities (1..5) of the --degrade copies."),
    robust: str = typer.Option("mean", "--robust", help="With --degrade: mean (clean and mean loss <= --max-drop, "
                               "worst loss <= --worst-drop) or worst (every condition's loss <= --max-drop)."),
    degraded_as: str = typer.Option("policy", "--degraded-as", help="With --degrade: policy (the calibrated "
                                    "policy meets the target on the copies) or guard (the policy stays the clean "
                                    "one; the copies fit the drift guard's conservative thresholds on the same "
                                    "exits, which `run` switches to when a stream drifts)."),
    worst_drop: float = typer.Option(2.5, "--worst-drop", help="With --degrade --robust mean: the largest loss "
                                     "allowed on any corrupted copy (points)."),
    confidence: Optional[float] = typer.Option(None, "--confidence", help="Hold --max-drop with this one-sided "
                                               "confidence (e.g. 0.95): the upper bound of the loss on the "
                                               "calibration split, not its estimate, must meet the target, so the "
                                               "target holds on new images at that rate. Points are tested from "
                                               "full depth towards cheaper ones and the search stops at the first "
                                               "that fails (fixed-sequence testing). With --degrade, every condition's loss (and the mean over the "
                                               "corrupted copies) is held on its bound, with the same walk. "
                                               "[default: the estimate]"),
) -> None:
    """Fit temperatures, orient every exit gate and choose, per gate, the internal exits to keep and their
    thresholds on the calibration split; write the winning policy (and every gate's) into the checkpoint."""
    _need_torch("calibrate")
    from .calibrate import calibrate as run_calibration, print_calibration
    from .collect import one_line_warnings

    if max_drop is not None and budget is not None:
        fail("give --max-drop or --budget, not both")
    with one_line_errors("interrupted; the checkpoint is unchanged"):
        with one_line_warnings():
            cal = run_calibration(ckpt, out=out, max_drop=max_drop, budget=budget, costs_path=costs,
                                  cost_metric=cost_metric, data=data, gates=gates, stage_overhead=stage_overhead,
                                  exits=exits, max_kept=max_kept, folds=folds, batch_size=batch_size,
                                  device=device, progress=not quiet and sys.stderr.isatty(),
                                  log=lambda m: typer.echo(m, err=True), degrade=degrade, severities=severities,
                                  robust=robust, worst_drop=worst_drop, confidence_level=confidence,
                                  degraded_as=degraded_as)
    print_calibration(cal)
    from .calibrate import exits_text

    typer.echo(f"policy: gate {cal['winner']} (exits {exits_text(cal['gates'][cal['winner']].get('exits'))}) "
               f"written to {cal['written_to']}")


@app.command(cls=_Command)
def evaluate(
    ckpt: Path = typer.Argument(..., metavar="CKPT", help="Calibrated checkpoint (edgeexit calibrate)."),
    data: Path = typer.Option(..., "--data", help="Labelled evaluation folder DATA/<class>/<image> (e.g. the test set)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder [default: reports/<checkpoint stem>]."),
    corrupt: Optional[str] = typer.Option(None, "--corrupt", help="Also evaluate corrupted copies: noise, shot, "
                                          "blur, defocus, motion, contrast, brightness, saturate, fog, pixelate, jpeg "
                                          "(comma-separated) or all."),
    severities: str = typer.Option("1,2,3,4,5", "--severities", help="Corruption severities (1..5)."),
    costs: Optional[Path] = typer.Option(None, "--costs", help="costs.json to price exits with [default: the costs "
                                         "used in calibration]."),
    cost_metric: Optional[str] = typer.Option(None, "--cost-metric", help="latency_ms or energy_mj from --costs."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many images (stratified, seeded)."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda, auto ..."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Skip (and count) images with more "
                                   "pixels than this; JPEGs are decoded reduced when that fits."),
) -> None:
    """Evaluate every calibrated exit gate on a labelled folder (thresholds fixed by calibration): accuracy vs
    cost, operating points, failure-prediction AUROC, oracle; report.json and plots."""
    _need_torch("evaluate")
    _set_max_pixels(max_pixels)
    from .collect import one_line_warnings
    from .evaluate import evaluate as run_evaluation, print_report

    sev = _parse_list(severities, int, "--severities") or [1, 2, 3, 4, 5]
    with one_line_errors():
        with one_line_warnings():
            report = run_evaluation(ckpt, data, out=out, corrupt=corrupt, severities=sev, costs_path=costs,
                                    cost_metric=cost_metric, limit=limit, batch_size=batch_size, device=device,
                                    plots=not no_plots, progress=not quiet and sys.stderr.isatty(),
                                    log=lambda m: typer.echo(m, err=True))
    print_report(report)


@app.command(cls=_Command)
def explain(
    ckpt: Path = typer.Argument(..., metavar="CKPT", help="Checkpoint (calibrated: the policy's exit is marked)."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help="Image files (or folders of images)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNG grids [default: reports/<checkpoint stem>/explain]."),
    device: str = typer.Option("cpu", help="cpu, cuda, auto ..."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Skip (and count) images with more "
                                   "pixels than this; JPEGs are decoded reduced when that fits."),
) -> None:
    """One PNG per image: every exit's CAM overlay, prediction, confidence and gate scores; the policy's exit framed."""
    _need_torch("explain")
    _set_max_pixels(max_pixels)
    from .collect import one_line_warnings
    from .explain import explain as run_explain

    with one_line_errors():
        with one_line_warnings():
            written = run_explain(ckpt, images, out=out, device=device, log=lambda m: typer.echo(m, err=True))
    for path in written:
        typer.echo(str(path))


@app.command(cls=_Command)
def run(
    bundle: Optional[str] = typer.Argument(None, metavar="BUNDLE", help="Bundle directory from edgeexit export (default: the demo "
                                           "bundle shipped with edgeexit)."),
    source: Optional[str] = typer.Argument(None, metavar="SOURCE", help="Input: image, folder (class sub-folders give labels and "
                                           "accuracy), video file, camera index, /dev/videoN, v4l2://, csi://N, "
                                           "rtsp://... (default: the demo samples)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Append the JSON lines to this file instead of stdout (created "
                                       "if missing, locked while the run writes). "
                                       "Fields: frame, time (video, camera) or name (file), class_id, label, "
                                       "confidence, exit, gate_score, latency_ms (the frame's share of the inference "
                                       "time), macs, true_id / true_label / correct (labelled folders), failed "
                                       "(reason or null), drift (the drift guard's state, when it runs)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Save annotated frames (label, exit, CAM overlay) here: "
                                        "PNGs for images, a video for video and camera inputs."),
    batch: int = typer.Option(1, "--batch", min=1, help="Frames per batch (samples that exit leave the batch)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="Use another exported gate: its own stages and "
                                       "calibrated policy (export it with --gates). Gates: " + GATE_LIST + "."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help="Override thresholds (the calibrated signs "
                                            "stay): one value for every kept internal exit, or T1,T2,... one per "
                                            "kept internal exit."),
    max_exit: Optional[int] = typer.Option(None, "--max-exit", help="Leave at this (kept) exit at the latest."),
    full: bool = typer.Option(False, "--full", help="Plain-network baseline: the monolithic full.onnx, one call "
                                "per frame."),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime or tensorrt."),
    providers: Optional[str] = typer.Option(None, "--providers", help="ONNX Runtime providers in order, e.g. "
                                            "tensorrt,cuda,cpu (default: the best available)."),
    threads: int = typer.Option(1, "--threads", min=1, help="Intra-op threads per ONNX Runtime session (default 1: "
                                "a chain runs sessions one after another, and more threads per session contend)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="TensorRT: capture each stage in a CUDA graph "
                                     "at the batch size used (fewer launch costs per frame)."),
    loop: bool = typer.Option(False, "--loop", help="Restart files, folders and videos at the end."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=0, help="Stop after this many frames."),
    width: Optional[int] = typer.Option(None, "--width", help="Camera capture width."),
    height: Optional[int] = typer.Option(None, "--height", help="Camera capture height."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Camera capture frame rate."),
    quiet: bool = typer.Option(False, "--quiet", help="No informational lines on stderr (warnings and the summary stay)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Skip (and count) images with more "
                                   "pixels than this; JPEGs are decoded reduced when that fits."),
    drift_window: Optional[int] = typer.Option(None, "--drift-window", help="Drift guard window in frames [default: "
                                               "the bundle's, 32]: when the mean confidence over it leaves the "
                                               "calibration's, run the conservative policy until it recovers."),
    no_drift: bool = typer.Option(False, "--no-drift", help="Turn the drift guard off."),
) -> None:
    """Classify frames with a bundle, chaining its stage engines (one per kept exit) and really stopping at the
    first exit whose gate allows it (works without torch). One JSON line per frame; a summary table at the end (on stderr when the
    lines go to stdout), also on Ctrl-C / SIGTERM (exit code 130)."""
    from .runtime.commands import RunOptions, run_command
    _set_max_pixels(max_pixels)

    with one_line_errors():
        code = run_command(RunOptions(
            bundle, source, out=str(out) if out else None, save=str(save) if save else None, batch=batch, gate=gate,
            threshold=threshold, max_exit=max_exit, full=full, backend=backend, providers=providers, threads=threads,
            cuda_graphs=cuda_graphs, loop=loop, max_frames=max_frames, width=width, height=height, fps=fps, quiet=quiet,
            drift_window=drift_window, no_drift=no_drift))
    exit_with(code)


@app.command()
def serve(
    bundle: str = typer.Argument(..., help="Bundle directory from edgeexit export (e.g. edgeexit/assets/demo/bundle)."),
    name: Optional[str] = typer.Option(None, "--name", help="Triton model name [default: the bundle directory's "
                                       "name]; <name>_full serves the plain network."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP/REST port (KServe v2: /v2/health/ready, "
                                  "/v2/models/<name>/infer)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port (/metrics)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Largest batch Triton's dynamic batcher forms "
                                  "(frames, over all requests)."),
    queue_delay_us: int = typer.Option(1000, "--queue-delay-us", min=0, help="How long the batcher may hold a "
                                       "request to fill a batch, in microseconds."),
    instances: int = typer.Option(1, "--instances", min=1, help="Model instances (each with its own engines) "
                                  "running batches in parallel."),
    gate: Optional[str] = typer.Option(None, "--gate", help="Another calibrated gate of the bundle (as run)."),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime or tensorrt."),
    providers: Optional[str] = typer.Option(None, "--providers", help="ONNX Runtime providers in order, e.g. "
                                            "tensorrt,cuda,cpu (default: the best available)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads per ONNX Runtime session."),
    stats_interval: float = typer.Option(60.0, "--stats-interval", help="Log edgeexit's per-exit counters and mean "
                                         "cost as a JSON line on stderr every this many seconds (0: only at the end)."),
    drain_timeout: int = typer.Option(30, "--drain-timeout", min=0, help="On SIGTERM/Ctrl-C, wait this many "
                                      "seconds for in-flight requests."),
) -> None:
    """Serve a bundle to many cameras: Triton Inference Server (via PyTriton) with models <name> (early exit) and
    <name>_full (plain network), dynamic batching, health and Prometheus metrics. Needs 'edgeexit[serve]' in a
    venv of the system's Python (see the README). Stops, after draining, on SIGTERM or Ctrl-C."""
    from .serve.server import serve_command

    with one_line_errors():
        code = serve_command(bundle, name=name, host=host, http_port=http_port, grpc_port=grpc_port,
                             metrics_port=metrics_port, max_batch=max_batch, queue_delay_us=queue_delay_us,
                             instances=instances, gate=gate, backend=backend, providers=providers, threads=threads,
                             stats_interval=stats_interval, drain_timeout=drain_timeout)
    exit_with(code)


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """What this machine offers the runtime: python, numpy, onnxruntime and its providers, TensorRT, pycuda, CUDA,
    OpenCV (GStreamer), cameras, power meters, torch (looked up, never imported)."""
    from .runtime import doctor as doc

    rows = doc.collect()
    if as_json:
        import json

        typer.echo(json.dumps(doc.to_dict(rows), indent=2))
    else:
        doc.render(rows)


@app.command(cls=_Command)
def export(
    ckpt: Path = typer.Argument(..., metavar="CKPT", help="Checkpoint to export; or, with --tensorrt, a bundle directory whose engines to build."),
    out: Optional[Path] = typer.Option(None, "--out", help="[required when CKPT is a checkpoint] Bundle directory to "
                                       "write (atomically: complete or absent).", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out (once the new one is complete)."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
    samples: int = typer.Option(64, help="Check inputs: held-out validation images when the checkpoint's data is at hand."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip onnx.checker and the ONNX Runtime vs torch parity checks."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Build TensorRT engines beside the ONNX files (needs TensorRT)."),
    fp16: bool = typer.Option(False, "--fp16", help="TensorRT engines in FP16 where the GPU has fast FP16."),
    int8: bool = typer.Option(False, "--int8", help="INT8 segment engines (heads stay FP16/FP32), entropy-calibrated."),
    calib_images: int = typer.Option(256, help="INT8: number of calibration images."),
    calib_data: Optional[Path] = typer.Option(None, help="INT8: folder of calibration images (default: the checkpoint's validation split)."),
    max_batch: int = typer.Option(32, help="TensorRT: largest batch of the engines' optimization profile."),
    gates: Optional[str] = typer.Option(None, "--gates", help="More calibrated gates to export beside the "
                                        "checkpoint's winner (comma-separated), so run --gate can switch to them: "
                                        + GATE_LIST + "."),
) -> None:
    """Export a checkpoint to a bundle: per exported gate one stage graph per kept exit (segments + head, only the
    gate's signals) and a CAM graph per kept exit, full.onnx and manifest.json (checked against torch with ONNX
    Runtime); --tensorrt also builds engines, or (re)builds them for an existing bundle."""
    from .export.command import export_command
    from .export.summary import print_bundle_table

    with one_line_errors(f"interrupted; {out or ckpt} was left as it was"):
        bundle = export_command(
            ckpt, out, force=force, opset=opset, samples=samples, check=not no_check, tensorrt=tensorrt, fp16=fp16,
            int8=int8, calib_images=calib_images, calib_data=calib_data, max_batch=max_batch,
            gates=[g.strip() for g in gates.split(",") if g.strip()] if gates else None, echo=lambda m: typer.echo(m), warn=lambda m: typer.echo(f"edgeexit: warning: {m}", err=True),
        )
    print_bundle_table(bundle)


@app.command(cls=_Command)
def profile(
    bundle: Optional[str] = typer.Argument(None, metavar="BUNDLE", help="Bundle directory from edgeexit export (default: the demo "
                                           "bundle shipped with edgeexit)."),
    source: Optional[str] = typer.Argument(None, metavar="SOURCE", help="Frames to profile on (as edgeexit run takes them: image, "
                                           "folder, video, camera ...) (default: the demo samples)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: profile-<bundle name>)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="Profile the pipeline of another exported gate "
                                       "(default: the bundle's)."),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime or tensorrt."),
    providers: Optional[str] = typer.Option(None, "--providers", help="ONNX Runtime providers in order, e.g. "
                                            "tensorrt,cuda,cpu (default: the best available)."),
    threads: Optional[int] = typer.Option(1, "--threads", min=1, help="Intra-op threads per ONNX Runtime session."),
    batch: int = typer.Option(1, "--batch", min=1, help="Frames per call (stages alone and the runs)."),
    frames: int = typer.Option(200, "--frames", min=1, help="Frames of SOURCE for the adaptive, full and chain runs, "
                               "drawn at random over the whole source (a shorter source is cycled)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the frame selection."),
    block: int = typer.Option(25, "--block", min=1, help="Frames per block of one mode in the interleaved runs."),
    warmup_ms: float = typer.Option(200.0, "--warmup-ms", min=0, help="Warm-up time before measuring (as trtexec)."),
    iterations: int = typer.Option(200, "--iterations", min=1, help="Timed runs of each stage and of full.onnx alone."),
    meter: str = typer.Option("auto", "--meter", help="Power meter: auto, jetson, nvml, rapl, constant or none."),
    power_watts: Optional[float] = typer.Option(None, "--power-watts", help="Watts for --meter constant (energy is "
                                                "then an estimate, labelled so)."),
    rate_hz: float = typer.Option(100.0, "--rate-hz", help="Power sampling rate."),
    cost_metric: str = typer.Option("latency_ms", "--cost-metric", help="latency_ms or energy_mj: the metric of "
                                    "costs.json (both are recorded)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines on stderr."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Skip (and count) images with more "
                                   "pixels than this; JPEGs are decoded reduced when that fits."),
) -> None:
    """Measure each stage and full.onnx alone (latency, energy), the per-call overhead, and the adaptive chain
    against full depth on the same frames; write profile.json, costs.json (for edgeexit calibrate --costs) and
    plots. Works without torch."""
    from .runtime.commands import ProfileOptions, profile_command
    _set_max_pixels(max_pixels)

    options = ProfileOptions(bundle=bundle, source=source, out=str(out) if out else None, gate=gate, backend=backend,
                             providers=providers, threads=threads, batch=batch, frames=frames, seed=seed, block=block,
                             warmup_ms=warmup_ms, iterations=iterations, meter=meter, power_watts=power_watts,
                             rate_hz=rate_hz, cost_metric=cost_metric, quiet=quiet)
    with one_line_errors():
        code = profile_command(options)
    exit_with(code)


def _print_exit_table(ckpt: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    costs, last = ckpt["costs"], ckpt["history"][-1]
    table = Table(title=f"{ckpt['config']['arch']} after epoch {ckpt['epoch']}: exits on the validation split")
    for col in ("exit", "after unit", "MACs (cumulative)", "% of plain network", "val acc %"):
        table.add_column(col, justify="right")
    units = [*ckpt["config"]["exits"], "last"]
    for i, (macs, acc) in enumerate(zip(costs["cumulative_macs"], last["val_accuracy"] or [float("nan")] * len(units))):
        table.add_row(str(i), str(units[i]), f"{macs / 1e6:.2f}M", f"{100 * macs / costs['reference_macs']:.1f}", f"{acc:.2f}")
    Console().print(table)



def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """Every Python warning (Pillow, numpy, edgeexit's own) as one ``edgeexit: warning:`` line."""
    try:
        print(f"edgeexit: warning: {one_line(str(message))}", file=sys.stderr if file is None else file, flush=True)
    except (OSError, ValueError):
        pass


def _click_exceptions(name: str) -> tuple:
    """``name`` (UsageError, ClickException, Abort) from click and from the copy of click newer typers carry."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def main() -> None:
    """The console script: click's usage errors become one ``edgeexit: error:`` line (exit code 2) instead of
    click's usage block, and warnings are one line each, in every command."""
    import os
    import warnings

    # Before torch loads: idle OpenMP threads that spin slow training ~4x on a shared CPU (the user's choice wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.stdout.isatty():  # piped or logged: rich would wrap tables at 80 columns and truncate them
        os.environ.setdefault("COLUMNS", "160")
    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)
    except _click_exceptions("NoArgsIsHelpError") as exc:  # bare `edgeexit` (or a group without a command)
        typer.echo(exc.ctx.get_help())
        sys.exit(0)
    except _click_exceptions("UsageError") as exc:
        ctx = getattr(exc, "ctx", None)
        where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        typer.echo(f"edgeexit: error: {one_line(exc.format_message())}{where}", err=True)
        sys.exit(2)
    except _click_exceptions("ClickException") as exc:
        typer.echo(f"edgeexit: error: {one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except _click_exceptions("Abort"):
        typer.echo("edgeexit: error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

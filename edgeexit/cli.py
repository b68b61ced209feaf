"""The ``edgeexit`` command line: train -> calibrate -> export -> run / profile.

Workstation commands import torch lazily, so the runtime commands work on a device without it.
Every expected failure is one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Early-exit CNN classifiers for edge cameras.")

# Exceptions that mean "bad input or environment": printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Early-exit CNN classifiers for edge cameras: train -> calibrate -> export -> run / profile."""
    if version:
        from . import __version__

        typer.echo(f"edgeexit {__version__}")
        raise typer.Exit()


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"edgeexit: error: {message}", err=True)
    raise typer.Exit(code)


def _parse_list(text: Optional[str], kind=float, name: str = "value") -> Optional[list]:
    if text is None or text == "":
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}")


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
    input_size: Optional[int] = typer.Option(None, help="Square input size [default: the shorter side of the first image]."),
    resize: Optional[int] = typer.Option(None, help="Resize the shorter side to this before cropping [default: input size]."),
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
    init_weights: Optional[Path] = typer.Option(None, help="Backbone state dict (units.N.*, fc.*) to start from, e.g. a pretrained model."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint at --out after its last saved epoch."),
    seed: int = typer.Option(0, help="Seed of initialisation, split, order and augmentation (runs are reproducible on CPU)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of the training folder held out (validation and calibration)."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many training images (stratified; quick runs)."),
    normalize: str = typer.Option("data", help="Normalisation: data (statistics of the training images), imagenet, half (0.5/0.5)."),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu, cuda, cuda:1 ..."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch [default: torch's choice]."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a multi-exit network on a class-folder data set.

    Several GPUs or machines: torchrun --nproc_per_node N -m edgeexit.cli train ...
    """
    _need_torch("train")
    import torch

    from .checkpoint import CheckpointError
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
        limit=limit, normalize=normalize, device=device,
    )
    try:
        ckpt = run_training(cfg, log=lambda m: typer.echo(m), progress=not quiet and sys.stderr.isatty())
    except (CheckpointError, *USER_ERRORS) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; the last finished epoch is saved in {out} (continue with --resume)", 130)
    if ckpt:
        _print_exit_table(ckpt)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""Training of multi-exit networks.

Loss (joint mode) = sum_i w_i(t) * L_i, with L_i the loss of exit i and, by default, the Shallow-Deep
Networks schedule: the last exit has weight 1 and internal exit i ramps linearly from 0.01 to its cumulative
MAC fraction f_i over training (t = epoch / (epochs - 1)). With self-distillation (alpha > 0),
L_i = (1 - alpha) CE(z_i, y) + alpha T^2 KL(softmax(z_last / T) || softmax(z_i / T)) for internal exits.
Heads-only mode freezes the backbone segments in eval mode (BatchNorm statistics do not move).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import Augment, ImageSet, channel_stats, decode_images, eval_batches, load_split
from .models import SDN_FRACTIONS, MultiExitNet, build_model
from .preprocess import Preprocess


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "resnet20"
    exits: list[int] | None = None
    exit_fractions: list[float] | None = None
    width: float = 1.0
    input_size: int | None = None
    resize: int | None = None
    channels: int = 3
    head_grid: int = 8
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    mode: str = "joint"  # joint | heads
    schedule: str = "sdn"  # sdn | constant
    distill: float = 0.0
    distill_temperature: float = 3.0
    init_weights: str | None = None
    resume: bool = False
    seed: int = 0
    val_fraction: float = 0.1
    limit: int | None = None
    normalize: str = "data"  # data | imagenet | half
    device: str = "auto"
    eval_every: int = 1

    def check(self) -> None:
        if self.mode not in ("joint", "heads"):
            raise ValueError(f"--mode must be joint or heads, got {self.mode!r}")
        if self.schedule not in ("sdn", "constant"):
            raise ValueError(f"--schedule must be sdn or constant, got {self.schedule!r}")
        if not 0 <= self.distill < 1:
            raise ValueError(f"--distill must lie in [0, 1), got {self.distill}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--epochs, --batch-size and --lr must be positive")
        if self.exits is not None and self.exit_fractions is not None:
            raise ValueError("give --exits or --exit-fractions, not both")


@dataclass
class EpochResult:
    epoch: int
    loss: float
    exit_losses: list[float]
    val_accuracy: list[float]
    lr: float
    seconds: float
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- losses


def exit_weights(fractions: Sequence[float], epoch: int, epochs: int, schedule: str) -> list[float]:
    """SDN schedule: internal weights ramp 0.01 -> f_i linearly over training; the last exit weighs 1."""
    t = 1.0 if epochs <= 1 else epoch / (epochs - 1)
    internal = [0.01 + (f - 0.01) * t if schedule == "sdn" else f for f in fractions[:-1]]
    return [*internal, 1.0]


def multi_exit_loss(logits: list[torch.Tensor], target: torch.Tensor, weights: Sequence[float],
                    distill: float = 0.0, temperature: float = 3.0) -> tuple[torch.Tensor, list[float]]:
    """Weighted sum of exit losses; internal exits optionally distilled from the (detached) last exit."""
    teacher = F.softmax(logits[-1].detach() / temperature, dim=1) if distill > 0 else None
    total = logits[0].new_zeros(())
    parts = []
    for i, (z, w) in enumerate(zip(logits, weights)):
        loss = F.cross_entropy(z, target)
        if teacher is not None and i < len(logits) - 1:
            kd = F.kl_div(F.log_softmax(z / temperature, dim=1), teacher, reduction="batchmean") * temperature**2
            loss = (1 - distill) * loss + distill * kd
        total = total + w * loss
        parts.append(float(loss.detach()))
    return total, parts


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def exit_accuracies(model: MultiExitNet, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess,
                    device: torch.device, batch_size: int = 256) -> list[float]:
    """Top-1 accuracy (%) of every exit on centre-cropped uint8 images."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(model.num_exits)
    for start, x in zip(range(0, len(images), batch_size), eval_batches(images, preprocess, batch_size)):
        y = torch.from_numpy(labels[start : start + batch_size])
        for i, z in enumerate(model(x.to(device))):
            correct[i] += (z.argmax(1).cpu() == y).sum()
    model.train(was_training)
    return (100.0 * correct / max(1, len(labels))).tolist()


# ----------------------------------------------------------------------------------------------- set-up


def split_fingerprint(root: Path | str, val_paths: Sequence[Path]) -> str:
    """SHA-256 of the held-out files' paths relative to the training folder: pins the calibration split."""
    import hashlib

    names = sorted(str(Path(p).relative_to(root)) for p in val_paths)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def check_split(split: dict, root: Path | str, val_paths: Sequence[Path], where: str) -> None:
    """Refuse a held-out split that differs from the one recorded at training (files added, removed or another
    folder): calibrating on images the model trained on would overstate every gate."""
    recorded = split.get("val_files_sha256")
    if recorded and recorded != split_fingerprint(root, val_paths):
        raise ValueError(f"the held-out split of {root} differs from the one {where} was trained with "
                         "(files were added, removed or renamed, or this is another folder)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_memory_format(device: torch.device, input_size: int) -> torch.memory_format:
    """channels_last makes convolutions ~20% faster on GPUs and on CPUs for small inputs.

    On CPU it is used only up to 32x32 inputs: with torch 2.13's CPU build, the backward pass of a stride-2 1x1
    convolution on a channels_last input of 64x64 or more corrupts the heap and crashes (reproduced in
    tests/test_train.py::test_large_inputs_train_on_cpu).
    """
    if device.type == "cuda" or input_size <= 32:
        return torch.channels_last
    return torch.contiguous_format


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _subset(indices: np.ndarray, labels: Sequence[int], limit: int | None, seed: int) -> np.ndarray:
    """A stratified, seeded subset of at most ``limit`` indices (quick runs and tests)."""
    if limit is None or limit >= len(indices):
        return indices
    rng = np.random.RandomState(seed + 1)
    labels = np.asarray(labels)[indices]
    classes = np.unique(labels)
    per_class = max(1, limit // len(classes))
    keep = [rng.permutation(indices[labels == c])[:per_class] for c in classes]
    return np.sort(np.concatenate(keep))


def _preprocess_for(cfg: TrainConfig, train_images: np.ndarray, input_size: int) -> Preprocess:
    if cfg.normalize == "imagenet" and cfg.channels == 3:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    elif cfg.normalize == "half":
        mean, std = (0.5,) * cfg.channels, (0.5,) * cfg.channels
    else:
        mean, std = channel_stats(train_images[: min(len(train_images), 5000)])
    return Preprocess(cfg.channels, cfg.resize or input_size, input_size, mean, std)


def load_init_weights(model: MultiExitNet, path: str) -> tuple[int, int]:
    """Load a plain backbone state dict (``units.N...`` / ``fc...``, as ``Backbone`` names them) into the segments.

    Returns (tensors loaded, tensors in the backbone). Shapes must match; unknown keys are an error.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read init weights {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    target = backbone_state_names(model)
    unknown = [k for k in state if k not in target]
    if unknown:
        raise CheckpointError(f"{path}: keys not in a {model.config.get('arch')} backbone: {', '.join(unknown[:3])}")
    own = model.state_dict()
    for key, value in state.items():
        name = target[key]
        if own[name].shape != value.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model needs {tuple(own[name].shape)}")
        own[name] = value
    model.load_state_dict(own)
    return len(state), len(target)


def backbone_state_names(model: MultiExitNet) -> dict[str, str]:
    """Map a plain ``Backbone`` state-dict name (``units.K.*``, ``fc.*``) to the multi-exit model's name."""
    mapping, unit = {}, 0
    for s, segment in enumerate(model.segments):
        for j, _ in enumerate(segment):
            for name in segment[j].state_dict():
                mapping[f"units.{unit}.{name}"] = f"segments.{s}.{j}.{name}"
            unit += 1
    for name in model.heads[-1].fc.state_dict():
        mapping[f"fc.{name}"] = f"heads.{model.num_exits - 1}.fc.{name}"
    return mapping


def model_config(cfg: TrainConfig, num_classes: int, input_size: int) -> dict:
    fractions = cfg.exit_fractions if cfg.exit_fractions is not None else (None if cfg.exits is not None else list(SDN_FRACTIONS))
    return {
        "arch": cfg.arch, "num_classes": num_classes, "input_size": input_size, "in_chans": cfg.channels,
        "width": cfg.width, "small_input": input_size <= 64, "exits": cfg.exits, "exit_fractions": fractions,
        "head_grid": cfg.head_grid, "head_width": None,
    }


def _infer_input_size(paths: Sequence[Path]) -> int:
    from .imageio import image_size

    return int(min(image_size(paths[0])))  # header only: a huge or broken first image is a one-line ImageError


# ----------------------------------------------------------------------------------------------- main loop


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume) a multi-exit network; writes the checkpoint atomically after every epoch.

    Returns the final checkpoint dict.
    """
    cfg.check()
    rank, world, local_rank = distributed_env()
    device = pick_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    say = log if is_main else (lambda _msg: None)

    resume_state = None
    if cfg.resume and Path(cfg.out).is_file():
        resume_state = load_checkpoint(cfg.out)
        saved = resume_state.get("train_config", {})
        for key in ("arch", "exits", "exit_fractions", "seed", "val_fraction", "mode", "batch_size"):
            if key in saved and saved[key] != getattr(cfg, key) and not (key in ("exits", "exit_fractions")):
                raise CheckpointError(f"--resume: {cfg.out} was trained with {key}={saved[key]!r}, not {getattr(cfg, key)!r}")
        cfg.epochs = max(cfg.epochs, int(saved.get("epochs", cfg.epochs)))

    classes = resume_state["classes"] if resume_state else None
    folder, train_idx, val_idx = load_split(cfg.data, cfg.val_fraction, cfg.seed, classes)
    train_idx = _subset(train_idx, folder.labels, cfg.limit, cfg.seed)
    val_idx = _subset(val_idx, folder.labels, None if cfg.limit is None else max(100, cfg.limit // 5), cfg.seed)
    if resume_state:
        check_split(resume_state.get("split") or {}, folder.root, [folder.paths[i] for i in val_idx], cfg.out)
    input_size = int(resume_state["config"]["input_size"]) if resume_state else (cfg.input_size or _infer_input_size(folder.paths))

    t0 = time.perf_counter()
    if resume_state:  # decode at the checkpoint's scale and channel count, whatever the command line says
        saved_pre = Preprocess.from_dict(resume_state["preprocess"])
        probe = Preprocess(saved_pre.channels, saved_pre.resize, saved_pre.crop, (0.0,) * saved_pre.channels,
                           (1.0,) * saved_pre.channels)
    else:
        probe = Preprocess(cfg.channels, cfg.resize or input_size, input_size, (0.0,) * cfg.channels, (1.0,) * cfg.channels)
    train_set = decode_images([folder.paths[i] for i in train_idx], [folder.labels[i] for i in train_idx], probe, square=True)
    preprocess = Preprocess.from_dict(resume_state["preprocess"]) if resume_state else _preprocess_for(cfg, train_set.images, input_size)
    val_set = decode_images([folder.paths[i] for i in val_idx], [folder.labels[i] for i in val_idx], preprocess, square=False)
    say(f"data: {len(train_set)} training and {len(val_set)} validation images in {len(folder.classes)} classes "
        f"({train_set.skipped + val_set.skipped} unreadable skipped), decoded in {time.perf_counter() - t0:.1f}s")
    if len(train_set) == 0:
        raise ValueError(f"no readable training images in {cfg.data}")

    torch.manual_seed(cfg.seed)
    config = resume_state["config"] if resume_state else model_config(cfg, len(folder.classes), input_size)
    memory_format = training_memory_format(device, input_size)
    model = build_model(config).to(device, memory_format=memory_format)
    start_epoch, history, step = 0, [], 0
    if cfg.init_weights and not resume_state:
        loaded, total = load_init_weights(model, cfg.init_weights)
        say(f"initialised {loaded}/{total} backbone tensors from {cfg.init_weights}")
    costs = model.costs()
    fractions = costs.cumulative_fraction

    if cfg.mode == "heads":
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=0.9, nesterov=True)
    if resume_state:
        model.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start_epoch, history, step = int(resume_state["epoch"]), list(resume_state.get("history", [])), int(resume_state.get("step", 0))
        say(f"resuming {cfg.out} after epoch {start_epoch}")

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    augment = Augment(preprocess)
    per_rank = max(1, min(cfg.batch_size // world, len(train_set) // world))  # a data set smaller than a batch
    steps_per_epoch = max(1, len(train_set) // (per_rank * world))
    total_steps, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    images = torch.from_numpy(train_set.images)
    labels = torch.from_numpy(train_set.labels)
    checkpoint: dict = resume_state or {}

    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(len(train_set), generator=generator)[: steps_per_epoch * per_rank * world]
        order = order.view(steps_per_epoch, world, per_rank)[:, rank]
        weights = exit_weights(fractions, epoch, cfg.epochs, cfg.schedule)
        net.train()
        if cfg.mode == "heads":
            model.segments.eval()  # frozen backbone: BatchNorm keeps its running statistics
        sums, count = np.zeros(model.num_exits + 1), 0
        bar = _progress(progress and is_main, f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
        for batch in order:
            lr = lr_at(step, total_steps, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = augment(images[batch], generator).to(device, memory_format=memory_format, non_blocking=True)
            y = labels[batch].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = net(x)
            loss, parts = multi_exit_loss([z.float() for z in logits], y, weights, cfg.distill, cfg.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += [float(loss.detach()), *parts]
            count += 1
            step += 1
            bar.advance()
        bar.close()
        means = sums / max(1, count)
        val = exit_accuracies(model, val_set.images, val_set.labels, preprocess, device) if is_main and (
            (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs) else []
        result = EpochResult(epoch + 1, float(means[0]), means[1:].tolist(), val, lr, time.perf_counter() - t_epoch)
        history.append(asdict(result))
        say(f"epoch {epoch + 1}/{cfg.epochs}  loss {result.loss:.3f}  lr {lr:.4f}  {result.seconds:.0f}s  "
            + ("val acc % " + " ".join(f"{a:.1f}" for a in val) if val else ""))
        if is_main:
            checkpoint = {
                "config": model.config, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "classes": list(folder.classes), "preprocess": preprocess.to_dict(),
                "split": {"data": str(Path(cfg.data).resolve()), "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                          "num_train": len(train_set), "num_val": len(val_set), "limit": cfg.limit,
                          "val_files_sha256": split_fingerprint(folder.root, [folder.paths[i] for i in val_idx])},
                "costs": costs.to_dict(), "epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(),
                "history": history, "train_config": {**asdict(cfg), "epochs": cfg.epochs},
                "versions": {"edgeexit": __version__, "torch": str(torch.__version__)},
                "policy": None,  # weights changed: any earlier calibration no longer applies
            }
            save_checkpoint(cfg.out, checkpoint)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return checkpoint


class _progress:
    """A rich progress bar when interactive; silent otherwise (CI logs stay readable)."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

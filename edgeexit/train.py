"""Training of multi-exit networks.

Loss (joint mode) = sum_i w_i(t) * L_i, with L_i the loss of exit i and, by default, the Shallow-Deep
Networks schedule: the last exit has weight 1 and internal exit i ramps linearly from 0.01 to its cumulative
MAC fraction f_i over training (t = epoch / (epochs - 1)). With self-distillation (alpha > 0),
L_i = (1 - alpha) CE(z_i, y) + alpha T^2 KL(softmax(z_last / T) || softmax(z_i / T)) for internal exits.
Heads-only mode freezes the backbone segments in eval mode (BatchNorm statistics do not move); without augmentation
it trains the heads on each exit's input computed once (``feature_cache``). Every epoch reports each exit's plain
cross-entropy, which reads right while the weighted sum grows with the ramping weights.

Data streams from disk (``data.FolderDataset`` in DataLoader workers), so memory does not grow with the data set;
the input size comes from ``--input-size``, the pretrained weights' configuration or the architecture's default
(``plan_input``).
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
from .data import SkipLog, load_split, to_model_input
from .models import SDN_FRACTIONS, MultiExitNet, build_model
from .models.pretrained import InitWeights, read_init_weights
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
    normalize: str = "auto"  # auto (the pretrained weights', else data) | data | imagenet | half
    augment: str = "auto"  # auto | none | flip | pad-crop | resized-crop (data.py)
    augmix: bool = False  # AugMix after the augmentation above (augmix.py)
    workers: int | None = None  # DataLoader worker processes [default: data.default_workers()]
    cache_mb: int = 1024  # heads mode: cached features kept in memory up to this size, else on disk
    device: str = "auto"
    eval_every: int = 1

    def check(self) -> None:
        """Everything that can be checked before any image is read."""
        from .data import resolve_augment
        from .models.backbones import check_arch

        check_arch(self.arch)
        resolve_augment(self.augment, 32)
        if self.normalize not in ("auto", "data", "imagenet", "half"):
            raise ValueError(f"--normalize must be auto, data, imagenet or half, got {self.normalize!r}")
        if self.input_size is not None and self.input_size < 8:
            raise ValueError(f"--input-size must be at least 8 pixels, got {self.input_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
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
    """channels_last on GPUs (~20% faster convolutions); the default layout on CPUs.

    With torch 2.13's CPU build, the backward pass of convolutions on channels_last inputs corrupts the heap: always
    at 64x64 and more (a stride-2 1x1 convolution; tests/test_train.py::test_large_inputs_train_on_cpu), and
    intermittently at 24x24 too (aborts in backward, or a segfault at interpreter exit, in 2 of 2 runs of
    tests/test_train.py + test_streaming.py; 0 of 3 with the default layout). A CPU run is ~20% slower for it.
    """
    if device.type == "cuda":
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


def load_init_weights(model: MultiExitNet, weights: InitWeights | str) -> tuple[int, int, list[str]]:
    """Load pretrained backbone weights (any layout ``models.pretrained`` reads) into the model's segments and
    final classifier; an edgeexit checkpoint's internal exit heads too when its exits are the model's (fine-tuning
    keeps what the heads learned). Returns (tensors loaded, tensors in the backbone, notes)."""
    from .models.pretrained import load_into

    if isinstance(weights, str):
        weights = read_init_weights(weights)
    target = backbone_state_names(model)
    loaded, notes = load_into(model, weights, target)
    notes += load_exit_heads(model, weights.exit_heads)
    return loaded, len(target), notes


def load_exit_heads(model: MultiExitNet, exit_heads: dict | None) -> list[str]:
    """Copy a checkpoint's internal heads into ``model`` if they fit it exactly (same exits, same shapes); else
    the heads start fresh. Returns a note saying which."""
    if not exit_heads:
        return []
    own = model.state_dict()
    state = exit_heads["state"]
    if list(exit_heads["exits"]) != list(model.config["exits"]):
        return [f"internal heads not loaded: exits {exit_heads['exits']} in the weights, {model.config['exits']} "
                f"in the model"]
    wanted = [k for k in own if k.startswith("heads.") and int(k.split(".")[1]) < len(model.config["exits"])]
    if set(wanted) != set(state) or any(own[k].shape != state[k].shape for k in wanted):
        return ["internal heads not loaded: their layers differ from the model's (another --head-grid or class count?)"]
    own.update(state)
    model.load_state_dict(own)
    return [f"internal heads of exits {model.config['exits']} loaded too"]


@dataclass
class InputPlan:
    """Input size, resize and normalisation of a run, and where each came from (printed, recorded)."""

    input_size: int
    resize: int
    mean: tuple[float, ...] | None  # None: measure on the training images
    std: tuple[float, ...] | None
    source: str


def plan_input(cfg: TrainConfig, weights: InitWeights | None) -> InputPlan:
    """Command line first, then the pretrained weights' configuration, then the architecture's default size
    (``DEFAULT_INPUT_SIZE``); normalisation ``auto`` follows the weights, else the training images' statistics."""
    from .models.backbones import DEFAULT_INPUT_SIZE

    pre = weights.preprocess if weights is not None else None
    if cfg.input_size:
        size, source = cfg.input_size, "--input-size"
    elif pre:
        size, source = int(pre["input_size"]), f"the pretrained weights' configuration ({weights.layout})"
    else:
        size, source = DEFAULT_INPUT_SIZE[cfg.arch], f"the default for {cfg.arch}"
    resize = cfg.resize or (int(pre["resize"]) if pre and not cfg.input_size else size)
    c = cfg.channels
    if cfg.normalize == "imagenet" and c == 3:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    elif cfg.normalize == "half":
        mean, std = (0.5,) * c, (0.5,) * c
    elif cfg.normalize == "auto" and pre and len(pre["mean"]) == c:
        mean, std = tuple(pre["mean"]), tuple(pre["std"])
    else:
        mean, std = None, None
    return InputPlan(int(size), int(max(resize, size)), mean, std, source)


def _state_for_checkpoint(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def loader_accuracies(model: MultiExitNet, loader, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                      skipped: SkipLog) -> list[float]:
    """Top-1 accuracy (%) of every exit over a loader of evaluation-transformed batches."""
    was_training = model.training
    model.eval()
    correct, total = torch.zeros(model.num_exits), 0
    for batch in loader:
        skipped.add(batch.errors)
        if batch.images is None:
            continue
        x = to_model_input(batch.images, mean, std).to(device)
        for i, z in enumerate(model(x)):
            correct[i] += (z.argmax(1).cpu() == batch.labels).sum()
        total += len(batch.labels)
    model.train(was_training)
    return (100.0 * correct / max(1, total)).tolist()


def epoch_batches(n: int, per_rank: int, world: int, rank: int, steps: int, generator: torch.Generator
                  ) -> list[list[tuple[int, int]]]:
    """This rank's batches of one epoch: a seeded permutation cut into ``steps`` global batches, each item with its
    own augmentation seed (drawn from the same generator, so a run is the same with any number of workers)."""
    order = torch.randperm(n, generator=generator)[: steps * per_rank * world]
    seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=generator)
    order = order.view(steps, world, per_rank)[:, rank]
    seeds = seeds.view(steps, world, per_rank)[:, rank]
    return [list(zip(o.tolist(), s.tolist())) for o, s in zip(order, seeds)]


def _epoch_line(epoch: int, epochs: int, ce: Sequence[float], lr: float, seconds: float, val: Sequence[float]) -> str:
    """Each exit's plain cross-entropy (the weighted total grows as the SDN weights ramp up, so it is not shown)."""
    return (f"epoch {epoch}/{epochs}  exit CE " + " ".join(f"{v:.3f}" for v in ce) + f"  lr {lr:.4f}  {seconds:.0f}s"
            + ("  val acc % " + " ".join(f"{a:.1f}" for a in val) if val else ""))


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume) a multi-exit network; writes the checkpoint atomically after every epoch.

    Returns the final checkpoint dict.
    """
    from .data import (EpochBatches, EvalTransform, FolderDataset, TrainTransform, default_workers, fixed_batches,
                       make_loader, resolve_augment, streamed_channel_stats)

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
    weights = read_init_weights(cfg.init_weights) if cfg.init_weights and not resume_state else None

    classes = resume_state["classes"] if resume_state else None
    folder, train_idx, val_idx = load_split(cfg.data, cfg.val_fraction, cfg.seed, classes)
    train_idx = _subset(train_idx, folder.labels, cfg.limit, cfg.seed)
    val_idx = _subset(val_idx, folder.labels, None if cfg.limit is None else max(100, cfg.limit // 5), cfg.seed)
    if resume_state:
        check_split(resume_state.get("split") or {}, folder.root, [folder.paths[i] for i in val_idx], cfg.out)
    train_paths, train_labels = [folder.paths[i] for i in train_idx], [folder.labels[i] for i in train_idx]
    val_paths, val_labels = [folder.paths[i] for i in val_idx], [folder.labels[i] for i in val_idx]
    if not train_paths:
        raise ValueError(f"no training images in {cfg.data}")
    workers = default_workers() if cfg.workers is None else cfg.workers
    skipped = SkipLog()

    if resume_state:
        preprocess = Preprocess.from_dict(resume_state["preprocess"])
        input_source = f"{cfg.out}"
    else:
        plan = plan_input(cfg, weights)
        mean, std = plan.mean, plan.std
        if mean is None:  # statistics of (up to 512) training images, streamed
            probe = Preprocess(cfg.channels, plan.resize, plan.input_size, (0.0,) * cfg.channels, (1.0,) * cfg.channels)
            sample = _subset(np.arange(len(train_paths)), train_labels, 512, cfg.seed)
            stats = FolderDataset([train_paths[i] for i in sample], [train_labels[i] for i in sample], cfg.channels,
                                  EvalTransform(probe))
            mean, std = streamed_channel_stats(make_loader(stats, fixed_batches(len(stats), 64), min(workers, 2)),
                                               on_errors=skipped.add)
        preprocess = Preprocess(cfg.channels, plan.resize, plan.input_size, tuple(mean), tuple(std))
        input_source = plan.source
    input_size = preprocess.crop
    # Frozen backbone, no augmentation asked for: each head's input is a fixed function of the image, computed once.
    use_cache = cfg.mode == "heads" and cfg.augment in ("auto", "none") and not cfg.augmix and world == 1
    augment = "none" if use_cache else resolve_augment(cfg.augment, input_size)
    say(f"input: {input_size}x{input_size} px from {input_source}; every image is resized (shorter side "
        f"{preprocess.resize}) and centre-cropped to it; training augmentation: {augment}"
        + (" + AugMix" if cfg.augmix else "")
        + (" (heads mode: features computed once)" if use_cache else ""))
    say(f"data: {len(train_paths)} training and {len(val_paths)} validation images in {len(folder.classes)} classes, "
        f"streamed by {workers} loader process{'es' if workers != 1 else ''}")

    torch.manual_seed(cfg.seed)
    config = resume_state["config"] if resume_state else model_config(cfg, len(folder.classes), input_size)
    memory_format = training_memory_format(device, input_size)
    model = build_model(config).to(device, memory_format=memory_format)
    start_epoch, history, step = 0, [], 0
    pretrained = (resume_state or {}).get("pretrained")
    if weights is not None:
        loaded, total, notes = load_init_weights(model, weights)
        say(f"initialised {loaded}/{total} backbone tensors from {cfg.init_weights} ({weights.layout} layout)"
            + "".join(f"; {n}" for n in notes))
        pretrained = {"path": str(Path(cfg.init_weights).resolve()), "layout": weights.layout, "loaded": loaded,
                      "total": total, "notes": notes, "preprocess": dict(weights.preprocess) if weights.preprocess else None}
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
    mean_t = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
    std_t = torch.tensor(preprocess.std).view(1, -1, 1, 1)
    val_loader = make_loader(FolderDataset(val_paths, val_labels, cfg.channels, EvalTransform(preprocess)),
                             fixed_batches(len(val_paths), 64), workers) if is_main and val_paths else None
    per_rank = max(1, min(cfg.batch_size // world, len(train_paths) // world))  # a data set smaller than a batch
    steps_per_epoch = max(1, len(train_paths) // (per_rank * world))
    total_steps, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    checkpoint: dict = resume_state or {}
    cache = None
    if use_cache:
        from .feature_cache import HeadFeatureCache

        t0 = time.perf_counter()
        source = make_loader(FolderDataset(train_paths, train_labels, cfg.channels, EvalTransform(preprocess)),
                             fixed_batches(len(train_paths), max(1, min(64, cfg.batch_size))), workers)
        cache = HeadFeatureCache.build(model, source, mean_t, std_t, device, memory_format, cfg.cache_mb,
                                       skipped.add, progress=_progress(progress and is_main, "caching features",
                                                                       len(source)))
        say(f"heads mode: each exit's input features cached once ({cache.describe()}) in "
            f"{time.perf_counter() - t0:.0f}s")
        skipped.report()
        if len(cache) == 0:
            raise ValueError(f"no readable training images in {cfg.data}")
        per_rank = max(1, min(cfg.batch_size, len(cache)))
        steps_per_epoch = max(1, len(cache) // per_rank)
        total_steps, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
        train_loader = sampler = None
    else:
        sampler = EpochBatches()
        transform = TrainTransform(preprocess, augment, augmix=cfg.augmix)
        train_loader = make_loader(FolderDataset(train_paths, train_labels, cfg.channels, transform), sampler, workers)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            weights_now = exit_weights(fractions, epoch, cfg.epochs, cfg.schedule)
            net.train()
            if cfg.mode == "heads":
                model.segments.eval()  # frozen backbone: BatchNorm keeps its running statistics
            sums, ce_sums, count = np.zeros(model.num_exits + 1), np.zeros(model.num_exits), 0
            bar = _progress(progress and is_main, f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
            if cache is not None:
                batches = cache.epoch_batches(per_rank, steps_per_epoch, generator)
            else:
                sampler.set_batches(epoch_batches(len(train_paths), per_rank, world, rank, steps_per_epoch, generator))
                batches = train_loader
            lr = lr_at(step, total_steps, warmup, cfg.lr)
            for batch in batches:
                lr = lr_at(step, total_steps, warmup, cfg.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if cache is not None:
                    logits, y = cache.forward_heads(model, batch, device)
                else:
                    skipped.add(batch.errors)
                    if batch.images is None:
                        step += 1
                        continue
                    x = to_model_input(batch.images, mean_t, std_t).to(device, memory_format=memory_format,
                                                                         non_blocking=True)
                    y = batch.labels.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        logits = net(x)
                logits = [z.float() for z in logits]
                loss, parts = multi_exit_loss(logits, y, weights_now, cfg.distill, cfg.distill_temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += [float(loss.detach()), *parts]
                ce_sums += [float(F.cross_entropy(z.detach(), y)) for z in logits]
                count += 1
                step += 1
                bar.advance()
            bar.close()
            means, ce = sums / max(1, count), (ce_sums / max(1, count)).tolist()
            val = loader_accuracies(model, val_loader, mean_t, std_t, device, skipped) if val_loader is not None and (
                (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs) else []
            skipped.report()
            result = EpochResult(epoch + 1, float(means[0]), means[1:].tolist(), val, lr, time.perf_counter() - t_epoch,
                                 {"exit_ce": ce, "exit_weights": list(weights_now), "skipped": skipped.count})
            history.append(asdict(result))
            say(_epoch_line(epoch + 1, cfg.epochs, ce, lr, result.seconds, val))
            if is_main:
                checkpoint = {
                    "config": model.config, "state_dict": _state_for_checkpoint(model),
                    "classes": list(folder.classes), "preprocess": preprocess.to_dict(),
                    "split": {"data": str(Path(cfg.data).resolve()), "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                              "num_train": len(train_paths), "skipped": skipped.count,
                              "num_val": len(val_paths), "limit": cfg.limit,
                              "val_files_sha256": split_fingerprint(folder.root, val_paths)},
                    "costs": costs.to_dict(), "epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(),
                    "history": history, "train_config": {**asdict(cfg), "epochs": cfg.epochs},
                    "versions": {"edgeexit": __version__, "torch": str(torch.__version__)},
                    "pretrained": pretrained, "augment": augment,
                    "policy": None,  # weights changed: any earlier calibration no longer applies
                }
                save_checkpoint(cfg.out, checkpoint)
    finally:
        if cache is not None:
            cache.close()
    if skipped.count and is_main:
        say(f"data: {skipped.count} unreadable images skipped")
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

"""Per-image explanation grids: what every exit saw (its CAM), what it said, and where the policy would leave.

For each image, one PNG: the model's input (after resize and centre crop), then one panel per exit with that exit's
class activation map (CAM of its predicted class: ReLU, scaled to its maximum, bilinearly upsampled to the input
and alpha-blended with the jet colour map), the predicted class and its (temperature-scaled) confidence, and every
gate score in compact text. The exit the checkpoint's policy takes is framed in red and titled "EXIT"; exits after
it are greyed ("not run"), as on the device.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from . import gates as G

__all__ = ["explain", "cam_overlay", "expand_inputs"]

def abbreviation_legend(per_line: int = 3) -> str:
    """``salH = spatial entropy of the CAM; ...``: every abbreviation the grid uses (the registry's labels), a few
    per line."""
    items = [f"{spec.label} = {spec.description}" for spec in G.GATES.values()]
    return "\n".join("; ".join(items[k : k + per_line]) for k in range(0, len(items), per_line))


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB float image in [0, 1]: ``image`` (uint8 H x W x C) blended with the jet-coloured CAM (h x w), which is
    ReLU'd, divided by its maximum and bilinearly upsampled to H x W."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    m = np.maximum(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0)
    peak = float(m.max())
    m = m / peak if peak > 0 else m
    up = np.asarray(Image.fromarray(m.astype(np.float32)).resize((w, h), Image.BILINEAR), dtype=np.float32)
    heat = colormaps["jet"](np.clip(up, 0.0, 1.0))[..., :3]
    base = image.astype(np.float32) / 255.0
    if base.shape[2] == 1:
        base = np.repeat(base, 3, axis=2)
    return np.clip((1 - alpha) * base + alpha * heat, 0.0, 1.0)


def expand_inputs(items: Sequence[Path | str]) -> List[Path]:
    """Files as given; a folder stands for the image files directly inside it (sorted)."""
    from .imageio import is_image_file

    out: List[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and is_image_file(f))
        else:
            out.append(p)
    return out


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def _unique_name(out_dir: Path, stem: str, used: set) -> Path:
    name, k = f"{stem}.png", 1
    while name in used:
        name = f"{stem}_{k}.png"
        k += 1
    used.add(name)
    return out_dir / name


def _exit_costs(ckpt: dict, model, policy) -> np.ndarray:
    """Cost of leaving at each exit on the policy's chain (fractions of the plain network; nan where not kept):
    the calibration's costs, or the model's MACs with the default stage overhead when uncalibrated."""
    from .calibrate import CostModel, model_costs

    cal_costs = (ckpt.get("calibration") or {}).get("costs")
    costs = CostModel.from_dict(cal_costs) if cal_costs and "segments" in cal_costs else model_costs(model)
    return costs.exit_vector(policy.exits)


def explain(
    ckpt_path: Path | str,
    images: Sequence[Path | str],
    out: Optional[Path | str] = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> List[Path]:
    """Write one PNG grid per readable image into ``out`` (default ``reports/<checkpoint stem>/explain``).

    Unreadable images: one warning each, skipped. Raises ValueError when none could be read."""
    from .calibrate import _device
    from .checkpoint import load_model
    from .collect import collect
    from .imageio import ImageError, load_image
    from .plots import new_figure, save_figure
    from .policy import ExitPolicy
    from .preprocess import Preprocess

    ckpt_path = Path(ckpt_path)
    model, ckpt = load_model(ckpt_path)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    e = model.num_exits
    calibrated = bool(ckpt.get("policy"))
    policy = ExitPolicy.from_dict(ckpt["policy"]) if calibrated else ExitPolicy.default(e)
    if not calibrated:
        log("edgeexit: warning: uncalibrated checkpoint: marking exits with the default policy (max_prob >= 0.9, "
            "T = 1); run edgeexit calibrate for the real one")
    classes = list(ckpt["classes"])
    paths = expand_inputs(images)
    if not paths:
        raise ValueError("no images given")
    kept, arrays = [], []
    for p in paths:
        try:
            arrays.append(pre.resize_and_crop(load_image(p, pre.channels)))
            kept.append(p)
        except ImageError as exc:
            warnings.warn(f"skipped {exc}", stacklevel=2)
    if not kept:
        raise ValueError(f"none of the {len(paths)} image(s) could be read")

    outputs = collect(model, np.stack(arrays), None, pre, 64, _device(device), False, paths=kept)
    signals = outputs.signals(policy.temperatures, policy.exits)  # (n, E, 7), as the policy's stages see them
    preds = outputs.classes
    patience = outputs.patience_for(policy.exits)
    exits = policy.decide(signals, preds)
    n = len(kept)
    scores = {name: signals[:, :, k].astype(np.float64) for k, name in enumerate(G.SIGNAL_NAMES)}
    scores["patience"] = patience.astype(np.float64)
    if policy.learned is not None:
        learned = np.full((n, e), np.nan)
        for i in policy.kept_internal:
            learned[:, i] = G.gate_score("learned", signals[:, i], patience[:, i], policy.learned[i])
        scores["learned"] = learned
    confidence = signals[:, :, 0]
    frac = _exit_costs(ckpt, model, policy)

    out_dir = Path(out) if out is not None else Path("reports") / ckpt_path.stem / "explain"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    used: set = set()
    cols = min(1 + e, 5)
    rows = math.ceil((1 + e) / cols)
    for b, path in enumerate(kept):
        img = arrays[b]
        chosen = int(exits[b])
        fig = new_figure(3.1 * cols, 3.9 * rows + 1.1)
        ax = fig.add_subplot(rows, cols, 1)
        ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                  interpolation="nearest")
        ax.set_title("input (model's view)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for i in range(e):
            ax = fig.add_subplot(rows, cols, i + 2)
            ran = i <= chosen
            ax.imshow(cam_overlay(img, outputs.cams[i][b]), alpha=1.0 if ran else 0.35, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            cls = classes[int(preds[b, i])] if int(preds[b, i]) < len(classes) else str(int(preds[b, i]))
            head = f"EXIT {i}" if i == chosen else f"exit {i}"
            is_kept = i in policy.kept
            cost = f"{100 * float(frac[i]):.0f}% cost" if is_kept else "not kept"
            ax.set_title(f"{head} ({cost})\n{cls} {100 * confidence[b, i]:.0f}%"
                         + ("" if ran else " (not run)"), fontsize=9,
                         color="red" if i == chosen else ("black" if ran else "grey"),
                         fontweight="bold" if i == chosen else "normal")
            lines = []
            names = [g for g in G.GATE_NAMES if g in scores]
            for k in range(0, len(names), 3):
                lines.append("  ".join(
                    f"{G.GATES[g].label} {int(scores[g][b, i]) if g == 'patience' else _fmt(float(scores[g][b, i]))}"
                    for g in names[k:k + 3] if not (g == "learned" and i == e - 1)))
            if i < e - 1 and not is_kept:
                lines.append(f"gate {policy.gate}: exit not kept")
            elif i < e - 1:
                s = float(policy.oriented_score(i, signals[b:b + 1, i], patience[b:b + 1, i])[0])
                thr = policy.thresholds[i]
                rel = ">=" if i == chosen else ("<" if i < chosen else "vs")
                lines.append(f"gate {policy.gate}: {_fmt(s)} {rel} {_fmt(thr)}")
            else:
                lines.append("last exit: always leaves")
            ax.set_xlabel("\n".join(l for l in lines if l), fontsize=7, color="black" if ran else "grey")
            if i == chosen:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(4)
        truth = path.parent.name if path.parent.name in classes else None
        verdict = ""
        if truth is not None:
            verdict = " (right)" if classes[int(preds[b, chosen])] == truth else f" (wrong: folder says {truth})"
        fig.suptitle(f"{path.name}: leaves at exit {chosen} as {classes[int(preds[b, chosen])]}{verdict}; policy: "
                     f"{policy.gate}{'' if calibrated else ' (default, uncalibrated)'}", fontsize=10)
        fig.supxlabel(abbreviation_legend(), fontsize=7, color="dimgrey")  # constrained layout keeps room for it
        target = _unique_name(out_dir, path.stem, used)
        save_figure(fig, target)
        written.append(target)
    return written

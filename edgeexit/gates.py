"""Exit-gate signals: the single numpy source of truth (torch-free).

Every function works on batches of numpy arrays. The exported ONNX head graph computes the same 7 signals
(``SIGNAL_NAMES``) and is tested against these functions; the runtime and calibration compute ``patience`` and the
``learned`` gate score with the functions below, so the offline simulation and the device agree.

Conventions
-----------
- ``logits``: (B, C) class scores of one exit head; ``temperature`` T > 0 divides them before the softmax.
- ``cam``: (B, h, w) raw class activation map of the predicted class (any real values).
- ``p = cam_distribution(cam)``: ReLU, then divide by the sum; a map with no positive mass becomes uniform.
- Maps of different exits can have different grids; they are compared on the common (smaller) grid after an
  area (box-filter overlap) resize given by ``resize_matrix``.
- All computation is float64; ``exit_signals`` returns float32.

Only numpy and the standard library are imported here: this module runs on camera devices without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "SIGNAL_NAMES",
    "GATE_NAMES",
    "GateSpec",
    "GATES",
    "gate_spec",
    "signals_for",
    "FEATURE_NAMES",
    "SSIM_C1",
    "SSIM_C2",
    "softmax",
    "softmax_signals",
    "cam_distribution",
    "spatial_entropy",
    "spatial_spread",
    "resize_matrix",
    "resize_map",
    "common_grid",
    "map_cosine",
    "map_ssim",
    "map_coherence",
    "exit_signals",
    "patience_counts",
    "kept_patience",
    "next_patience",
    "gate_features",
    "gate_score",
    "fit_logistic",
    "logistic_score",
    "softmax_nll",
    "fit_temperature",
]

SIGNAL_NAMES: Tuple[str, ...] = (
    "max_prob",
    "margin",
    "entropy_conf",
    "sal_entropy",
    "sal_spread",
    "coh_cosine",
    "coh_ssim",
)
"""The 7 per-exit signals, in the column order of ``exit_signals`` and of the head graph's ``signals`` output."""

FEATURE_NAMES: Tuple[str, ...] = SIGNAL_NAMES + ("patience",)
"""Inputs of the learned gate, in column order of ``gate_features``."""


@dataclass(frozen=True)
class GateSpec:
    """What one exit gate is and what it reads.

    ``signals``: the head signals the gate's score is computed from (``SIGNAL_NAMES`` order), so an exported
    head computes only those; ``needs_cam``: the head must compute this exit's CAM; ``needs_prev_cam``: it must
    also receive the previous kept exit's CAM; ``needs_patience``: the runtime counts agreeing exits.
    ``signal_cost``: what computing those signals adds to an internal stage, in per-call overheads (the
    ``boundary`` of ``edgeexit.stages``): MACs do not see it (a CAM, its entropy, a map resize and SSIM are many
    tiny graph nodes). Measured on ONNX Runtime CPU against a max_prob stage (every stage outputs the confidence
    anyway), in units of the measured per-call overhead, mean of 3 runs (``benchmarks/signal_cost.py``, results in
    ``benchmarks/results/signal-cost/``).
    """

    name: str
    family: str  # softmax, saliency, coherence, agreement, learned
    label: str  # short column label for tables and plots
    description: str
    signals: Tuple[str, ...]
    needs_cam: bool = False
    needs_prev_cam: bool = False
    needs_patience: bool = False
    signal_cost: float = 0.0


GATES: "Mapping[str, GateSpec]" = {g.name: g for g in (
    GateSpec("max_prob", "softmax", "maxp", "largest softmax probability", ("max_prob",)),
    GateSpec("margin", "softmax", "margin", "top-1 minus top-2 softmax probability", ("margin",),
             signal_cost=0.06),
    GateSpec("entropy_conf", "softmax", "1-H", "1 - softmax entropy / log C", ("entropy_conf",), signal_cost=0.1),
    GateSpec("sal_entropy", "saliency", "salH", "spatial entropy of the CAM", ("sal_entropy",), needs_cam=True,
             signal_cost=1.0),
    GateSpec("sal_spread", "saliency", "spread", "squared radius of gyration of the CAM", ("sal_spread",),
             needs_cam=True, signal_cost=1.0),
    GateSpec("coh_cosine", "coherence", "cos", "cosine of this and the previous exit's CAM", ("coh_cosine",),
             needs_cam=True, needs_prev_cam=True, signal_cost=1.5),
    GateSpec("coh_ssim", "coherence", "ssim", "SSIM of this and the previous exit's CAM", ("coh_ssim",),
             needs_cam=True, needs_prev_cam=True, signal_cost=1.85),
    # combined (issue 13): a softmax confidence times the CAM coherence with the previous kept exit, a soft veto:
    # a confident exit whose evidence moved since the last exit (typical of noise and blur) scores low
    GateSpec("conf_coh", "combined", "p*cos", "max_prob x coh_cosine (confidence, vetoed by incoherent CAMs)",
             ("max_prob", "coh_cosine"), needs_cam=True, needs_prev_cam=True, signal_cost=1.45),
    GateSpec("margin_coh", "combined", "m*cos", "margin x coh_cosine (margin, vetoed by incoherent CAMs)",
             ("margin", "coh_cosine"), needs_cam=True, needs_prev_cam=True, signal_cost=1.55),
    GateSpec("patience", "agreement", "pat", "consecutive exits agreeing on the class (PABEE)", (),
             needs_patience=True),
    GateSpec("learned", "learned", "learned", "logistic regression over every signal and patience", SIGNAL_NAMES,
             needs_cam=True, needs_prev_cam=True, needs_patience=True, signal_cost=3.0),
)}
"""The one registry of exit gates: CLI help, calibration, plots, explain, the manifest schema, the export (which
signals a head computes) and the runtime all read it."""

GATE_NAMES: Tuple[str, ...] = tuple(GATES)
"""Every gate an ``ExitPolicy`` can use: each signal, PABEE ``patience`` and the per-exit ``learned`` logistic gate."""


def gate_spec(name: str) -> GateSpec:
    """The registry entry of ``name``; ValueError naming the known gates otherwise."""
    try:
        return GATES[name]
    except KeyError:
        raise ValueError(f"unknown gate {name!r}; expected one of {', '.join(GATE_NAMES)}") from None


def signals_for(gate_names: Sequence[str]) -> Tuple[str, ...]:
    """The head signals (``SIGNAL_NAMES`` order) that the named gates read together."""
    wanted = {s for g in gate_names for s in gate_spec(g).signals}
    return tuple(s for s in SIGNAL_NAMES if s in wanted)

SSIM_C1: float = 0.01**2
SSIM_C2: float = 0.03**2

_TINY = np.finfo(np.float64).tiny
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# classifier confidence
# ----------------------------------------------------------------------------------------------------------------
def _as_logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (B, C), got shape {z.shape}")
    if z.shape[1] < 1:
        raise ValueError("logits need at least one class")
    return z


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    return t


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis.

    ``p_c = exp(z_c / T - m) / sum_k exp(z_k / T - m)`` with ``m = max_k z_k / T``. Returns float64, same shape.
    """
    t = _check_temperature(temperature)
    z = np.asarray(logits, dtype=np.float64) / t
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def softmax_signals(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Confidence signals of softmax(z / T), float64 (B, 3): ``[max_prob, margin, entropy_conf]``.

    - ``max_prob = p_(1)`` (largest probability),
    - ``margin = p_(1) - p_(2)`` (largest minus second largest),
    - ``entropy_conf = 1 - H(p) / log C`` with ``H(p) = -sum_c p_c log p_c`` (0 log 0 = 0), clipped to [0, 1].

    With a single class (C == 1) the prediction is certain: all three are defined as 1
    (p_(2) is taken as 0 and H / log C as 0).
    """
    z = _as_logits(logits)
    p = softmax(z, temperature)
    n_classes = p.shape[1]
    out = np.empty((p.shape[0], 3), dtype=np.float64)
    if n_classes == 1:
        out[:] = 1.0
        return out
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    out[:, 0] = top2[:, 0]
    out[:, 1] = top2[:, 0] - top2[:, 1]
    plogp = np.where(p > 0.0, p * np.log(np.where(p > 0.0, p, 1.0)), 0.0)
    h = -np.sum(plogp, axis=1)
    out[:, 2] = np.clip(1.0 - h / math.log(n_classes), 0.0, 1.0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# saliency (CAM) signals
# ----------------------------------------------------------------------------------------------------------------
def _as_maps(cam: np.ndarray, name: str = "cam") -> np.ndarray:
    m = np.asarray(cam, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"{name} must be (B, h, w), got shape {m.shape}")
    if m.shape[1] < 1 or m.shape[2] < 1:
        raise ValueError(f"{name} must have a non-empty grid, got shape {m.shape}")
    return m


def cam_distribution(cam: np.ndarray) -> np.ndarray:
    """Turn raw maps (B, h, w) into spatial distributions (B, h, w), float64, each summing to 1.

    ``p = relu(cam) / sum(relu(cam))``. Non-finite values (nan, +-inf) are treated as 0. A map with no positive
    mass (all zero, or all negative) becomes the uniform distribution ``1 / (h w)``.
    """
    m = _as_maps(cam)
    r = np.maximum(np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    total = np.sum(r, axis=(1, 2), keepdims=True)
    has_mass = total >= _TINY
    uniform = 1.0 / (m.shape[1] * m.shape[2])
    return np.where(has_mass, r / np.where(has_mass, total, 1.0), uniform)


def spatial_entropy(cam: np.ndarray) -> np.ndarray:
    """Normalised spatial entropy of each map, float64 (B,) in [0, 1].

    ``H = -sum_ij p_ij log p_ij / log(h w)`` with ``p = cam_distribution(cam)``. Uniform map (and all-zero or
    negative maps, which become uniform) -> 1; one-hot map -> 0; a 1x1 map -> 0 (log 1 = 0, defined as 0).
    """
    p = cam_distribution(cam)
    n = p.shape[1] * p.shape[2]
    if n == 1:
        return np.zeros(p.shape[0], dtype=np.float64)
    plogp = np.where(p > 0.0, p * np.log(np.where(p > 0.0, p, 1.0)), 0.0)
    h = -np.sum(plogp, axis=(1, 2))
    return np.clip(h / math.log(n), 0.0, 1.0)


def _unit_coords(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in the unit square: ``y_i = (i + 0.5) / h`` (h,), ``x_j = (j + 0.5) / w`` (w,)."""
    return (np.arange(h, dtype=np.float64) + 0.5) / h, (np.arange(w, dtype=np.float64) + 0.5) / w


def spatial_spread(cam: np.ndarray) -> np.ndarray:
    """Spatial spread (squared radius of gyration) of each map, float64 (B,).

    ``spread = sum_ij p_ij ((x_j - cx)^2 + (y_i - cy)^2)`` with ``p = cam_distribution(cam)``,
    ``x_j = (j + 0.5) / w``, ``y_i = (i + 0.5) / h`` (unit-square coordinates, so the value does not depend on the
    grid size), ``cx = sum p x``, ``cy = sum p y``. One-hot or 1x1 map -> 0; uniform n x n map ->
    ``(1 - 1/n^2) / 6``.
    """
    p = cam_distribution(cam)
    y, x = _unit_coords(p.shape[1], p.shape[2])
    px = np.sum(p, axis=1)  # (B, w) marginal over rows
    py = np.sum(p, axis=2)  # (B, h)
    cx = px @ x
    cy = py @ y
    var_x = np.sum(px * (x[None, :] - cx[:, None]) ** 2, axis=1)
    var_y = np.sum(py * (y[None, :] - cy[:, None]) ** 2, axis=1)
    return var_x + var_y


# ----------------------------------------------------------------------------------------------------------------
# resizing and coherence between consecutive exits
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _resize_matrix_cached(src: int, dst: int) -> np.ndarray:
    # Work in units of 1 / (src * dst) so that every edge is an integer and the weights are exact:
    # output pixel k covers [k * src, (k + 1) * src), source pixel j covers [j * dst, (j + 1) * dst).
    k = np.arange(dst, dtype=np.int64)[:, None]
    j = np.arange(src, dtype=np.int64)[None, :]
    overlap = np.minimum((k + 1) * src, (j + 1) * dst) - np.maximum(k * src, j * dst)
    r = np.clip(overlap, 0, None).astype(np.float64) / src
    r.flags.writeable = False
    return r


def resize_matrix(src: int, dst: int) -> np.ndarray:
    """1-D area (box-filter overlap) interpolation weights, float64 (dst, src); every row sums to 1.

    Output pixel k covers the source interval ``[k src / dst, (k + 1) src / dst)``; its weight on source pixel j is
    the length of the overlap of that interval with ``[j, j + 1)`` divided by the interval length ``src / dst``.
    Works both ways: downsampling averages boxes (4 -> 2: ``[[.5, .5, 0, 0], [0, 0, .5, .5]]``), upsampling
    replicates or splits pixels (2 -> 3: ``[[1, 0], [.5, .5], [0, 1]]``); ``src == dst`` gives the identity.
    A 2-D map ``m`` (h, w) resizes to (H, W) as ``resize_matrix(h, H) @ m @ resize_matrix(w, W).T``.
    """
    if isinstance(src, bool) or isinstance(dst, bool) or int(src) != src or int(dst) != dst:
        raise ValueError(f"resize_matrix sizes must be integers, got {src!r}, {dst!r}")
    src, dst = int(src), int(dst)
    if src < 1 or dst < 1:
        raise ValueError(f"resize_matrix sizes must be >= 1, got src={src}, dst={dst}")
    return _resize_matrix_cached(src, dst).copy()


def resize_map(maps: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Area-resize maps (B, h, w) to (B, H, W), float64: ``Ry @ m @ Rx.T`` with ``Ry = resize_matrix(h, H)``,
    ``Rx = resize_matrix(w, W)``. The mean of each map is preserved (the sum scales by ``H W / (h w)``)."""
    m = _as_maps(maps, "maps")
    big_h, big_w = int(size[0]), int(size[1])
    if big_h < 1 or big_w < 1:
        raise ValueError(f"target size must be >= 1, got {size!r}")
    h, w = m.shape[1], m.shape[2]
    if (h, w) == (big_h, big_w):
        return m.copy()
    ry = _resize_matrix_cached(h, big_h) if h != big_h else None
    rx = _resize_matrix_cached(w, big_w) if w != big_w else None
    out = m
    if ry is not None:
        out = ry @ out
    if rx is not None:
        out = out @ rx.T
    return np.ascontiguousarray(out)


def common_grid(hw_a: Sequence[int], hw_b: Sequence[int]) -> Tuple[int, int]:
    """The grid two maps are compared on: ``(min(h_a, h_b), min(w_a, w_b))``."""
    return (min(int(hw_a[0]), int(hw_b[0])), min(int(hw_a[1]), int(hw_b[1])))


def _paired_distributions(cam: np.ndarray, prev_cam: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Both maps -> cam_distribution -> area-resized to the common grid, flattened: two (B, H*W) arrays."""
    a = _as_maps(cam)
    b = _as_maps(prev_cam, "prev_cam")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"cam and prev_cam batch sizes differ: {a.shape[0]} vs {b.shape[0]}")
    grid = common_grid(a.shape[1:], b.shape[1:])
    pa = resize_map(cam_distribution(a), grid).reshape(a.shape[0], -1)
    pb = resize_map(cam_distribution(b), grid).reshape(b.shape[0], -1)
    return pa, pb


def map_cosine(cam: np.ndarray, prev_cam: Optional[np.ndarray]) -> np.ndarray:
    """Cosine similarity of consecutive exits' maps, float64 (B,) in [0, 1].

    ``p = cam_distribution(cam)``, ``q = cam_distribution(prev_cam)``, both area-resized (``resize_map``) to
    ``common_grid``; ``cos = <p, q> / (|p| |q|)``. Identical maps -> 1; maps with disjoint support -> 0.
    ``prev_cam is None`` (first exit) -> zeros.
    """
    if prev_cam is None:
        return np.zeros(_as_maps(cam).shape[0], dtype=np.float64)
    return _cosine(*_paired_distributions(cam, prev_cam))


def _cosine(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    num = np.sum(pa * pb, axis=1)
    den = np.linalg.norm(pa, axis=1) * np.linalg.norm(pb, axis=1)
    return np.clip(num / np.maximum(den, _EPS), 0.0, 1.0)


def map_ssim(cam: np.ndarray, prev_cam: Optional[np.ndarray]) -> np.ndarray:
    """Global (one-window) SSIM of consecutive exits' maps, float64 (B,) in [-1, 1].

    Both maps go through ``cam_distribution`` and are area-resized to ``common_grid``; each is then scaled to
    ``q = p / max(p)`` (peak 1). With means ``mu_a, mu_b``, population variances ``var_a, var_b`` and population
    covariance ``cov`` over the N grid cells:

    ``SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))``,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``.

    Identical maps -> 1 (two uniform maps included). ``prev_cam is None`` (first exit) -> zeros.
    """
    if prev_cam is None:
        return np.zeros(_as_maps(cam).shape[0], dtype=np.float64)
    return _ssim(*_paired_distributions(cam, prev_cam))


def _ssim(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    qa = pa / np.maximum(np.max(pa, axis=1, keepdims=True), _TINY)
    qb = pb / np.maximum(np.max(pb, axis=1, keepdims=True), _TINY)
    mu_a = np.mean(qa, axis=1)
    mu_b = np.mean(qb, axis=1)
    da = qa - mu_a[:, None]
    db = qb - mu_b[:, None]
    var_a = np.mean(da * da, axis=1)
    var_b = np.mean(db * db, axis=1)
    cov = np.mean(da * db, axis=1)
    num = (2.0 * mu_a * mu_b + SSIM_C1) * (2.0 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return np.clip(num / den, -1.0, 1.0)


def map_coherence(cam: np.ndarray, prev_cam: Optional[np.ndarray]) -> np.ndarray:
    """``[map_cosine, map_ssim]`` of two exits' maps, float64 (B, 2), from one pass over the distributions (the
    same numbers as the two functions; zeros when ``prev_cam is None``)."""
    if prev_cam is None:
        return np.zeros((_as_maps(cam).shape[0], 2), dtype=np.float64)
    pa, pb = _paired_distributions(cam, prev_cam)
    return np.stack([_cosine(pa, pb), _ssim(pa, pb)], axis=1)


def exit_signals(
    logits: np.ndarray,
    cam: np.ndarray,
    prev_cam: Optional[np.ndarray] = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """All 7 gate signals of one exit, float32 (B, 7), columns in ``SIGNAL_NAMES`` order.

    ``[max_prob, margin, entropy_conf]`` = ``softmax_signals(logits, T)``; ``sal_entropy`` =
    ``spatial_entropy(cam)``; ``sal_spread`` = ``spatial_spread(cam)``; ``coh_cosine`` / ``coh_ssim`` =
    ``map_cosine`` / ``map_ssim`` of ``cam`` and ``prev_cam`` (0 at the first exit, ``prev_cam is None``).
    """
    z = _as_logits(logits)
    m = _as_maps(cam)
    if z.shape[0] != m.shape[0]:
        raise ValueError(f"logits and cam batch sizes differ: {z.shape[0]} vs {m.shape[0]}")
    out = np.empty((z.shape[0], len(SIGNAL_NAMES)), dtype=np.float64)
    out[:, 0:3] = softmax_signals(z, temperature)
    out[:, 3] = spatial_entropy(m)
    out[:, 4] = spatial_spread(m)
    out[:, 5] = map_cosine(m, prev_cam)
    out[:, 6] = map_ssim(m, prev_cam)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# patience (PABEE)
# ----------------------------------------------------------------------------------------------------------------
def patience_counts(classes: np.ndarray) -> np.ndarray:
    """PABEE patience, int64 (B, E): the number of consecutive exits ending at exit i that predict the same class.

    ``count[:, 0] = 1``; ``count[:, i] = count[:, i-1] + 1`` if ``classes[:, i] == classes[:, i-1]`` else 1.
    Example: classes ``[3, 3, 1, 1, 1]`` -> ``[1, 2, 1, 2, 3]``.
    """
    c = np.asarray(classes)
    if c.ndim != 2:
        raise ValueError(f"classes must be (B, E), got shape {c.shape}")
    counts = np.ones(c.shape, dtype=np.int64)
    for i in range(1, c.shape[1]):
        counts[:, i] = np.where(c[:, i] == c[:, i - 1], counts[:, i - 1] + 1, 1)
    return counts


def kept_patience(classes: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Patience along a chain that keeps only some exits, int64 (B, E): ``patience_counts`` of the kept exits'
    columns (``kept``: sorted exit indices, the last exit included), 0 at the exits that are not kept.
    Example: classes ``[3, 1, 3, 3]``, kept ``(0, 2, 3)`` -> ``[1, 0, 2, 3]`` (exit 1 is skipped)."""
    c = np.asarray(classes)
    if c.ndim != 2:
        raise ValueError(f"classes must be (B, E), got shape {c.shape}")
    idx = [int(k) for k in kept]
    out = np.zeros(c.shape, dtype=np.int64)
    out[:, idx] = patience_counts(c[:, idx])
    return out


def next_patience(
    prev_count: Optional[np.ndarray],
    prev_class: Optional[np.ndarray],
    cls: np.ndarray,
) -> np.ndarray:
    """Incremental patience for the runtime, int64 (B,): ``prev_count + 1`` where ``cls == prev_class``, else 1.

    At the first exit pass ``prev_count = prev_class = None``: the result is all ones. Running this exit by exit
    gives the columns of ``patience_counts``.
    """
    c = np.asarray(cls).reshape(-1)
    if prev_count is None or prev_class is None:
        return np.ones(c.shape[0], dtype=np.int64)
    pc = np.asarray(prev_count, dtype=np.int64).reshape(-1)
    pk = np.asarray(prev_class).reshape(-1)
    if pc.shape != c.shape or pk.shape != c.shape:
        raise ValueError(f"next_patience: shapes differ: {pc.shape}, {pk.shape}, {c.shape}")
    return np.where(c == pk, pc + 1, 1).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# gate scores
# ----------------------------------------------------------------------------------------------------------------
def _as_signals(signals: np.ndarray) -> np.ndarray:
    s = np.asarray(signals, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(SIGNAL_NAMES):
        raise ValueError(f"signals must be (B, {len(SIGNAL_NAMES)}), got shape {s.shape}")
    return s


def gate_features(signals: np.ndarray, patience: np.ndarray) -> np.ndarray:
    """Learned-gate inputs, float64 (B, 8): the 7 signals then patience, columns in ``FEATURE_NAMES`` order."""
    s = _as_signals(signals)
    pat = np.asarray(patience, dtype=np.float64).reshape(-1)
    if pat.shape[0] != s.shape[0]:
        raise ValueError(f"signals and patience batch sizes differ: {s.shape[0]} vs {pat.shape[0]}")
    return np.concatenate([s, pat[:, None]], axis=1)


def gate_score(
    gate: str,
    signals: np.ndarray,
    patience: Optional[np.ndarray] = None,
    learned_params: Optional[Mapping[str, object]] = None,
    columns: Sequence[str] = SIGNAL_NAMES,
) -> np.ndarray:
    """Raw (not yet sign-oriented) score of ``gate`` at one exit, float64 (B,).

    ``signals`` (B, len(columns)) holds the signals named by ``columns`` (all 7 by default; an exported head of
    a bundle computes only its gate's, ``GATES[gate].signals``).

    - a signal name: that column;
    - ``"patience"``: ``patience`` (B,) as float;
    - ``"learned"``: ``logistic_score(gate_features(signals, patience), learned_params)``, a probability that
      the exit is right (needs all 7 signals, ``patience`` and ``learned_params``);
    - a ``combined`` gate: the product of its signals (``GATES[gate].signals``), e.g. max_prob * coh_cosine; a
      coherence factor of exactly 0 (the first kept exit, which has no previous map) counts as 1.
    """
    spec = gate_spec(gate)
    s = np.asarray(signals, dtype=np.float64)
    columns = tuple(columns)
    if s.ndim != 2 or s.shape[1] != len(columns):
        raise ValueError(f"signals must be (B, {len(columns)}) for columns {list(columns)}, got shape {s.shape}")
    if gate in SIGNAL_NAMES:
        if gate not in columns:
            raise ValueError(f"gate {gate!r} needs the {gate} signal, the head computes {list(columns) or 'none'}")
        return s[:, columns.index(gate)].copy()
    if spec.family == "combined":
        missing = [n for n in spec.signals if n not in columns]
        if missing:
            raise ValueError(f"gate {gate!r} needs the {', '.join(missing)} signal(s), the head computes "
                             f"{list(columns) or 'none'}")
        factors = s[:, [columns.index(n) for n in spec.signals]]
        # coherence is exactly 0 at the first kept exit (no previous map): there the veto does not apply
        coh = [j for j, n in enumerate(spec.signals) if n.startswith("coh_")]
        factors[:, coh] = np.where(factors[:, coh] == 0.0, 1.0, factors[:, coh])
        return np.prod(factors, axis=1)
    if spec.needs_patience and patience is None:
        raise ValueError(f"the {gate} gate needs patience counts")
    if gate == "patience":
        pat = np.asarray(patience, dtype=np.float64).reshape(-1)
        if pat.shape[0] != s.shape[0]:
            raise ValueError(f"signals and patience batch sizes differ: {s.shape[0]} vs {pat.shape[0]}")
        return pat
    if learned_params is None:
        raise ValueError("the learned gate needs learned_params (from fit_logistic)")
    if columns != SIGNAL_NAMES:
        s = s[:, [columns.index(n) for n in SIGNAL_NAMES]]
    return logistic_score(gate_features(s, patience), learned_params)


# ----------------------------------------------------------------------------------------------------------------
# learned gate: L2-regularised logistic regression
# ----------------------------------------------------------------------------------------------------------------
def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    """``log(1 / (1 + exp(-z)))`` without overflow."""
    return -np.logaddexp(0.0, -z)


def _logistic_objective(xb: np.ndarray, y: np.ndarray, theta: np.ndarray, reg: np.ndarray) -> float:
    z = xb @ theta
    nll = np.mean(np.logaddexp(0.0, z) - y * z)
    return float(nll + 0.5 * np.sum(reg * theta * theta))


def fit_logistic(
    features: np.ndarray,
    target: np.ndarray,
    l2: float = 1e-2,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> dict:
    """Fit ``P(target | x) = sigmoid(w . (x - mean) / std + b)`` by damped Newton (IRLS) in numpy.

    Objective: ``mean_n [log(1 + exp(z_n)) - y_n z_n] + (l2 / 2) |w|^2`` with ``z = w . x_std + b``; the bias is
    not penalised. Features are standardised with their mean and population std; a constant column (std 0) gets
    std 1, so its standardised value is 0 and its weight stays 0. Non-finite feature values are treated as the
    column mean. If every target is true (or every target false) there is nothing to separate: the weights are 0
    and ``b = log((k + 0.5) / (n - k + 0.5))`` (k = number of true targets), a smoothed constant.

    Returns JSON-able params ``{"mean": [d], "std": [d], "weights": [d], "bias": float}`` for ``logistic_score``.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {x.shape}")
    y = np.asarray(target).reshape(-1).astype(bool)
    n, d = x.shape
    if y.shape[0] != n:
        raise ValueError(f"features and target lengths differ: {n} vs {y.shape[0]}")
    if n == 0:
        raise ValueError("fit_logistic needs at least one sample")
    if not (l2 >= 0.0):
        raise ValueError(f"l2 must be >= 0, got {l2!r}")
    finite = np.isfinite(x)
    cnt = np.maximum(finite.sum(axis=0), 1)
    mean = np.where(finite, x, 0.0).sum(axis=0) / cnt
    x = np.where(finite, x, mean[None, :])
    std = x.std(axis=0)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    xs = (x - mean) / std
    k = int(y.sum())
    if k == 0 or k == n:
        return {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "weights": [0.0] * d,
            "bias": float(math.log((k + 0.5) / (n - k + 0.5))),
        }
    yf = y.astype(np.float64)
    xb = np.concatenate([xs, np.ones((n, 1))], axis=1)
    reg = np.concatenate([np.full(d, float(l2)), [0.0]])
    ridge = reg + 1e-9  # keeps the Hessian invertible (constant columns, tiny l2)
    prior = (k + 0.5) / (n + 1.0)
    theta = np.zeros(d + 1)
    theta[-1] = math.log(prior / (1.0 - prior))
    obj = _logistic_objective(xb, yf, theta, reg)
    for _ in range(max_iter):
        z = xb @ theta
        prob = np.exp(_log_sigmoid(z))
        grad = xb.T @ (prob - yf) / n + reg * theta
        wts = prob * (1.0 - prob)
        hess = (xb * wts[:, None]).T @ xb / n + np.diag(ridge)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        t = 1.0
        while True:
            cand = theta - t * step
            new_obj = _logistic_objective(xb, yf, cand, reg)
            if new_obj <= obj + 1e-4 * t * float(grad @ -step) or t < 1e-8:
                break
            t *= 0.5
        if not np.isfinite(new_obj) or new_obj > obj:
            break
        theta, improvement, obj = cand, obj - new_obj, new_obj
        if improvement < tol or float(np.max(np.abs(t * step))) < 1e-10:
            break
    return {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "weights": [float(v) for v in theta[:d]],
        "bias": float(theta[-1]),
    }


def logistic_score(features: np.ndarray, params: Mapping[str, object]) -> np.ndarray:
    """Probability from ``fit_logistic`` params, float64 (B,):
    ``sigmoid(sum_k w_k (x_k - mean_k) / std_k + b)``. Non-finite feature values are replaced by the mean."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (B, d), got shape {x.shape}")
    try:
        mean = np.asarray(params["mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(params["std"], dtype=np.float64).reshape(-1)
        w = np.asarray(params["weights"], dtype=np.float64).reshape(-1)
        b = float(params["bias"])  # type: ignore[arg-type]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"learned params need keys mean, std, weights, bias: {exc}") from exc
    d = x.shape[1]
    if not (mean.shape[0] == std.shape[0] == w.shape[0] == d):
        raise ValueError(
            f"learned params have {w.shape[0]} weights, {mean.shape[0]} means, {std.shape[0]} stds "
            f"but the features have {d} columns"
        )
    x = np.where(np.isfinite(x), x, mean[None, :])
    z = ((x - mean) / np.where(std > 0, std, 1.0)) @ w + b
    return np.exp(_log_sigmoid(z))


# ----------------------------------------------------------------------------------------------------------------
# temperature scaling
# ----------------------------------------------------------------------------------------------------------------
def softmax_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood ``mean_n [logsumexp(z_n / T) - z_{n, y_n} / T]``."""
    z = _as_logits(logits) / _check_temperature(temperature)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"logits and labels lengths differ: {z.shape[0]} vs {y.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
    m = np.max(z, axis=1)
    lse = m + np.log(np.sum(np.exp(z - m[:, None]), axis=1))
    return float(np.mean(lse - z[np.arange(z.shape[0]), y]))


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    t_min: float = 0.05,
    t_max: float = 20.0,
    iters: int = 80,
) -> float:
    """Temperature T in [t_min, t_max] that minimises ``softmax_nll(logits, labels, T)``.

    The NLL is convex in 1/T, hence unimodal in log T: golden-section search on ``log T``. The result never has a
    higher NLL than T = 1 when 1 lies in the range (if the search ends worse, which only rounding can cause,
    1.0 is returned).
    """
    z = _as_logits(logits)
    y = np.asarray(labels).reshape(-1)
    if z.shape[0] == 0:
        raise ValueError("fit_temperature needs at least one sample")
    if not (0.0 < t_min < t_max):
        raise ValueError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")

    def f(log_t: float) -> float:
        return softmax_nll(z, y, math.exp(log_t))

    lo, hi = math.log(t_min), math.log(t_max)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c = b - inv_phi * (b - a)
    d = a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    best_log_t, best = (c, fc) if fc <= fd else (d, fd)
    for edge in (lo, hi):  # the minimum may sit on the boundary
        fe = f(edge)
        if fe < best:
            best_log_t, best = edge, fe
    if lo <= 0.0 <= hi and best > f(0.0):
        return 1.0
    return float(math.exp(best_log_t))

"""PNG plots of an ``edgeexit profile`` result (the profile.json dict), drawn with matplotlib's Agg canvas.

matplotlib is imported inside :func:`write_plots` only (no pyplot, no global backend switch), so the profiler runs
on a device without it: the ImportError is turned into one line by the caller.

- ``latency_breakdown.png``: stacked bars, the cumulative cost of leaving at each exit (and of the full network)
  broken into the segments and heads it runs.
- ``power_trace.png``: watts vs time (total, and every rail), the adaptive and full runs shaded.
- ``energy_per_frame.png``: energy per frame, adaptive vs full (per rail where the meter has rails).

Estimated energy (``--meter constant``) is labelled "ESTIMATE" in the titles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

__all__ = ["write_plots", "PLOT_FILES"]

PLOT_FILES = {
    "latency_plot": "latency_breakdown.png",
    "power_plot": "power_trace.png",
    "energy_plot": "energy_per_frame.png",
}

_SEG_RAMP = ("#0b2a4a", "#b4d3f0")  # segments: dark to light blue
_HEAD_RAMP = ("#7a3100", "#f8c9a4")  # heads: dark to light orange (hatched)


def _ramp(ends: tuple, n: int) -> List[str]:
    """n distinct colours evenly spaced from ``ends[0]`` to ``ends[1]`` (any n: none is reused)."""
    a = [int(ends[0][k : k + 2], 16) for k in (1, 3, 5)]
    b = [int(ends[1][k : k + 2], 16) for k in (1, 3, 5)]
    steps = [0.0] if n <= 1 else [i / (n - 1) for i in range(n)]
    return ["#" + "".join(f"{round(x + t * (y - x)):02x}" for x, y in zip(a, b)) for t in steps]
_SPAN_COLORS = {"adaptive": "#70ad47", "full": "#c00000"}


def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    from .bundle import atomic_write_bytes  # noqa: PLC0415

    fig.tight_layout()
    atomic_write_bytes(path, lambda fh: fig.savefig(fh, format="png"))


def _estimate_suffix(result: Dict[str, Any]) -> str:
    meter = result.get("meter") or {}
    if meter.get("is_estimate"):
        w = meter.get("watts")
        return f" - ESTIMATE (constant {w:g} W)" if isinstance(w, (int, float)) else " - ESTIMATE"
    return ""


def _subtitle(result: Dict[str, Any]) -> str:
    dev = result.get("device") or {}
    what = dev.get("model") or dev.get("processor") or dev.get("machine") or ""
    return f"{result['bundle']['name']} on {dev.get('node', '?')} {('(' + what + ')') if what else ''}, " \
           f"{result['backend']['description']}"


def plot_latency_breakdown(result: Dict[str, Any], path: Path) -> Path:
    segs = [p["latency_ms_per_frame"] for p in result["segments"]]
    heads = [p["latency_ms_per_frame"] for p in result["heads"]]
    e = len(segs)
    fig = _figure(max(6.0, 1.3 * (e + 1) + 3), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    names = [f"exit {i}" for i in range(e)] + ["full"]
    # bar k (k < e): segments 0..k and heads 0..k; the last bar: every segment + the last head
    used = [(list(range(k + 1)), list(range(k + 1))) for k in range(e)] + [(list(range(e)), [e - 1])]
    labelled = set()
    seg_colors, head_colors = _ramp(_SEG_RAMP, e), _ramp(_HEAD_RAMP, e)
    for k, (seg_ids, head_ids) in enumerate(used):
        bottom = 0.0
        pieces = [("segment", i, segs[i]) for i in seg_ids] + [("head", i, heads[i]) for i in head_ids]
        for kind, i, v in pieces:
            colors = seg_colors if kind == "segment" else head_colors
            lab = f"{kind} {i}"
            ax.bar(k, v, bottom=bottom, color=colors[i], edgecolor="white", linewidth=0.6,
                   label=None if lab in labelled else lab, hatch="//" if kind == "head" else None)
            labelled.add(lab)
            bottom += v
        ax.text(k, bottom, f"{bottom:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    batch = result["settings"]["batch"]
    ax.set_ylabel("latency per frame (ms)" + (f", batch {batch}" if batch != 1 else ""))
    ax.set_title(f"Cost of leaving at each exit (mean latency)\n{_subtitle(result)}", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return path


def plot_power_trace(result: Dict[str, Any], path: Path) -> Path:
    trace = result["power_trace"]
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    t = trace["t"]
    rails = [k for k in trace if k not in ("t", "total", "spans", "decimated_by")]
    ax.plot(t, trace["total"], color="black", linewidth=1.0, label="total")
    for r in rails:
        ax.plot(t, trace[r], linewidth=0.8, label=r)
    seen = set()
    parts_span: Optional[List[float]] = None
    for s in trace.get("spans", []):
        color = _SPAN_COLORS.get(s["label"])
        if color is not None:
            ax.axvspan(s["start"], s["end"], color=color, alpha=0.18,
                       label=None if s["label"] in seen else f"{s['label']} run")
            seen.add(s["label"])
        elif s["label"].startswith(("segment_", "head_")):
            parts_span = [min(parts_span[0], s["start"]) if parts_span else s["start"],
                          max(parts_span[1], s["end"]) if parts_span else s["end"]]
    if parts_span:
        ax.axvspan(parts_span[0], parts_span[1], color="#7f7f7f", alpha=0.08, label="segments / heads alone")
    meter = result.get("meter") or {}
    ax.set_xlabel("time (s)")
    ax.set_ylabel("power (W)")
    ax.set_title(f"Power trace, meter {meter.get('name', '?')}{_estimate_suffix(result)}\n{_subtitle(result)}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best", frameon=False)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def plot_energy(result: Dict[str, Any], path: Path) -> Path:
    runs = result["runs"]
    a, f = runs["adaptive"]["energy_mj_per_frame"], runs["full"]["energy_mj_per_frame"]
    rails = [r for r in a.get("per_rail", {}) if r in f.get("per_rail", {})]
    groups = ["total"] + rails
    fig = _figure(max(7.0, 1.6 * len(groups) + 3.0), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    for k, g in enumerate(groups):
        va = a["total"] if g == "total" else a["per_rail"][g]
        vf = f["total"] if g == "total" else f["per_rail"][g]
        for off, v, mode in ((-width / 2, va, "adaptive"), (width / 2, vf, "full")):
            if v is None:
                continue
            ax.bar(k + off, v, width, color=_SPAN_COLORS[mode], label=mode if k == 0 else None)
            ax.text(k + off, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    est = (result.get("meter") or {}).get("is_estimate")
    ax.set_ylabel("energy per frame (mJ)" + (" - estimate" if est else ""))
    saving = (result.get("savings") or {}).get("energy")
    stxt = ""
    if isinstance(saving, (int, float)):
        stxt = (f": adaptive saves {100 * saving:.1f}%" if saving >= 0
                else f": adaptive uses {-100 * saving:.1f}% more")
    est_line = f"\n{_estimate_suffix(result).lstrip(' -')}" if est else ""
    ax.set_title(f"Energy per frame, adaptive vs full{stxt}{est_line}\n{_subtitle(result)}", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return path


def write_plots(result: Dict[str, Any], out_dir: Path, warn: Callable[[str], None] = lambda _m: None) -> Dict[str, str]:
    """Draw the plots the result supports into ``out_dir``; returns {key: path}. Raises ImportError without
    matplotlib. Plots that need energy are skipped (one line through ``warn``) when there was no meter."""
    import matplotlib  # noqa: F401, PLC0415 - raises ImportError on a device without it

    out_dir = Path(out_dir)
    files: Dict[str, str] = {}
    if result.get("segments") and result.get("heads"):
        files["latency_plot"] = str(plot_latency_breakdown(result, out_dir / PLOT_FILES["latency_plot"]))
    if result.get("power_trace"):
        files["power_plot"] = str(plot_power_trace(result, out_dir / PLOT_FILES["power_plot"]))
    else:
        warn("edgeexit: no power meter: power trace plot skipped")
    runs = result.get("runs") or {}
    if all((runs.get(m) or {}).get("energy_mj_per_frame") for m in ("adaptive", "full")):
        files["energy_plot"] = str(plot_energy(result, out_dir / PLOT_FILES["energy_plot"]))
    else:
        warn("edgeexit: no energy measured: energy plot skipped")
    return files

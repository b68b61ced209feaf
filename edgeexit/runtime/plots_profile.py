"""PNG plots of an ``edgeexit profile`` result (the profile.json dict), drawn with matplotlib's Agg canvas.

matplotlib is imported inside :func:`write_plots` only (no pyplot, no global backend switch), so the profiler runs
on a device without it: the ImportError is turned into one line by the caller.

- ``latency_breakdown.png``: stacked bars, the latency of leaving at each kept exit broken into the stages it
  runs (one colour per stage; the hatched top of each piece is the per-call overhead ``boundary``), beside
  ``full.onnx`` alone.
- ``power_trace.png``: watts vs time (total, and every rail), the blocks of the adaptive, full and chain runs
  shaded (one colour per mode), the stage-alone loops in grey.
- ``energy_per_frame.png``: energy per frame, adaptive vs full vs chain (per rail where the meter has rails).

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

# distinct colours (matplotlib's tab10 minus green/red/grey, which mark the modes and the part loops)
_STAGE_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#aec7e8")
_MONO_COLOR = "#7f7f7f"
_SPAN_COLORS = {"adaptive": "#2ca02c", "full": "#d62728", "chain": "#1f3f77"}


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
    stages = [p["latency_ms_per_frame"] for p in result["stages"]]
    exits = [p["exit"] for p in result["stages"]]
    mono = result["monolithic"]["latency_ms_per_frame"]
    boundary = ((result.get("cost_model") or {}).get("latency_ms") or {}).get("boundary")
    boundary = float(boundary) if isinstance(boundary, (int, float)) else 0.0
    n = len(stages)
    fig = _figure(max(6.0, 1.3 * (n + 1) + 3), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    names = [f"exit {k}" for k in exits] + ["full.onnx"]
    for j in range(n):  # bar j: stages 0..j, each its compute then its call overhead (hatched)
        bottom = 0.0
        for i in range(j + 1):
            color = _STAGE_COLORS[i % len(_STAGE_COLORS)]
            over = min(boundary, stages[i])
            ax.bar(j, stages[i] - over, bottom=bottom, color=color, edgecolor="white", linewidth=0.6,
                   label=f"stage {i} (exit {exits[i]})" if j == i else None)
            ax.bar(j, over, bottom=bottom + stages[i] - over, color=color, edgecolor="white", linewidth=0.6,
                   hatch="//", alpha=0.6, label="per-call overhead" if j == i == 0 and over > 0 else None)
            bottom += stages[i]
        ax.text(j, bottom, f"{bottom:.3g}", ha="center", va="bottom", fontsize=8)
    ax.bar(n, mono, color=_MONO_COLOR, edgecolor="white", linewidth=0.6, label="full.onnx (one call)")
    ax.text(n, mono, f"{mono:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    batch = result["settings"]["batch"]
    ax.set_ylabel("latency per frame (ms)" + (f", batch {batch}" if batch != 1 else ""))
    gate = result["bundle"].get("gate")
    ax.set_title(f"Cost of leaving at each kept exit (stages alone, median latency; gate {gate})\n{_subtitle(result)}",
                 fontsize=9)
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
        elif s["label"].startswith("stage_") or s["label"] == "full.onnx":
            parts_span = [min(parts_span[0], s["start"]) if parts_span else s["start"],
                          max(parts_span[1], s["end"]) if parts_span else s["end"]]
    if parts_span:
        ax.axvspan(parts_span[0], parts_span[1], color="#7f7f7f", alpha=0.08, label="stages / full.onnx alone")
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
    modes = [m for m in ("adaptive", "full", "chain") if (runs.get(m) or {}).get("energy_mj_per_frame")]
    energy = {m: runs[m]["energy_mj_per_frame"] for m in modes}
    rails = [r for r in energy[modes[0]].get("per_rail", {}) if all(r in energy[m].get("per_rail", {}) for m in modes)]
    groups = ["total"] + rails
    fig = _figure(max(7.0, 1.9 * len(groups) + 3.0), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(modes)
    for k, g in enumerate(groups):
        for i, mode in enumerate(modes):
            v = energy[mode]["total"] if g == "total" else energy[mode]["per_rail"][g]
            if v is None:
                continue
            x = k + (i - (len(modes) - 1) / 2) * width
            ax.bar(x, v, width, color=_SPAN_COLORS[mode], label=mode if k == 0 else None)
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    est = (result.get("meter") or {}).get("is_estimate")
    ax.set_ylabel("energy per frame (mJ)" + (" - estimate" if est else ""))
    saving = (result.get("savings") or {}).get("energy")
    stxt = ""
    if isinstance(saving, (int, float)):
        stxt = (f": adaptive saves {100 * saving:.1f}% vs full" if saving >= 0
                else f": adaptive uses {-100 * saving:.1f}% more than full")
    est_line = f"\n{_estimate_suffix(result).lstrip(' -')}" if est else ""
    ax.set_title(f"Energy per frame, adaptive vs full vs chain{stxt}{est_line}\n{_subtitle(result)}", fontsize=9)
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
    if result.get("stages") and result.get("monolithic"):
        files["latency_plot"] = str(plot_latency_breakdown(result, out_dir / PLOT_FILES["latency_plot"]))
    if result.get("power_trace"):
        files["power_plot"] = str(plot_power_trace(result, out_dir / PLOT_FILES["power_plot"]))
    else:
        warn("edgeexit: no power meter: power trace plot skipped")
    runs = result.get("runs") or {}
    if all((runs.get(m) or {}).get("energy_mj_per_frame") for m in ("adaptive", "full")):  # chain: when measured
        files["energy_plot"] = str(plot_energy(result, out_dir / PLOT_FILES["energy_plot"]))
    else:
        warn("edgeexit: no energy measured: energy plot skipped")
    return files

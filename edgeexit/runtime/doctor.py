"""``edgeexit doctor``: what this machine offers the runtime, in one table (torch-free; torch is only looked up).

Rows: python, numpy, onnxruntime (version and available providers), TensorRT, pycuda, CUDA (from onnxruntime's
build info and pycuda where available), Jetson L4T release, OpenCV (version, GStreamer support), cameras
(``/dev/video*``), power meters (:func:`edgeexit.runtime.meters.available_meters`), clocks locked
(``jetson_clocks``), torch (present or not; found with ``importlib.util.find_spec``, never imported).
Every probe is guarded: doctor reports a failure as a row, it never crashes.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

__all__ = ["collect", "render", "Row"]

Row = Tuple[str, str, str]  # (component, status, detail)


def _guard(fn: Callable[[], List[Row]], name: str) -> List[Row]:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (doctor never crashes)
        return [(name, "error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")]


def _find(module: str) -> Optional[bool]:
    """Whether ``module`` can be imported, without importing it (None: blocked, e.g. ``sys.modules[m] = None``)."""
    if module in sys.modules and sys.modules[module] is None:
        return None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return None


def _python() -> List[Row]:
    return [("python", platform.python_version(), f"{sys.executable} ({platform.machine()}, {platform.system()})")]


def _numpy() -> List[Row]:
    import numpy as np  # noqa: PLC0415

    return [("numpy", np.__version__, "")]


def _onnxruntime() -> List[Row]:
    if not _find("onnxruntime"):
        return [("onnxruntime", "not installed", "pip install onnxruntime (onnxruntime-gpu for CUDA/TensorRT)")]
    import onnxruntime as ort  # noqa: PLC0415

    providers = ort.get_available_providers()
    short = [p.replace("ExecutionProvider", "") for p in providers]
    rows = [("onnxruntime", ort.__version__, f"providers: {', '.join(short)}; device: {ort.get_device()}")]
    cuda = _ort_cuda_version(ort)
    if cuda:
        rows.append(("CUDA (onnxruntime build)", cuda, ""))
    return rows


def _ort_cuda_version(ort: Any) -> Optional[str]:
    try:
        info = ort.get_build_info()
    except Exception:  # noqa: BLE001
        return None
    for part in str(info).replace(";", ",").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() in ("cuda_version", "cuda-version") and value.strip():
            return value.strip()
    return None


def _tensorrt() -> List[Row]:
    found = _find("tensorrt")
    if not found:
        return [("TensorRT", "not installed", "JetPack: python3-libnvinfer; elsewhere: pip install tensorrt")]
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 (an install whose libraries do not load)
        return [("TensorRT", "broken", f"import failed: {' '.join(str(exc).split())[:160]}")]
    return [("TensorRT", str(getattr(trt, "__version__", "?")), "")]


def _pycuda() -> List[Row]:
    if not _find("pycuda"):
        return [("pycuda", "not installed", "needed by --backend tensorrt: pip install pycuda")]
    import pycuda  # noqa: PLC0415

    version = getattr(pycuda, "VERSION_TEXT", None) or ".".join(map(str, getattr(pycuda, "VERSION", ()))) or "?"
    rows: List[Row] = [("pycuda", str(version), "")]
    try:
        import pycuda.driver as cuda  # noqa: PLC0415

        cuda.init()
        toolkit = ".".join(map(str, cuda.get_version()))
        driver = cuda.get_driver_version()
        gpus = [cuda.Device(i).name() for i in range(cuda.Device.count())]
        rows.append(("CUDA (pycuda)", toolkit, f"driver API {driver // 1000}.{driver % 1000 // 10}; GPUs: {', '.join(gpus) or 'none'}"))
    except Exception as exc:  # noqa: BLE001
        rows.append(("CUDA (pycuda)", "unavailable", " ".join(str(exc).split())[:160]))
    return rows


def _jetson() -> List[Row]:
    path = "/etc/nv_tegra_release"
    if not os.path.isfile(path):
        return []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        first = fh.readline().strip()
    return [("Jetson L4T", first.split(",")[0].lstrip("# ") or "?", first)]


def _opencv() -> List[Row]:
    if not _find("cv2"):
        return [("OpenCV", "not installed", "video and camera sources need it: pip install 'edgeexit[video]'")]
    import cv2  # noqa: PLC0415

    from .sources import opencv_has_gstreamer  # noqa: PLC0415

    gst = opencv_has_gstreamer()
    detail = "GStreamer: yes (csi:// works)" if gst else "GStreamer: no (csi:// needs JetPack's OpenCV)"
    return [("OpenCV", cv2.__version__, detail)]


def _cameras() -> List[Row]:
    devices = sorted(glob.glob("/dev/video*"), key=lambda p: (len(p), p))
    if not devices:
        return [("cameras", "none found", "no /dev/video* (CSI cameras appear through nvargus, try csi://0)")]
    described = []
    for dev in devices:
        name_file = f"/sys/class/video4linux/{os.path.basename(dev)}/name"
        try:
            with open(name_file, "r", encoding="utf-8", errors="replace") as fh:
                described.append(f"{dev} ({fh.read().strip()})")
        except OSError:
            described.append(dev)
    return [("cameras", str(len(devices)), ", ".join(described))]


def _meters() -> List[Row]:
    from .meters import available_meters, jetson_clocks_locked  # noqa: PLC0415

    rows: List[Row] = []
    for name, ok, reason in available_meters():
        if name == "constant" and not ok:
            rows.append(("power meter constant", "estimate only", "with --power-watts W"))
            continue
        rows.append((f"power meter {name}", "available" if ok else "no", " ".join(str(reason).split())[:160]))
    locked = jetson_clocks_locked()
    rows.append(("clocks locked", {True: "yes", False: "no", None: "unknown"}[locked],
                 "" if locked else "sudo jetson_clocks before profiling" if locked is False else ""))
    return rows


def _torch() -> List[Row]:
    found = _find("torch")
    if found is None:
        return [("torch", "blocked", "import disabled in this process (the runtime does not need it)")]
    if found:
        return [("torch", "present", "workstation commands (train, calibrate, export) available; run does not use it")]
    return [("torch", "not installed", "fine for edgeexit run / profile / doctor")]


def collect() -> List[Row]:
    """Every doctor row (component, status, detail)."""
    rows: List[Row] = []
    for name, fn in (
        ("python", _python), ("numpy", _numpy), ("onnxruntime", _onnxruntime), ("TensorRT", _tensorrt),
        ("pycuda", _pycuda), ("Jetson", _jetson), ("OpenCV", _opencv), ("cameras", _cameras),
        ("power meters", _meters), ("torch", _torch),
    ):
        rows += _guard(fn, name)
    return rows


def to_dict(rows: List[Row]) -> Dict[str, Dict[str, str]]:
    return {name: {"status": status, "detail": detail} for name, status, detail in rows}


def render(rows: Optional[List[Row]] = None, file: Optional[TextIO] = None) -> None:
    """Print the doctor table to ``file`` (stdout by default)."""
    rows = collect() if rows is None else rows
    file = file if file is not None else sys.stdout
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="edgeexit doctor", title_justify="left")
    table.add_column("component")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for name, status, detail in rows:
        table.add_row(name, status, detail)
    Console(file=file, width=max(100, _terminal_width()), highlight=False).print(table)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120

"""Shared helpers of the benchmark scripts: machine description, atomic JSON, Markdown tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Where and with what a figure was measured."""
    import numpy
    import onnxruntime

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import torch

        info["torch"] = str(torch.__version__)
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    return info


def jsonable(obj: Any) -> Any:
    """Strict JSON: NaN and infinities become null, numpy scalars and arrays plain Python (``edgeexit.jsonio``)."""
    from edgeexit.jsonio import plain

    return plain(obj)


def write_json(path: Path, data: Any) -> None:
    from edgeexit.jsonio import write_json as _write

    _write(path, data)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"

"""Export: multi-exit model -> bundle (per-segment / per-exit ONNX files + manifest) -> TensorRT engines.

This package's ``__init__`` imports nothing heavy: ``edgeexit.export.tensorrt`` must import on a Jetson without
torch. ``export_bundle`` (torch) is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_bundle", "ExportError", "ExportCheckError", "build_bundle_engines", "TensorRTMissing"]

_LAZY = {
    "export_bundle": "onnx_export",
    "ExportError": "onnx_export",
    "ExportCheckError": "onnx_export",
    "build_bundle_engines": "tensorrt",  # a re-export of edgeexit.runtime.tensorrt_build
    "TensorRTMissing": "tensorrt",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The torch-free on-device runtime: bundle -> backend engines -> exit chain, fed by camera/file sources.

::

    from edgeexit.runtime import load_bundle, open_backend, StageRunner
    bundle = load_bundle("bundle/")
    runner = StageRunner(bundle, open_backend(bundle))
    decisions = runner.run_images(frames)          # uint8 HxWxC frames -> list[Decision]
    decisions[0].to_dict()                         # the JSON-line fields: class_id, label, confidence, exit, ...

Modules: ``bundle`` (load and check a bundle), ``engine`` (the engine interface), ``backends`` (ONNX Runtime;
``tensorrt_backend`` for TensorRT), ``chain`` (StageRunner, Decision), ``sources`` (input URIs), ``outputs``
(JSON lines, annotated frames), ``summary`` (run statistics), ``meters`` (power), ``commands`` (the command
layer), ``doctor`` (environment report).
Nothing here imports torch; tensorrt, pycuda and cv2 are imported only when used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Attributes are loaded on first use, so importing one submodule (e.g. ``edgeexit.runtime.sources``) does not
# load the others.
_LAZY = {
    "Backend": "backends", "BackendError": "backends", "Engine": "backends", "OrtBackend": "backends",
    "open_backend": "backends", "resolve_providers": "backends",
    "TensorRTBackend": "tensorrt_backend",
    "Bundle": "bundle", "BundleError": "bundle", "load_bundle": "bundle",
    "Decision": "chain", "StageRunner": "chain", "RunOptions": "commands",
    "run_command": "commands", "Pipeline": "bundle", "Buffer": "engine", "parse_thresholds": "chain", "run_source": "chain",
    "Frame": "sources", "Source": "sources", "SourceError": "sources", "open_source": "sources",
    "RunStats": "summary",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))

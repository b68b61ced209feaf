"""The engine interface every backend implements (torch-free, no backend imported here).

An :class:`Engine` runs one ONNX graph of a bundle (a stage, a CAM graph or the monolithic model)::

    engine.input_names, engine.output_names, engine.input_shapes
    engine.run(feeds, outputs=None) -> {name: numpy array}          # any batch size
    call = engine.bind(inputs, outputs); call()                      # fixed buffers, no per-call allocation

``bind`` is the camera path: the caller owns every buffer (a :class:`Buffer` made by the backend) and one stage's
output buffer *is* the next stage's input buffer, so a frame crosses the chain with one copy in and a few scalars
out. A :class:`Backend` opens engines for a bundle's files and makes buffers where its engines want them (host
memory for the CPU, device memory for GPUs, with host views only for what the chain reads).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import EdgeexitError

__all__ = ["BackendError", "Buffer", "Engine", "Backend", "TENSORRT_MISSING"]

TENSORRT_MISSING = ("the tensorrt backend needs TensorRT and pycuda (JetPack ships python3-libnvinfer; pip install "
                    "pycuda); use --backend onnxruntime")


class BackendError(EdgeexitError, RuntimeError):
    """A backend that cannot be opened or used; the message is one line."""


class Buffer:
    """A fixed tensor buffer of a backend. ``host`` is a numpy view the chain may read or write (None for
    device-only buffers, e.g. features passed from stage to stage on a GPU); ``value`` is what the backend binds."""

    def __init__(self, shape: Tuple[int, ...], dtype: Any, host: Optional[np.ndarray], value: Any) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.host = host
        self.value = value

    def __repr__(self) -> str:
        where = "host" if self.host is not None else "device"
        return f"<Buffer {self.shape} {self.dtype} on {where}>"


class Engine:
    """One compiled graph. Subclasses set ``name``, ``input_names``, ``output_names``, ``input_shapes``,
    ``output_types`` (name -> numpy dtype) and implement :meth:`run` and :meth:`bind`."""

    name: str = "engine"
    input_names: List[str]
    output_names: List[str]
    input_shapes: Dict[str, Tuple[Optional[int], ...]]
    output_types: Dict[str, Any]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """Run on host ``feeds``; returns the requested ``outputs`` (all by default) as numpy arrays."""
        raise NotImplementedError

    def bind(self, inputs: Mapping[str, Buffer], outputs: Mapping[str, Buffer]) -> Callable[[], None]:
        """A call that runs the graph from ``inputs`` into ``outputs`` (buffers of this engine's backend) with
        nothing allocated per call. Outputs not named are computed and discarded."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.input_names} -> {self.output_names}>"


class Backend:
    """Opens a bundle's graphs as engines (cached per file) and makes buffers for them."""

    kind: str = "backend"
    device: str = "cpu"
    max_batch: Optional[int] = None  # the largest batch the engines take (None: any)

    def __init__(self) -> None:
        self.notes: List[str] = []  # e.g. why "auto" did not pick TensorRT
        self._engines: Dict[str, Engine] = {}

    def engine(self, model_file: Any) -> Engine:
        """The engine of a bundle file (``ModelFile``), opened once."""
        key = str(model_file.path)
        if key not in self._engines:
            self._engines[key] = self._open(model_file)
        return self._engines[key]

    def _open(self, model_file: Any) -> Engine:
        raise NotImplementedError

    def buffer(self, shape: Sequence[int], dtype: Any, host: bool = True) -> Buffer:
        """A fixed buffer; ``host=False`` lets it live on the device (the chain never reads it)."""
        array = np.zeros(tuple(int(d) for d in shape), dtype=dtype)
        return Buffer(array.shape, array.dtype, array, array)

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:
        for engine in self._engines.values():
            try:
                engine.close()
            except Exception:  # noqa: BLE001 (closing is best effort)
                pass
        self._engines.clear()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

"""Inference backends (torch-free): ONNX Runtime here, TensorRT in ``tensorrt_backend``; the interface is in
``edgeexit.runtime.engine``.

:func:`open_backend` picks and opens one for a bundle:

- ``"onnxruntime"``: :class:`OrtBackend`, any execution-provider list (``tensorrt,cuda,cpu`` ...), one session
  per graph with low-latency options (one intra-op thread and no spinning by default: a chain runs several
  sessions one after another, and idle spinning workers of one steal the cores of the next), IO binding with
  buffers bound once (on GPU providers features stay in device memory between stages).
- ``"tensorrt"``: :class:`~edgeexit.runtime.tensorrt_backend.TensorRTBackend` (tensorrt + pycuda, imported lazily).
- ``"auto"``: TensorRT when ``tensorrt`` and ``pycuda`` import, else ONNX Runtime with its best provider.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .engine import TENSORRT_MISSING, Backend, BackendError, Buffer, Engine

__all__ = [
    "BackendError",
    "Engine",
    "Backend",
    "Buffer",
    "OrtEngine",
    "OrtBackend",
    "PROVIDER_ALIASES",
    "GPU_PROVIDERS",
    "BACKEND_KINDS",
    "resolve_providers",
    "best_providers",
    "session_options",
    "trt_profile_options",
    "available_cpus",
    "open_backend",
    "MAX_THREADS",
]

BACKEND_KINDS = ("auto", "onnxruntime", "tensorrt")

# Short names accepted by ``--providers`` (case-insensitive); full ONNX Runtime names are accepted too.
PROVIDER_ALIASES: Dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}

# Providers whose tensors live in device memory (IO binding keeps them there).
GPU_PROVIDERS: Dict[str, str] = {
    "TensorrtExecutionProvider": "cuda",
    "CUDAExecutionProvider": "cuda",
    "ROCMExecutionProvider": "cuda",  # ORT names ROCm device memory "cuda" in OrtValue as well
}

# The order "auto" prefers among the available providers.
_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)


# --------------------------------------------------------------------------------------------------------------
# ONNX Runtime


def _import_ort() -> Any:
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise BackendError(f"onnxruntime is not installed: pip install onnxruntime ({exc})") from None
    return ort


def _provider_name(provider: Union[str, Tuple[str, Mapping[str, Any]]]) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def best_providers(available: Optional[Sequence[str]] = None) -> List[str]:
    """The available providers in the order ``auto`` prefers them (TensorRT, CUDA, ..., CPU); Azure and other
    remote providers are left out. Always ends with the CPU provider."""
    if available is None:
        available = _import_ort().get_available_providers()
    ranked = [p for p in _PREFERENCE if p in available]
    if "CPUExecutionProvider" not in ranked:
        ranked.append("CPUExecutionProvider")
    return ranked


def resolve_providers(
    providers: Union[None, str, Sequence[Union[str, Tuple[str, Mapping[str, Any]]]]],
    available: Optional[Sequence[str]] = None,
) -> List[Union[str, Tuple[str, Dict[str, Any]]]]:
    """Map a provider list (``"tensorrt,cuda,cpu"``, a list of short or full names, or ``(name, options)``
    tuples) to ONNX Runtime provider entries. ``None`` or ``"auto"``: :func:`best_providers`. Unknown names and
    providers this onnxruntime build lacks are a BackendError naming the available ones."""
    if available is None:
        available = _import_ort().get_available_providers()
    if providers is None or (isinstance(providers, str) and providers.strip().lower() in ("", "auto")):
        return list(best_providers(available))
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    out: List[Union[str, Tuple[str, Dict[str, Any]]]] = []
    for entry in providers:
        options: Optional[Dict[str, Any]] = None
        if isinstance(entry, tuple):
            entry, options = entry[0], dict(entry[1])
        name = PROVIDER_ALIASES.get(str(entry).strip().lower(), str(entry).strip())
        if name not in available:
            known = ", ".join(sorted({k for k, v in PROVIDER_ALIASES.items() if v in available}) or ["cpu"])
            raise BackendError(
                f"execution provider {entry!r} ({name}) is not available in this onnxruntime build; "
                f"available: {', '.join(available)} (short names: {known})"
            )
        if name in (_provider_name(p) for p in out):
            continue
        out.append((name, options) if options else name)
    if not out:
        raise BackendError("empty provider list")
    return out


def _default_provider_options(name: str, cache_dir: Optional[Path]) -> Dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        options: Dict[str, Any] = {"trt_fp16_enable": True}
        if cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        return options
    return {}


def _ort_cache_dir() -> Optional[Path]:
    base = os.environ.get("EDGEEXIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgeexit"
    )
    path = Path(base) / "ort-tensorrt"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def available_cpus() -> int:
    """CPUs this process may run on (affinity / cgroup-pinned sets count, unlike ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def session_options(threads: Optional[int] = None, spinning: Optional[bool] = None) -> Any:
    """Low-latency ONNX Runtime session options: every graph optimisation, sequential execution, one inter-op
    thread, ``threads`` intra-op threads (None: ORT's default). ``spinning=False`` (the default) stops idle worker
    threads from busy-waiting after a run: a chain runs several sessions one after another, and the spinning
    workers of one session compete with the next for the cores (measured: 2 spinning threads per session gave
    10-27 ms mean latencies from contention between sessions)."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        if int(threads) < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = int(threads)
    if spinning is None:
        spinning = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: no provider-fallback chatter on stderr
    return so


def _shape_of(shape: Sequence[Any]) -> Tuple[Optional[int], ...]:
    return tuple(int(d) if isinstance(d, (int, np.integer)) and int(d) >= 0 else None for d in shape)


def trt_profile_options(input_shapes: Mapping[str, Sequence[int]], max_batch: int) -> Dict[str, str]:
    """TensorRT execution-provider options that fix one optimisation profile (batch 1 .. ``max_batch``, optimum
    ``max_batch``), so batches shrunk by early exits never make ONNX Runtime rebuild the engine."""
    def fmt(batch: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in (batch, *shape))}" for name, shape in input_shapes.items())

    top = max(1, int(max_batch))
    return {"trt_profile_min_shapes": fmt(1), "trt_profile_opt_shapes": fmt(top), "trt_profile_max_shapes": fmt(top)}


def _with_trt_profile(entries: List[Any], shapes: Optional[Mapping[str, Sequence[int]]], max_batch: int) -> List[Any]:
    if not shapes:
        return entries
    out = []
    for entry in entries:
        name = _provider_name(entry)
        if name == "TensorrtExecutionProvider":
            options = dict(entry[1]) if isinstance(entry, tuple) else {}
            for key, value in trt_profile_options(shapes, max_batch).items():
                options.setdefault(key, value)
            entry = (name, options)
        out.append(entry)
    return out




MAX_THREADS = 256
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


class OrtEngine(Engine):
    """One ONNX Runtime session. ``run`` takes host arrays; ``bind`` binds fixed buffers once (IO binding), so a
    call is one ``run_with_iobinding`` (measured on this CPU: 7-9 us less than ``run`` per call)."""

    def __init__(self, path: Union[str, Path], providers: Sequence[Any], options: Any = None,
                 device: str = "cpu", device_id: int = 0) -> None:
        ort = _import_ort()
        self._ort = ort
        self.path = Path(path)
        self.name = self.path.stem
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 (ORT raises several types)
            raise BackendError(f"onnxruntime cannot load {self.path.name}: {str(exc).strip().splitlines()[0][:300]}") from None
        self.providers = list(self.session.get_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: _shape_of(i.shape) for i in self.session.get_inputs()}
        self.output_types = {o.name: _NP_TYPES.get(o.type, np.float32) for o in self.session.get_outputs()}
        self.device = device
        self.device_id = int(device_id)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        values = self.session.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return dict(zip(names, values))

    def bind(self, inputs: Mapping[str, Buffer], outputs: Mapping[str, Buffer]) -> Callable[[], None]:
        binding = self.session.io_binding()
        for name, buf in inputs.items():
            binding.bind_ortvalue_input(name, buf.value)
        for name in self.output_names:
            if name in outputs:
                binding.bind_ortvalue_output(name, outputs[name].value)
            else:  # computed anyway; let ORT place it
                binding.bind_output(name, self.device, self.device_id)
        run = self.session.run_with_iobinding
        return lambda: run(binding)

    def close(self) -> None:
        self.session = None


class OrtBackend(Backend):
    """A bundle's graphs as ONNX Runtime sessions (one per graph, opened on first use), sharing providers and
    session options."""

    kind = "onnxruntime"

    def __init__(self, providers: Union[None, str, Sequence[Any]] = None, threads: Optional[int] = 1,
                 spinning: Optional[bool] = None, max_batch: int = 32, input_shapes: Optional[Dict[str, Any]] = None):
        super().__init__()
        ort = _import_ort()
        self._ort = ort
        resolved = resolve_providers(providers)
        cache_dir = _ort_cache_dir() if any(_provider_name(p) == "TensorrtExecutionProvider" for p in resolved) else None
        entries: List[Any] = []
        for p in resolved:
            name = _provider_name(p)
            options = _default_provider_options(name, cache_dir)
            if isinstance(p, tuple):
                options.update(p[1])
            entries.append((name, options) if options else name)
        self._entries = entries
        self.requested_providers = [_provider_name(p) for p in resolved]
        first = entries[0]
        self.device_id = int((first[1] if isinstance(first, tuple) else {}).get("device_id", 0))
        self.device = GPU_PROVIDERS.get(self.requested_providers[0], "cpu")
        if threads is not None and not 1 <= int(threads) <= MAX_THREADS:
            raise BackendError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
        self.threads = threads
        self._options = session_options(threads, spinning)
        self._max_batch = max(1, int(max_batch))
        self.providers: List[str] = []
        if "TensorrtExecutionProvider" in self.requested_providers:
            self.max_batch = self._max_batch  # the fixed TensorRT profile: larger batches are split

    def _open(self, model_file: Any) -> OrtEngine:
        shapes = {t.name: t.static_shape for t in getattr(model_file, "inputs", ())}
        engine = OrtEngine(model_file.path, _with_trt_profile(self._entries, shapes, self._max_batch), self._options,
                           device=self.device, device_id=self.device_id)
        self.providers = engine.providers
        if self.device != "cpu" and GPU_PROVIDERS.get(engine.providers[0] if engine.providers else "", "cpu") == "cpu":
            self.device = "cpu"  # the GPU provider was not taken: buffers on the host
        return engine

    def buffer(self, shape: Sequence[int], dtype: Any, host: bool = True) -> Buffer:
        shape = tuple(int(d) for d in shape)
        if host or self.device == "cpu":
            array = np.zeros(shape, dtype=dtype)
            return Buffer(shape, dtype, array, self._ort.OrtValue.ortvalue_from_numpy(array))
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, self.device,
                                                               self.device_id)
        return Buffer(shape, dtype, None, value)

    def describe(self) -> str:
        used = ", ".join(p.replace("ExecutionProvider", "") for p in (self.providers or self.requested_providers))
        extra = [f"{self.threads} thread{'s' if self.threads != 1 else ''} per session"] if self.threads else []
        extra += self.notes
        return f"onnxruntime [{used}]" + (f" ({', '.join(extra)})" if extra else "")


# --------------------------------------------------------------------------------------------------------------


def tensorrt_available() -> bool:
    """True when both ``tensorrt`` and ``pycuda`` can be imported (checked without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda"))


def open_backend(
    bundle: Any,
    kind: str = "auto",
    providers: Union[None, str, Sequence[Any]] = None,
    threads: Optional[int] = 1,
    max_batch: int = 32,
    gate: Optional[str] = None,
    full: bool = False,
    **kwargs: Any,
) -> Backend:
    """Open a backend for ``bundle`` and its engines for the run: the stages of ``gate``'s pipeline (default:
    the bundle's gate), or with ``full`` the monolithic model, so a bad file fails here, not on the first frame.

    ``kind``: ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (TensorRT when tensorrt and pycuda are installed and
    no ``providers`` were given, else ONNX Runtime). ``providers``: ONNX Runtime providers (``"tensorrt,cuda,cpu"``
    or a list; default: the best available). ``threads``: intra-op threads of each ONNX Runtime session (default 1;
    None: ONNX Runtime's default). ``max_batch``: the largest batch TensorRT profiles and buffers are made for.
    """
    kind = (kind or "auto").lower()
    if kind not in BACKEND_KINDS:
        raise BackendError(f"unknown backend {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")
    files = [bundle.monolithic] if full else list(bundle.pipeline(gate).stages)
    fallback = None
    backend: Optional[Backend] = None
    if kind == "auto" and providers is None and tensorrt_available():
        try:
            backend = _tensorrt(bundle, max_batch, kwargs)
            _open_all(backend, files)
            return backend
        except BackendError as exc:  # e.g. no GPU, or an engine that cannot be built: ONNX Runtime still works
            fallback = f"tensorrt unavailable ({exc})"
    if kind == "tensorrt":
        if providers is not None:
            raise BackendError("--providers applies to the onnxruntime backend only")
        backend = _tensorrt(bundle, max_batch, kwargs)
    else:
        backend = OrtBackend(providers=providers, threads=threads, max_batch=max_batch,
                             spinning=kwargs.get("spinning"))
        if fallback:
            backend.notes.append(fallback)
    _open_all(backend, files)
    return backend


def _tensorrt(bundle: Any, max_batch: int, kwargs: Mapping[str, Any]) -> Backend:
    if "trt_module" not in kwargs and not tensorrt_available():
        raise BackendError(TENSORRT_MISSING)
    from .tensorrt_backend import TensorRTBackend  # noqa: PLC0415 (imports tensorrt lazily)

    return TensorRTBackend(bundle, max_batch=max_batch, **{k: v for k, v in kwargs.items() if k != "spinning"})


def _open_all(backend: Backend, files: Sequence[Any]) -> None:
    try:
        for f in files:
            backend.engine(f)
    except BaseException:
        backend.close()
        raise

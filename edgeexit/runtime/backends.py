"""Inference backends behind one small interface (torch-free).

An :class:`Engine` runs one ONNX graph of a bundle (a segment or a head)::

    engine.input_names, engine.output_names, engine.input_shapes
    engine.run(feeds: dict[str, array | device value], outputs=None, keep=()) -> dict[str, array | device value]

``keep`` names outputs that should stay on the device (GPU providers): they come back as backend-specific device
values (an ``onnxruntime.OrtValue`` or a TensorRT :class:`~edgeexit.runtime.tensorrt_backend.DeviceArray`) that the
next engine takes as a feed without a host round trip. Every other output comes back as a numpy array. On the CPU
``keep`` changes nothing (everything is a numpy array already).

A :class:`Backend` holds the engines of one bundle: ``segments[i]``, ``heads[i]``, plus the two device-value
helpers the chain needs: ``take(value, rows)`` (the rows of a batch that go on, kept on the device) and
``to_host(value)``. :func:`open_backend` picks and opens one:

- ``"onnxruntime"``: :class:`OrtBackend`, any execution-provider list (``tensorrt,cuda,cpu`` ...), low-latency
  session options, IO binding on GPU providers so segment features stay on the device between segments.
- ``"tensorrt"``: :class:`~edgeexit.runtime.tensorrt_backend.TensorRTBackend` (tensorrt + pycuda, imported lazily).
- ``"auto"``: TensorRT when ``tensorrt`` and ``pycuda`` import, else ONNX Runtime with its best provider.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "BackendError",
    "Engine",
    "Backend",
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
    "bundle_root",
    "bundle_manifest",
    "bundle_graph_paths",
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


class BackendError(RuntimeError):
    """A backend that cannot be opened or used; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------------------
# bundle access (duck-typed: a Bundle from edgeexit.runtime.bundle, or anything with a root and a manifest dict)


def bundle_root(bundle: Any) -> Path:
    """The bundle directory."""
    for attr in ("root", "path", "directory", "dir"):
        value = getattr(bundle, attr, None)
        if value is not None:
            return Path(value)
    raise TypeError(f"cannot find the directory of bundle {bundle!r}")


def bundle_manifest(bundle: Any) -> Mapping[str, Any]:
    """The manifest dict of a bundle."""
    manifest = getattr(bundle, "manifest", None)
    if isinstance(manifest, Mapping):
        return manifest
    if manifest is not None and hasattr(manifest, "to_dict"):
        return manifest.to_dict()
    if isinstance(bundle, Mapping):
        return bundle
    raise TypeError(f"cannot find the manifest of bundle {bundle!r}")


def bundle_graph_paths(bundle: Any) -> Tuple[List[Path], List[Path]]:
    """(segment ONNX paths, head ONNX paths) in exit order."""
    segs, heads = getattr(bundle, "segments", None), getattr(bundle, "heads", None)
    if segs is not None and heads is not None and all(hasattr(f, "path") for f in (*segs, *heads)):
        return [Path(f.path) for f in segs], [Path(f.path) for f in heads]
    root, manifest = bundle_root(bundle), bundle_manifest(bundle)
    segments = sorted(manifest["segments"], key=lambda s: int(s["index"]))
    heads = sorted(manifest["heads"], key=lambda h: int(h["index"]))
    return [root / s["file"] for s in segments], [root / h["file"] for h in heads]


# --------------------------------------------------------------------------------------------------------------
# the interface


class Engine:
    """One compiled graph. Subclasses set ``name``, ``input_names``, ``output_names``, ``input_shapes``
    (name -> shape with None for dynamic axes) and implement :meth:`run`."""

    name: str = "engine"
    input_names: List[str]
    output_names: List[str]
    input_shapes: Dict[str, Tuple[Optional[int], ...]]

    def run(
        self,
        feeds: Mapping[str, Any],
        outputs: Optional[Sequence[str]] = None,
        keep: Collection[str] = (),
    ) -> Dict[str, Any]:
        """Run on ``feeds`` (numpy arrays or device values of this backend). Returns the requested ``outputs``
        (all by default): those named in ``keep`` may stay device values, the others are numpy arrays."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.input_names} -> {self.output_names}>"


class Backend:
    """The engines of one bundle, in exit order, and the device-value helpers the chain uses."""

    kind: str = "backend"
    device: str = "cpu"  # where kept outputs live: "cpu" or "cuda"
    max_batch: Optional[int] = None  # the largest batch the engines take (None: any)

    def __init__(self, segments: Sequence[Engine], heads: Sequence[Engine]):
        self.notes: List[str] = []  # e.g. why "auto" did not pick TensorRT
        if len(segments) != len(heads) or not segments:
            raise BackendError(f"a backend needs one head per segment, got {len(segments)} segments and {len(heads)} heads")
        self.segments: List[Engine] = list(segments)
        self.heads: List[Engine] = list(heads)

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    def to_host(self, value: Any) -> np.ndarray:
        """A numpy array of a value returned by an engine (a copy for device values)."""
        return np.asarray(value)

    def take(self, value: Any, rows: np.ndarray) -> Any:
        """The given batch rows of a value (in that order), staying where the value is."""
        return np.asarray(value)[rows]

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:
        for engine in (*self.segments, *self.heads):
            try:
                engine.close()
            except Exception:  # noqa: BLE001 (closing is best effort)
                pass

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}, {self.num_exits} exits>"


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
    thread, ``threads`` intra-op threads (None: ORT's default). ``spinning=False`` stops idle worker threads from
    busy-waiting after a run (the default unless ``threads == 1``): a chain runs many sessions one after another,
    and the spinning workers of the previous session compete with the next one for the cores (measured on 2 cores:
    0.52 ms per frame without spinning, 2.6 ms with it, for the 4-exit test bundle)."""
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
        spinning = threads == 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: no provider-fallback chatter on stderr
    return so


def _shape_of(shape: Sequence[Any]) -> Tuple[Optional[int], ...]:
    return tuple(int(d) if isinstance(d, (int, np.integer)) and int(d) >= 0 else None for d in shape)


def _graph_input_shapes(bundle: Any) -> Dict[str, Dict[str, Tuple[int, ...]]]:
    """file name -> {input name: shape without the batch axis}, from the manifest (empty where unknown)."""
    out: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    try:
        manifest = bundle_manifest(bundle)
        for entry in (*manifest["segments"], *manifest["heads"]):
            out[str(entry["file"])] = {
                str(t["name"]): tuple(int(d) for d in t["shape"][1:]) for t in entry.get("inputs", ())
            }
    except (TypeError, KeyError, ValueError):
        return {}
    return out


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


class OrtEngine(Engine):
    """One ONNX Runtime session.

    With ``io_binding`` (the default on GPU providers) feeds may be ``OrtValue``s on the device, kept outputs are
    bound to device memory and come back as ``OrtValue``s, the other outputs are bound to host memory.
    Without it, ``session.run`` is used (OrtValue feeds are converted with ``.numpy()``).
    """

    def __init__(
        self,
        path: Union[str, Path],
        providers: Sequence[Any],
        options: Any = None,
        io_binding: Optional[bool] = None,
        device: Optional[str] = None,
        device_id: int = 0,
    ):
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
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        if device is None:
            device = GPU_PROVIDERS.get(self.providers[0], "cpu") if self.providers else "cpu"
        self.device = device
        self.device_id = int(device_id)
        self.io_binding = (device != "cpu") if io_binding is None else bool(io_binding)

    def _host(self, value: Any) -> np.ndarray:
        if isinstance(value, self._ort.OrtValue):
            return value.numpy()
        return value

    def run(
        self,
        feeds: Mapping[str, Any],
        outputs: Optional[Sequence[str]] = None,
        keep: Collection[str] = (),
    ) -> Dict[str, Any]:
        names = list(outputs) if outputs is not None else self.output_names
        if not self.io_binding:
            values = self.session.run(names, {k: self._host(v) for k, v in feeds.items()})
            return dict(zip(names, values))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            if name in keep:
                binding.bind_output(name, self.device, self.device_id)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: (value if name in keep else value.numpy()) for name, value in zip(names, values)}

    def close(self) -> None:
        self.session = None


class OrtBackend(Backend):
    """A bundle's segments and heads as ONNX Runtime sessions (one per graph), sharing providers and options."""

    kind = "onnxruntime"

    def __init__(
        self,
        bundle: Any,
        providers: Union[None, str, Sequence[Any]] = None,
        threads: Optional[int] = None,
        io_binding: Optional[bool] = None,
        spinning: Optional[bool] = None,
        max_batch: int = 32,
    ):
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
        self.requested_providers = [_provider_name(p) for p in resolved]
        first = entries[0]
        first_options = first[1] if isinstance(first, tuple) else {}
        self.device_id = int(first_options.get("device_id", 0))
        if threads is None:
            threads = available_cpus()
        self.threads = threads
        options = session_options(threads, spinning)
        seg_paths, head_paths = bundle_graph_paths(bundle)
        kwargs = dict(options=options, io_binding=io_binding, device_id=self.device_id)
        shapes = _graph_input_shapes(bundle)
        segments = [OrtEngine(p, _with_trt_profile(entries, shapes.get(p.name), max_batch), **kwargs) for p in seg_paths]
        heads = [OrtEngine(p, _with_trt_profile(entries, shapes.get(p.name), max_batch), **kwargs) for p in head_paths]
        super().__init__(segments, heads)
        self.providers = segments[0].providers
        self.device = segments[0].device
        self.io_binding = segments[0].io_binding
        if "TensorrtExecutionProvider" in self.providers:
            self.max_batch = max(1, int(max_batch))  # the fixed TensorRT profile: larger batches are split

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, self._ort.OrtValue):
            return value.numpy()
        return np.asarray(value)

    def take(self, value: Any, rows: np.ndarray) -> Any:
        """Rows of a batch. An OrtValue on the device goes through the host once (ONNX Runtime has no device
        gather from Python), and goes back to the device; numpy arrays are indexed."""
        if isinstance(value, self._ort.OrtValue):
            host = np.ascontiguousarray(value.numpy()[rows])
            device = value.device_name().lower()
            if device == "cpu":
                return host
            return self._ort.OrtValue.ortvalue_from_numpy(host, device, self.device_id)
        return np.asarray(value)[rows]

    def describe(self) -> str:
        used = ", ".join(p.replace("ExecutionProvider", "") for p in self.providers)
        extra = []
        if self.threads:
            extra.append(f"{self.threads} threads")
        if self.io_binding:
            extra.append("IO binding")
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
    threads: Optional[int] = None,
    max_batch: int = 32,
    **kwargs: Any,
) -> Backend:
    """Open the engines of ``bundle``.

    ``kind``: ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (TensorRT when tensorrt and pycuda are installed and
    no ``providers`` were given, else ONNX Runtime). ``providers``: ONNX Runtime providers (``"tensorrt,cuda,cpu"``
    or a list; default: the best available). ``threads``: intra-op threads of each ONNX Runtime session.
    ``max_batch``: the batch the TensorRT backend allocates its buffers for.
    """
    kind = (kind or "auto").lower()
    if kind not in BACKEND_KINDS:
        raise BackendError(f"unknown backend {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")
    fallback = None
    if kind == "auto":
        if providers is None and tensorrt_available():
            from .tensorrt_backend import TensorRTBackend  # noqa: PLC0415

            try:
                return TensorRTBackend(bundle, max_batch=max_batch, **kwargs)
            except BackendError as exc:  # e.g. no GPU, or an engine that cannot be built: ONNX Runtime still works
                fallback = f"tensorrt unavailable ({exc})"
        kind = "onnxruntime"
    if kind == "tensorrt":
        if providers is not None:
            raise BackendError("--providers applies to the onnxruntime backend only")
        from .tensorrt_backend import TensorRTBackend  # noqa: PLC0415 (imports tensorrt lazily)

        return TensorRTBackend(bundle, max_batch=max_batch, **kwargs)
    ort_kwargs = {k: v for k, v in kwargs.items() if k in ("io_binding", "spinning")}
    backend = OrtBackend(bundle, providers=providers, threads=threads, max_batch=max_batch, **ort_kwargs)
    if fallback:
        backend.notes.append(fallback)
    return backend

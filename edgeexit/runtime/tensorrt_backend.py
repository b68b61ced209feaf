"""TensorRT backend: a bundle's per-segment engines chained on one CUDA stream (tensorrt + pycuda, imported lazily).

Written against the TensorRT name-based tensor API (8.5 - 10.x; the binding-index API is gone in 10):
``Runtime.deserialize_cuda_engine``, ``engine.num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
``get_tensor_dtype``, ``get_tensor_shape``, ``get_tensor_profile_shape``, ``context.set_input_shape``,
``set_tensor_address``, ``execute_async_v3(stream)``.

- Engines: the bundle's ``*.engine`` files when the manifest says they were built by this TensorRT version for this
  GPU; otherwise rebuilt from the ONNX graphs with ``edgeexit.export.tensorrt.build_engine`` and cached
  (``$EDGEEXIT_CACHE`` or ``~/.cache/edgeexit/tensorrt``).
- Memory: every engine allocates its device buffers once, for the largest batch (``max_batch``, clipped to the
  engine's optimisation profile), plus page-locked host buffers (``pycuda.driver.pagelocked_empty``) for the
  tensors that cross the bus. Nothing is allocated per frame.
- Data flow: one CUDA stream. A segment's output buffer is the next segment's and its head's input address (no
  copy); a head's ``cam`` stays on the device as the next head's ``prev_cam``; only the head outputs the chain asks
  for (``class``, ``signals``, and ``cam`` when it is drawn) are copied to the host. Samples that leave are
  compacted out of the device buffers in place (device-to-device row copies), so later segments run on fewer rows.

Not verified on real hardware in development (no GPU, TensorRT or pycuda there): the pure-Python parts (shape
bookkeeping, buffer sizing, compaction copies, engine compatibility) are unit-tested, and the whole backend is
tested with fake ``tensorrt`` / ``pycuda`` modules that execute the ONNX graphs.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .backends import Backend, BackendError, Engine, bundle_manifest, bundle_root

__all__ = [
    "TensorSpec",
    "DeviceArray",
    "TRTEngine",
    "TensorRTBackend",
    "resolve_shape",
    "volume",
    "plan_buffers",
    "compaction_copies",
    "engine_compatible",
    "import_tensorrt",
]

TENSORRT_MISSING = (
    "the tensorrt backend needs TensorRT and pycuda (JetPack ships python3-libnvinfer; pip install pycuda); "
    "use --backend onnxruntime"
)


def import_tensorrt() -> Tuple[Any, Any]:
    """``(tensorrt, pycuda.driver)``, or a one-line BackendError when either is missing."""
    try:
        import tensorrt as trt  # noqa: PLC0415
        import pycuda.driver as cuda  # noqa: PLC0415
    except ImportError as exc:
        raise BackendError(f"{TENSORRT_MISSING} ({exc})") from None
    return trt, cuda


# --------------------------------------------------------------------------------------------------------------
# pure bookkeeping


@dataclass(frozen=True)
class TensorSpec:
    """One IO tensor of an engine: ``shape`` as the engine reports it (-1 = dynamic) and ``max_shape``, the shape
    its buffer is allocated for."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: Tuple[int, ...]
    max_shape: Tuple[int, ...]

    @property
    def max_bytes(self) -> int:
        return volume(self.max_shape) * np.dtype(self.dtype).itemsize


def volume(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        if int(d) < 0:
            raise ValueError(f"shape {tuple(shape)} is not concrete")
        n *= int(d)
    return n


def resolve_shape(shape: Sequence[int], batch: int, profile_max: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """A concrete shape: a dynamic batch axis (axis 0) becomes ``batch``; any other dynamic axis takes the
    optimisation profile's maximum (``profile_max``), else it is an error."""
    out = []
    for axis, d in enumerate(shape):
        d = int(d)
        if d >= 0:
            out.append(d)
        elif axis == 0:
            out.append(int(batch))
        elif profile_max is not None and int(profile_max[axis]) >= 0:
            out.append(int(profile_max[axis]))
        else:
            raise ValueError(f"dynamic axis {axis} in shape {tuple(shape)} has no profile maximum")
    return tuple(out)


def plan_buffers(
    inputs: Mapping[str, Tuple[Sequence[int], Any, Optional[Sequence[int]]]],
    max_batch: int,
) -> Tuple[int, Dict[str, Tuple[int, ...]]]:
    """The batch to allocate for and the max shape of every input.

    ``inputs``: name -> (engine shape, dtype, profile max shape or None). The batch is ``max_batch`` clipped to the
    smallest profile maximum of a dynamic batch axis; a static batch axis fixes it."""
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    batch = int(max_batch)
    for name, (shape, _dtype, pmax) in inputs.items():
        if not shape:
            continue
        if int(shape[0]) >= 0:
            batch = min(batch, int(shape[0]))
        elif pmax is not None and int(pmax[0]) > 0:
            batch = min(batch, int(pmax[0]))
    return batch, {name: resolve_shape(shape, batch, pmax) for name, (shape, _dtype, pmax) in inputs.items()}


def compaction_copies(rows: Sequence[int], row_bytes: int) -> List[Tuple[int, int, int]]:
    """Device-to-device copies ``(dst_offset, src_offset, nbytes)`` that move batch rows ``rows`` (strictly
    increasing) to the front of the same buffer, in order, without overlapping source and destination of one copy
    (cudaMemcpy on overlapping ranges is undefined). Rows already in place cost nothing; consecutive rows are merged.
    """
    rows = [int(r) for r in rows]
    if any(b <= a for a, b in zip(rows, rows[1:])) or (rows and rows[0] < 0):
        raise ValueError(f"rows must be strictly increasing and >= 0, got {rows}")
    copies: List[Tuple[int, int, int]] = []
    j = 0
    n = len(rows)
    while j < n:
        src = rows[j]
        run = 1
        while j + run < n and rows[j + run] == src + run:
            run += 1
        gap = src - j  # source row - destination row (>= 0, constant within the run)
        if gap > 0:
            done = 0
            while done < run:
                chunk = min(run - done, gap)  # chunks of at most `gap` rows never overlap their destination
                copies.append(((j + done) * row_bytes, (src + done) * row_bytes, chunk * row_bytes))
                done += chunk
        j += run
    return copies


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "unknown"


def engine_compatible(
    entry: Optional[Mapping[str, Any]], root: Path, trt_version: str, gpu_name: str
) -> Tuple[bool, str]:
    """Whether a manifest ``engine`` entry can be deserialized here: the file exists and was built by this
    TensorRT version for this GPU. Returns (ok, reason when not)."""
    if not entry:
        return False, "no engine in the bundle"
    path = root / str(entry.get("file", ""))
    if not entry.get("file") or not path.is_file():
        return False, f"engine file {entry.get('file')!r} missing"
    built_trt = str(entry.get("tensorrt_version", ""))
    if built_trt != str(trt_version):
        return False, f"built with TensorRT {built_trt or '?'}, this is {trt_version}"
    built_gpu = str(entry.get("gpu", ""))
    if built_gpu.strip().lower() != str(gpu_name).strip().lower():
        return False, f"built for GPU {built_gpu or '?'}, this is {gpu_name}"
    return True, ""


# --------------------------------------------------------------------------------------------------------------
# device values


class DeviceArray:
    """A batch living in an engine's device buffer: a pointer, a shape and a dtype (valid until that engine runs
    again or the rows are compacted)."""

    __slots__ = ("ptr", "shape", "dtype", "capacity", "owner")

    def __init__(self, ptr: int, shape: Sequence[int], dtype: Any, capacity: int, owner: str = ""):
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.capacity = int(capacity)  # bytes available at ptr
        self.owner = owner

    @property
    def nbytes(self) -> int:
        return volume(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return volume(self.shape[1:]) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"DeviceArray({self.owner}, shape={self.shape}, dtype={self.dtype})"


# --------------------------------------------------------------------------------------------------------------
# one engine


class TRTEngine(Engine):
    """One deserialized engine with its execution context and buffers (allocated once, for ``max_batch``)."""

    def __init__(self, engine: Any, name: str, trt: Any, cuda: Any, stream: Any, max_batch: int = 32):
        self.name = name
        self._trt, self._cuda, self._stream = trt, cuda, stream
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        shapes = {n: tuple(int(d) for d in engine.get_tensor_shape(n)) for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        profile = {}
        for n in self.input_names:
            if any(d < 0 for d in shapes[n]):
                profile[n] = tuple(int(d) for d in engine.get_tensor_profile_shape(n, 0)[2])
        self.max_batch, in_shapes = plan_buffers(
            {n: (shapes[n], dtypes[n], profile.get(n)) for n in self.input_names}, max_batch
        )
        for n in self.input_names:
            self.context.set_input_shape(n, in_shapes[n])
        out_shapes = {n: tuple(int(d) for d in self.context.get_tensor_shape(n)) for n in self.output_names}
        for n, s in out_shapes.items():
            if any(d < 0 for d in s):
                raise BackendError(f"{name}: output {n} has no concrete shape {s} at the maximum input shapes")
        self.specs: Dict[str, TensorSpec] = {}
        for n in names:
            max_shape = in_shapes[n] if is_input[n] else out_shapes[n]
            self.specs[n] = TensorSpec(n, is_input[n], dtypes[n], shapes[n], max_shape)
        self.input_shapes = {
            n: tuple(None if d < 0 else d for d in shapes[n]) for n in self.input_names
        }
        # buffers: one device allocation per IO tensor; page-locked host staging for every tensor
        self._device: Dict[str, Any] = {}
        self._host: Dict[str, np.ndarray] = {}
        for n, spec in self.specs.items():
            self._device[n] = cuda.mem_alloc(max(1, spec.max_bytes))
            self._host[n] = cuda.pagelocked_empty(volume(spec.max_shape), spec.dtype)
        for n in self.output_names:
            self.context.set_tensor_address(n, int(self._device[n]))

    @property
    def allocated_bytes(self) -> int:
        return sum(max(1, s.max_bytes) for s in self.specs.values())

    def run(
        self,
        feeds: Mapping[str, Any],
        outputs: Optional[Sequence[str]] = None,
        keep: Collection[str] = (),
    ) -> Dict[str, Any]:
        cuda, stream = self._cuda, self._stream
        for n in self.input_names:
            if n not in feeds:
                raise BackendError(f"{self.name}: missing input {n}")
            value, spec = feeds[n], self.specs[n]
            if isinstance(value, DeviceArray):
                if value.dtype != spec.dtype:
                    raise BackendError(f"{self.name}: input {n} is {value.dtype}, the engine takes {spec.dtype}")
                shape, ptr = value.shape, value.ptr
            else:
                array = np.ascontiguousarray(value, dtype=spec.dtype)
                shape = array.shape
                if array.size * spec.dtype.itemsize > spec.max_bytes:
                    raise BackendError(
                        f"{self.name}: input {n} of shape {shape} exceeds the buffer for {spec.max_shape} "
                        f"(max batch {self.max_batch})"
                    )
                staging = self._host[n][: array.size]
                staging[...] = array.reshape(-1)
                cuda.memcpy_htod_async(self._device[n], staging, stream)
                ptr = int(self._device[n])
            if shape and shape[0] > self.max_batch:
                raise BackendError(f"{self.name}: batch {shape[0]} exceeds the engine's max batch {self.max_batch}")
            self.context.set_input_shape(n, shape)
            self.context.set_tensor_address(n, ptr)
        for n in self.output_names:
            self.context.set_tensor_address(n, int(self._device[n]))
        if not self.context.execute_async_v3(stream.handle):
            raise BackendError(f"{self.name}: TensorRT execution failed")
        names = list(outputs) if outputs is not None else self.output_names
        results: Dict[str, Any] = {}
        pending: List[Tuple[str, np.ndarray, Tuple[int, ...]]] = []
        for n in names:
            spec = self.specs[n]
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            if n in keep:
                results[n] = DeviceArray(int(self._device[n]), shape, spec.dtype, spec.max_bytes, f"{self.name}:{n}")
            else:
                host = self._host[n][: volume(shape)]
                cuda.memcpy_dtoh_async(host, self._device[n], stream)
                pending.append((n, host, shape))
        stream.synchronize()
        for n, host, shape in pending:
            results[n] = host.reshape(shape).copy()  # the staging buffer is reused by the next run
        return results

    def close(self) -> None:
        for buf in self._device.values():
            free = getattr(buf, "free", None)
            if free is not None:
                try:
                    free()
                except Exception:  # noqa: BLE001
                    pass
        self._device.clear()
        self._host.clear()
        self.context = None
        self.engine = None


# --------------------------------------------------------------------------------------------------------------
# the backend


def _cache_dir() -> Path:
    base = os.environ.get("EDGEEXIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgeexit"
    )
    return Path(base) / "tensorrt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _default_builder(onnx_path: Path, engine_path: Path, precision: str, max_batch: int,
                     trt_module: Any = None, cuda_module: Any = None) -> bytes:
    """Build an engine with ``edgeexit.export.tensorrt.build_engine`` (batch profile 1..max_batch) and return it.
    INT8 needs calibration images the runtime does not have: an INT8 bundle is rebuilt in FP16."""
    try:
        from ..export.tensorrt import build_engine  # noqa: PLC0415 (torch-free)
    except ImportError as exc:
        raise BackendError(f"cannot rebuild TensorRT engines: edgeexit.export.tensorrt is unavailable ({exc})") from None
    prec = "fp16" if "int8" in str(precision).lower() else str(precision)
    try:
        built = build_engine(onnx_path, engine_path, precision=prec, min_batch=1, opt_batch=int(max_batch),
                             max_batch=int(max_batch), trt_module=trt_module, cuda_module=cuda_module)
    except Exception as exc:  # noqa: BLE001 (TensorRTError and the builder's own errors)
        raise BackendError(f"cannot build a TensorRT engine for {onnx_path.name}: {exc}") from None
    return Path(getattr(built, "path", engine_path)).read_bytes()


class TensorRTBackend(Backend):
    """The bundle's engines, chained on one CUDA stream (see the module docstring).

    ``trt_module`` / ``cuda_module`` / ``builder(onnx_path, engine_path, precision, max_batch) -> bytes`` replace
    ``tensorrt``, ``pycuda.driver`` and the engine builder (tests use fakes; nothing else needs them).
    """

    kind = "tensorrt"
    device = "cuda"

    def __init__(
        self,
        bundle: Any,
        max_batch: int = 32,
        device_id: int = 0,
        precision: Optional[str] = None,
        rebuild: bool = True,
        cache_dir: Optional[Path] = None,
        log: Optional[Callable[[str], None]] = None,
        trt_module: Any = None,
        cuda_module: Any = None,
        builder: Optional[Callable[[Path, Path, str, int], bytes]] = None,
    ):
        if trt_module is None or cuda_module is None:
            trt, cuda = import_tensorrt()
            trt, cuda = trt_module or trt, cuda_module or cuda
        else:
            trt, cuda = trt_module, cuda_module
        self._trt, self._cuda = trt, cuda
        self._log = log or (lambda _m: None)
        self._context = None
        try:
            cuda.init()
            device = cuda.Device(int(device_id))
            self.gpu_name = str(device.name())
            # TensorRT uses the CUDA runtime, i.e. the device's primary context: make it current for pycuda too
            self._context = device.retain_primary_context()
            self._context.push()
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 (pycuda raises its own error types)
            raise BackendError(f"cannot open CUDA device {device_id}: {exc}") from None
        self.trt_version = str(getattr(trt, "__version__", "?"))
        self.rebuilt: List[str] = []
        self._stream = cuda.Stream()
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        root, manifest = bundle_root(bundle), bundle_manifest(bundle)
        cache = Path(cache_dir) if cache_dir is not None else _cache_dir()
        engines: Dict[str, List[TRTEngine]] = {"segments": [], "heads": []}
        try:
            for group in ("segments", "heads"):
                for entry in sorted(manifest[group], key=lambda e: int(e["index"])):
                    data = self._engine_bytes(entry, root, cache, precision, max_batch, rebuild, builder)
                    engine = self._runtime.deserialize_cuda_engine(data)
                    if engine is None:
                        raise BackendError(f"TensorRT cannot deserialize the engine of {entry['file']}")
                    name = Path(str(entry["file"])).stem
                    engines[group].append(TRTEngine(engine, name, trt, cuda, self._stream, max_batch))
        except BaseException:
            for e in (*engines["segments"], *engines["heads"]):
                e.close()
            self._pop()
            raise
        super().__init__(engines["segments"], engines["heads"])
        self.max_batch = min(e.max_batch for e in (*self.segments, *self.heads))

    # -- engines -----------------------------------------------------------------------------------------------

    def _engine_bytes(
        self,
        entry: Mapping[str, Any],
        root: Path,
        cache: Path,
        precision: Optional[str],
        max_batch: int,
        rebuild: bool,
        builder: Optional[Callable[[Path, Path, str, int], bytes]],
    ) -> bytes:
        engine_entry = entry.get("engine")
        ok, reason = engine_compatible(engine_entry, root, self.trt_version, self.gpu_name)
        if ok and (precision is None or str(engine_entry.get("precision")) == precision):
            return (root / engine_entry["file"]).read_bytes()
        if not ok and not rebuild:
            raise BackendError(f"{entry['file']}: {reason}, and rebuilding is off")
        onnx_path = root / str(entry["file"])
        prec = precision or str((engine_entry or {}).get("precision") or "fp16")
        key = f"{_sha256(onnx_path)[:16]}-trt{_slug(self.trt_version)}-{_slug(self.gpu_name)}-{prec}-b{max_batch}"
        cached = cache / f"{onnx_path.stem}-{key}.engine"
        if cached.is_file():
            return cached.read_bytes()
        self._log(f"building TensorRT engine for {onnx_path.name} ({reason or 'precision ' + prec}); cached in {cache}")
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the engine cache {cache}: {exc}") from None
        if builder is not None:
            data = builder(onnx_path, cached, prec, int(max_batch))
        else:
            data = _default_builder(onnx_path, cached, prec, int(max_batch), self._trt, self._cuda)
        if not cached.is_file():
            tmp = cached.with_suffix(".engine.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, cached)
        self.rebuilt.append(onnx_path.name)
        return data

    # -- device values -----------------------------------------------------------------------------------------

    def _pinned(self, size: int, dtype: Any) -> np.ndarray:
        """A reused page-locked staging buffer of at least ``size`` elements (cudaHostAlloc is slow: never per frame)."""
        cache = self.__dict__.setdefault("_pinned_cache", {})
        key = np.dtype(dtype).str
        buf = cache.get(key)
        if buf is None or buf.size < size:
            buf = cache[key] = self._cuda.pagelocked_empty(max(int(size), 1), dtype)
        return buf[:size]

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, DeviceArray):
            out = self._pinned(volume(value.shape), value.dtype)
            self._cuda.memcpy_dtoh_async(out, value.ptr, self._stream)
            self._stream.synchronize()
            return np.array(out.reshape(value.shape))
        return np.asarray(value)

    def take(self, value: Any, rows: np.ndarray) -> Any:
        """Rows of a batch. A DeviceArray is compacted in place in its buffer (the rows move to the front by
        device-to-device copies on the stream); numpy arrays are indexed."""
        if not isinstance(value, DeviceArray):
            return np.asarray(value)[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= value.shape[0]):
            # not an in-place compaction: go through the host
            host = self.to_host(value)[rows]
            staging = self._pinned(host.size, value.dtype)
            staging[...] = host.reshape(-1)
            self._cuda.memcpy_htod_async(value.ptr, staging, self._stream)
            self._stream.synchronize()
            return DeviceArray(value.ptr, host.shape, value.dtype, value.capacity, value.owner)
        for dst, src, nbytes in compaction_copies(rows.tolist(), value.row_bytes):
            self._cuda.memcpy_dtod_async(value.ptr + dst, value.ptr + src, nbytes, self._stream)
        return DeviceArray(value.ptr, (int(rows.size), *value.shape[1:]), value.dtype, value.capacity, value.owner)

    def describe(self) -> str:
        extra = f", rebuilt {len(self.rebuilt)} engines" if self.rebuilt else ""
        return f"tensorrt {self.trt_version} on {self.gpu_name} (max batch {self.max_batch}{extra})"

    def _pop(self) -> None:
        ctx, self._context = self._context, None
        if ctx is not None:
            try:
                ctx.pop()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        try:
            if getattr(self, "_stream", None) is not None:
                self._stream.synchronize()
        except Exception:  # noqa: BLE001
            pass
        super().close()
        self._pop()

"""TensorRT backend: one engine per bundle graph (a stage, a CAM graph, ``full.onnx``), all on one CUDA stream
(tensorrt + pycuda, imported lazily). Implements the interface of :mod:`edgeexit.runtime.engine`.

Written against the TensorRT name-based tensor API (8.5 - 10.x; the binding-index API is gone in 10):
``Runtime.deserialize_cuda_engine``, ``engine.num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
``get_tensor_dtype``, ``get_tensor_shape``, ``get_tensor_profile_shape``, ``context.set_input_shape``,
``set_tensor_address``, ``execute_async_v3(stream)``.

- Engines: the file's ``*.engine`` when its manifest entry says it was built by this TensorRT version for this
  GPU; otherwise rebuilt from the ONNX graph with :func:`edgeexit.runtime.tensorrt_build.build_engine` and cached
  (``$EDGEEXIT_CACHE`` or ``~/.cache/edgeexit/tensorrt``).
- Buffers (``backend.buffer``): device memory allocated once; ``host=True`` adds a page-locked host mirror
  (``pycuda.driver.pagelocked_empty``). The chain asks for mirrors only for the frame and the few scalars it reads
  (class, confidence, signals); features and CAMs stay on the device, stage k's ``features`` buffer being stage
  k+1's input.
- ``engine.bind(inputs, outputs)``: shapes and tensor addresses are set once; the call copies the mirrored inputs
  in, enqueues (``execute_async_v3``, or the stage's CUDA graph), copies the mirrored outputs back and synchronizes.
- ``engine.run(feeds)``: batches from host arrays through the engine's own buffers (allocated once, for its
  profile's max batch), copied in and out per call.
- CUDA graphs (``cuda_graphs=True``): each bound call's enqueue is captured once, at the bound batch size, and
  replayed with one ``cuGraphLaunch`` (the CUDA driver API through ctypes, on the stream's handle). TensorRT needs one plain enqueue after the shapes are set
  before capturing (it flushes deferred shape work), which the bound call does.

Not verified on real hardware in development (no GPU, TensorRT or pycuda there): the backend is tested with fake
``tensorrt`` / ``pycuda`` modules that execute the ONNX graphs with ONNX Runtime and record the API calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .engine import TENSORRT_MISSING, Backend, BackendError, Buffer, Engine

__all__ = [
    "TRTEngine",
    "TensorRTBackend",
    "DeviceMemory",
    "CudaGraphs",
    "resolve_shape",
    "volume",
    "plan_batch",
    "engine_compatible",
    "import_tensorrt",
]



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


def plan_batch(inputs: Mapping[str, Tuple[Sequence[int], Optional[Sequence[int]]]], max_batch: int) -> int:
    """The largest batch an engine takes: ``max_batch`` clipped to the smallest profile maximum of a dynamic batch
    axis; a static batch axis fixes it. ``inputs``: name -> (engine shape, profile max shape or None)."""
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    batch = int(max_batch)
    for shape, pmax in inputs.values():
        if not shape:
            continue
        if int(shape[0]) >= 0:
            batch = min(batch, int(shape[0]))
        elif pmax is not None and int(pmax[0]) > 0:
            batch = min(batch, int(pmax[0]))
    return batch


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "unknown"


def engine_compatible(info: Any, trt_version: str, gpu_name: str) -> Tuple[bool, str]:
    """Whether a bundle file's engine (an ``EngineInfo``, or None) can be deserialized here: the file exists and
    was built by this TensorRT version for this GPU. Returns (ok, reason when not)."""
    if info is None:
        return False, "no engine in the bundle"
    if not Path(info.path).is_file():
        return False, f"engine file {info.file!r} missing"
    if str(info.tensorrt_version) != str(trt_version):
        return False, f"built with TensorRT {info.tensorrt_version or '?'}, this is {trt_version}"
    if str(info.gpu).strip().lower() != str(gpu_name).strip().lower():
        return False, f"built for GPU {info.gpu or '?'}, this is {gpu_name}"
    return True, ""


# --------------------------------------------------------------------------------------------------------------
# device memory and CUDA graphs


class DeviceMemory:
    """One device allocation (``Buffer.value`` of this backend): ``ptr`` is what TensorRT binds."""

    __slots__ = ("allocation", "ptr", "nbytes")

    def __init__(self, allocation: Any, nbytes: int) -> None:
        self.allocation = allocation
        self.ptr = int(allocation)
        self.nbytes = int(nbytes)

    def free(self) -> None:
        free = getattr(self.allocation, "free", None)
        if free is not None:
            try:
                free()
            except Exception:  # noqa: BLE001 (freeing is best effort at close)
                pass


class CudaGraphs:
    """Stream capture -> executable graph -> launch, through the CUDA driver API (ctypes on ``libcuda``:
    ``cuStreamBeginCapture_v2``, ``cuStreamEndCapture``, ``cuGraphInstantiateWithFlags`` (CUDA 11.4+),
    ``cuGraphLaunch``) on pycuda's ``stream.handle`` (a ``CUstream`` in the primary context TensorRT uses too).
    The driver API is used rather than pycuda's own graph wrappers, whose names changed between pycuda releases."""

    THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: other threads' CUDA calls do not break the capture

    def __init__(self, stream: Any, lib: Any = None) -> None:
        self._stream = stream
        self._lib = lib if lib is not None else self._load_libcuda()
        self._owned: List[Tuple[Any, Any]] = []

    @staticmethod
    def _load_libcuda() -> Any:
        name = ctypes.util.find_library("cuda") or "libcuda.so.1"
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            raise BackendError(f"CUDA graphs need the CUDA driver library ({name}): {exc}") from None

    @staticmethod
    def _check(what: str, status: int) -> None:
        if int(status) != 0:
            raise BackendError(f"CUDA graph capture failed: {what} returned CUDA error {int(status)}")

    def capture(self, enqueue: Callable[[], None]) -> Callable[[], None]:
        """Capture what ``enqueue`` puts on the stream; returns a call that launches the graph on the stream."""
        lib, handle = self._lib, ctypes.c_void_p(int(self._stream.handle))
        self._check("cuStreamBeginCapture_v2", lib.cuStreamBeginCapture_v2(handle, ctypes.c_int(self.THREAD_LOCAL)))
        graph = ctypes.c_void_p()
        try:
            enqueue()
        finally:
            status = lib.cuStreamEndCapture(handle, ctypes.byref(graph))  # always: a stream left capturing is dead
        self._check("cuStreamEndCapture", status)
        graph_exec = ctypes.c_void_p()
        status = lib.cuGraphInstantiateWithFlags(ctypes.byref(graph_exec), graph, ctypes.c_ulonglong(0))
        if status != 0:
            lib.cuGraphDestroy(graph)
        self._check("cuGraphInstantiateWithFlags", status)
        self._owned.append((graph_exec, graph))
        launch = lib.cuGraphLaunch

        def call() -> None:
            status = launch(graph_exec, handle)
            if status != 0:
                raise BackendError(f"cuGraphLaunch returned CUDA error {int(status)}")

        return call

    def close(self) -> None:
        for graph_exec, graph in self._owned:
            self._lib.cuGraphExecDestroy(graph_exec)
            self._lib.cuGraphDestroy(graph)
        self._owned.clear()


# --------------------------------------------------------------------------------------------------------------
# one engine


class TRTEngine(Engine):
    """One deserialized engine and its execution context (see the module docstring)."""

    def __init__(self, engine: Any, name: str, trt: Any, cuda: Any, stream: Any, max_batch: int = 32,
                 graphs: Optional[CudaGraphs] = None) -> None:
        self.name = name
        self._trt, self._cuda, self._stream, self._graphs = trt, cuda, stream, graphs
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._shapes = {n: tuple(int(d) for d in engine.get_tensor_shape(n)) for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.output_types = {n: self.dtypes[n] for n in self.output_names}
        self._profile_max = {n: tuple(int(d) for d in engine.get_tensor_profile_shape(n, 0)[2])
                             for n in self.input_names if any(d < 0 for d in self._shapes[n])}
        self.max_batch = plan_batch({n: (self._shapes[n], self._profile_max.get(n)) for n in self.input_names},
                                    max_batch)
        self.input_shapes = {n: tuple(None if d < 0 else d for d in self._shapes[n]) for n in self.input_names}
        self._run_buffers: Optional[Dict[str, Tuple[DeviceMemory, np.ndarray]]] = None
        self._owner: object = None  # whose shapes and addresses the context holds (a bound call, or run)
        self._scratch: List[DeviceMemory] = []

    # -- shapes ----------------------------------------------------------------------------------------------
    def _max_shape(self, n: str) -> Tuple[int, ...]:
        if n in self.input_names:
            return resolve_shape(self._shapes[n], self.max_batch, self._profile_max.get(n))
        for i in self.input_names:
            self.context.set_input_shape(i, self._max_shape(i))
        self._owner = None
        shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
        if any(d < 0 for d in shape):
            raise BackendError(f"{self.name}: output {n} has no concrete shape {shape} at the maximum input shapes")
        return shape

    def _set_inputs(self, shapes: Mapping[str, Sequence[int]]) -> None:
        for n in self.input_names:
            shape = tuple(int(d) for d in shapes[n])
            if shape and shape[0] > self.max_batch:
                raise BackendError(f"{self.name}: batch {shape[0]} exceeds the engine's max batch {self.max_batch}")
            if not self.context.set_input_shape(n, shape):
                raise BackendError(f"{self.name}: TensorRT refused input {n} of shape {list(shape)}")

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._stream.handle):
            raise BackendError(f"{self.name}: TensorRT execution failed")

    # -- batches from the host ---------------------------------------------------------------------------------
    def _staging(self) -> Dict[str, Tuple[DeviceMemory, np.ndarray]]:
        """Device + page-locked host buffers for every IO tensor at the max batch (made on first ``run``)."""
        if self._run_buffers is None:
            shapes = {n: self._max_shape(n) for n in (*self.input_names, *self.output_names)}
            buffers = {}
            for n, shape in shapes.items():
                nbytes = max(1, volume(shape) * self.dtypes[n].itemsize)
                buffers[n] = (DeviceMemory(self._cuda.mem_alloc(nbytes), nbytes),
                              self._cuda.pagelocked_empty(volume(shape), self.dtypes[n]))
            self._run_buffers = buffers
        return self._run_buffers

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{self.name}: missing input {', '.join(missing)}")
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        buffers = self._staging()
        cuda, stream = self._cuda, self._stream
        self._set_inputs({n: a.shape for n, a in arrays.items()})
        self._owner = self
        for n, array in arrays.items():
            device, host = buffers[n]
            staging = host[: array.size]
            staging[...] = array.reshape(-1)
            cuda.memcpy_htod_async(device.ptr, staging, stream)
            self.context.set_tensor_address(n, device.ptr)
        for n in self.output_names:
            self.context.set_tensor_address(n, buffers[n][0].ptr)
        self._enqueue()
        names = list(outputs) if outputs is not None else self.output_names
        pending = []
        for n in names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            host = buffers[n][1][: volume(shape)]
            cuda.memcpy_dtoh_async(host, buffers[n][0].ptr, stream)
            pending.append((n, host, shape))
        stream.synchronize()
        return {n: host.reshape(shape).copy() for n, host, shape in pending}  # staging is reused by the next run

    # -- fixed buffers -----------------------------------------------------------------------------------------
    def bind(self, inputs: Mapping[str, Buffer], outputs: Mapping[str, Buffer]) -> Callable[[], None]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise BackendError(f"{self.name}: bind needs input {', '.join(missing)}")
        for n, buf in {**inputs, **outputs}.items():
            if not isinstance(buf.value, DeviceMemory):
                raise BackendError(f"{self.name}: buffer {n} is not a TensorRT backend buffer")
            if n in self.input_names and buf.dtype != self.dtypes[n]:
                raise BackendError(f"{self.name}: buffer {n} is {buf.dtype}, the engine's tensor is {self.dtypes[n]}")
        self._set_inputs({n: inputs[n].shape for n in self.input_names})
        addresses: Dict[str, int] = {n: inputs[n].value.ptr for n in self.input_names}
        copy_out: List[Tuple[np.ndarray, int]] = []
        casts: List[Tuple[np.ndarray, np.ndarray]] = []  # (caller's host view, engine-typed staging)
        for n in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            nbytes = max(1, volume(shape) * self.dtypes[n].itemsize)
            buf = outputs.get(n)
            if buf is not None and buf.shape != shape:
                raise BackendError(f"{self.name}: output buffer {n} has shape {list(buf.shape)}, "
                                   f"the engine writes {list(shape)}")
            if buf is not None and buf.dtype == self.dtypes[n]:
                addresses[n] = buf.value.ptr
                if buf.host is not None:
                    copy_out.append((buf.host, buf.value.ptr))
                continue
            # not asked for (computed anyway), or another dtype: TensorRT before 10 returns int64 tensors (class)
            # as int32, so the engine writes to a buffer of its own and the host view gets a cast copy
            scratch = DeviceMemory(self._cuda.mem_alloc(nbytes), nbytes)
            self._scratch.append(scratch)
            addresses[n] = scratch.ptr
            if buf is not None and buf.host is None:
                raise BackendError(f"{self.name}: output buffer {n} is {buf.dtype} on the device, the engine's "
                                   f"tensor is {self.dtypes[n]}")
            if buf is not None:
                staging = self._cuda.pagelocked_empty(shape, self.dtypes[n])
                copy_out.append((staging, scratch.ptr))
                casts.append((buf.host, staging))
        shapes = {n: inputs[n].shape for n in self.input_names}
        copy_in = [(inputs[n].value.ptr, inputs[n].host) for n in self.input_names if inputs[n].host is not None]
        token = object()

        def apply() -> None:
            """Point the context at this call's shapes and buffers (once; again only after ``run`` or another
            bound call of this engine changed them)."""
            self._set_inputs(shapes)
            for n, ptr in addresses.items():
                self.context.set_tensor_address(n, ptr)
            self._owner = token

        apply()
        self._enqueue()  # TensorRT's first enqueue after new shapes does deferred setup: never inside a capture
        self._stream.synchronize()
        launch = self._graphs.capture(self._enqueue) if self._graphs is not None else self._enqueue
        cuda, stream = self._cuda, self._stream
        htod, dtoh = cuda.memcpy_htod_async, cuda.memcpy_dtoh_async

        def call() -> None:
            if self._owner is not token and self._graphs is None:
                apply()
            for ptr, host in copy_in:
                htod(ptr, host, stream)
            launch()
            for host, ptr in copy_out:
                dtoh(host, ptr, stream)
            stream.synchronize()
            for host, staging in casts:
                np.copyto(host, staging, casting="unsafe")

        return call

    def close(self) -> None:
        for device in [*(d for d, _h in (self._run_buffers or {}).values()), *self._scratch]:
            device.free()
        self._run_buffers, self._scratch = None, []
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
    """Build an engine with ``tensorrt_build.build_engine`` (batch profile 1..max_batch) and return its bytes.
    INT8 needs calibration images the runtime does not have: an INT8 bundle is rebuilt in FP16."""
    from .tensorrt_build import build_engine  # noqa: PLC0415 (imports tensorrt)

    prec = "fp16" if "int8" in str(precision).lower() else str(precision)
    try:
        built = build_engine(onnx_path, engine_path, precision=prec, min_batch=1, opt_batch=int(max_batch),
                             max_batch=int(max_batch), trt_module=trt_module, cuda_module=cuda_module)
    except Exception as exc:  # noqa: BLE001 (TensorRTError and the builder's own errors)
        raise BackendError(f"cannot build a TensorRT engine for {onnx_path.name}: {exc}") from None
    return Path(getattr(built, "path", engine_path)).read_bytes()


class TensorRTBackend(Backend):
    """A bundle's graphs as TensorRT engines on one CUDA stream (see the module docstring).

    ``bundle`` may be None for an engine loaded from bytes (:meth:`load`, the build-time check). ``precision``:
    the precision to rebuild in (default: the bundle engine's, else fp16); ``rebuild=False`` refuses to build.
    ``cuda_graphs``: capture every bound call (fixed batch) in a CUDA graph. ``trt_module`` / ``cuda_module`` /
    ``builder(onnx_path, engine_path, precision, max_batch) -> bytes`` / ``graph_lib`` (a libcuda stand-in) replace
    ``tensorrt``, ``pycuda.driver``, the engine builder and the CUDA driver library (tests use fakes).
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
        cuda_graphs: bool = False,
        log: Optional[Callable[[str], None]] = None,
        trt_module: Any = None,
        cuda_module: Any = None,
        builder: Optional[Callable[[Path, Path, str, int], bytes]] = None,
        graph_lib: Any = None,
    ) -> None:
        super().__init__()
        if trt_module is None or cuda_module is None:
            trt, cuda = import_tensorrt()
            trt, cuda = trt_module or trt, cuda_module or cuda
        else:
            trt, cuda = trt_module, cuda_module
        self._trt, self._cuda = trt, cuda
        self.bundle = bundle
        self._log = log or (lambda _m: None)
        self._requested_batch = max(1, int(max_batch))
        self._precision, self._rebuild, self._builder = precision, bool(rebuild), builder
        self._cache = Path(cache_dir) if cache_dir is not None else _cache_dir()
        self._context = None
        try:
            cuda.init()
            device = cuda.Device(int(device_id))
            self.gpu_name = str(device.name())
            # TensorRT uses the CUDA runtime, i.e. the device's primary context: make it current for pycuda too
            self._context = device.retain_primary_context()
            self._context.push()
            self._stream = cuda.Stream()
            self._graphs = CudaGraphs(self._stream, graph_lib) if cuda_graphs else None
        except BackendError:
            self._pop()
            raise
        except Exception as exc:  # noqa: BLE001 (pycuda raises its own error types)
            self._pop()
            raise BackendError(f"cannot open CUDA device {device_id}: {exc}") from None
        self.cuda_graphs = bool(cuda_graphs)
        self.trt_version = str(getattr(trt, "__version__", "?"))
        self.rebuilt: List[str] = []
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

    # -- engines -----------------------------------------------------------------------------------------------
    def _open(self, model_file: Any) -> TRTEngine:
        return self.load(self._engine_bytes(model_file), Path(str(model_file.file)).stem)

    def load(self, data: bytes, name: str) -> TRTEngine:
        """An engine from serialized bytes, on this backend's stream; ``max_batch`` follows its profile."""
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError(f"TensorRT cannot deserialize the engine of {name} (corrupted, or another version?)")
        opened = TRTEngine(engine, name, self._trt, self._cuda, self._stream, self._requested_batch, self._graphs)
        self.max_batch = opened.max_batch if self.max_batch is None else min(self.max_batch, opened.max_batch)
        return opened

    def _engine_bytes(self, model_file: Any) -> bytes:
        info = model_file.engine
        ok, reason = engine_compatible(info, self.trt_version, self.gpu_name)
        if ok and (self._precision is None or info.precision == self._precision):
            return Path(info.path).read_bytes()
        if not ok and not self._rebuild:
            raise BackendError(f"{model_file.file}: {reason}, and rebuilding is off")
        onnx_path = Path(model_file.path)
        prec = self._precision or (info.precision if info is not None else "fp16")
        key = (f"{_sha256(onnx_path)[:16]}-trt{_slug(self.trt_version)}-{_slug(self.gpu_name)}-{prec}"
               f"-b{self._requested_batch}")
        cached = self._cache / f"{onnx_path.stem}-{key}.engine"
        if cached.is_file():
            return cached.read_bytes()
        self._log(f"building TensorRT engine for {onnx_path.name} ({reason or 'precision ' + prec}); "
                  f"cached in {self._cache}")
        try:
            self._cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the engine cache {self._cache}: {exc}") from None
        if self._builder is not None:
            data = self._builder(onnx_path, cached, prec, self._requested_batch)
        else:
            data = _default_builder(onnx_path, cached, prec, self._requested_batch, self._trt, self._cuda)
        if not cached.is_file():
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, cached)
        self.rebuilt.append(onnx_path.name)
        return data

    # -- buffers -----------------------------------------------------------------------------------------------
    def buffer(self, shape: Sequence[int], dtype: Any, host: bool = True) -> Buffer:
        """Device memory allocated once; ``host=True`` adds a page-locked mirror that bound calls copy."""
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        nbytes = max(1, volume(shape) * dtype.itemsize)
        device = DeviceMemory(self._cuda.mem_alloc(nbytes), nbytes)
        self.__dict__.setdefault("_buffers", []).append(device)
        mirror = self._cuda.pagelocked_empty(shape, dtype) if host else None
        if mirror is not None:
            mirror[...] = 0
        return Buffer(shape, dtype, mirror, device)

    def describe(self) -> str:
        extra = [f"max batch {self.max_batch}"] if self.max_batch else []
        extra += ["CUDA graphs"] if self.cuda_graphs else []
        extra += [f"rebuilt {len(self.rebuilt)} engines"] if self.rebuilt else []
        extra += self.notes
        return f"tensorrt {self.trt_version} on {self.gpu_name}" + (f" ({', '.join(extra)})" if extra else "")

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
        for device in self.__dict__.pop("_buffers", []):
            device.free()
        if getattr(self, "_graphs", None) is not None:
            self._graphs.close()
        self._pop()

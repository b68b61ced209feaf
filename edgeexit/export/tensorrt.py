"""TensorRT engines for a bundle's ONNX files (torch-free: runs on a Jetson with only the runtime installed).

``build_engine`` follows the name-based TensorRT 8.5 - 10.x Python API: ``Builder`` -> ``create_network`` (with the
``EXPLICIT_BATCH`` flag before TensorRT 10, where it still exists) -> ``OnnxParser.parse`` (errors reported) ->
``create_builder_config`` (``set_memory_pool_limit(WORKSPACE)``, ``FP16`` where the platform has fast FP16, ``INT8``
with an ``IInt8EntropyCalibrator2``) -> one optimization profile, ``set_shape(name, min, opt, max)`` per input
(only the batch axis varies) -> ``build_serialized_network``.

``build_bundle_engines`` builds one engine per ONNX file of a bundle (segments, heads, the monolithic model) and
records, beside each file in the manifest, the engine's file name, SHA-256, TensorRT version, GPU and precision;
the manifest is rewritten atomically and engine files are named by their content, so an interrupted build leaves
the previous, consistent bundle.

Precision: ``fp16`` applies to every file; ``int8`` to segments and the monolithic model only: exit heads stay
FP16/FP32 because their gate signals (softmax, logarithms, CAM normalisation) feed thresholds calibrated in FP32.
INT8 needs calibration images and pycuda (device buffers for the calibrator).

Not verified against a real TensorRT here (the development machine has none); the tests drive this code through
a fake ``tensorrt`` module that checks the calls.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..runtime.bundle import (
    Bundle, atomic_write_bytes, load_bundle, read_manifest, sha256_file, write_manifest,
)

__all__ = [
    "TensorRTError",
    "TensorRTMissing",
    "EngineBuildError",
    "EngineBuild",
    "CalibrationBatches",
    "make_calibrator",
    "tensorrt_available",
    "import_tensorrt",
    "gpu_name",
    "build_engine",
    "build_bundle_engines",
    "calibration_feeds",
    "load_calibration_images",
    "MIN_TENSORRT",
]

MIN_TENSORRT = (8, 5)
DEFAULT_WORKSPACE_MB = 1024
MISSING_HINT = ("the ONNX bundle runs without it; build engines where TensorRT is installed (a Jetson: JetPack "
                "ships python3-libnvinfer) with `edgeexit export --tensorrt BUNDLE`")
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
           "UINT8": "uint8", "BOOL": "bool", "BF16": "bfloat16", "FP8": "fp8"}


class TensorRTError(RuntimeError):
    """A TensorRT problem (one line)."""


class TensorRTMissing(TensorRTError):
    """TensorRT (or pycuda, for INT8) is not importable here."""


class EngineBuildError(TensorRTError):
    """TensorRT could not parse or build an engine (names the ONNX file)."""


# ----------------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------------
def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", str(text))[:3]) or (0,)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTMissing with one line saying why."""
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTMissing(reason)
    import tensorrt  # noqa: PLC0415

    return tensorrt


def tensorrt_available() -> Tuple[bool, str]:
    """``(True, "TensorRT x.y.z")`` when ``import tensorrt`` works and is at least 8.5, else ``(False, reason)``."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as exc:
        return False, f"TensorRT is not installed ({exc}); {MISSING_HINT}"
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer, CUDA mismatch)
        return False, f"TensorRT failed to import ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); {MISSING_HINT}"
    version = str(getattr(trt, "__version__", "0"))
    if _version_tuple(version) < MIN_TENSORRT:
        return False, f"TensorRT {version} is older than {'.'.join(map(str, MIN_TENSORRT))} (the name-based API this uses)"
    return True, f"TensorRT {version}"


def _import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda  # noqa: PLC0415
    except ImportError as exc:
        raise TensorRTMissing(f"INT8 calibration needs pycuda for device buffers (pip install pycuda): {exc}") from None
    return cuda


def gpu_name(cuda_module: Any = None) -> str:
    """The GPU's name as the runtime sees it (pycuda ``Device(0).name()``), else NVML, else the Jetson model."""
    try:
        cuda = cuda_module
        if cuda is None:
            import pycuda.driver as cuda  # noqa: PLC0415
        cuda.init()
        return str(cuda.Device(0).name())
    except Exception:  # noqa: BLE001 - any failure: try the next source
        pass
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001
        pass
    try:
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00 \n") or "unknown"
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# INT8 calibration
# ----------------------------------------------------------------------------------------------------------------
class CalibrationBatches:
    """Fixed-size batches of calibration inputs (one array per network input, same number of rows).

    ``batch_size`` is capped at the number of samples; only full batches are served (TensorRT calibrates on a fixed
    shape), so ``N % batch_size`` samples at the end are left out (``dropped``). ``next()`` returns a dict
    ``name -> float32 C-contiguous (batch_size, ...)`` or None when done; ``reset()`` starts over.
    """

    def __init__(self, inputs: Union[np.ndarray, Mapping[str, np.ndarray]], batch_size: int,
                 input_name: str = "input") -> None:
        feeds = {input_name: inputs} if isinstance(inputs, np.ndarray) else dict(inputs)
        if not feeds:
            raise ValueError("calibration needs at least one input array")
        lengths = {name: len(a) for name, a in feeds.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"calibration inputs have different numbers of samples: {lengths}")
        n = next(iter(lengths.values()))
        if n < 1:
            raise ValueError("calibration needs at least one sample")
        if int(batch_size) < 1:
            raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
        self.inputs = {name: np.asarray(a, dtype=np.float32) for name, a in feeds.items()}
        self.num_samples = n
        self.batch_size = min(int(batch_size), n)
        self.num_batches = n // self.batch_size
        self.dropped = n - self.num_batches * self.batch_size
        self._next = 0

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.inputs)

    def shape(self, name: str) -> Tuple[int, ...]:
        return (self.batch_size, *self.inputs[name].shape[1:])

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name))) * 4

    def reset(self) -> None:
        self._next = 0

    def next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._next >= self.num_batches:
            return None
        lo = self._next * self.batch_size
        self._next += 1
        return {name: np.ascontiguousarray(a[lo : lo + self.batch_size]) for name, a in self.inputs.items()}

    def __iter__(self):
        self.reset()
        while (batch := self.next()) is not None:
            yield batch


def make_calibrator(trt: Any, cuda: Any, batches: CalibrationBatches, cache_path: Optional[Path] = None) -> Any:
    """An ``IInt8EntropyCalibrator2`` serving ``batches`` through pycuda device buffers (one per input)."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = batches
            self.cache_path = cache_path
            self.cache: Optional[bytes] = None
            self.buffers = {name: cuda.mem_alloc(batches.nbytes(name)) for name in batches.names}
            self.served = 0

        def get_batch_size(self) -> int:
            return self.batches.batch_size

        def get_batch(self, names, *_unused) -> Optional[List[int]]:
            batch = self.batches.next()
            if batch is None:
                return None
            pointers = []
            for name in names:
                if name not in batch:
                    raise KeyError(f"no calibration data for network input {name!r} (have {', '.join(batch)})")
                cuda.memcpy_htod(self.buffers[name], batch[name])
                pointers.append(int(self.buffers[name]))
            self.served += 1
            return pointers

        def read_calibration_cache(self) -> Optional[bytes]:
            if self.cache_path is not None and Path(self.cache_path).is_file():
                return Path(self.cache_path).read_bytes()
            return None

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)
            if self.cache_path is not None:
                atomic_write_bytes(self.cache_path, self.cache)

        def free(self) -> None:
            for buf in self.buffers.values():
                if hasattr(buf, "free"):
                    buf.free()
            self.buffers = {}

    return EntropyCalibrator()


# ----------------------------------------------------------------------------------------------------------------
# one engine
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EngineBuild:
    """What ``build_engine`` wrote."""

    path: Path
    sha256: str
    precision: str
    tensorrt_version: str
    gpu: str
    min_batch: int
    opt_batch: int
    max_batch: int
    io: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    def manifest_entry(self, file_name: Optional[str] = None) -> Dict[str, Any]:
        return {
            "file": file_name or self.path.name, "sha256": self.sha256, "tensorrt_version": self.tensorrt_version,
            "gpu": self.gpu, "precision": self.precision, "min_batch": self.min_batch, "opt_batch": self.opt_batch,
            "max_batch": self.max_batch, "io": self.io,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None) or str(dtype).split(".")[-1]
    return _DTYPES.get(str(name).upper(), str(name).lower())


def _parse_errors(parser: Any) -> str:
    messages = []
    for i in range(int(getattr(parser, "num_errors", 0))):
        err = parser.get_error(i)
        desc = err.desc() if hasattr(err, "desc") else str(err)
        messages.append(" ".join(str(desc).split()))
    return "; ".join(messages[:3]) or "no error reported"


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> Tuple[int, int, int]:
    lo, opt, hi = int(min_batch), int(opt_batch), int(max_batch)
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch sizes must satisfy 1 <= min ({lo}) <= opt ({opt}) <= max ({hi})")
    return lo, opt, hi


def build_engine(
    onnx_path: Union[str, Path],
    engine_path: Union[str, Path],
    *,
    fp16: bool = False,
    int8: bool = False,
    precision: Optional[str] = None,
    calibration_images: Union[np.ndarray, Mapping[str, np.ndarray], None] = None,
    calibration_batch: int = 8,
    calibration_cache: Optional[Union[str, Path]] = None,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 32,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    log: Optional[Callable[[str], None]] = None,
    trt_module: Any = None,
    cuda_module: Any = None,
) -> EngineBuild:
    """Build a TensorRT engine for one ONNX file and write it atomically to ``engine_path``.

    ``precision`` ("fp32", "fp16", "int8", "int8+fp16") may replace the ``fp16`` / ``int8`` flags. Inputs get one
    optimization profile whose batch axis spans ``min_batch``..``max_batch`` (tuned for ``opt_batch``).
    ``calibration_images``: with ``int8``, the calibration inputs: an array for a one-input network, or a dict
    ``input name -> array`` (all preprocessed float32, same number of rows).
    ``trt_module`` / ``cuda_module`` replace ``tensorrt`` / ``pycuda.driver`` (tests).
    """
    say = log or (lambda _m: None)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision is not None:
        p = str(precision).lower()
        if p not in ("fp32", "fp16", "int8", "int8+fp16"):
            raise ValueError(f"precision must be fp32, fp16, int8 or int8+fp16, got {precision!r}")
        fp16, int8 = fp16 or "fp16" in p, int8 or "int8" in p
    lo, opt, hi = _check_batches(min_batch, opt_batch, max_batch)
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path}: ONNX file not found")
    trt = trt_module if trt_module is not None else import_tensorrt()
    version = str(getattr(trt, "__version__", "?"))
    major = _version_tuple(version)[0]
    notes: List[str] = []
    t0 = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10 and hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(
            trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise EngineBuildError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {_parse_errors(parser)}")

    config = builder.create_builder_config()
    workspace = int(workspace_mb) << 20
    if hasattr(config, "set_memory_pool_limit") and hasattr(trt, "MemoryPoolType"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    else:  # before 8.4
        config.max_workspace_size = workspace

    used_fp16 = False
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise EngineBuildError(f"{onnx_path.name}: TensorRT {version} has no FP16 builder flag (strongly typed "
                                   "networks only): build fp32")
        if getattr(builder, "platform_has_fast_fp16", True):
            config.set_flag(trt.BuilderFlag.FP16)
            used_fp16 = True
        else:
            notes.append("this GPU has no fast FP16: built in FP32")
            say(f"{onnx_path.name}: this GPU has no fast FP16; building FP32")

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profile = builder.create_optimization_profile()
    shapes: Dict[str, Tuple[int, ...]] = {}
    for tensor in inputs:
        dims = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise EngineBuildError(f"{onnx_path.name}: input {tensor.name!r} has dynamic axes beyond the batch: {dims}")
        shapes[tensor.name] = dims[1:]
        profile.set_shape(tensor.name, (lo, *dims[1:]), (opt, *dims[1:]), (hi, *dims[1:]))
    config.add_optimization_profile(profile)

    calibrator = None
    used_int8 = False
    if int8:
        if not hasattr(trt.BuilderFlag, "INT8"):
            raise EngineBuildError(f"{onnx_path.name}: TensorRT {version} has no INT8 builder flag")
        if not getattr(builder, "platform_has_fast_int8", True):
            notes.append("this GPU has no fast INT8: INT8 not used")
            say(f"{onnx_path.name}: this GPU has no fast INT8; not using INT8")
        else:
            if calibration_images is None:
                raise ValueError(f"{onnx_path.name}: INT8 needs calibration images")
            single = inputs[0].name if len(inputs) == 1 else "input"
            batches = CalibrationBatches(calibration_images, calibration_batch, input_name=single)
            missing = [t.name for t in inputs if t.name not in batches.names]
            if missing:
                raise ValueError(f"{onnx_path.name}: no calibration data for input(s) {', '.join(missing)}")
            cuda = cuda_module if cuda_module is not None else _import_pycuda()
            context = _push_context(cuda)
            try:
                calibrator = make_calibrator(trt, cuda, batches, Path(calibration_cache) if calibration_cache else None)
                config.set_flag(trt.BuilderFlag.INT8)
                config.int8_calibrator = calibrator
                calib_profile = builder.create_optimization_profile()
                for name, rest in shapes.items():
                    fixed = (batches.batch_size, *rest)
                    calib_profile.set_shape(name, fixed, fixed, fixed)
                if hasattr(config, "set_calibration_profile"):
                    config.set_calibration_profile(calib_profile)
                used_int8 = True
                say(f"{onnx_path.name}: INT8 calibration on {batches.num_batches} batches of {batches.batch_size}"
                    + (f" ({batches.dropped} samples left out)" if batches.dropped else ""))
                serialized = builder.build_serialized_network(network, config)
            finally:
                if calibrator is not None:
                    calibrator.free()
                _pop_context(context)
    if not used_int8:
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT could not build an engine (see the TensorRT log above)")
    data = bytes(memoryview(serialized))
    if not data:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT returned an empty engine")
    atomic_write_bytes(engine_path, data)

    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io.append({"name": t.name, "shape": ["batch", *[int(d) for d in tuple(t.shape)[1:]]], "dtype": _dtype_name(t.dtype)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "shape": ["batch", *[int(d) if int(d) >= 0 else "dyn" for d in tuple(t.shape)[1:]]],
                   "dtype": _dtype_name(t.dtype)})
    precision_name = "int8+fp16" if used_int8 and used_fp16 else "int8" if used_int8 else "fp16" if used_fp16 else "fp32"
    return EngineBuild(
        path=engine_path, sha256=sha256_file(engine_path), precision=precision_name, tensorrt_version=version,
        gpu=gpu_name(cuda_module), min_batch=lo, opt_batch=opt, max_batch=hi, io=io,
        seconds=time.perf_counter() - t0, notes=notes,
    )


def _push_context(cuda: Any) -> Any:
    """Make the device's primary context current (TensorRT uses it; pycuda allocations must live in it too)."""
    try:
        cuda.init()
        context = cuda.Device(0).retain_primary_context()
        context.push()
        return context
    except Exception as exc:  # noqa: BLE001
        raise TensorRTError(f"cannot open CUDA device 0 for INT8 calibration: {exc}") from None


def _pop_context(context: Any) -> None:
    try:
        context.pop()
    except Exception:  # noqa: BLE001
        pass


# ----------------------------------------------------------------------------------------------------------------
# calibration data for every file of a bundle
# ----------------------------------------------------------------------------------------------------------------
def load_calibration_images(source: Union[np.ndarray, str, Path, Sequence[Union[str, Path]]], preprocess: Any,
                            count: int = 256) -> np.ndarray:
    """Preprocessed float32 NCHW calibration images from: a float32 NCHW array (used as is), a uint8 NHWC array,
    a folder of images (searched recursively, evenly sampled) or a list of image paths."""
    from ..imageio import ImageError, is_image_file, load_image  # noqa: PLC0415

    if isinstance(source, np.ndarray):
        if source.dtype == np.uint8:
            return np.stack([preprocess(img) for img in source[:count]]).astype(np.float32)
        return np.ascontiguousarray(source[:count], dtype=np.float32)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"calibration image folder not found: {root}")
        paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise FileNotFoundError(f"no calibration images in {source}")
    if len(paths) > count:
        paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, count).round().astype(int))]
    images = []
    for p in paths:
        try:
            images.append(preprocess(load_image(p, preprocess.channels)))
        except ImageError:
            continue
    if not images:
        raise FileNotFoundError(f"no readable calibration images in {source}")
    return np.stack(images).astype(np.float32)


def calibration_feeds(bundle: Bundle, images: np.ndarray, batch: int = 32) -> Dict[str, Dict[str, np.ndarray]]:
    """Inputs of every file of the bundle for calibration images (N, C, H, W): run the ONNX chain with ONNX Runtime
    and collect ``file name -> {input name: array}`` (segment i gets segment i-1's features, head i its segment's
    features and head i-1's CAM, the monolithic model the images)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.log_severity_level = 3
    segs = [ort.InferenceSession(str(f.path), options, providers=["CPUExecutionProvider"]) for f in bundle.segments]
    heads = [ort.InferenceSession(str(f.path), options, providers=["CPUExecutionProvider"]) for f in bundle.heads]
    x = np.ascontiguousarray(images, dtype=np.float32)
    feeds: Dict[str, Dict[str, List[np.ndarray]]] = {f.file: {} for f in bundle.files()}

    def add(file: str, name: str, value: np.ndarray) -> None:
        feeds[file].setdefault(name, []).append(value)

    for lo in range(0, len(x), batch):
        f = x[lo : lo + batch]
        add(bundle.monolithic.file, "input", f)
        prev = None
        for i in range(bundle.num_exits):
            add(bundle.segments[i].file, "input" if i == 0 else "features_in", f)
            (f,) = segs[i].run(["features"], {("input" if i == 0 else "features_in"): f})
            feed = {"features": f} if i == 0 else {"features": f, "prev_cam": prev}
            for name, value in feed.items():
                add(bundle.heads[i].file, name, value)
            (prev,) = heads[i].run(["cam"], feed)
    return {file: {name: np.concatenate(parts) for name, parts in named.items()} for file, named in feeds.items()}


# ----------------------------------------------------------------------------------------------------------------
# a bundle's engines
# ----------------------------------------------------------------------------------------------------------------
def build_bundle_engines(
    bundle_dir: Union[str, Path],
    fp16: bool = False,
    int8: bool = False,
    *,
    calibration_images: Union[np.ndarray, str, Path, Sequence[Union[str, Path]], None] = None,
    calib_count: int = 256,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 32,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    monolithic: bool = True,
    log: Callable[[str], None] = print,
    build: Optional[Callable[..., EngineBuild]] = None,
    trt_module: Any = None,
    cuda_module: Any = None,
) -> Bundle:
    """Build one engine per ONNX file of a bundle and record each beside its file in the manifest.

    Engine files are named ``<stem>.<sha8>.engine`` and written before the manifest is rewritten (atomically);
    engines the new manifest no longer names are deleted afterwards. Returns the reloaded bundle.
    ``build`` replaces ``build_engine`` (tests); without it TensorRT must be importable (else TensorRTMissing).
    """
    root = Path(bundle_dir)
    bundle = load_bundle(root)
    _check_batches(min_batch, opt_batch, max_batch)
    if build is None:
        if trt_module is None:
            import_tensorrt()  # one-line TensorRTMissing before any work
        build = build_engine
    feeds: Dict[str, Dict[str, np.ndarray]] = {}
    if int8:
        if calibration_images is None:
            raise ValueError("INT8 needs calibration images (--calib-data DIR, or a checkpoint whose data is available)")
        images = load_calibration_images(calibration_images, bundle.preprocess, calib_count)
        log(f"INT8 calibration: {len(images)} images through the ONNX chain")
        feeds = calibration_feeds(bundle, images)

    manifest = read_manifest(root)
    groups: List[Tuple[str, Optional[int], Any]] = [("segments", i, f) for i, f in enumerate(bundle.segments)]
    groups += [("heads", i, f) for i, f in enumerate(bundle.heads)]
    if monolithic:
        groups.append(("monolithic", None, bundle.monolithic))
    written: List[Path] = []
    old_engines = {f.engine.file for f in bundle.files() if f.engine is not None}
    try:
        for group, index, f in groups:
            use_int8 = int8 and group != "heads"
            tmp = root / f".{Path(f.file).stem}.{os.getpid()}.engine.tmp"
            written.append(tmp)
            result = build(
                f.path, tmp, fp16=fp16, int8=use_int8, calibration_images=feeds.get(f.file) if use_int8 else None,
                min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_mb=workspace_mb, log=log,
                **({"trt_module": trt_module, "cuda_module": cuda_module} if trt_module is not None else {}),
            )
            digest = sha256_file(tmp)
            name = f"{Path(f.file).stem}.{digest[:8]}.engine"
            final = root / name
            os.replace(tmp, final)
            written[-1] = final
            entry = result.manifest_entry(name)
            entry["sha256"] = digest
            target = manifest["monolithic"] if group == "monolithic" else manifest[group][index]
            target["engine"] = entry
            log(f"{f.file} -> {name} ({entry['precision']}, {final.stat().st_size / 1e6:.2f} MB"
                + (f", {result.seconds:.1f}s" if getattr(result, "seconds", 0) else "") + ")")
        write_manifest(root, manifest)
    except BaseException:
        for p in written:
            if p.name not in old_engines:
                p.unlink(missing_ok=True)
        raise
    new_engines = {e["engine"]["file"] for e in (*manifest["segments"], *manifest["heads"], manifest["monolithic"])
                   if e.get("engine")}
    for stale in old_engines - new_engines:
        (root / stale).unlink(missing_ok=True)
    return load_bundle(root)

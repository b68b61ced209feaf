"""TensorRT engines for a bundle's ONNX files (torch-free: runs on a Jetson with only the runtime installed).

``build_engine`` follows the name-based TensorRT 8.5 - 10.x Python API: ``Builder`` -> ``create_network`` (with the
``EXPLICIT_BATCH`` flag before TensorRT 10, where it still exists) -> ``OnnxParser.parse`` (errors reported) ->
``create_builder_config`` (``set_memory_pool_limit(WORKSPACE)``, ``FP16`` where the platform has fast FP16, ``INT8``
with an ``IInt8EntropyCalibrator2``) -> one optimization profile, ``set_shape(name, min, opt, max)`` per input
(only the batch axis varies) -> ``build_serialized_network``.

``build_bundle_engines`` builds one engine per ONNX graph of a bundle (every pipeline's stages and CAM graphs, and
the monolithic model), checks each against its ONNX graph on held-out inputs (:func:`compare_engine`: ONNX Runtime
CPU vs the engine, max abs / relative error of every float output, class agreement) and records, in each file's
manifest entry, the engine's file name, SHA-256, TensorRT version, GPU, precision and that check
(``engine.checks``); the manifest is rewritten atomically and engine files are named by their content, so an
interrupted or failed build leaves the previous, consistent bundle.

Precision: ``fp16`` applies to every graph; ``int8`` to stages and the monolithic model (calibrated on the inputs
each graph really sees: stage j on stage j-1's features), not to the CAM graphs (drawn maps). The engine check
tells when INT8 moved a stage's gate signals too far. INT8 needs calibration images and pycuda (device buffers for
the calibrator).

This module lives in the torch-free runtime: it runs on the device (a Jetson) where the engines are built.
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

from .bundle import (
    Bundle, ModelFile, atomic_write_bytes, load_bundle, read_manifest, sha256_file, write_manifest,
)
from ..errors import EdgeexitError

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
    "graph_feeds",
    "random_images",
    "load_calibration_images",
    "compare_engine",
    "EngineCheckError",
    "FP16_TOLERANCE",
    "MIN_TENSORRT",
]

MIN_TENSORRT = (8, 5)
DEFAULT_WORKSPACE_MB = 1024
MISSING_HINT = ("the ONNX bundle runs without it; build engines where TensorRT is installed (a Jetson: JetPack "
                "ships python3-libnvinfer) with `edgeexit export --tensorrt BUNDLE`")
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
           "UINT8": "uint8", "BOOL": "bool", "BF16": "bfloat16", "FP8": "fp8"}


class TensorRTError(EdgeexitError, RuntimeError):
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


# ----------------------------------------------------------------------------------------------------------------
# inputs of every graph of a bundle (calibration and engine checks)
# ----------------------------------------------------------------------------------------------------------------
def _ort_session(path: Path) -> Any:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_feeds(bundle: Bundle, images: np.ndarray, batch: int = 32) -> Dict[str, Dict[str, np.ndarray]]:
    """Inputs of every ONNX graph of the bundle for images (N, C, H, W), from the ONNX graphs themselves (ONNX
    Runtime, CPU): ``file name -> {input name: array}``. Stage j of a pipeline gets stage j-1's ``features`` (and
    ``cam`` as ``prev_cam``), a CAM graph its stage's features, the monolithic model the images."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    feeds: Dict[str, Dict[str, List[np.ndarray]]] = {f.file: {} for f in bundle.files()}

    def add(file: str, named: Mapping[str, np.ndarray]) -> None:
        for name, value in named.items():
            feeds[file].setdefault(name, []).append(value)

    for pipe in bundle.pipelines.values():
        stages = [_ort_session(f.path) for f in pipe.stages]
        for lo in range(0, len(x), batch):
            prev: Dict[str, np.ndarray] = {"features": x[lo : lo + batch]}
            for session, stage in zip(stages, pipe.stages):
                feed = {name: prev["cam" if name == "prev_cam" else "features"] for name in stage.input_names}
                add(stage.file, feed)
                prev = dict(zip(stage.output_names, session.run(list(stage.output_names), feed)))
                cam = pipe.cam(stage.exit)
                if cam is not None:
                    add(cam.file, {"features": prev["features"]})
    add(bundle.monolithic.file, {"input": x})
    return {file: {name: np.concatenate(parts) for name, parts in named.items()} for file, named in feeds.items()}


def calibration_feeds(bundle: Bundle, images: np.ndarray, batch: int = 32) -> Dict[str, Dict[str, np.ndarray]]:
    """INT8 calibration inputs of every graph (:func:`graph_feeds`)."""
    return graph_feeds(bundle, images, batch)


def random_images(bundle: Bundle, count: int = 16, seed: int = 0) -> np.ndarray:
    """Standard-normal inputs of the bundle's shape (what preprocessed images look like to the first layer), for
    engine checks when no images are given."""
    return np.random.default_rng(seed).standard_normal((int(count), *bundle.input_shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# engine vs ONNX (a Polygraphy-style comparator)
# ----------------------------------------------------------------------------------------------------------------
FP16_TOLERANCE = 1e-2  # relative to max(1, the largest |reference|): what FP16 accumulations keep on these graphs
MIN_CLASS_AGREEMENT = 0.98  # FP16 may flip near ties; more flips than this is a broken engine


class EngineCheckError(TensorRTError):
    """An engine whose outputs differ from its ONNX graph beyond the tolerance (one line)."""


def compare_engine(onnx_path: Union[str, Path], engine: Any, inputs: Mapping[str, np.ndarray],
                   tol: float = FP16_TOLERANCE, min_agreement: float = MIN_CLASS_AGREEMENT) -> Dict[str, Any]:
    """Run the ONNX graph (ONNX Runtime, CPU) and ``engine`` (anything with ``run(feeds) -> {name: array}`` and
    ``max_batch``, e.g. a ``TRTEngine``) on the same ``inputs`` and compare every output.

    Float outputs: ``max_abs_error`` and ``max_rel_error = max|engine - onnx| / max(1, max|onnx|)``, which must be
    <= ``tol``; integer outputs (``class``): ``class_agreement``, the fraction of equal rows, must be >=
    ``min_agreement``. Returns a JSON-ready dict with ``ok`` and, when not ok, ``message`` (one line)."""
    onnx_path = Path(onnx_path)
    feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    n = len(next(iter(feeds.values())))
    session = _ort_session(onnx_path)
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    step = max(1, int(getattr(engine, "max_batch", None) or n))
    parts: Dict[str, List[np.ndarray]] = {}
    for lo in range(0, n, step):
        out = engine.run({k: v[lo : lo + step] for k, v in feeds.items()}, list(reference))
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value))
    got = {name: np.concatenate(p) for name, p in parts.items()}
    result: Dict[str, Any] = {"samples": int(n), "tolerance": float(tol), "max_abs_error": {}, "max_rel_error": {}}
    failures: List[str] = []
    for name, ref in reference.items():
        value = got[name]
        if value.shape != ref.shape:
            failures.append(f"output {name!r} has shape {list(value.shape)}, the ONNX graph {list(ref.shape)}")
            continue
        if np.issubdtype(ref.dtype, np.integer):
            agreement = float(np.mean(value.astype(np.int64) == ref.astype(np.int64))) if ref.size else 1.0
            result["class_agreement" if name == "class" else f"{name}_agreement"] = agreement
            if agreement < min_agreement:
                failures.append(f"output {name!r} agrees on {agreement:.1%} of {n} samples (need {min_agreement:.0%})")
            continue
        err = float(np.max(np.abs(value.astype(np.float64) - ref))) if ref.size else 0.0
        if not np.isfinite(err):
            err = float("inf")
        rel = err / max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        result["max_abs_error"][name], result["max_rel_error"][name] = err, rel
        if not rel <= tol:
            failures.append(f"output {name!r} differs by {err:.3g} (max abs; relative {rel:.3g} > tolerance {tol:.3g})")
    result["ok"] = not failures
    if failures:
        result["message"] = f"{getattr(engine, 'name', 'engine')} vs {onnx_path.name}: {failures[0]}"
    return result


def _check_built_engine(path: Path, f: ModelFile, feeds: Mapping[str, np.ndarray], max_batch: int, tol: float,
                        trt_module: Any, cuda_module: Any) -> Dict[str, Any]:
    from .tensorrt_backend import TensorRTBackend  # noqa: PLC0415 (the runtime side; imports this module lazily)

    backend = TensorRTBackend(None, max_batch=max_batch, trt_module=trt_module, cuda_module=cuda_module)
    try:
        engine = backend.load(path.read_bytes(), Path(f.file).stem)
        return compare_engine(f.path, engine, feeds, tol)
    finally:
        backend.close()


# ----------------------------------------------------------------------------------------------------------------
# a bundle's engines
# ----------------------------------------------------------------------------------------------------------------
def _graph_targets(bundle: Bundle, manifest: Dict[str, Any]) -> List[Tuple[ModelFile, Dict[str, Any], bool]]:
    """(file, its manifest entry, INT8 allowed) for every graph: each pipeline's stages (INT8 allowed) and CAM
    graphs (FP16/FP32: drawn maps, not worth a calibration), then the monolithic model (INT8 allowed)."""
    out: List[Tuple[ModelFile, Dict[str, Any], bool]] = []
    for gate, pipe in bundle.pipelines.items():
        entry = manifest["pipelines"][gate]
        out += [(f, entry["stages"][j], True) for j, f in enumerate(pipe.stages)]
        out += [(f, entry["cams"][k], False) for k, f in enumerate(pipe.cams)]
    out.append((bundle.monolithic, manifest["monolithic"], True))
    return out


def _engine_files(manifest: Mapping[str, Any]) -> set:
    entries = [manifest["monolithic"]]
    for pipe in manifest["pipelines"].values():
        entries += [*pipe["stages"], *pipe["cams"]]
    return {e["engine"]["file"] for e in entries if e.get("engine")}


def build_bundle_engines(
    bundle_dir: Union[str, Path],
    fp16: bool = False,
    int8: bool = False,
    *,
    calibration_images: Union[np.ndarray, str, Path, Sequence[Union[str, Path]], None] = None,
    calib_count: int = 256,
    check_images: Union[np.ndarray, str, Path, Sequence[Union[str, Path]], None] = None,
    check: bool = True,
    check_tolerance: float = FP16_TOLERANCE,
    check_count: int = 64,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 32,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    monolithic: bool = True,
    log: Callable[[str], None] = print,
    build: Optional[Callable[..., EngineBuild]] = None,
    compare: Optional[Callable[..., Dict[str, Any]]] = None,
    trt_module: Any = None,
    cuda_module: Any = None,
) -> Bundle:
    """Build one engine per ONNX graph of a bundle (every pipeline's stages and CAM graphs, and ``full.onnx``)
    and record each in its file's manifest entry (``engine``: file, SHA-256, TensorRT version, GPU, precision,
    batch profile, and with ``check`` the comparison with the ONNX graph, ``engine.checks``).

    ``check``: run every engine and its ONNX graph on the same inputs (``check_images``, else the calibration
    images, else :func:`random_images`) with :func:`compare_engine`; any failure is a one-line EngineCheckError and
    the bundle is left as it was. Engine files are named ``<stem>.<sha8>.engine`` and written before the manifest
    is rewritten (atomically); engines the new manifest no longer names are deleted afterwards. Returns the
    reloaded bundle. ``build`` / ``compare`` replace ``build_engine`` / the engine check (tests); without
    ``build``, TensorRT must be importable (else TensorRTMissing).
    """
    root = Path(bundle_dir)
    bundle = load_bundle(root)
    _check_batches(min_batch, opt_batch, max_batch)
    if build is None:
        if trt_module is None:
            import_tensorrt()  # one-line TensorRTMissing before any work
        build = build_engine
    calib: Dict[str, Dict[str, np.ndarray]] = {}
    images = None
    if int8:
        if calibration_images is None:
            raise ValueError("INT8 needs calibration images (--calib-data DIR, or a checkpoint whose data is available)")
        images = load_calibration_images(calibration_images, bundle.preprocess, calib_count)
        log(f"INT8 calibration: {len(images)} images through the ONNX graphs")
        calib = calibration_feeds(bundle, images)
    checks: Dict[str, Dict[str, np.ndarray]] = {}
    check_source = ""
    if check:
        if check_images is not None:
            held_out, check_source = load_calibration_images(check_images, bundle.preprocess, check_count), "images"
        elif images is not None:
            held_out, check_source = images[:check_count], "calibration images"
        else:
            held_out, check_source = random_images(bundle, min(int(check_count), 16)), "random inputs"
        checks = graph_feeds(bundle, held_out)
    compare = compare or (lambda path, f, feeds: _check_built_engine(path, f, feeds, max_batch, check_tolerance,
                                                                       trt_module, cuda_module))
    device = {"trt_module": trt_module, "cuda_module": cuda_module} if trt_module is not None else {}

    manifest = read_manifest(root)
    written: List[Path] = []
    old_engines = _engine_files(manifest)
    try:
        for f, entry, int8_ok in _graph_targets(bundle, manifest):
            if f is bundle.monolithic and not monolithic:
                continue
            use_int8 = int8 and int8_ok
            tmp = root / f".{Path(f.file).stem}.{os.getpid()}.engine.tmp"
            written.append(tmp)
            result = build(
                f.path, tmp, fp16=fp16, int8=use_int8, calibration_images=calib.get(f.file) if use_int8 else None,
                min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_mb=workspace_mb, log=log,
                **device,
            )
            digest = sha256_file(tmp)
            name = f"{Path(f.file).stem}.{digest[:8]}.engine"
            final = root / name
            os.replace(tmp, final)
            written[-1] = final
            info = result.manifest_entry(name)
            info["sha256"] = digest
            line = f"{f.file} -> {name} ({info['precision']}, {final.stat().st_size / 1e6:.2f} MB"
            line += f", {result.seconds:.1f}s" if getattr(result, "seconds", 0) else ""
            if check:
                verdict = compare(final, f, checks[f.file])
                verdict["inputs"] = check_source
                if not verdict["ok"]:
                    raise EngineCheckError(f"{verdict['message']} on {verdict['samples']} {check_source}; "
                                           "the bundle is unchanged (try --fp16 off, or other calibration images)")
                info["checks"] = verdict
                line += f", max rel error {max(verdict['max_rel_error'].values(), default=0.0):.2g}"
            entry["engine"] = info
            log(line + ")")
        write_manifest(root, manifest)
    except BaseException:
        for p in written:
            if p.name not in old_engines:
                p.unlink(missing_ok=True)
        raise
    for stale in old_engines - _engine_files(manifest):
        (root / stale).unlink(missing_ok=True)
    return load_bundle(root)

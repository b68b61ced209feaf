"""Bundles: the directory ``edgeexit export`` writes and the camera device loads (torch-free).

A bundle holds, per exported gate, a *pipeline*: one ONNX graph per kept exit (a stage: the backbone segments
since the previous kept exit plus that exit's head, computing only what the gate reads; see
``edgeexit.stages``), one small CAM graph per kept exit (for drawing), optional TensorRT engines; plus the
monolithic reference ``full.onnx`` and ``manifest.json`` (schema: ``edgeexit/schemas/manifest.schema.json``; see
docs/architecture.md, section "Bundle")::

    from edgeexit.runtime.bundle import load_bundle
    bundle = load_bundle("bundle/")          # schema, file names, SHA-256, ONNX inputs/outputs and shapes checked
    pipe = bundle.pipeline()                 # the default gate's; bundle.pipeline("coh_ssim") another exported one
    pipe.stages[0].path, pipe.policy.kept, bundle.preprocess

Every problem with a bundle is a :class:`BundleError` whose message is one line naming the file or field.
Only numpy, jsonschema and the standard library are imported (plus the torch-free ``edgeexit`` core).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

from ..errors import EdgeexitError
from ..jsonio import atomic_write_bytes, atomic_write_text
from ..gates import GATE_NAMES, gate_spec
from ..policy import ExitPolicy
from ..preprocess import Preprocess
from ..stages import exit_costs, stage_ranges
from .onnx_io import OnnxIOError, read_io

__all__ = [
    "BundleError",
    "MANIFEST",
    "SCHEMA_VERSION",
    "TensorSpec",
    "EngineInfo",
    "ModelFile",
    "Pipeline",
    "Bundle",
    "stage_io",
    "load_bundle",
    "read_manifest",
    "validate_manifest",
    "manifest_schema",
    "check_file_name",
    "is_bundle_dir",
    "sha256_file",
    "write_manifest",
    "atomic_write_bytes",
    "atomic_write_text",
    "json_ready",
]

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2
FORMAT = "edgeexit-bundle"
_MAX_MANIFEST_BYTES = 16 << 20


class BundleError(EdgeexitError, ValueError):
    """A bundle that is missing, malformed, tampered with or inconsistent. The message is one line."""


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------
def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def json_ready(value: Any) -> Any:
    """A copy of ``value`` that strict JSON can hold: tuples become lists, numpy scalars Python numbers and
    non-finite floats the strings "inf", "-inf", "nan" (``ExitPolicy.from_dict`` reads "inf" / "-inf" back)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:  # numpy scalar
        return json_ready(value.item())
    if hasattr(value, "tolist"):  # numpy array
        return json_ready(value.tolist())
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return value


def write_manifest(bundle_dir: Union[str, Path], manifest: Mapping[str, Any], validate: bool = True) -> Path:
    """Validate ``manifest`` against the schema and write ``bundle_dir/manifest.json`` atomically (strict JSON)."""
    data = json_ready(manifest)
    if validate:
        validate_manifest(data)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    path = Path(bundle_dir) / MANIFEST
    atomic_write_text(path, text)
    return path


def is_bundle_dir(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a directory with a manifest.json (not whether that bundle is valid)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def check_file_name(name: Any, field: str) -> str:
    """``name`` must be a plain file name: no directory part, no '..', not absolute, no odd characters."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{MANIFEST}: {field} must be a non-empty file name, got {name!r}")
    bad = (
        "/" in name
        or "\\" in name
        or name in (".", "..")
        or ".." in name
        or name.startswith("~")
        or (len(name) >= 2 and name[1] == ":")
        or any(ord(c) < 32 for c in name)
        or os.path.isabs(name)
        or name == MANIFEST
    )
    if bad:
        raise BundleError(f"{MANIFEST}: {field} {name!r} is not a plain file name inside the bundle")
    return name


# ----------------------------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _schema_text() -> str:
    from importlib import resources

    return resources.files("edgeexit").joinpath("schemas", "manifest.schema.json").read_text(encoding="utf-8")


def manifest_schema() -> Dict[str, Any]:
    """The manifest JSON Schema shipped in the package (a fresh dict), its gate enum filled from the registry."""
    schema = json.loads(_schema_text())
    schema["$defs"]["gate"] = {"enum": list(GATE_NAMES)}
    return schema


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = manifest_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _field(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate_manifest(manifest: Any) -> None:
    """Raise a one-line BundleError naming the first offending field when ``manifest`` breaks the schema."""
    import jsonschema

    errors = list(_validator().iter_errors(manifest))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    # oneOf / anyOf: the most specific sub-error names the field best
    while err.context:
        err = jsonschema.exceptions.best_match(err.context)
    message = err.message if len(err.message) <= 200 else err.message[:197] + "..."
    raise BundleError(f"{MANIFEST}: field {_field(err.absolute_path)}: {message}")


def read_manifest(bundle_dir: Union[str, Path]) -> Dict[str, Any]:
    """Parse ``bundle_dir/manifest.json`` (no schema check); one-line BundleError when it cannot be read."""
    from .guards import loads_strict  # noqa: PLC0415  (issue 11)

    root = Path(bundle_dir)
    if not root.exists():
        raise BundleError(f"bundle not found: {root}")
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory (a bundle is a folder with {MANIFEST})")
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{path}: missing (not an edgeexit bundle)" if not path.exists() else f"{path}: not a plain file")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: too large for a manifest ({path.stat().st_size} bytes)")
    try:
        data = loads_strict(path.read_text(encoding="utf-8"))  # issue 11: no NaN/Infinity, nesting limited
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not UTF-8 text (corrupted?)") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except ValueError as exc:  # issue 11: loads_strict's NaN/Infinity constants and nesting depth
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------------------
# typed view
# ----------------------------------------------------------------------------------------------------------------
Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: name, shape (ints, or strings for dynamic axes such as "batch"), dtype."""

    name: str
    shape: Tuple[Dim, ...]
    dtype: str

    @property
    def static_shape(self) -> Tuple[int, ...]:
        """The shape without its first (batch) axis."""
        return tuple(int(d) for d in self.shape[1:])

    @property
    def dynamic_batch(self) -> bool:
        return isinstance(self.shape[0], str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(data["name"]), tuple(d if isinstance(d, str) else int(d) for d in data["shape"]), str(data["dtype"]))

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class EngineInfo:
    """A TensorRT engine built for one ONNX file."""

    file: str
    path: Path
    sha256: str
    tensorrt_version: str
    gpu: str
    precision: str
    min_batch: Optional[int] = None
    opt_batch: Optional[int] = None
    max_batch: Optional[int] = None
    io: Tuple[TensorSpec, ...] = ()


@dataclass(frozen=True)
class ModelFile:
    """One ONNX graph of the bundle: a stage, a CAM graph or the monolithic model.

    ``kind``: "stage" | "cam" | "monolithic"; ``index``: the stage's position in its pipeline (-1 otherwise);
    ``exit``: the exit a stage ends at or a CAM graph draws (-1 for the monolithic model); ``segments``: the
    (first, last) backbone segments a stage runs; ``cam_shape``: (h, w) of that exit's CAM."""

    kind: str
    index: int
    file: str
    path: Path
    sha256: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    macs: int = 0
    params: int = 0
    engine: Optional[EngineInfo] = None
    exit: int = -1
    segments: Tuple[int, int] = (-1, -1)
    cam_shape: Tuple[int, int] = (0, 0)
    temperature: Optional[float] = None
    size: Optional[int] = None

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.file} has no input {name!r} (inputs: {', '.join(t.name for t in self.inputs)})")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.file} has no output {name!r} (outputs: {', '.join(t.name for t in self.outputs)})")

    def has_input(self, name: str) -> bool:
        return any(t.name == name for t in self.inputs)

    def has_output(self, name: str) -> bool:
        return any(t.name == name for t in self.outputs)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class Pipeline:
    """The deployed chain of one gate: its calibrated policy (with the kept exits), the signals its stages
    compute, one stage per kept exit and one CAM graph per kept exit (for drawing)."""

    gate: str
    policy: ExitPolicy
    signals: Tuple[str, ...]
    stages: Tuple[ModelFile, ...]
    cams: Tuple[ModelFile, ...]
    checks: Optional[Dict[str, Any]] = None
    drift: Optional[Dict[str, Any]] = None  # the drift guard's reference (edgeexit.runtime.drift), when exported

    @property
    def kept(self) -> Tuple[int, ...]:
        """The exit each stage ends at (the kept internal exits, then the last)."""
        return tuple(s.exit for s in self.stages)

    def cam(self, exit_index: int) -> Optional[ModelFile]:
        return next((c for c in self.cams if c.exit == exit_index), None)

    def files(self) -> Iterator[ModelFile]:
        yield from self.stages
        yield from self.cams


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle: the one representation the runtime uses. ``manifest`` is the parsed
    manifest.json, kept for reports (treat as read-only); everything the runtime needs is typed here."""

    path: Path
    manifest: Dict[str, Any]
    classes: Tuple[str, ...]
    preprocess: Preprocess
    num_exits: int
    pipelines: Dict[str, Pipeline]
    default_gate: str
    monolithic: ModelFile
    segment_macs: Tuple[int, ...]
    head_macs: Tuple[int, ...]
    reference_macs: int
    versions: Dict[str, Any]
    checks: Optional[Dict[str, Any]]
    verified: bool
    calibrated: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return tuple(int(v) for v in self.manifest["input"]["shape"])  # type: ignore[return-value]

    @property
    def input_info(self) -> Dict[str, Any]:
        return dict(self.manifest["input"])

    @property
    def policy(self) -> ExitPolicy:
        """The default gate's policy."""
        return self.pipelines[self.default_gate].policy

    @property
    def gates(self) -> Tuple[str, ...]:
        return tuple(self.pipelines)

    def pipeline(self, gate: Optional[str] = None) -> Pipeline:
        """The pipeline of ``gate`` (default: the bundle's); a one-line BundleError when it was not exported."""
        name = self.default_gate if gate is None else gate
        if name not in self.pipelines:
            gate_spec(name)  # an unknown gate name gets the registry's error
            raise BundleError(f"{self.path}: gate {name!r} is not in this bundle (exported: "
                              f"{', '.join(self.pipelines)}); re-export with --gates {','.join([*self.pipelines, name])}")
        return self.pipelines[name]

    def exit_macs(self, gate: Optional[str] = None) -> Tuple[int, ...]:
        """MACs of leaving at each kept exit of a pipeline (``stages.exit_costs``, no per-call overhead)."""
        policy = self.pipeline(gate).policy
        return tuple(int(round(v)) for v in exit_costs(self.segment_macs, self.head_macs, policy.kept_internal))

    @property
    def has_engines(self) -> bool:
        return all(f.engine is not None for p in self.pipelines.values() for f in p.stages)

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    @property
    def edgeexit_version(self) -> str:
        return str(self.manifest.get("edgeexit_version", ""))

    def files(self) -> Iterator[ModelFile]:
        """Every ONNX graph: each pipeline's stages and CAM graphs, then the monolithic model."""
        for p in self.pipelines.values():
            yield from p.files()
        yield self.monolithic


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
def _inside(root: Path, name: str, field: str) -> Path:
    """``root/name`` after checking it is a regular file that (through symlinks too) stays inside ``root``."""
    path = root / name
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"{root}: {field} {name!r} is missing")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BundleError(f"{root}: {field} {name!r} is a broken link") from None
    if resolved.parent != root.resolve():
        raise BundleError(f"{root}: {field} {name!r} points outside the bundle (to {resolved})")
    if not resolved.is_file():
        raise BundleError(f"{root}: {field} {name!r} is not a regular file")
    return path


def _engine(root: Path, data: Any, field: str, verify: bool) -> Optional[EngineInfo]:
    if data is None:
        return None
    name = check_file_name(data.get("file"), f"{field}.file")
    path = _inside(root, name, f"{field}.file")
    if verify:
        _check_sha(path, data["sha256"], field)
    return EngineInfo(
        file=name, path=path, sha256=str(data["sha256"]), tensorrt_version=str(data["tensorrt_version"]),
        gpu=str(data["gpu"]), precision=str(data["precision"]), min_batch=data.get("min_batch"),
        opt_batch=data.get("opt_batch"), max_batch=data.get("max_batch"),
        io=tuple(TensorSpec.from_dict(t) for t in data.get("io") or ()),
    )


def _check_sha(path: Path, expected: str, field: str, content: Optional[bytes] = None) -> None:
    actual = sha256_file(path) if content is None else hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise BundleError(
            f"{path}: SHA-256 does not match {field}.sha256 in {MANIFEST} "
            f"(file {actual[:12]}..., manifest {str(expected)[:12]}...): corrupted or modified"
        )


def _check_io(path: Path, content: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
              field: str) -> None:
    """The ONNX file's own inputs and outputs (names, dtypes, static shapes) must be those the manifest declares."""
    try:
        real_in, real_out = read_io(path, content)
    except OnnxIOError as exc:
        raise BundleError(f"{path}: {exc}") from None
    for what, declared, real in (("inputs", inputs, real_in), ("outputs", outputs, real_out)):
        want = [(t.name, t.static_shape, t.dtype) for t in declared]
        got = [(name, tuple(shape[1:]), dtype) for name, shape, dtype in real]
        if want != got:
            def show(items: Sequence[Tuple[str, Tuple[Any, ...], str]]) -> str:
                return ", ".join(f"{n}{list(s)} {d}" for n, s, d in items)
            raise BundleError(f"{path}: the file's {what} ({show(got)}) are not those {field} declares in {MANIFEST} "
                              f"({show(want)}): a file from another bundle or export?")


def _model_file(root: Path, data: Mapping[str, Any], kind: str, field: str, verify: bool) -> ModelFile:
    name = check_file_name(data.get("file"), f"{field}.file")
    path = _inside(root, name, f"{field}.file")
    content = path.read_bytes()  # read once: hashed and its inputs/outputs parsed
    if verify:
        _check_sha(path, data["sha256"], field, content)
    inputs = tuple(TensorSpec.from_dict(t) for t in data["inputs"])
    outputs = tuple(TensorSpec.from_dict(t) for t in data["outputs"])
    _check_io(path, content, inputs, outputs, field)
    temperature = data.get("temperature")
    segments = data.get("segments") or (-1, -1)
    cam_shape = data.get("cam_shape") or (0, 0)
    return ModelFile(
        kind=kind, index=int(data.get("index", -1)), file=name, path=path, sha256=str(data["sha256"]),
        inputs=inputs, outputs=outputs, macs=int(data.get("macs", 0)), params=int(data.get("params", 0)),
        engine=_engine(root, data.get("engine"), f"{field}.engine", verify), exit=int(data.get("exit", -1)),
        segments=(int(segments[0]), int(segments[1])), cam_shape=(int(cam_shape[0]), int(cam_shape[1])),
        temperature=None if temperature is None else float(temperature), size=data.get("size"),
    )


def _require(spec: TensorSpec, field: str, rank: int, dtypes: Sequence[str] = ("float32",)) -> None:
    if len(spec.shape) != rank:
        raise BundleError(f"{MANIFEST}: field {field} {spec.name!r} must have {rank} dimensions, got shape {list(spec.shape)}")
    if any(isinstance(d, str) for d in spec.shape[1:]):
        raise BundleError(f"{MANIFEST}: field {field} {spec.name!r} may be dynamic only in its batch axis, got {list(spec.shape)}")
    if spec.dtype not in dtypes:
        raise BundleError(f"{MANIFEST}: field {field} {spec.name!r} must be {' or '.join(dtypes)}, got {spec.dtype}")


def stage_io(gate: str, j: int, num_stages: int) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(input names, output names) of stage j of a pipeline of ``gate``: the stage contract, one home for
    the exporter and the loader."""
    spec = gate_spec(gate)
    last = j == num_stages - 1
    compares = spec.needs_prev_cam
    inputs = ("input" if j == 0 else "features_in",) + (("prev_cam",) if compares and 0 < j and not last else ())
    outputs = ("features", "class", "confidence")
    if not last and spec.signals:
        outputs += ("signals",)
    if compares and j < num_stages - 2:  # the next stage is internal and compares maps
        outputs += ("cam",)
    return inputs, outputs


def _check_pipeline(p: Pipeline, num_exits: int, image: Tuple[int, ...], num_classes: int, field: str) -> None:
    policy = p.policy
    if policy.num_exits != num_exits:
        raise BundleError(f"{MANIFEST}: field {field}.policy has {policy.num_exits} exits, the bundle {num_exits}")
    if policy.gate != p.gate:
        raise BundleError(f"{MANIFEST}: field {field}.policy.gate is {policy.gate!r}, the pipeline is {p.gate!r}")
    want_signals = tuple(gate_spec(p.gate).signals)
    if tuple(p.signals) != want_signals:
        raise BundleError(f"{MANIFEST}: field {field}.signals is {list(p.signals)}, gate {p.gate} reads {list(want_signals)}")
    ranges = stage_ranges(policy.kept_internal, num_exits)
    if p.kept != policy.kept or len(p.stages) != len(ranges):
        raise BundleError(f"{MANIFEST}: field {field}.stages end at exits {list(p.kept)}, the policy keeps {list(policy.kept)}")
    n = len(p.stages)
    prev_features: Tuple[int, ...] = image
    prev_cam: Optional[Tuple[int, int]] = None
    for j, stage in enumerate(p.stages):
        sf = f"{field}.stages[{j}]"
        if stage.index != j or stage.segments != ranges[j]:
            raise BundleError(f"{MANIFEST}: field {sf} must be stage {j} over segments {list(ranges[j])}, "
                              f"got stage {stage.index} over {list(stage.segments)}")
        want_in, want_out = stage_io(p.gate, j, n)
        if stage.input_names != want_in or stage.output_names != want_out:
            raise BundleError(f"{MANIFEST}: field {sf} must take {list(want_in)} and return {list(want_out)}, "
                              f"got {list(stage.input_names)} -> {list(stage.output_names)}")
        first = stage.inputs[0]
        _require(first, f"{sf}.inputs", 4)
        if first.static_shape != tuple(prev_features):
            source = "the input shape" if j == 0 else f"{field}.stages[{j - 1}] 'features'"
            raise BundleError(f"{MANIFEST}: field {sf}.inputs {first.name!r} has shape {list(first.shape)}, "
                              f"inconsistent with {source} {list(prev_features)}")
        _require(stage.output("features"), f"{sf}.outputs", 4)
        _require(stage.output("class"), f"{sf}.outputs", 1, ("int64", "int32"))
        _require(stage.output("confidence"), f"{sf}.outputs", 1)
        if stage.has_output("signals"):
            sig = stage.output("signals")
            _require(sig, f"{sf}.outputs", 2)
            if sig.static_shape != (len(p.signals),):
                raise BundleError(f"{MANIFEST}: field {sf}.outputs 'signals' must have {len(p.signals)} columns "
                                  f"({', '.join(p.signals)}), got shape {list(sig.shape)}")
        if stage.has_input("prev_cam"):
            spec = stage.input("prev_cam")
            _require(spec, f"{sf}.inputs", 3)
            if prev_cam is None or spec.static_shape != prev_cam:
                raise BundleError(f"{MANIFEST}: field {sf}.inputs 'prev_cam' has shape {list(spec.shape)}, the "
                                  f"previous stage returns {list(prev_cam) if prev_cam else 'no cam'}")
        prev_cam = None
        if stage.has_output("cam"):
            cam = stage.output("cam")
            _require(cam, f"{sf}.outputs", 3)
            prev_cam = cam.static_shape  # type: ignore[assignment]
        if stage.temperature is not None and not math.isclose(stage.temperature, policy.temperatures[stage.exit],
                                                              rel_tol=1e-6):
            raise BundleError(f"{MANIFEST}: field {sf}.temperature {stage.temperature} differs from "
                              f"policy.temperatures[{stage.exit}] {policy.temperatures[stage.exit]} (baked into the graph)")
        prev_features = stage.output("features").static_shape
    by_exit = {s.exit: s for s in p.stages}
    for k, cam in enumerate(p.cams):
        cf = f"{field}.cams[{k}]"
        stage = by_exit.get(cam.exit)
        if stage is None:
            raise BundleError(f"{MANIFEST}: field {cf}.exit {cam.exit} is not a kept exit ({list(p.kept)})")
        if cam.input_names != ("features",) or cam.output_names != ("cam",):
            raise BundleError(f"{MANIFEST}: field {cf} must map ['features'] to ['cam'], got "
                              f"{list(cam.input_names)} -> {list(cam.output_names)}")
        if cam.inputs[0].static_shape != stage.output("features").static_shape:
            raise BundleError(f"{MANIFEST}: field {cf}.inputs 'features' has shape {list(cam.inputs[0].shape)}, "
                              f"the stage of exit {cam.exit} returns {list(stage.output('features').shape)}")


def load_bundle(path: Union[str, Path], verify: bool = True) -> Bundle:
    """Load and check a bundle directory.

    Checks: manifest.json parses and matches the schema (schema 2; older bundles are refused with the advice to
    re-export); every file named is a plain file name inside the bundle (no '/', '\\\\', '..', absolute paths,
    links leaving the directory) and exists; with ``verify`` (default) every file's SHA-256 matches; every ONNX
    file's own inputs and outputs are those the manifest declares; each pipeline's stages end at its policy's
    kept exits and every tensor fits its neighbour. Any failure raises a one-line :class:`BundleError`.
    """
    root = Path(path)
    data = read_manifest(root)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        older = isinstance(version, int) and version < SCHEMA_VERSION
        raise BundleError(f"{root / MANIFEST}: schema_version {version!r} is not supported (this edgeexit reads "
                          f"{SCHEMA_VERSION})" + ("; re-export it: edgeexit export CHECKPOINT --out DIR" if older else ""))
    # File names first: a path outside the bundle is named as such even when other fields are odd.
    for gate, pipe in (data.get("pipelines") or {}).items() if isinstance(data.get("pipelines"), dict) else ():
        for group in ("stages", "cams"):
            for i, entry in enumerate((pipe or {}).get(group) or [] if isinstance(pipe, dict) else []):
                if isinstance(entry, dict) and "file" in entry:
                    check_file_name(entry["file"], f"pipelines.{gate}.{group}[{i}].file")
                    if isinstance(entry.get("engine"), dict) and "file" in entry["engine"]:
                        check_file_name(entry["engine"]["file"], f"pipelines.{gate}.{group}[{i}].engine.file")
    mono = data.get("monolithic")
    if isinstance(mono, dict) and "file" in mono:
        check_file_name(mono["file"], "monolithic.file")
    validate_manifest(data)

    inp = data["input"]
    channels = int(inp["shape"][0])
    if inp["channel_order"] != ("RGB" if channels == 3 else "GRAY"):
        raise BundleError(f"{MANIFEST}: field input.channel_order {inp['channel_order']!r} does not fit {channels} channels")
    if int(inp["shape"][1]) != int(inp["crop"]) or int(inp["shape"][2]) != int(inp["crop"]):
        raise BundleError(f"{MANIFEST}: field input.shape {inp['shape']} does not fit crop {inp['crop']}")
    try:
        pre = Preprocess(channels=channels, resize=int(inp["resize"]), crop=int(inp["crop"]),
                         mean=tuple(float(v) for v in inp["mean"]), std=tuple(float(v) for v in inp["std"]))
    except ValueError as exc:
        raise BundleError(f"{MANIFEST}: field input: {exc}") from None
    image = (pre.channels, pre.crop, pre.crop)
    classes = tuple(str(c) for c in data["classes"])
    num_exits = int(data["num_exits"])
    costs = data["costs"]
    seg_macs = tuple(int(v) for v in costs["segment_macs"])
    head_macs = tuple(int(v) for v in costs["head_macs"])
    if len(seg_macs) != num_exits or len(head_macs) != num_exits:
        raise BundleError(f"{MANIFEST}: field costs: {len(seg_macs)} segment and {len(head_macs)} head costs for "
                          f"{num_exits} exits")

    seen: Dict[str, str] = {}

    def unique(name: str, field: str) -> None:
        if name in seen:
            raise BundleError(f"{MANIFEST}: field {field} names {name!r}, already used by {seen[name]}")
        seen[name] = field

    pipelines: Dict[str, Pipeline] = {}
    for gate, entry in data["pipelines"].items():
        field = f"pipelines.{gate}"
        try:
            policy = ExitPolicy.from_dict(entry["policy"])
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"{MANIFEST}: field {field}.policy: {exc}") from None
        stages = tuple(_model_file(root, s, "stage", f"{field}.stages[{j}]", verify) for j, s in enumerate(entry["stages"]))
        cams = tuple(_model_file(root, c, "cam", f"{field}.cams[{k}]", verify) for k, c in enumerate(entry["cams"]))
        for group, files in (("stages", stages), ("cams", cams)):
            for j, f in enumerate(files):
                unique(f.file, f"{field}.{group}[{j}].file")
                if f.engine is not None:
                    unique(f.engine.file, f"{field}.{group}[{j}].engine.file")
        pipe = Pipeline(gate=str(gate), policy=policy, signals=tuple(entry["signals"]), stages=stages, cams=cams,
                        checks=entry.get("checks"), drift=entry.get("drift"))
        _check_pipeline(pipe, num_exits, image, len(classes), field)
        pipelines[str(gate)] = pipe
    default_gate = str(data["default_gate"])
    if default_gate not in pipelines:
        raise BundleError(f"{MANIFEST}: field default_gate {default_gate!r} has no pipeline ({', '.join(pipelines)})")
    monolithic = _model_file(root, data["monolithic"], "monolithic", "monolithic", verify)
    unique(monolithic.file, "monolithic.file")
    if monolithic.input_names != ("input",) or monolithic.inputs[0].static_shape != image:
        raise BundleError(f"{MANIFEST}: field monolithic.inputs must be ['input'] of shape {list(image)}, "
                          f"got {[t.to_dict() for t in monolithic.inputs]}")
    if not monolithic.has_output("logits") or monolithic.output("logits").static_shape != (len(classes),):
        raise BundleError(f"{MANIFEST}: field monolithic.outputs must hold 'logits' with {len(classes)} classes")
    return Bundle(
        path=root, manifest=data, classes=classes, preprocess=pre, num_exits=num_exits, pipelines=pipelines,
        default_gate=default_gate, monolithic=monolithic, segment_macs=seg_macs, head_macs=head_macs,
        reference_macs=int(costs["reference_macs"]), versions=dict(data["versions"]), checks=data.get("checks"),
        verified=bool(verify), calibrated=bool(data.get("calibrated", True)),
    )

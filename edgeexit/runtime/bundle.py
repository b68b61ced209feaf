"""Bundles: the directory ``edgeexit export`` writes and the camera device loads (torch-free).

A bundle holds one ONNX file per segment and per exit head, a monolithic reference model, optional TensorRT
engines and ``manifest.json`` (schema: ``edgeexit/schemas/manifest.schema.json``; see docs/architecture.md,
section "Bundle")::

    from edgeexit.runtime.bundle import load_bundle
    bundle = load_bundle("bundle/")          # schema, file names, SHA-256 and shapes are checked
    bundle.segments[0].path, bundle.heads[2].output("cam").shape, bundle.policy, bundle.preprocess

Every problem with a bundle is a :class:`BundleError` whose message is one line naming the file or field.
Only numpy, jsonschema and the standard library are imported (plus the torch-free ``edgeexit`` core).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..gates import SIGNAL_NAMES
from ..policy import ExitPolicy
from ..preprocess import Preprocess

__all__ = [
    "BundleError",
    "MANIFEST",
    "SCHEMA_VERSION",
    "TensorSpec",
    "EngineInfo",
    "ModelFile",
    "Bundle",
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
SCHEMA_VERSION = 1
FORMAT = "edgeexit-bundle"
HEAD_OUTPUTS = ("logits", "probs", "class", "cam", "signals")
_MAX_MANIFEST_BYTES = 16 << 20


class BundleError(ValueError):
    """A bundle that is missing, malformed, tampered with or inconsistent. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode an ordinary new file gets (mkstemp makes 0600): the existing file's, else 0666 minus the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write_bytes(path: Union[str, Path], data: Union[bytes, Callable[[Any], None]]) -> None:
    """Write ``data`` (bytes, or a callable taking the open binary file) to a temporary file beside ``path``,
    fsync it, then rename it over ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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
    """The manifest JSON Schema shipped in the package (a fresh dict)."""
    return json.loads(_schema_text())


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
    """A segment, an exit head or the monolithic model: its ONNX file, tensors, costs and engine (or None)."""

    kind: str  # "segment", "head" or "monolithic"
    index: int  # exit index (-1 for the monolithic model)
    file: str
    path: Path
    sha256: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    macs: int
    params: int
    engine: Optional[EngineInfo]
    temperature: Optional[float] = None  # heads: the softmax temperature baked into the graph
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

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle. ``manifest`` is the parsed manifest.json (treat as read-only)."""

    path: Path
    manifest: Dict[str, Any]
    classes: Tuple[str, ...]
    preprocess: Preprocess
    segments: Tuple[ModelFile, ...]
    heads: Tuple[ModelFile, ...]
    monolithic: ModelFile
    policy: ExitPolicy
    cumulative_macs: Tuple[int, ...]
    reference_macs: int
    versions: Dict[str, Any]
    signals: Tuple[str, ...]
    checks: Optional[Dict[str, Any]]
    verified: bool

    @property
    def num_exits(self) -> int:
        return len(self.segments)

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
    def cam_shapes(self) -> Tuple[Tuple[int, int], ...]:
        """(h, w) of every exit's CAM."""
        return tuple(tuple(h.output("cam").static_shape) for h in self.heads)  # type: ignore[misc]

    @property
    def cumulative_fraction(self) -> Tuple[float, ...]:
        return tuple(c / self.reference_macs for c in self.cumulative_macs) if self.reference_macs else ()

    @property
    def has_engines(self) -> bool:
        return all(f.engine is not None for f in (*self.segments, *self.heads))

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    @property
    def edgeexit_version(self) -> str:
        return str(self.manifest.get("edgeexit_version", ""))

    def files(self) -> Iterator[ModelFile]:
        """Every model file: segments, heads, then the monolithic model."""
        yield from self.segments
        yield from self.heads
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


def _check_sha(path: Path, expected: str, field: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise BundleError(
            f"{path}: SHA-256 does not match {field}.sha256 in {MANIFEST} "
            f"(file {actual[:12]}..., manifest {str(expected)[:12]}...): corrupted or modified"
        )


def _model_file(root: Path, data: Mapping[str, Any], kind: str, field: str, verify: bool) -> ModelFile:
    name = check_file_name(data.get("file"), f"{field}.file")
    path = _inside(root, name, f"{field}.file")
    if verify:
        _check_sha(path, data["sha256"], field)
    temperature = data.get("temperature")
    return ModelFile(
        kind=kind,
        index=int(data.get("index", -1)),
        file=name,
        path=path,
        sha256=str(data["sha256"]),
        inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        macs=int(data.get("macs", 0)),
        params=int(data.get("params", 0)),
        engine=_engine(root, data.get("engine"), f"{field}.engine", verify),
        temperature=None if temperature is None else float(temperature),
        size=data.get("size"),
    )


def _names(specs: Sequence[TensorSpec]) -> List[str]:
    return [t.name for t in specs]


def _require_static(spec: TensorSpec, field: str, rank: int) -> None:
    if len(spec.shape) != rank:
        raise BundleError(f"{MANIFEST}: {field} {spec.name!r} must have {rank} dimensions, got shape {list(spec.shape)}")
    if any(isinstance(d, str) for d in spec.shape[1:]):
        raise BundleError(f"{MANIFEST}: {field} {spec.name!r} may be dynamic only in its batch axis, got {list(spec.shape)}")


def _check_consistency(seg: Sequence[ModelFile], heads: Sequence[ModelFile], mono: ModelFile, policy: ExitPolicy,
                       pre: Preprocess, classes: Sequence[str], costs: Mapping[str, Any]) -> None:
    e = len(seg)
    if len(heads) != e:
        raise BundleError(f"{MANIFEST}: field heads: {len(heads)} heads for {e} segments (one head per segment)")
    if policy.num_exits != e:
        raise BundleError(f"{MANIFEST}: field policy.temperatures: the policy has {policy.num_exits} exits, the bundle {e}")
    num_classes = len(classes)
    image = (pre.channels, pre.crop, pre.crop)
    for i, s in enumerate(seg):
        field = f"segments[{i}]"
        if s.index != i:
            raise BundleError(f"{MANIFEST}: field {field}.index is {s.index}, expected {i}")
        want = "input" if i == 0 else "features_in"
        if _names(s.inputs) != [want]:
            raise BundleError(f"{MANIFEST}: field {field}.inputs must be [{want!r}], got {_names(s.inputs)}")
        if _names(s.outputs) != ["features"]:
            raise BundleError(f"{MANIFEST}: field {field}.outputs must be ['features'], got {_names(s.outputs)}")
        _require_static(s.inputs[0], f"{field}.inputs", 4)
        _require_static(s.outputs[0], f"{field}.outputs", 4)
        expected_in = image if i == 0 else seg[i - 1].outputs[0].static_shape
        if s.inputs[0].static_shape != tuple(expected_in):
            source = "the input shape" if i == 0 else f"segments[{i - 1}].outputs 'features'"
            raise BundleError(f"{MANIFEST}: field {field}.inputs {want!r} has shape {list(s.inputs[0].shape)}, "
                              f"inconsistent with {source} {list(expected_in)}")
    for i, h in enumerate(heads):
        field = f"heads[{i}]"
        if h.index != i:
            raise BundleError(f"{MANIFEST}: field {field}.index is {h.index}, expected {i}")
        want = ["features"] if i == 0 else ["features", "prev_cam"]
        if sorted(_names(h.inputs)) != sorted(want):
            raise BundleError(f"{MANIFEST}: field {field}.inputs must be {want}, got {_names(h.inputs)}")
        if sorted(_names(h.outputs)) != sorted(HEAD_OUTPUTS):
            raise BundleError(f"{MANIFEST}: field {field}.outputs must be {list(HEAD_OUTPUTS)}, got {_names(h.outputs)}")
        feats = h.input("features")
        _require_static(feats, f"{field}.inputs", 4)
        if feats.static_shape != seg[i].outputs[0].static_shape:
            raise BundleError(f"{MANIFEST}: field {field}.inputs 'features' has shape {list(feats.shape)}, inconsistent "
                              f"with segments[{i}].outputs 'features' {list(seg[i].outputs[0].shape)}")
        for name, rank in (("logits", 2), ("probs", 2), ("signals", 2), ("class", 1), ("cam", 3)):
            _require_static(h.output(name), f"{field}.outputs", rank)
        for name in ("logits", "probs"):
            if h.output(name).static_shape != (num_classes,):
                raise BundleError(f"{MANIFEST}: field {field}.outputs {name!r} has shape {list(h.output(name).shape)}, "
                                  f"but the bundle has {num_classes} classes")
        if h.output("signals").static_shape != (len(SIGNAL_NAMES),):
            raise BundleError(f"{MANIFEST}: field {field}.outputs 'signals' must have {len(SIGNAL_NAMES)} columns, "
                              f"got shape {list(h.output('signals').shape)}")
        if h.output("class").dtype not in ("int64", "int32"):
            raise BundleError(f"{MANIFEST}: field {field}.outputs 'class' must be int64, got {h.output('class').dtype}")
        if i > 0:
            prev = h.input("prev_cam")
            _require_static(prev, f"{field}.inputs", 3)
            if prev.static_shape != heads[i - 1].output("cam").static_shape:
                raise BundleError(f"{MANIFEST}: field {field}.inputs 'prev_cam' has shape {list(prev.shape)}, inconsistent "
                                  f"with heads[{i - 1}].outputs 'cam' {list(heads[i - 1].output('cam').shape)}")
        if h.temperature is not None and not math.isclose(h.temperature, policy.temperatures[i], rel_tol=1e-6):
            raise BundleError(f"{MANIFEST}: field {field}.temperature {h.temperature} differs from "
                              f"policy.temperatures[{i}] {policy.temperatures[i]} (baked into the head graph)")
    if _names(mono.inputs) != ["input"] or mono.inputs[0].static_shape != image:
        raise BundleError(f"{MANIFEST}: field monolithic.inputs must be ['input'] of shape {list(image)}, "
                          f"got {[t.to_dict() for t in mono.inputs]}")
    if "logits" not in _names(mono.outputs) or mono.output("logits").static_shape != (num_classes,):
        raise BundleError(f"{MANIFEST}: field monolithic.outputs must hold 'logits' with {num_classes} classes")
    cumulative = [int(v) for v in costs["cumulative_macs"]]
    if len(cumulative) != e:
        raise BundleError(f"{MANIFEST}: field costs.cumulative_macs has {len(cumulative)} entries for {e} exits")
    if any(b < a for a, b in zip(cumulative, cumulative[1:])):
        raise BundleError(f"{MANIFEST}: field costs.cumulative_macs must not decrease, got {cumulative}")


def load_bundle(path: Union[str, Path], verify: bool = True) -> Bundle:
    """Load and check a bundle directory.

    Checks: manifest.json parses and matches the schema; every file named is a plain file name inside the bundle
    (no '/', '\\\\', '..', absolute paths, links leaving the directory) and exists; with ``verify`` (default) every
    file's SHA-256 matches; the numbers of segments, heads and policy exits agree and every tensor shape fits its
    neighbour (segment i -> segment i+1, segment i -> head i, head i-1 cam -> head i prev_cam).
    Any failure raises a one-line :class:`BundleError`.
    """
    root = Path(path)
    data = read_manifest(root)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{root / MANIFEST}: schema_version {version!r} is not supported (this edgeexit reads {SCHEMA_VERSION})")
    # File names first: a path outside the bundle is named as such even when other fields are odd.
    for group in ("segments", "heads"):
        for i, entry in enumerate(data.get(group) or []):
            if isinstance(entry, dict) and "file" in entry:
                check_file_name(entry["file"], f"{group}[{i}].file")
                if isinstance(entry.get("engine"), dict) and "file" in entry["engine"]:
                    check_file_name(entry["engine"]["file"], f"{group}[{i}].engine.file")
    mono = data.get("monolithic")
    if isinstance(mono, dict) and "file" in mono:
        check_file_name(mono["file"], "monolithic.file")
    validate_manifest(data)

    signals = tuple(data["signals"])
    if signals != SIGNAL_NAMES:
        raise BundleError(f"{MANIFEST}: field signals is {list(signals)}, this edgeexit computes {list(SIGNAL_NAMES)}")
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
    try:
        policy = ExitPolicy.from_dict(data["policy"])
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{MANIFEST}: field policy: {exc}") from None

    seen: Dict[str, str] = {}

    def unique(name: str, field: str) -> None:
        if name in seen:
            raise BundleError(f"{MANIFEST}: field {field} names {name!r}, already used by {seen[name]}")
        seen[name] = field

    segments = []
    for i, entry in enumerate(data["segments"]):
        segments.append(_model_file(root, entry, "segment", f"segments[{i}]", verify))
    heads = []
    for i, entry in enumerate(data["heads"]):
        heads.append(_model_file(root, entry, "head", f"heads[{i}]", verify))
    monolithic = _model_file(root, data["monolithic"], "monolithic", "monolithic", verify)
    for group, files in (("segments", segments), ("heads", heads)):
        for i, f in enumerate(files):
            unique(f.file, f"{group}[{i}].file")
            if f.engine is not None:
                unique(f.engine.file, f"{group}[{i}].engine.file")
    unique(monolithic.file, "monolithic.file")
    if monolithic.engine is not None:
        unique(monolithic.engine.file, "monolithic.engine.file")

    classes = tuple(str(c) for c in data["classes"])
    _check_consistency(segments, heads, monolithic, policy, pre, classes, data["costs"])
    costs = data["costs"]
    cumulative = tuple(int(v) for v in costs["cumulative_macs"])
    reference = int(costs.get("reference_macs", sum(s.macs for s in segments) + heads[-1].macs))
    return Bundle(
        path=root,
        manifest=data,
        classes=classes,
        preprocess=pre,
        segments=tuple(segments),
        heads=tuple(heads),
        monolithic=monolithic,
        policy=policy,
        cumulative_macs=cumulative,
        reference_macs=reference,
        versions=dict(data["versions"]),
        signals=signals,
        checks=data.get("checks"),
        verified=bool(verify),
    )

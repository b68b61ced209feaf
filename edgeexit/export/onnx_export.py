"""``edgeexit export``: a multi-exit model -> a bundle of per-segment and per-exit ONNX files with a manifest.

The bundle is written into a temporary sibling directory and renamed into place only when every file is
written, checked and hashed, so an interrupted export never leaves something ``load_bundle`` accepts at the
target path. Checks (on by default): ``onnx.checker`` on every file, then ONNX Runtime against torch on sample
inputs (held-out validation images when the checkpoint knows its data, else random tensors):

- per file, fed torch's own inputs: head logits / probs / cam / signals and full-model logits within 1e-4
  absolute (logits and CAMs larger than 100 in magnitude: 1e-6 relative), segment features within 1e-4 of their
  largest magnitude;
- chained like the device runs it (ONNX Runtime outputs feed the next file): the exit each sample takes under the
  policy and its class equal the torch model's (torch logits and CAMs -> ``gates.exit_signals`` ->
  ``ExitPolicy.decide``), except samples whose gate score lies within the tolerance of a threshold.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..gates import SIGNAL_NAMES, exit_signals, patience_counts, softmax
from ..policy import ExitPolicy
from ..preprocess import Preprocess
from ..runtime.bundle import (
    MANIFEST, SCHEMA_VERSION, BundleError, is_bundle_dir, json_ready, sha256_file, validate_manifest, write_manifest,
)
from .head_graph import HEAD_OUTPUTS, FullGraph, HeadGraph

__all__ = ["export_bundle", "ExportError", "ExportCheckError", "TOLERANCE", "DEFAULT_SAMPLES", "MIN_OPSET",
           "check_bundle_parity", "validation_inputs"]

TOLERANCE = 1e-4
DEFAULT_SAMPLES = 64
MIN_OPSET = 17
DEFAULT_THRESHOLD = 0.9
_EXAMPLE_BATCH = 2
_ABS_UP_TO = 100.0  # logits and CAMs: absolute tolerance while |values| <= 100, relative beyond
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


class ExportError(ValueError):
    """An export that cannot be done as asked (target exists, model and policy disagree, ...). One line."""


class ExportCheckError(ExportError):
    """An exported file whose ONNX Runtime outputs differ from torch's (names the file, tensor and error)."""


# ----------------------------------------------------------------------------------------------------------------
# inputs: model, classes, preprocessing, policy
# ----------------------------------------------------------------------------------------------------------------
def _resolve_model(source: Any) -> Tuple[nn.Module, Dict[str, Any], str]:
    from ..models import MultiExitNet

    if isinstance(source, (str, os.PathLike)):
        from ..checkpoint import load_model

        model, ckpt = load_model(source)
        return model, ckpt, str(source)
    if isinstance(source, MultiExitNet):
        return source, {}, f"{type(source).__name__} ({source.config.get('arch', 'model')})"
    raise ExportError(f"export needs a checkpoint path or a MultiExitNet, got {type(source).__name__}")


def _resolve_policy(policy: Any, ckpt: Mapping[str, Any], num_exits: int, origin: str,
                    log: Callable[[str], None]) -> Tuple[ExitPolicy, bool]:
    calibrated = True
    if policy is None and ckpt.get("policy") is not None:
        policy = ckpt["policy"]
    if policy is None:
        calibrated = False
        log(f"not calibrated: {origin} has no exit policy; the bundle gets the default max_prob >= {DEFAULT_THRESHOLD} "
            f"policy at every internal exit (run `edgeexit calibrate` and export again for a tuned one)")
        return ExitPolicy.default(num_exits, "max_prob", DEFAULT_THRESHOLD), calibrated
    try:
        pol = policy if isinstance(policy, ExitPolicy) else ExitPolicy.from_dict(policy)
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"invalid exit policy in {origin}: {exc}") from None
    if pol.num_exits != num_exits:
        raise ExportError(f"the exit policy has {pol.num_exits} exits but the model has {num_exits}")
    return pol, calibrated


def _gate_policies(ckpt: Mapping[str, Any], chosen: ExitPolicy) -> Dict[str, Any]:
    """Every calibrated gate's policy (same temperatures as the chosen one), so `edgeexit run --gate G` uses G's
    calibrated thresholds without re-exporting."""
    out: Dict[str, Any] = {}
    for name, entry in ((ckpt.get("calibration") or {}).get("gates") or {}).items():
        policy = entry.get("policy") if isinstance(entry, Mapping) else None
        if policy is None:
            continue
        pol = ExitPolicy.from_dict(policy)
        if pol.num_exits == chosen.num_exits and list(pol.temperatures) == list(chosen.temperatures):
            out[name] = pol.to_dict()
    return out


def _prepare_target(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it, or choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory: refusing to replace it")
    if not is_bundle_dir(out) and any(out.iterdir()):
        raise ExportError(f"{out} is a non-empty directory without {MANIFEST} (not a bundle): refusing to replace it")


# ----------------------------------------------------------------------------------------------------------------
# ONNX files
# ----------------------------------------------------------------------------------------------------------------
def _export_onnx(module: nn.Module, args: Tuple[torch.Tensor, ...], path: Path, input_names: Sequence[str],
                 output_names: Sequence[str], opset: int) -> None:
    """Legacy (TorchScript) exporter: dynamic batch axis on every input and output, constant folding on."""
    import onnx

    axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    with torch.no_grad():
        result = module(*args)
    result = result if isinstance(result, (tuple, list)) else (result,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True, export_params=True, dynamo=False,
        )
    # The exporter's symbolic shape inference sometimes leaves static axes symbolic (a reshape after a gather):
    # write the shapes torch produced, with only the batch axis dynamic.
    model = onnx.load(str(path))
    changed = False
    for value, tensor in zip(model.graph.output, result):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != tensor.dim():
            raise ExportError(f"{path.name}: output {value.name!r} has rank {len(dims)} in ONNX, {tensor.dim()} in torch")
        for axis in range(1, tensor.dim()):
            if dims[axis].dim_param or dims[axis].dim_value != tensor.shape[axis]:
                dims[axis].dim_value = int(tensor.shape[axis])  # clears dim_param (oneof)
                changed = True
    if changed:
        onnx.save(model, str(path))


def _onnx_io(path: Path) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``onnx.checker`` (full check, with shape inference), then the graph's inputs and outputs as tensor specs."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several types
        raise ExportCheckError(f"{path.name}: onnx.checker rejected the file: {str(exc).splitlines()[0][:200]}") from None
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def spec(value) -> Dict[str, Any]:
        t = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": value.name, "shape": shape, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))}

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def _file_entry(path: Path, io: Tuple[list, list], macs: int, params: int, index: Optional[int] = None,
                **extra: Any) -> Dict[str, Any]:
    entry: Dict[str, Any] = {} if index is None else {"index": index}
    entry.update({
        "file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size,
        "inputs": io[0], "outputs": io[1], "macs": int(macs), "params": int(params), "engine": None,
    })
    entry.update(extra)
    return entry


# ----------------------------------------------------------------------------------------------------------------
# sample inputs for the checks
# ----------------------------------------------------------------------------------------------------------------
def validation_inputs(ckpt: Mapping[str, Any], preprocess: Preprocess, classes: Sequence[str], n: int,
                      log: Callable[[str], None]) -> Tuple[np.ndarray, str]:
    """Up to ``n`` preprocessed held-out validation images of a checkpoint (its ``split`` re-derived with
    ``data.load_split``), evenly spread over the split; random normal inputs when the data is not at hand.
    Returns (float32 NCHW array, "validation" | "random")."""
    split = ckpt.get("split") if isinstance(ckpt, Mapping) else None
    if split and split.get("data"):
        from ..data import decode_images, load_split

        try:
            folder, _, val_idx = load_split(split["data"], float(split["val_fraction"]), int(split["seed"]), classes)
            if len(val_idx):
                pick = val_idx[np.unique(np.linspace(0, len(val_idx) - 1, min(n, len(val_idx))).round().astype(int))]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    images = decode_images([folder.paths[i] for i in pick], [folder.labels[i] for i in pick],
                                           preprocess, square=False)
                if len(images):
                    return preprocess.normalize(images.images), "validation"
            log(f"check inputs: the validation split of {split['data']} is empty; using random inputs")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log(f"check inputs: cannot read the validation split ({str(exc).splitlines()[0][:120]}); using random inputs")
    gen = torch.Generator().manual_seed(0)
    return torch.randn((n, *preprocess.input_shape), generator=gen).numpy(), "random"


# ----------------------------------------------------------------------------------------------------------------
# parity checks
# ----------------------------------------------------------------------------------------------------------------
def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))


def _scaled_tol(ref: np.ndarray, tol: float, scale: float = 1.0) -> float:
    """``tol`` absolute while the largest magnitude of ``ref`` is at most ``scale``; beyond that, relative to it
    (float32 rounding grows with the values)."""
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    return tol * max(1.0, peak / scale)


def _fail(file: str, tensor: str, err: float, tol: float, what: str = "differs from torch") -> None:
    raise ExportCheckError(f"{file}: output {tensor!r} {what} by {err:.3g} (max abs; tolerance {tol:.3g})")


def _near_tie(logits: np.ndarray, tol: float) -> np.ndarray:
    """Samples whose two largest logits are within ``tol`` (argmax may legitimately differ)."""
    if logits.shape[1] < 2:
        return np.zeros(logits.shape[0], dtype=bool)
    top2 = -np.partition(-np.asarray(logits, np.float64), 1, axis=1)[:, :2]
    return (top2[:, 0] - top2[:, 1]) <= tol * np.maximum(1.0, np.abs(top2[:, 0]))


def _gate_tolerance(policy: ExitPolicy, i: int, tol: float) -> float:
    """How far the oriented gate score can move when every signal moves by ``tol``."""
    if policy.gate in SIGNAL_NAMES:
        return tol
    if policy.gate == "patience":
        return 0.0
    params = policy.learned[i]  # logistic: |d sigmoid| <= 1/4 |sum w_j / std_j dx_j|
    n = len(SIGNAL_NAMES)
    lips = sum(abs(float(w)) / max(abs(float(s)), 1e-12) for w, s in zip(params["weights"][:n], params["std"][:n]))
    return 0.25 * lips * tol


def check_bundle_parity(model: nn.Module, bundle_dir: Path, files: Mapping[str, Any], policy: ExitPolicy,
                        x: np.ndarray, tol: float = TOLERANCE) -> Dict[str, Any]:
    """Compare every ONNX file of ``bundle_dir`` with the torch model on the preprocessed inputs ``x`` (N,C,H,W).

    ``files``: {"segments": [names], "heads": [names], "monolithic": name}. Returns the parity figures; raises
    ExportCheckError naming the file and tensor when an error exceeds the tolerance or a decision differs.
    """
    e = model.num_exits
    temps = policy.temperatures
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        feats = [f.numpy() for f in model.forward_intermediates(xt)]
        outs = [model.heads[i].forward_cam(torch.from_numpy(feats[i])) for i in range(e)]
    t_logits = [o.logits.numpy() for o in outs]
    t_cams = [o.cam.numpy() for o in outs]
    t_classes = [lg.argmax(1) for lg in t_logits]
    t_signals = [exit_signals(t_logits[i], t_cams[i], t_cams[i - 1] if i else None, temps[i]) for i in range(e)]

    worst: Dict[str, float] = {k: 0.0 for k in ("features", "logits", "probs", "cam", "signals", "full_logits")}
    per_file: Dict[str, Dict[str, float]] = {}
    ties = 0

    def record(file: str, kind: str, err: float, limit: float, key: Optional[str] = None) -> None:
        per_file.setdefault(file, {})[kind] = err
        key = key or kind
        worst[key] = max(worst[key], err)
        if not err <= limit:  # nan fails too
            _fail(file, kind, err, limit)

    # -- every file on torch's own inputs ------------------------------------------------------------------------
    seg_sessions = [_session(bundle_dir / n) for n in files["segments"]]
    head_sessions = [_session(bundle_dir / n) for n in files["heads"]]
    for i, name in enumerate(files["segments"]):
        sess = seg_sessions[i]
        inp = x.astype(np.float32) if i == 0 else feats[i - 1]
        (got,) = sess.run(["features"], {"input" if i == 0 else "features_in": inp})
        record(name, "features", _max_err(got, feats[i]), _scaled_tol(feats[i], tol))
    for i, name in enumerate(files["heads"]):
        sess = head_sessions[i]
        feed = {"features": feats[i]}
        if i > 0:
            feed["prev_cam"] = t_cams[i - 1]
        logits, probs, cls, cam, sig = sess.run(list(HEAD_OUTPUTS), feed)
        record(name, "logits", _max_err(logits, t_logits[i]), _scaled_tol(t_logits[i], tol, _ABS_UP_TO))
        record(name, "probs", _max_err(probs, softmax(t_logits[i], temps[i])), tol)
        same = cls.astype(np.int64) == t_classes[i]
        tie = _near_tie(t_logits[i], tol)
        if np.any(~same & ~tie):
            b = int(np.flatnonzero(~same & ~tie)[0])
            raise ExportCheckError(f"{name}: output 'class' differs from torch on sample {b} "
                                   f"({int(cls[b])} vs {int(t_classes[i][b])}, not a near tie)")
        ties += int(np.sum(~same))
        record(name, "cam", _max_err(cam[same], t_cams[i][same]), _scaled_tol(t_cams[i][same], tol, _ABS_UP_TO))
        record(name, "signals", _max_err(sig[same], t_signals[i][same]), tol)
    full = files["monolithic"]
    sess = _session(bundle_dir / full)
    (got,) = sess.run(["logits"], {"input": x.astype(np.float32)})
    record(full, "logits", _max_err(got, t_logits[-1]), _scaled_tol(t_logits[-1], tol, _ABS_UP_TO), key="full_logits")
    (one,) = sess.run(["logits"], {"input": x[:1].astype(np.float32)})  # batch 1 through the dynamic axis
    record(full, "logits_batch1", _max_err(one, t_logits[-1][:1]), _scaled_tol(t_logits[-1], tol, _ABS_UP_TO),
           key="full_logits")

    # -- chained, as the device runs it --------------------------------------------------------------------------
    o_classes, o_signals = [], []
    f = x.astype(np.float32)
    prev = None
    for i in range(e):
        (f,) = seg_sessions[i].run(["features"], {("input" if i == 0 else "features_in"): f})
        feed = {"features": f}
        if i > 0:
            feed["prev_cam"] = prev
        cls, cam, sig = head_sessions[i].run(["class", "cam", "signals"], feed)
        o_classes.append(cls.astype(np.int64))
        o_signals.append(sig)
        prev = cam
    t_cls = np.stack(t_classes, 1)
    o_cls = np.stack(o_classes, 1)
    t_sig = np.stack(t_signals, 1)
    o_sig = np.stack(o_signals, 1)
    t_exit = policy.decide(t_sig, t_cls)
    o_exit = policy.decide(o_sig, o_cls)
    rows = np.arange(len(x))
    # a sample is ambiguous when, at an exit it reaches, its torch gate score is within tolerance of the
    # threshold or its torch class is a near tie
    t_pat = patience_counts(t_cls)
    reach = np.maximum(t_exit, o_exit)
    ambiguous = np.zeros(len(x), dtype=bool)
    for i in range(e):
        reached = reach >= i
        ambiguous |= reached & _near_tie(t_logits[i], tol)
        if i < e - 1 and math.isfinite(policy.thresholds[i]):
            score = policy.oriented_score(i, t_sig[:, i, :], t_pat[:, i])
            ambiguous |= reached & (np.abs(score - policy.thresholds[i]) <= _gate_tolerance(policy, i, tol))
    differ = (t_exit != o_exit) | (t_cls[rows, t_exit] != o_cls[rows, o_exit])
    bad = differ & ~ambiguous
    if np.any(bad):
        b = int(np.flatnonzero(bad)[0])
        first = int(min(t_exit[b], o_exit[b]))
        raise ExportCheckError(
            f"{files['heads'][first]}: chained decision differs from torch on sample {b}: torch leaves at exit "
            f"{int(t_exit[b])} with class {int(t_cls[b, t_exit[b]])}, the bundle at exit {int(o_exit[b])} with class "
            f"{int(o_cls[b, o_exit[b]])} (max abs signal error along the chain {_max_err(o_sig, t_sig):.3g})")
    return {
        "tolerance": tol,
        "max_abs_error": worst,
        "per_file": per_file,
        "chain_signals_max_abs_error": _max_err(o_sig, t_sig),
        "decisions": {
            "compared": int(len(x)),
            "equal": int(np.sum(~differ)),
            "near_threshold": int(np.sum(ambiguous)),
            "class_near_ties": ties,
            "exit_histogram": np.bincount(t_exit, minlength=e).astype(int).tolist(),
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for p in root.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished temporary bundle into place (replacing an existing bundle only when ``force``)."""
    if out.exists() or out.is_symlink():
        _prepare_target(out, force)
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _fmt(v: float) -> str:
    return f"{v:.1e}"


def export_bundle(
    checkpoint_path_or_model: Union[str, os.PathLike, nn.Module],
    out_dir: Union[str, os.PathLike],
    *,
    force: bool = False,
    opset: int = 17,
    samples: Optional[int] = None,
    policy: Union[ExitPolicy, Mapping[str, Any], None] = None,
    check: bool = True,
    log: Callable[[str], None] = print,
    classes: Optional[Sequence[str]] = None,
    preprocess: Optional[Preprocess] = None,
) -> Path:
    """Export a checkpoint (path) or a ``MultiExitNet`` to a bundle directory ``out_dir``; returns its path.

    Writes ``segment_i.onnx``, ``head_i.onnx`` (temperatures of the policy baked in), ``full.onnx`` and
    ``manifest.json`` (see docs/architecture.md, "Bundle"). ``policy``: an ExitPolicy or its dict; default: the
    checkpoint's calibrated policy, else an uncalibrated ``max_prob`` policy (with a "not calibrated: ..." line).
    ``classes`` / ``preprocess`` are used for a bare model (a checkpoint brings its own).
    ``samples``: number of check inputs (default 64). ``check=False`` skips the checks (manifest ``checks`` null).
    Raises FileExistsError (target exists, no ``force``), ExportError, ExportCheckError, CheckpointError.
    """
    import onnx

    if int(opset) < MIN_OPSET:
        raise ExportError(f"opset must be >= {MIN_OPSET}, got {opset}")
    opset = int(opset)
    n_samples = DEFAULT_SAMPLES if samples is None else int(samples)
    if check and n_samples < 1:
        raise ExportError(f"samples must be >= 1, got {samples}")
    out = Path(out_dir)
    _prepare_target(out, force)  # fail fast, before the work

    source, ckpt, origin = _resolve_model(checkpoint_path_or_model)
    model = copy.deepcopy(source).float().to("cpu", memory_format=torch.contiguous_format).eval()
    e = model.num_exits
    num_classes = int(model.heads[-1].fc.out_features)
    class_names = list(ckpt.get("classes") or classes or [f"class_{i}" for i in range(num_classes)])
    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names for a model with {num_classes} classes")
    if ckpt.get("preprocess"):
        pre = Preprocess.from_dict(ckpt["preprocess"])
    elif preprocess is not None:
        pre = preprocess
    else:
        c, s, _ = model.input_shape
        pre = Preprocess(channels=c, resize=s, crop=s, mean=(0.5,) * c, std=(0.5,) * c)
    if tuple(pre.input_shape) != tuple(model.input_shape):
        raise ExportError(f"preprocessing gives {pre.input_shape} inputs but the model takes {model.input_shape}")
    pol, calibrated = _resolve_policy(policy, ckpt, e, origin, log)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        costs = model.costs()
        example = torch.zeros((_EXAMPLE_BATCH, *model.input_shape))
        with torch.no_grad():
            feats = model.forward_intermediates(example)
            cams = [model.heads[i].forward_cam(feats[i]).cam for i in range(e)]
        cam_hw = [tuple(int(v) for v in c.shape[1:]) for c in cams]

        seg_entries, head_entries = [], []
        for i in range(e):
            path = tmp / f"segment_{i}.onnx"
            names = ["input" if i == 0 else "features_in"]
            _export_onnx(model.segments[i], (example if i == 0 else feats[i - 1],), path, names, ["features"], opset)
            seg_entries.append(_file_entry(path, _onnx_io(path), costs.segment_macs[i], costs.segment_params[i], i))
        for i in range(e):
            path = tmp / f"head_{i}.onnx"
            graph = HeadGraph(model.heads[i], cam_hw[i], cam_hw[i - 1] if i else None, pol.temperatures[i]).eval()
            args = (feats[i],) if i == 0 else (feats[i], cams[i - 1])
            names = ["features"] if i == 0 else ["features", "prev_cam"]
            _export_onnx(graph, args, path, names, list(HEAD_OUTPUTS), opset)
            head_entries.append(_file_entry(path, _onnx_io(path), costs.head_macs[i], costs.head_params[i], i,
                                            temperature=float(pol.temperatures[i]), cam_shape=list(cam_hw[i])))
        full_path = tmp / "full.onnx"
        _export_onnx(FullGraph(model.segments, model.heads[-1]).eval(), (example,), full_path, ["input"], ["logits"], opset)
        mono_entry = _file_entry(full_path, _onnx_io(full_path), costs.reference_macs,
                                 sum(costs.segment_params) + costs.head_params[-1])

        checks = None
        ort_version = None
        if check:
            import onnxruntime

            ort_version = onnxruntime.__version__
            x, source_kind = validation_inputs(ckpt, pre, class_names, n_samples, log)
            files = {"segments": [s["file"] for s in seg_entries], "heads": [h["file"] for h in head_entries],
                     "monolithic": mono_entry["file"]}
            checks = check_bundle_parity(model, tmp, files, pol, x)
            checks = {"samples": int(len(x)), "inputs": source_kind, "runtime": f"onnxruntime {ort_version} CPU", **checks}
            # the figures go into the manifest's "checks"; `edgeexit export` prints them once, under its table

        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": "edgeexit-bundle",
            "edgeexit_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "classes": class_names,
            "input": {
                "shape": list(pre.input_shape), "channel_order": "RGB" if pre.channels == 3 else "GRAY",
                "color_space": "sRGB", "resize": pre.resize, "crop": pre.crop, "mean": list(pre.mean),
                "std": list(pre.std), "layout": "NCHW", "dtype": "float32",
                "transform": "shorter side -> resize (bilinear), centre crop, x = (pixel / 255 - mean) / std",
            },
            "signals": list(SIGNAL_NAMES),
            "segments": seg_entries,
            "heads": head_entries,
            "monolithic": mono_entry,
            "policy": pol.to_dict(),
            "gate_policies": _gate_policies(ckpt, pol) if calibrated else {},
            "calibrated": calibrated,
            "costs": {
                "unit": "MACs", "cumulative_macs": list(costs.cumulative_macs), "reference_macs": costs.reference_macs,
                "segment_macs": list(costs.segment_macs), "head_macs": list(costs.head_macs),
            },
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": opset, "edgeexit": __version__,
                         "onnxruntime": ort_version},
            "model": json_ready(model.config),
            "checks": checks,
        }
        try:
            validate_manifest(json_ready(manifest))
        except BundleError as exc:  # a bug here, not the user's
            raise ExportError(f"the manifest does not match its schema: {exc}") from None
        write_manifest(tmp, manifest)
        _fsync_tree(tmp)
        _commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"bundle {out} written: {2 * e + 1} ONNX files, {e} exits, opset {opset}")
    return out

"""``edgeexit export``: a multi-exit model -> a bundle of stage graphs (one per kept exit, per exported gate), CAM
graphs, the monolithic ``full.onnx`` and a manifest.

The bundle is written into a temporary sibling directory and renamed into place only when every file is
written, checked and hashed, so an interrupted export never leaves something ``load_bundle`` accepts at the
target path. Checks (on by default): ``onnx.checker`` on every file, then ONNX Runtime against torch on sample
inputs (held-out validation images when the checkpoint knows its data, else random tensors):

- per file, fed torch's own inputs: stage features, class, confidence, gate signals and CAM, CAM graphs and
  full-model logits within 1e-4 absolute (logits and CAMs larger than 100 in magnitude: 1e-6 relative);
- the runtime itself (``StageRunner`` on ONNX Runtime, batch 1 and batch 32): the exit each sample takes and its
  class equal the torch model's under the policy (torch logits and CAMs -> ``gates.exit_signals`` against the
  previous kept exit -> ``ExitPolicy.decide``), except samples within the tolerance of a threshold or a tie.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import EdgeexitError
from ..gates import SIGNAL_NAMES, exit_signals, gate_spec, patience_counts, softmax
from ..policy import ExitPolicy
from ..preprocess import Preprocess
from ..runtime.bundle import (
    MANIFEST, SCHEMA_VERSION, BundleError, is_bundle_dir, json_ready, sha256_file, stage_io, validate_manifest,
    write_manifest,
)
from ..stages import stage_ranges
from .head_graph import FullGraph
from .stage_graph import CamGraph, StageGraph
from .replace import commit_dir, remove_stale, temp_dir_for

__all__ = ["export_bundle", "ExportError", "ExportCheckError", "TOLERANCE", "DEFAULT_SAMPLES", "MIN_OPSET",
           "check_pipeline_parity", "check_monolithic", "torch_reference", "validation_inputs"]

TOLERANCE = 1e-4
DEFAULT_SAMPLES = 64
MIN_OPSET = 17
DEFAULT_THRESHOLD = 0.9
_EXAMPLE_BATCH = 2
_ABS_UP_TO = 100.0  # logits and CAMs: absolute tolerance while |values| <= 100, relative beyond
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


class ExportError(EdgeexitError, ValueError):
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
    if gate_spec(policy.gate).family == "combined":  # a product of signals in [0, 1]: each factor moves by tol
        return len(gate_spec(policy.gate).signals) * tol
    params = policy.learned[i]  # logistic: |d sigmoid| <= 1/4 |sum w_j / std_j dx_j|
    n = len(SIGNAL_NAMES)
    lips = sum(abs(float(w)) / max(abs(float(s)), 1e-12) for w, s in zip(params["weights"][:n], params["std"][:n]))
    return 0.25 * lips * tol


def torch_reference(model: nn.Module, x: np.ndarray, policy: ExitPolicy) -> Dict[str, Any]:
    """What the torch model says for a pipeline: per exit its features, logits, CAM and class; per kept exit the
    7 signals against the previous *kept* exit's CAM (``gates.exit_signals``); and the exit and class each
    sample takes under ``policy`` (``ExitPolicy.decide``)."""
    e = model.num_exits
    temps = policy.temperatures
    with torch.no_grad():
        feats = [f for f in model.forward_intermediates(torch.from_numpy(np.ascontiguousarray(x, np.float32)))]
        outs = [model.heads[i].forward_cam(feats[i]) for i in range(e)]
    logits = [o.logits.numpy() for o in outs]
    cams = [o.cam.numpy() for o in outs]
    classes = np.stack([lg.argmax(1) for lg in logits], 1)
    signals = np.zeros((len(x), e, len(SIGNAL_NAMES)), dtype=np.float32)
    prev = None
    for k in policy.kept:
        signals[:, k] = exit_signals(logits[k], cams[k], None if prev is None else cams[prev], temps[k])
        prev = k
    exits = policy.decide(signals, classes)
    return {"features": [f.numpy() for f in feats], "logits": logits, "cams": cams, "classes": classes,
            "signals": signals, "exits": exits, "labels": classes[np.arange(len(x)), exits]}


def _ambiguous(ref: Mapping[str, Any], policy: ExitPolicy, reach: np.ndarray, tol: float) -> np.ndarray:
    """Samples whose decision may legitimately differ: at an exit they reach, a near-tie class or a gate score
    within the float tolerance of its threshold."""
    kept = list(policy.kept)
    pat = np.zeros(ref["classes"].shape, dtype=np.int64)
    pat[:, kept] = patience_counts(ref["classes"][:, kept])
    out = np.zeros(reach.shape[0], dtype=bool)
    for k in kept:
        reached = reach >= k
        out |= reached & _near_tie(ref["logits"][k], tol)
        if k < policy.num_exits - 1 and math.isfinite(policy.thresholds[k]):
            score = policy.oriented_score(k, ref["signals"][:, k, :], pat[:, k])
            out |= reached & (np.abs(score - policy.thresholds[k]) <= _gate_tolerance(policy, k, tol))
    return out


def check_pipeline_parity(model: nn.Module, bundle_dir: Path, gate: str, x: np.ndarray,
                          tol: float = TOLERANCE) -> Dict[str, Any]:
    """Check one exported pipeline against torch on the preprocessed inputs ``x`` (N, C, H, W).

    1. every stage and CAM graph, fed torch's own inputs: features, class, confidence, signals and CAM within
       the tolerance (classes may differ only on near ties);
    2. the runtime itself (``StageRunner`` on ONNX Runtime CPU), at batch 1 and batch 32: the exit and class of
       every sample equal torch's, except samples near a threshold or a class tie.
    Raises ExportCheckError naming the file and tensor; returns the figures for the manifest.
    """
    from ..runtime.backends import open_backend
    from ..runtime.bundle import load_bundle
    from ..runtime.chain import StageRunner

    bundle = load_bundle(bundle_dir)
    pipe = bundle.pipeline(gate)
    policy = pipe.policy
    ref = torch_reference(model, x, policy)
    worst: Dict[str, float] = {}
    per_file: Dict[str, Dict[str, float]] = {}

    def record(file: str, kind: str, err: float, limit: float) -> None:
        per_file.setdefault(file, {})[kind] = err
        worst[kind] = max(worst.get(kind, 0.0), err)
        if not err <= limit:  # nan fails too
            _fail(file, kind, err, limit)

    prev_k: Optional[int] = None
    for stage in pipe.stages:
        k, a = stage.exit, stage.segments[0]
        feed = {stage.input_names[0]: x.astype(np.float32) if a == 0 else ref["features"][a - 1]}
        if stage.has_input("prev_cam"):
            feed["prev_cam"] = ref["cams"][prev_k]
        got = dict(zip(stage.output_names, _session(stage.path).run(list(stage.output_names), feed)))
        record(stage.file, "features", _max_err(got["features"], ref["features"][k]), _scaled_tol(ref["features"][k], tol))
        t_cls = ref["classes"][:, k]
        same = got["class"].astype(np.int64) == t_cls
        tie = _near_tie(ref["logits"][k], tol)
        if np.any(~same & ~tie):
            b = int(np.flatnonzero(~same & ~tie)[0])
            raise ExportCheckError(f"{stage.file}: output 'class' differs from torch on sample {b} "
                                   f"({int(got['class'][b])} vs {int(t_cls[b])}, not a near tie)")
        conf = softmax(ref["logits"][k], policy.temperatures[k]).max(axis=1)
        record(stage.file, "confidence", _max_err(got["confidence"], conf), tol)
        if "signals" in got:
            cols = [SIGNAL_NAMES.index(n) for n in pipe.signals]
            record(stage.file, "signals", _max_err(got["signals"][same], ref["signals"][same][:, k][:, cols]), tol)
        if "cam" in got:
            record(stage.file, "cam", _max_err(got["cam"][same], ref["cams"][k][same]),
                   _scaled_tol(ref["cams"][k][same], tol, _ABS_UP_TO))
        prev_k = k
    for cam_file in pipe.cams:
        k = cam_file.exit
        (cam,) = _session(cam_file.path).run(["cam"], {"features": ref["features"][k]})
        same = cam.shape[0] == len(x)
        record(cam_file.file, "cam", _max_err(cam, ref["cams"][k]) if same else math.inf,
               _scaled_tol(ref["cams"][k], tol, _ABS_UP_TO))

    decisions: Dict[str, Any] = {}
    for batch in (1, 32):
        backend = open_backend(bundle, "onnxruntime", providers="cpu", threads=1, max_batch=batch, gate=gate)
        try:
            runner = StageRunner(bundle, backend, gate=gate)
            got = runner.run_batch(x.astype(np.float32), batch_size=batch)
        finally:
            backend.close()
        o_exit = np.asarray([d.exit for d in got])
        o_cls = np.asarray([d.class_id for d in got])
        differ = (o_exit != ref["exits"]) | (o_cls != ref["labels"])
        ambiguous = _ambiguous(ref, policy, np.maximum(o_exit, ref["exits"]), tol)
        bad = differ & ~ambiguous
        if np.any(bad):
            b = int(np.flatnonzero(bad)[0])
            raise ExportCheckError(
                f"{pipe.stages[0].file}: at batch {batch} the runtime's decision differs from torch on sample {b}: torch "
                f"leaves at exit {int(ref['exits'][b])} with class {int(ref['labels'][b])}, the runtime at exit "
                f"{int(o_exit[b])} with class {int(o_cls[b])}")
        decisions[f"batch{batch}"] = {"compared": int(len(x)), "equal": int(np.sum(~differ)),
                                      "near_threshold": int(np.sum(ambiguous & differ))}
    return {
        "tolerance": tol,
        "max_abs_error": worst,
        "per_file": per_file,
        "decisions": decisions,
        "exit_histogram": np.bincount(ref["exits"], minlength=policy.num_exits).astype(int).tolist(),
    }


def check_monolithic(model: nn.Module, path: Path, x: np.ndarray, tol: float = TOLERANCE) -> Dict[str, float]:
    """``full.onnx`` against the torch model's last exit, at the check batch and at batch 1."""
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))[-1].numpy()
    sess = _session(path)
    (got,) = sess.run(["logits"], {"input": x.astype(np.float32)})
    (one,) = sess.run(["logits"], {"input": x[:1].astype(np.float32)})
    limit = _scaled_tol(ref, tol, _ABS_UP_TO)
    errs = {"logits": _max_err(got, ref), "logits_batch1": _max_err(one, ref[:1])}
    for kind, err in errs.items():
        if not err <= limit:
            _fail(path.name, kind, err, limit)
    return errs


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for p in root.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Put the finished temporary bundle in place (replacing an existing bundle only when ``force``; swapped
    atomically where the system can, see ``replace.commit_dir``)."""
    if out.exists() or out.is_symlink():
        _prepare_target(out, force)
    commit_dir(tmp, out)


def max_opset() -> int:
    """The newest opset both torch's exporter and the installed onnx support."""
    import onnx

    limit = int(onnx.defs.onnx_opset_version())
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET  # noqa: PLC0415 (private, but the exporter's own bound)

        limit = min(limit, int(ONNX_MAX_OPSET))
    except (ImportError, AttributeError):
        pass
    return limit


def _fmt(v: float) -> str:
    return f"{v:.1e}"


def _drift_of(ckpt: Mapping[str, Any], policy: ExitPolicy) -> Optional[Dict[str, Any]]:
    """The calibration's drift reference of ``policy``'s gate (``calibrate.drift_block``), when the exported
    policy is the one it was measured for (same kept exits and thresholds); else None (no guard)."""
    entry = ((ckpt.get("calibration") or {}).get("gates") or {}).get(policy.gate) or {}
    drift, calibrated = entry.get("drift"), entry.get("policy")
    if not drift or not calibrated:
        return None
    same = ExitPolicy.from_dict(calibrated)
    if tuple(same.kept) != tuple(policy.kept) or list(same.thresholds) != list(policy.thresholds):
        return None
    return dict(drift)


def _pipeline_policies(gates: Optional[Sequence[str]], chosen: ExitPolicy, ckpt: Mapping[str, Any],
                       origin: str) -> Dict[str, ExitPolicy]:
    """The policy of every gate to export: the chosen one, plus each gate named in ``gates`` with its calibrated
    policy from the checkpoint (same temperatures; they are baked into the graphs)."""
    names = [chosen.gate] + [g for g in (gates or []) if g != chosen.gate]
    calibrated = _gate_policies(ckpt, chosen)
    out: Dict[str, ExitPolicy] = {}
    for name in names:
        gate_spec(name)
        if name == chosen.gate:
            out[name] = chosen
        elif name in calibrated:
            out[name] = ExitPolicy.from_dict(calibrated[name])
        else:
            raise ExportError(f"gate {name!r} has no calibrated policy in {origin}: run `edgeexit calibrate` "
                              f"(with that gate) first, or leave it out of --gates")
    return out


def _export_pipeline(model: nn.Module, policy: ExitPolicy, tmp: Path, example: torch.Tensor,
                     feats: Sequence[torch.Tensor], cams: Sequence[torch.Tensor], cam_hw: Sequence[Tuple[int, int]],
                     costs: Any, opset: int) -> Dict[str, Any]:
    """Write one gate's stage and CAM graphs into ``tmp``; returns its manifest entry (without checks)."""
    gate = policy.gate
    spec = gate_spec(gate)
    ranges = stage_ranges(policy.kept_internal, model.num_exits)
    n = len(ranges)
    stages, cam_entries = [], []
    prev_k: Optional[int] = None
    for j, (a, k) in enumerate(ranges):
        in_names, out_names = stage_io(gate, j, n)
        takes_prev = "prev_cam" in in_names
        graph = StageGraph(
            list(model.segments[a:k + 1]), model.heads[k], cam_hw=cam_hw[k], temperature=policy.temperatures[k],
            signals=spec.signals if j < n - 1 else (), prev_hw=cam_hw[prev_k] if takes_prev else None,
            emit_cam="cam" in out_names).eval()
        args = (example if a == 0 else feats[a - 1],) + ((cams[prev_k],) if takes_prev else ())
        path = tmp / f"{gate}.stage_{j}.onnx"
        _export_onnx(graph, args, path, in_names, out_names, opset)
        macs = sum(costs.segment_macs[a:k + 1]) + costs.head_macs[k]
        params = sum(costs.segment_params[a:k + 1]) + costs.head_params[k]
        stages.append(_file_entry(path, _onnx_io(path), macs, params, j, exit=k, segments=[a, k],
                                  cam_shape=list(cam_hw[k]), temperature=float(policy.temperatures[k])))
        cam_path = tmp / f"{gate}.cam_{k}.onnx"
        _export_onnx(CamGraph(model.heads[k], cam_hw[k]).eval(), (feats[k],), cam_path, ["features"], ["cam"], opset)
        cam_entries.append(_file_entry(cam_path, _onnx_io(cam_path), costs.head_macs[k], costs.head_params[k], exit=k))
        prev_k = k
    return {"policy": policy.to_dict(), "signals": list(spec.signals), "stages": stages, "cams": cam_entries,
            "checks": None}


def export_bundle(
    checkpoint_path_or_model: Union[str, os.PathLike, nn.Module],
    out_dir: Union[str, os.PathLike],
    *,
    force: bool = False,
    opset: int = 17,
    samples: Optional[int] = None,
    policy: Union[ExitPolicy, Mapping[str, Any], None] = None,
    gates: Optional[Sequence[str]] = None,
    check: bool = True,
    log: Callable[[str], None] = print,
    classes: Optional[Sequence[str]] = None,
    preprocess: Optional[Preprocess] = None,
) -> Path:
    """Export a checkpoint (path) or a ``MultiExitNet`` to a bundle directory ``out_dir``; returns its path.

    Writes, per exported gate, one stage graph per kept exit and one CAM graph per kept exit (temperatures
    baked in), ``full.onnx`` and ``manifest.json`` (see docs/architecture.md, "Bundle"). ``policy``: an
    ExitPolicy or its dict; default: the checkpoint's calibrated policy, else an uncalibrated ``max_prob``
    policy (with a "not calibrated: ..." line). ``gates``: more calibrated gates to export beside it (so
    ``run --gate G`` can switch). ``classes`` / ``preprocess`` are used for a bare model (a checkpoint brings its
    own). ``samples``: number of check inputs (default 64). ``check=False`` skips the checks.
    Raises FileExistsError (target exists, no ``force``), ExportError, ExportCheckError, CheckpointError.
    """
    import onnx

    if not MIN_OPSET <= int(opset) <= max_opset():
        raise ExportError(f"--opset must be between {MIN_OPSET} and {max_opset()} (what this torch and onnx "
                          f"export), got {opset}")
    opset = int(opset)
    n_samples = DEFAULT_SAMPLES if samples is None else int(samples)
    if check and n_samples < 1:
        raise ExportError(f"samples must be >= 1, got {samples}")
    out = Path(out_dir)
    remove_stale(out)  # temporary directories of killed exports; a bundle a killed --force set aside goes back
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
    try:
        policies = _pipeline_policies(gates, pol, ckpt, origin)
    except ValueError as exc:
        raise ExportError(str(exc)) from None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    tmp.mkdir()
    try:
        costs = model.costs()
        example = torch.zeros((_EXAMPLE_BATCH, *model.input_shape))
        with torch.no_grad():
            feats = model.forward_intermediates(example)
            cams = [model.heads[i].forward_cam(feats[i]).cam for i in range(e)]
        cam_hw = [tuple(int(v) for v in c.shape[1:]) for c in cams]
        pipelines = {gate: _export_pipeline(model, p, tmp, example, feats, cams, cam_hw, costs, opset)
                     for gate, p in policies.items()}
        for gate, p in policies.items():  # the drift guard's reference, measured for this very policy
            pipelines[gate]["drift"] = _drift_of(ckpt, p)
        full_path = tmp / "full.onnx"
        _export_onnx(FullGraph(model.segments, model.heads[-1]).eval(), (example,), full_path, ["input"], ["logits"], opset)
        mono_entry = _file_entry(full_path, _onnx_io(full_path), costs.reference_macs,
                                 sum(costs.segment_params) + costs.head_params[-1])
        import onnxruntime

        ort_version = onnxruntime.__version__
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
            "num_exits": e,
            "pipelines": pipelines,
            "default_gate": pol.gate,
            "monolithic": mono_entry,
            "calibrated": calibrated,
            "costs": {"unit": "MACs", "segment_macs": list(costs.segment_macs), "head_macs": list(costs.head_macs),
                      "reference_macs": costs.reference_macs},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": opset, "edgeexit": __version__,
                         "onnxruntime": ort_version},
            "model": json_ready(model.config),
            "checks": None,
        }
        try:
            validate_manifest(json_ready(manifest))
        except BundleError as exc:  # a bug here, not the user's
            raise ExportError(f"the manifest does not match its schema: {exc}") from None
        write_manifest(tmp, manifest)
        if check:
            x, source_kind = validation_inputs(ckpt, pre, class_names, n_samples, log)
            manifest["checks"] = {"samples": int(len(x)), "inputs": source_kind,
                                  "runtime": f"onnxruntime {ort_version} CPU",
                                  "monolithic": check_monolithic(model, full_path, x)}
            for gate in pipelines:
                pipelines[gate]["checks"] = check_pipeline_parity(model, tmp, gate, x)
                _log_checks(log, gate, pipelines[gate]["checks"], len(x), source_kind)
            write_manifest(tmp, manifest)
        _fsync_tree(tmp)
        _commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    n_files = sum(1 for p in out.iterdir() if p.suffix == ".onnx")
    kept = "; ".join(f"{g}: exits {', '.join(map(str, policies[g].kept))}" for g in policies)
    log(f"bundle {out}: {n_files} ONNX files, {size / 1e6:.2f} MB, opset {opset}; stages end at {kept}")
    return out


def _log_checks(log: Callable[[str], None], gate: str, checks: Mapping[str, Any], n: int, source: str) -> None:
    w = checks["max_abs_error"]
    d = checks["decisions"]
    errors = ", ".join(f"{k} {_fmt(v)}" for k, v in w.items())
    equal = ", ".join(f"batch {k[5:]} {v['equal']}/{v['compared']}" for k, v in d.items())
    log(f"parity of the {gate} stages vs torch on {n} {source} inputs (max abs error): {errors}; "
        f"decisions equal: {equal}")

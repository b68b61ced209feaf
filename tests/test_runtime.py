"""The torch-free runtime: backends, the stage chain (batch 1 and batches), overrides, failures, outputs, memory.

The reference for every decision is the torch model of ``tiny_ckpt``: its heads' logits and CAMs -> the numpy gate
signals against the previous *kept* exit (``gates.exit_signals``) -> ``ExitPolicy.decide``, on the same images.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
from PIL import Image

from edgeexit.gates import SIGNAL_NAMES, exit_signals, gate_score, patience_counts, softmax
from edgeexit.policy import ExitPolicy
from edgeexit.runtime.backends import (
    BackendError, OrtBackend, best_providers, open_backend, resolve_providers, session_options,
)
from edgeexit.runtime.bundle import BundleError, load_bundle
from edgeexit.runtime.chain import Decision, StageRunner, parse_thresholds, run_source
from edgeexit.runtime.engine import Engine
from edgeexit.runtime.outputs import FrameSaver, JsonlWriter, annotate, crop_box, frame_record, jet
from edgeexit.runtime.sources import Frame
from edgeexit.runtime.summary import LatencyStats, RunStats


# --------------------------------------------------------------------------------------------------------------
# fixtures and helpers (also used by test_run_cli.py and test_runtime_notorch.py)


def bundle_path_for(request, tmp_path_factory, tiny_ckpt) -> Path:
    """The shared ``tiny_bundle`` fixture when conftest has it, else an export of ``tiny_ckpt``."""
    try:
        return Path(request.getfixturevalue("tiny_bundle"))
    except pytest.FixtureLookupError:
        from edgeexit.export import export_bundle

        out = tmp_path_factory.mktemp("runtime_bundle") / "bundle"
        export_bundle(tiny_ckpt, out, log=lambda _m: None)
        return out


@pytest.fixture(scope="module")
def bundle_dir(request, tmp_path_factory, tiny_ckpt) -> Path:
    return bundle_path_for(request, tmp_path_factory, tiny_ckpt)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def ort_backend(bundle):
    backend = open_backend(bundle, "onnxruntime", providers="cpu", threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def images(tiny_folder) -> List[np.ndarray]:
    """The tiny folder's images plus frames of other sizes and channel counts (resized/converted)."""
    paths = sorted(tiny_folder.glob("*/*.png"))
    out = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    rng = np.random.default_rng(3)
    base = out[5]
    out.append(np.asarray(Image.fromarray(base).resize((40, 30))))  # larger, not square
    out.append(np.concatenate([out[14], np.full((24, 24, 1), 255, np.uint8)], axis=2))  # RGBA
    out.append(np.asarray(Image.fromarray(out[25]).convert("L")))  # grayscale HxW
    out.append(rng.integers(0, 256, (17, 29, 3), dtype=np.uint8))  # smaller than the crop
    return out


@pytest.fixture(scope="module")
def torch_model(tiny_ckpt):
    from edgeexit.checkpoint import load_model

    model, _ckpt = load_model(tiny_ckpt)
    return model


@pytest.fixture(scope="module")
def x(bundle, images):
    return bundle.preprocess.normalize(np.stack([bundle.preprocess.resize_and_crop(np.asarray(i)) for i in images]))


def torch_outputs(model, x: np.ndarray, temperatures, kept: Sequence[int]):
    """Per exit torch logits and CAMs; the numpy gate signals of the kept exits against the previous kept one."""
    import torch

    with torch.no_grad():
        outs = model.forward_exits(torch.from_numpy(x))
    logits = [o.logits.numpy().astype(np.float64) for o in outs]
    cams = [o.cam.numpy().astype(np.float64) for o in outs]
    signals = np.zeros((len(x), len(outs), len(SIGNAL_NAMES)), dtype=np.float32)
    prev = None
    for k in kept:
        signals[:, k] = exit_signals(logits[k], cams[k], None if prev is None else cams[prev], temperatures[k])
        prev = k
    classes = np.stack([lg.argmax(axis=1) for lg in logits], axis=1)
    return logits, cams, signals, classes


def gap_thresholds(scores: np.ndarray, targets=(0.7, 0.55, 0.5, 0.5, 0.5, 0.5)) -> List[float]:
    """Per column, a threshold in the middle of a wide gap between scores near the target quantile, so
    decisions are far from ties (the exported graphs and torch differ by ~1e-7)."""
    out = []
    for i in range(scores.shape[1]):
        s = np.unique(scores[:, i])
        lo, hi = int(len(s) * (targets[i] - 0.25)), int(len(s) * (targets[i] + 0.25))
        lo, hi = max(lo, 0), min(max(hi, lo + 2), len(s))
        window = s[lo:hi]
        if len(window) < 2:
            out.append(float(s[-1]) + 1.0)
            continue
        k = int(np.argmax(np.diff(window)))
        assert window[k + 1] - window[k] > 2e-5, "scores too dense for a tie-free threshold"
        out.append(float((window[k] + window[k + 1]) / 2))
    return out


def assert_same_decisions(a: List[Decision], b: List[Decision], atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for k, (da, db) in enumerate(zip(a, b)):
        assert (da.class_id, da.exit, bool(da.failed)) == (db.class_id, db.exit, bool(db.failed)), k
        assert da.confidence == pytest.approx(db.confidence, abs=atol), k
        if da.gate_score is None or db.gate_score is None:
            assert da.gate_score is None and db.gate_score is None
        else:
            assert da.gate_score == pytest.approx(db.gate_score, abs=atol), k


_EXPORTED: Dict[tuple, Path] = {}


def gate_bundle(tmp_path_factory, tiny_ckpt, gate: str, exits: Optional[Sequence[int]], thresholds: Sequence[float],
                temperatures: Optional[Sequence[float]] = None, learned=None) -> Path:
    """``tiny_ckpt`` exported with a hand-made policy of ``gate`` keeping ``exits`` (thresholds per kept exit)."""
    from edgeexit.export import export_bundle
    from edgeexit.checkpoint import load_model

    model, _ = load_model(tiny_ckpt)
    e = model.num_exits
    kept = list(range(e - 1)) if exits is None else list(exits)
    full = [math.inf] * (e - 1)
    for k, t in zip(kept, thresholds):
        full[k] = t
    policy = ExitPolicy(gate, full, [1.0] * (e - 1), list(temperatures or [1.0] * e), learned=learned,
                        exits=None if exits is None else list(exits))
    key = (gate, tuple(kept), tuple(np.round(thresholds, 9)))
    if key not in _EXPORTED:
        out = tmp_path_factory.mktemp(f"bundle_{gate}") / "bundle"
        export_bundle(tiny_ckpt, out, policy=policy, samples=16, log=lambda _m: None)
        _EXPORTED[key] = out
    return _EXPORTED[key]


# --------------------------------------------------------------------------------------------------------------
# providers and backends


def test_resolve_providers_maps_short_names():
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider", "AzureExecutionProvider"]
    assert resolve_providers("tensorrt,cuda,cpu", available) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["CUDA", "cpu", "cuda"], available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, available)[0] == "TensorrtExecutionProvider"
    assert resolve_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert best_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(BackendError, match="not available"):
        resolve_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="not available"):
        resolve_providers("nonsense", available)


def test_tensorrt_provider_gets_a_fixed_profile():
    from edgeexit.runtime.backends import _with_trt_profile, trt_profile_options

    opts = trt_profile_options({"features": (8, 12, 12), "prev_cam": (8, 8)}, 4)
    assert opts == {"trt_profile_min_shapes": "features:1x8x12x12,prev_cam:1x8x8",
                    "trt_profile_opt_shapes": "features:4x8x12x12,prev_cam:4x8x8",
                    "trt_profile_max_shapes": "features:4x8x12x12,prev_cam:4x8x8"}
    entries = _with_trt_profile([("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "CPUExecutionProvider"],
                                {"input": (3, 24, 24)}, 8)
    assert entries[0][1]["trt_fp16_enable"] and entries[0][1]["trt_profile_max_shapes"] == "input:8x3x24x24"
    assert entries[1] == "CPUExecutionProvider"


def test_session_options_low_latency():
    import onnxruntime as ort

    so = session_options(threads=2)
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # spinning off by default
    with pytest.raises(BackendError):
        session_options(threads=0)


def test_open_backend_opens_the_pipelines_stages(bundle):
    with pytest.raises(BackendError, match="unknown backend"):
        open_backend(bundle, "magic")
    backend = open_backend(bundle, "onnxruntime", providers="cpu")
    try:
        assert isinstance(backend, OrtBackend) and backend.threads == 1  # one intra-op thread by default
        stages = [backend.engine(f) for f in bundle.pipeline().stages]
        assert stages[0].input_names == ["input"] and stages[1].input_names == ["features_in"]
        assert stages[0].output_names == ["features", "class", "confidence", "signals"]
        assert stages[-1].output_names == ["features", "class", "confidence"]  # the last exit decides nothing
        assert "onnxruntime" in backend.describe()
    finally:
        backend.close()
    with pytest.raises(BackendError, match="--threads"):
        open_backend(bundle, "onnxruntime", providers="cpu", threads=10_000)
    try:
        import tensorrt  # noqa: F401
        import pycuda  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="TensorRT and pycuda"):
            open_backend(bundle, "tensorrt")
        auto = open_backend(bundle, "auto")  # falls to onnxruntime without TensorRT
        assert isinstance(auto, OrtBackend)
        auto.close()


# --------------------------------------------------------------------------------------------------------------
# the chain against the torch model


@pytest.mark.parametrize("gate,exits", [("max_prob", None), ("margin", (0, 2)), ("coh_cosine", (0, 1, 2)),
                                        ("coh_ssim", (1, 2)), ("patience", (0, 1, 2)), ("sal_entropy", (1,))])
def test_runtime_decisions_equal_torch_model(tmp_path_factory, tiny_ckpt, torch_model, x, gate, exits):
    e = torch_model.num_exits
    kept = list(range(e - 1)) if exits is None else list(exits)
    temps = [1.0] * e
    logits, cams, signals, classes = torch_outputs(torch_model, x, temps, kept + [e - 1])
    pat = np.zeros(classes.shape, np.int64)
    pat[:, kept + [e - 1]] = patience_counts(classes[:, kept + [e - 1]])
    if gate == "patience":
        thresholds = [1.5] * len(kept)  # integers: no ties
    else:
        scores = np.stack([gate_score(gate, signals[:, k], pat[:, k]) for k in kept], axis=1)
        thresholds = gap_thresholds(scores)
    bundle = load_bundle(gate_bundle(tmp_path_factory, tiny_ckpt, gate, exits, thresholds))
    pipe = bundle.pipeline()
    assert pipe.kept == tuple(kept + [e - 1])
    assert pipe.signals == tuple(s for s in SIGNAL_NAMES if s == gate)  # only what the gate reads
    backend = open_backend(bundle, "onnxruntime", providers="cpu")
    runner = StageRunner(bundle, backend)
    want_exit = runner.policy.decide(signals, classes)
    rows = np.arange(len(x))
    want_class = classes[rows, want_exit]
    probs = np.stack([softmax(logits[i], temps[i]) for i in range(e)], axis=1)
    want_conf = probs[rows, want_exit, want_class]
    one = [runner.run_one(x[k]) for k in range(len(x))]  # the pre-bound camera path
    many = runner.run_batch(x, batch_size=32)  # compaction
    for got in (one, many):
        assert [d.exit for d in got] == want_exit.tolist()
        assert [d.class_id for d in got] == want_class.tolist()
        np.testing.assert_allclose([d.confidence for d in got], want_conf, atol=1e-4)
        assert [d.macs for d in got] == [bundle.exit_macs()[list(pipe.kept).index(k)] for k in want_exit]
        for k, d in enumerate(got):  # the reported score is the one that decided (none at the last exit)
            if d.exit == e - 1:
                assert d.gate_score is None
            else:
                assert d.gate_score == pytest.approx(gate_score(gate, signals[k:k + 1, d.exit], pat[k:k + 1, d.exit])[0],
                                                     abs=1e-4)
    assert_same_decisions(many, one)
    if gate in ("max_prob", "margin", "coh_cosine"):
        assert len(set(want_exit.tolist())) >= 2, "thresholds should spread the samples over several exits"
    backend.close()


def test_learned_gate_runs_the_logistic_on_the_stage_signals(tmp_path_factory, tiny_ckpt, torch_model, x):
    from edgeexit.gates import FEATURE_NAMES, gate_features

    e = torch_model.num_exits
    kept = [0, 2]
    _, _, signals, classes = torch_outputs(torch_model, x, [1.0] * e, kept + [e - 1])
    pat = np.zeros(classes.shape, np.int64)
    pat[:, kept + [e - 1]] = patience_counts(classes[:, kept + [e - 1]])
    rng = np.random.default_rng(0)
    learned = [None] * (e - 1)
    for k in kept:
        feats = gate_features(signals[:, k], pat[:, k])
        learned[k] = {"mean": feats.mean(0).tolist(), "std": (feats.std(0) + 1e-3).tolist(),
                      "weights": rng.normal(size=len(FEATURE_NAMES)).tolist(), "bias": 0.1}
    scores = np.stack([gate_score("learned", signals[:, k], pat[:, k], learned[k]) for k in kept], axis=1)
    bundle = load_bundle(gate_bundle(tmp_path_factory, tiny_ckpt, "learned", kept, gap_thresholds(scores),
                                     learned=learned))
    assert bundle.pipeline().signals == SIGNAL_NAMES
    runner = StageRunner(bundle, open_backend(bundle, "onnxruntime", providers="cpu"))
    want = runner.policy.decide(signals, classes)
    assert [runner.run_one(x[k]).exit for k in range(len(x))] == want.tolist()
    assert [d.exit for d in runner.run_batch(x, batch_size=7)] == want.tolist()


def test_full_runs_the_monolithic_graph(bundle, images):
    backend = open_backend(bundle, "onnxruntime", providers="cpu", full=True)
    runner = StageRunner(bundle, backend, full=True)
    x = runner.prepare(images)
    import onnxruntime as ort

    mono = ort.InferenceSession(str(bundle.monolithic.path), providers=["CPUExecutionProvider"])
    logits = mono.run(["logits"], {"input": x})[0]
    for got in ([runner.run_one(f) for f in x], runner.run_batch(x, batch_size=8)):
        assert [d.class_id for d in got] == logits.argmax(axis=1).tolist()
        np.testing.assert_allclose([d.confidence for d in got],
                                   softmax(logits, bundle.policy.temperatures[-1]).max(axis=1), atol=1e-5)
        assert {d.exit for d in got} == {bundle.num_exits - 1}
        assert {d.macs for d in got} == {bundle.reference_macs} and all(d.gate_score is None for d in got)
    # only full.onnx was opened: no stage ran
    assert [Path(p).name for p in backend._engines] == [bundle.monolithic.file]


def test_threshold_and_max_exit_overrides(bundle, ort_backend, images):
    e = bundle.num_exits
    base = StageRunner(bundle, ort_backend)
    assert base.policy.thresholds == bundle.policy.thresholds
    everyone_first = StageRunner(bundle, ort_backend, threshold="0")
    assert everyone_first.policy.thresholds == [0.0] * (e - 1)
    assert {d.exit for d in everyone_first.run_images(images)} == {0}
    nobody = StageRunner(bundle, ort_backend, threshold=",".join(["1.5"] * (e - 1)))
    assert {d.exit for d in nobody.run_images(images)} == {e - 1}
    capped = StageRunner(bundle, ort_backend, threshold=1.5, max_exit=1)
    assert {d.exit for d in capped.run_images(images)} == {1}
    with pytest.raises(ValueError, match="internal exits"):
        StageRunner(bundle, ort_backend, threshold=[0.5] * e)
    with pytest.raises(ValueError, match="max_exit"):
        StageRunner(bundle, ort_backend, max_exit=e)
    with pytest.raises(ValueError, match="unknown gate"):
        StageRunner(bundle, ort_backend, gate="nonsense")
    with pytest.raises(BundleError, match="not in this bundle .*re-export with --gates"):
        StageRunner(bundle, ort_backend, gate="coh_ssim")


def test_threshold_override_keeps_the_calibrated_signs(tmp_path_factory, tiny_ckpt, bundle, images):
    """--threshold starts from the pipeline's calibrated signs: with sign -1 a frame leaves when -score >= T."""
    e = bundle.num_exits
    path = gate_bundle(tmp_path_factory, tiny_ckpt, "max_prob", (0,), [0.5])
    b = load_bundle(path)
    data = json.loads((path / "manifest.json").read_text())
    assert data["pipelines"]["max_prob"]["policy"]["exits"] == [0]
    runner = StageRunner(b, open_backend(b, "onnxruntime", providers="cpu"), threshold="-2")
    assert runner.policy.thresholds == [-2.0] + [math.inf] * (e - 2)
    assert {d.exit for d in runner.run_images(images)} == {0}
    with pytest.raises(ValueError, match="not kept"):
        StageRunner(b, open_backend(b, "onnxruntime", providers="cpu"), max_exit=1)


def test_parse_thresholds():
    assert parse_thresholds("0.8") == 0.8
    assert parse_thresholds("0.9,0.8,0.7") == [0.9, 0.8, 0.7]
    assert parse_thresholds("0.5,") == [0.5]
    assert parse_thresholds("-inf,inf") == [-math.inf, math.inf]
    with pytest.raises(ValueError):
        parse_thresholds("high")
    with pytest.raises(ValueError):
        parse_thresholds("nan")


class _Poisoned(Engine):
    """Wraps a stage engine: the rows listed get a non-finite value in ``output``, or every call raises."""

    def __init__(self, inner, bad_rows=(0,), mode="nan", output="confidence"):
        self.inner, self.name, self.mode, self.output = inner, inner.name, mode, output
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.input_shapes, self.output_types = inner.input_shapes, inner.output_types
        self.bad_rows = list(bad_rows)
        self.row = 0  # batch 1: which frame this is

    def run(self, feeds, outputs=None):
        if self.mode == "raise":
            raise RuntimeError("device lost")
        out = dict(self.inner.run(feeds, outputs))
        value = np.array(out[self.output], dtype=np.float32)
        value[[r for r in self.bad_rows if r < value.shape[0]]] = np.nan
        out[self.output] = value
        return out

    def bind(self, inputs, outputs):
        call = self.inner.bind(inputs, outputs)

        def poisoned():
            if self.mode == "raise":
                raise RuntimeError("device lost")
            call()
            if self.row in self.bad_rows:
                outputs[self.output].host[0] = np.nan
            self.row += 1
        return poisoned


def _poison(runner: StageRunner, j: int, **kwargs) -> StageRunner:
    runner._stages = list(runner._stages)
    runner._stages[j] = _Poisoned(runner._stages[j], **kwargs)
    return runner


def test_non_finite_answer_fails_the_frame_only(bundle, ort_backend, images):
    e = bundle.num_exits
    clean = StageRunner(bundle, ort_backend, threshold=1.5)  # every frame runs to the last stage
    want = clean.run_images(images[:6])
    for batch in (6, 1):
        runner = _poison(StageRunner(bundle, ort_backend, threshold=1.5), -1, bad_rows=(1,))
        got = runner.run_batch(runner.prepare(images[:6]), batch_size=batch)
        assert got[1].failed and "non-finite" in got[1].failed and f"stage_{len(runner.exits) - 1}" in got[1].failed
        others = [k for k in range(6) if k != 1]
        assert_same_decisions([got[k] for k in others], [want[k] for k in others])
        stats = RunStats(e, [runner.exit_fraction(i) for i in range(e)])
        for d in got:
            stats.add(d, label=0)
        assert stats.failed == 1 and stats.frames == 6
        assert json.dumps(frame_record(Frame(1, None, "x.png"), got[1]), allow_nan=False)  # strict JSON


def test_non_finite_gate_score_goes_deeper(bundle, ort_backend, images):
    """A nan score passes no threshold: the frame is answered by a later exit, not by a broken one."""
    for batch in (6, 1):
        runner = _poison(StageRunner(bundle, ort_backend, threshold=0.0), 0, bad_rows=(1,), output="signals")
        got = runner.run_batch(runner.prepare(images[:6]), batch_size=batch)
        assert [d.exit for d in got] == [0, 1, 0, 0, 0, 0] and not any(d.failed for d in got)


def test_engine_exception_fails_the_frames_and_the_run_continues(bundle, ort_backend, images):
    for batch in (3, 1):
        ok = _poison(StageRunner(bundle, ort_backend, threshold=0.0), -1, mode="raise")
        assert not any(d.failed for d in ok.run_batch(ok.prepare(images[:3]), batch_size=batch))  # never ran
        broken = _poison(StageRunner(bundle, ort_backend, threshold=1.5), -1, mode="raise")
        got = broken.run_batch(broken.prepare(images[:3]), batch_size=batch)
        assert all(d.failed and "device lost" in d.failed for d in got)
        assert all(d.exit == bundle.num_exits - 1 for d in got)


def test_keep_cam_returns_the_exits_map(bundle, ort_backend, images, torch_model):
    import torch

    runner = StageRunner(bundle, ort_backend, threshold=0.4, keep_cam=True)
    x = runner.prepare(images)
    with torch.no_grad():
        outs = torch_model.forward_exits(torch.from_numpy(x))
    for got in ([runner.run_one(f) for f in x], runner.run_batch(x, batch_size=8)):
        assert len({d.exit for d in got}) >= 2
        for k, d in enumerate(got):
            np.testing.assert_allclose(d.cam, outs[d.exit].cam[k].numpy(), atol=1e-4)
    assert StageRunner(bundle, ort_backend).run_one(x[0]).cam is None  # not drawn, not computed


def test_run_source_skips_unusable_frames(bundle, ort_backend, images):
    runner = StageRunner(bundle, ort_backend, threshold=0.4)
    frames = [Frame(0, images[0], "a.png", label=0), Frame(1, None, "bad.png", error="cannot read image bad.png"),
              Frame(2, np.zeros((0, 5, 3), np.uint8), "empty.png"), Frame(3, images[1], "b.png"),
              Frame(4, images[2], "c.png")]
    seen, skipped = [], []
    n = run_source(runner, frames, 2, lambda f, d: seen.append((f.index, d)), lambda f, r: skipped.append((f.index, r)))
    assert n == 3 and [i for i, _ in seen] == [0, 3, 4]
    assert [i for i, _ in skipped] == [1, 2]
    assert_same_decisions([d for _, d in seen], runner.run_images([images[0], images[1], images[2]]))


def test_decision_fields_are_the_json_lines(bundle, ort_backend, images):
    d = StageRunner(bundle, ort_backend).run_images(images[:1])[0]
    rec = frame_record(Frame(0, None, "a.png"), d, bundle.classes)
    assert {k: rec[k] for k in d.to_dict()} == d.to_dict()


# --------------------------------------------------------------------------------------------------------------
# outputs and summary


def test_jsonl_writer_flushes_every_line(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    writer = JsonlWriter(path)
    writer.write({"frame": 0, "x": 1.5})
    assert path.read_text() == '{"frame": 0, "x": 1.5}\n'  # visible before close
    writer.write({"frame": 1})
    writer.close()
    assert [json.loads(l)["frame"] for l in path.read_text().splitlines()] == [0, 1]


def test_frame_record_fields():
    d = Decision(2, "stripes", 0.875, 1, gate_score=0.9, latency_ms=1.25, macs=1000)
    rec = frame_record(Frame(7, None, "cls/x.png", None, 2), d, ("a", "b", "stripes"))
    assert rec == {"frame": 7, "name": "cls/x.png", "class_id": 2, "label": "stripes", "confidence": 0.875,
                   "exit": 1, "gate_score": 0.9, "latency_ms": 1.25, "macs": 1000, "true_id": 2,
                   "true_label": "stripes", "correct": True, "failed": None}
    video = frame_record(Frame(3, None, "frame 3", 0.12, None), Decision(0, "a", float("nan"), 0, None), None)
    assert video["time"] == 0.12 and video["confidence"] is None and "true_id" not in video


def test_annotate_and_jet(tmp_path):
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours.shape == (3, 3)
    assert colours[0].argmax() == 2 and colours[1].argmax() == 1 and colours[2].argmax() == 0  # blue -> green -> red
    assert crop_box(48, 64, 24, 24) == (0, 8, 48, 56)
    frame = np.full((48, 64, 3), 120, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[1, 2] = 1.0
    pic = annotate(frame, Decision(0, "circle", 0.9, 2, cam=cam), resize=24, crop=24)
    assert pic.dtype == np.uint8 and pic.shape == frame.shape  # the source's resolution
    # crop box (0, 8, 48, 56), map peak in cell (1, 2): rows 12-24, columns 32-44 of the frame
    assert not np.array_equal(pic[14:22, 34:42], frame[14:22, 34:42])  # the overlay is there
    assert np.array_equal(pic[36:46, 12:20], frame[36:46, 12:20])  # where the map is 0 the frame is untouched
    assert (pic[12:26, 30:46] == 255).all(axis=2).any()  # the outline of the map's upper half
    assert pic[1, 60].max() > 0  # the text bar darkens the frame, it does not black it out
    saver = FrameSaver(tmp_path / "png", SimpleNamespace(kind="folder", fps=None),
                       SimpleNamespace(resize=24, crop=24))
    saver.save(Frame(0, frame, "cls/../../x.jpg"), Decision(0, "circle", 0.9, 2, cam=cam))
    assert (tmp_path / "png" / "cls" / "x.png").is_file()


def test_run_stats_summary():
    stats = RunStats(3, [0.3, 0.6, 1.1])
    for k in range(10):
        stats.add(Decision(k % 2, "", 0.9, k % 3, latency_ms=float(k)), label=0)
    stats.add(Decision(-1, "", float("nan"), 0, failed="non-finite output of stage_0"), label=0)
    stats.add_skipped(2)
    stats.stop()
    d = stats.to_dict()
    assert d["frames"] == 11 and d["failed"] == 1 and d["skipped"] == 2
    assert d["exit_histogram"] == [4, 3, 3]
    assert d["accuracy"] == pytest.approx(5 / 11, abs=1e-6)
    assert d["latency_ms"]["p50"] == pytest.approx(4.5) and d["latency_ms"]["mean"] == pytest.approx(4.5)
    assert d["mean_cost_pct"] == pytest.approx(100 * (4 * 0.3 + 3 * 0.6 + 3 * 1.1) / 10)
    assert d["saving_pct"] == pytest.approx(100 - d["mean_cost_pct"])
    import io

    buf = io.StringIO()
    stats.render(buf)
    text = buf.getvalue()
    for word in ("frames", "skipped", "failed", "exit 0", "accuracy", "p95", "fps", "saving"):
        assert word in text
    lat = LatencyStats(capacity=100)
    for v in range(1000):
        lat.add(float(v))
    assert lat.count == 1000 and lat.mean == pytest.approx(499.5) and lat.max == 999
    assert 300 < lat.percentile(50) < 700  # a sample of all frames, not the first 100


# --------------------------------------------------------------------------------------------------------------
# memory stays flat


def rss_bytes() -> int:
    """Resident set size from /proc/self/statm (no psutil)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_memory_stays_flat(bundle, ort_backend, images, tmp_path):
    runner = StageRunner(bundle, ort_backend, threshold=0.38, keep_cam=True)
    stats = RunStats(bundle.num_exits, [runner.exit_fraction(i) for i in range(bundle.num_exits)])
    writer = JsonlWriter(tmp_path / "mem.jsonl")
    frames = [Frame(k, images[k % len(images)], f"f{k}.png", label=0) for k in range(len(images))]

    def on_decision(frame, decision):
        stats.add(decision, frame.label)
        writer.write(frame_record(frame, decision, runner.classes))

    for _ in range(3):  # warm-up: allocator pools, caches
        run_source(runner, frames, 4, on_decision)
        run_source(runner, frames, 1, on_decision)
    before = rss_bytes()
    for _ in range(10):  # 400 more frames
        run_source(runner, frames, 4, on_decision)
        run_source(runner, frames[:8], 1, on_decision)
    growth = rss_bytes() - before
    writer.close()
    assert stats.frames == 3 * 2 * len(frames) + 10 * (len(frames) + 8)
    assert growth < 5 * 2**20, f"RSS grew by {growth / 2**20:.2f} MB over {10 * (len(frames) + 8)} frames"


def test_gate_override_uses_that_gates_stages_and_calibrated_policy(tmp_path, tiny_ckpt):
    """A bundle exported with --gates carries each gate's pipeline: --gate G runs G's stages and policy."""
    from edgeexit.calibrate import calibrate
    from edgeexit.export import export_bundle

    ckpt = tmp_path / "cal.pt"
    cal = calibrate(tiny_ckpt, out=ckpt, max_drop=5.0, log=lambda _m: None)
    other = next(g for g in cal["gates"] if g != cal["winner"])
    bundle = load_bundle(export_bundle(ckpt, tmp_path / "bundle", gates=[other], samples=8, log=lambda _m: None))
    assert set(bundle.pipelines) == {cal["winner"], other} and bundle.default_gate == cal["winner"]
    runner = StageRunner(bundle, open_backend(bundle, "onnxruntime", providers="cpu", gate=other), gate=other)
    expected = ExitPolicy.from_dict(cal["gates"][other]["policy"])
    assert runner.policy.gate == other and runner.exits == expected.kept
    assert [float(t) for t in runner.policy.thresholds] == [float(t) for t in expected.thresholds]
    assert all(f.file.startswith(f"{other}.") for f in bundle.pipeline(other).stages)

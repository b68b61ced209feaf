"""The torch-free runtime: backends, the exit chain, TensorRT bookkeeping (with fakes), outputs and memory.

The reference for every decision is the torch model of ``tiny_ckpt``: its heads' logits and CAMs -> the numpy gate
signals (``gates.exit_signals``) -> ``ExitPolicy.decide``, on the same preprocessed images.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from edgeexit.gates import exit_signals, gate_score, patience_counts, softmax
from edgeexit.runtime.backends import (
    Backend, BackendError, Engine, OrtBackend, best_providers, open_backend, resolve_providers, session_options,
)
from edgeexit.runtime.bundle import load_bundle
from edgeexit.runtime.chain import Decision, ExitRunner, parse_thresholds, run_source
from edgeexit.runtime.outputs import FrameSaver, JsonlWriter, annotate, crop_box, frame_record, jet
from edgeexit.runtime.sources import Frame
from edgeexit.runtime.summary import LatencyStats, RunStats
from edgeexit.runtime import tensorrt_backend as trtb


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
    backend = OrtBackend(bundle, providers="cpu", threads=1)
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


def torch_exit_outputs(model, x: np.ndarray, temperatures):
    """Per exit: torch logits, CAMs, and the numpy gate signals (the reference the runtime must match)."""
    import torch

    with torch.no_grad():
        outs = model.forward_exits(torch.from_numpy(x))
    logits = [o.logits.numpy().astype(np.float64) for o in outs]
    cams = [o.cam.numpy().astype(np.float64) for o in outs]
    signals = np.stack(
        [exit_signals(logits[i], cams[i], cams[i - 1] if i else None, temperatures[i]) for i in range(len(outs))],
        axis=1,
    )
    classes = np.stack([l.argmax(axis=1) for l in logits], axis=1)
    return logits, cams, signals, classes


def gap_thresholds(scores: np.ndarray, targets=(0.75, 0.6, 0.5, 0.5, 0.5, 0.5)) -> List[float]:
    """Per internal exit, a threshold in the middle of a wide gap between calibration scores near the target
    quantile, so decisions are far from ties (the exported graphs and torch differ by ~1e-7)."""
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
        assert (da.class_id, da.exit_index, da.failed) == (db.class_id, db.exit_index, db.failed), k
        assert da.confidence == pytest.approx(db.confidence, abs=atol), k
        if da.gate_score is None or db.gate_score is None:
            assert da.gate_score is None and db.gate_score is None
        else:
            assert da.gate_score == pytest.approx(db.gate_score, abs=atol), k


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
    with pytest.raises(BackendError):
        session_options(threads=0)


def test_ort_backend_engines(bundle, ort_backend):
    assert ort_backend.num_exits == bundle.num_exits
    assert ort_backend.providers == ["CPUExecutionProvider"]
    assert ort_backend.segments[0].input_names == ["input"]
    assert ort_backend.segments[1].input_names == ["features_in"]
    assert set(ort_backend.heads[1].input_names) == {"features", "prev_cam"}
    assert {"class", "signals", "cam"} <= set(ort_backend.heads[0].output_names)
    assert "onnxruntime" in ort_backend.describe()


def test_open_backend_kinds(bundle):
    with pytest.raises(BackendError, match="unknown backend"):
        open_backend(bundle, "magic")
    backend = open_backend(bundle, "onnxruntime", providers="cpu")
    assert isinstance(backend, OrtBackend)
    backend.close()
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


@pytest.fixture(scope="module")
def reference(bundle, ort_backend, images, torch_model):
    """(x, logits per exit, signals (B, E, 7), classes (B, E)) of the torch model on the preprocessed images."""
    x = ExitRunner(bundle, ort_backend).prepare(images)
    logits, _cams, signals, classes = torch_exit_outputs(torch_model, x, bundle.policy.temperatures)
    return x, logits, signals, classes


@pytest.mark.parametrize("gate", ["max_prob", "coh_cosine", "patience"])
def test_runtime_decisions_equal_torch_model(bundle, ort_backend, images, reference, gate):
    x, logits, signals, classes = reference
    temps = bundle.policy.temperatures
    e = bundle.num_exits
    if gate == "patience":
        thresholds = [1.5] * (e - 1)  # integers: no ties
    else:
        scores = np.stack([gate_score(gate, signals[:, i], None) for i in range(e - 1)], axis=1)
        thresholds = gap_thresholds(scores)
    runner = ExitRunner(bundle, ort_backend, gate=gate, threshold=thresholds)
    policy = runner.policy
    assert policy.thresholds == pytest.approx(thresholds)
    want_exit = policy.decide(signals, classes)
    got = runner.run_batch(x)
    assert [d.exit_index for d in got] == want_exit.tolist()
    rows = np.arange(len(images))
    want_class = classes[rows, want_exit]
    assert [d.class_id for d in got] == want_class.tolist()
    probs = np.stack([softmax(logits[i], temps[i]) for i in range(e)], axis=1)
    want_conf = probs[rows, want_exit, want_class]
    np.testing.assert_allclose([d.confidence for d in got], want_conf, atol=1e-4)
    assert [d.label for d in got] == [bundle.classes[c] for c in want_class]
    assert [d.macs for d in got] == [bundle.cumulative_macs[i] for i in want_exit]
    # the gate score reported is the one that decided
    pat = patience_counts(classes)
    for k, d in enumerate(got):
        if d.exit_index < e - 1 or gate != "learned":
            want = gate_score(gate, signals[k : k + 1, d.exit_index], pat[k : k + 1, d.exit_index])[0]
            assert d.gate_score == pytest.approx(want, abs=1e-4)
    if gate == "max_prob":
        assert len(set(want_exit.tolist())) >= 2, "thresholds should spread the samples over several exits"


def test_compaction_equals_batch_one(bundle, ort_backend, images, reference):
    x, _logits, signals, _classes = reference
    e = bundle.num_exits
    for gate in ("max_prob", "coh_ssim"):  # coh_ssim: prev_cam must be compacted with the features
        scores = np.stack([gate_score(gate, signals[:, i], None) for i in range(e - 1)], axis=1)
        runner = ExitRunner(bundle, ort_backend, gate=gate, threshold=gap_thresholds(scores))
        one = [runner.run_batch(x[k : k + 1])[0] for k in range(len(x))]
        for batch in (len(x), 7):
            many = []
            for start in range(0, len(x), batch):
                many += runner.run_batch(x[start : start + batch])
            assert_same_decisions(many, one)
        assert len({d.exit_index for d in one}) >= 2, "compaction should really happen"


def test_max_batch_split_keeps_order(bundle, ort_backend, images):
    runner = ExitRunner(bundle, ort_backend, threshold=0.5)
    x = runner.prepare(images)
    whole = runner.run_batch(x)
    ort_backend.max_batch = 5
    try:
        split = runner.run_batch(x)
    finally:
        ort_backend.max_batch = None
    assert_same_decisions(split, whole)


def test_io_binding_path_equals_plain(bundle, ort_backend, images):
    bound = OrtBackend(bundle, providers="cpu", threads=1, io_binding=True)
    try:
        assert bound.io_binding
        a = ExitRunner(bundle, ort_backend, threshold=0.4).run_images(images)
        b = ExitRunner(bundle, bound, threshold=0.4).run_images(images)
        assert_same_decisions(a, b)
        import onnxruntime as ort

        seg = bound.segments[0]
        out = seg.run({"input": np.zeros((2, *bundle.input_shape), np.float32)}, keep=("features",))
        assert isinstance(out["features"], ort.OrtValue)
        taken = bound.take(out["features"], np.array([1]))
        assert bound.to_host(taken).shape[0] == 1
    finally:
        bound.close()


def test_full_runs_every_segment_and_only_the_last_head(bundle, ort_backend, images):
    calls: List[str] = []

    class Recording(Engine):
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name
            self.input_names, self.output_names = inner.input_names, inner.output_names
            self.input_shapes = inner.input_shapes

        def run(self, feeds, outputs=None, keep=()):
            calls.append(self.name)
            return self.inner.run(feeds, outputs, keep)

    rec = Backend([Recording(e) for e in ort_backend.segments], [Recording(e) for e in ort_backend.heads])
    runner = ExitRunner(bundle, rec, full=True, threshold=0.0)  # the threshold would exit everything at 0
    x = runner.prepare(images)
    got = runner.run_batch(x)
    e = bundle.num_exits
    assert calls == [f"segment_{i}" for i in range(e)] + [f"head_{e - 1}"]
    assert {d.exit_index for d in got} == {e - 1}
    assert {d.macs for d in got} == {bundle.reference_macs}
    assert all(d.gate_score is None for d in got)
    # the plain network: equal to the monolithic full.onnx
    import onnxruntime as ort

    mono = ort.InferenceSession(str(bundle.monolithic.path), providers=["CPUExecutionProvider"])
    logits = mono.run(["logits"], {"input": x})[0]
    assert [d.class_id for d in got] == logits.argmax(axis=1).tolist()
    np.testing.assert_allclose([d.confidence for d in got],
                               softmax(logits, bundle.policy.temperatures[-1]).max(axis=1), atol=1e-5)


def test_threshold_and_max_exit_overrides(bundle, ort_backend, images):
    e = bundle.num_exits
    base = ExitRunner(bundle, ort_backend)
    assert base.policy.thresholds == bundle.policy.thresholds
    everyone_first = ExitRunner(bundle, ort_backend, gate="max_prob", threshold="0")
    assert everyone_first.policy.thresholds == [0.0] * (e - 1)
    assert {d.exit_index for d in everyone_first.run_images(images)} == {0}
    nobody = ExitRunner(bundle, ort_backend, gate="max_prob", threshold=",".join(["1.5"] * (e - 1)))
    assert {d.exit_index for d in nobody.run_images(images)} == {e - 1}
    capped = ExitRunner(bundle, ort_backend, gate="max_prob", threshold=1.5, max_exit=1)
    assert {d.exit_index for d in capped.run_images(images)} == {1}
    with pytest.raises(ValueError, match="entries"):
        ExitRunner(bundle, ort_backend, threshold=[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5][: e])
    with pytest.raises(ValueError, match="max_exit"):
        ExitRunner(bundle, ort_backend, max_exit=e)
    with pytest.raises(ValueError, match="gate"):
        ExitRunner(bundle, ort_backend, gate="nonsense", threshold=0.5)


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
    """Wraps a head engine: the rows listed get non-finite signals (or the engine raises)."""

    def __init__(self, inner, bad_rows=(0,), mode="nan"):
        self.inner, self.name, self.mode = inner, inner.name, mode
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.input_shapes = inner.input_shapes
        self.bad_rows = list(bad_rows)
        self.calls = 0

    def run(self, feeds, outputs=None, keep=()):
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("device lost")
        out = dict(self.inner.run(feeds, outputs, keep))
        sig = np.array(out["signals"], dtype=np.float32)
        rows = [r for r in self.bad_rows if r < sig.shape[0]]
        sig[rows, 0] = np.nan if self.mode == "nan" else np.inf
        out["signals"] = sig
        return out


def test_non_finite_engine_output_fails_the_frame_only(bundle, ort_backend, images):
    heads = list(ort_backend.heads)
    heads[0] = _Poisoned(heads[0], bad_rows=(1,))
    fake = Backend(ort_backend.segments, heads)
    runner = ExitRunner(bundle, fake, threshold=0.4)
    clean = ExitRunner(bundle, ort_backend, threshold=0.4)
    got = runner.run_images(images[:6])
    want = clean.run_images(images[:6])
    assert got[1].failed and "non-finite" in got[1].reason and "head_0" in got[1].reason
    assert got[1].exit_index == 0
    others = [k for k in range(6) if k != 1]
    assert_same_decisions([got[k] for k in others], [want[k] for k in others])
    # the run goes on: the next batch is fine apart from its own row 1
    again = runner.run_images(images[6:9])
    assert [d.failed for d in again] == [False, True, False]
    stats = RunStats(bundle.num_exits, [0.25, 0.5, 0.75, 1.0][: bundle.num_exits])
    for d in got + again:
        stats.add(d, label=0)
    assert stats.failed == 2 and stats.frames == 9
    assert json.dumps(frame_record(Frame(1, None, "x.png"), got[1]))  # strict JSON: no NaN


def test_engine_exception_fails_the_batch_and_run_continues(bundle, ort_backend, images):
    heads = list(ort_backend.heads)
    heads[-1] = _Poisoned(heads[-1], mode="raise")
    runner = ExitRunner(bundle, Backend(ort_backend.segments, heads), gate="max_prob", threshold=0.0)
    ok = runner.run_images(images[:3])  # every sample leaves at exit 0: the broken last head never runs
    assert not any(d.failed for d in ok)
    broken = ExitRunner(bundle, Backend(ort_backend.segments, heads), gate="max_prob", threshold=1.5)
    got = broken.run_images(images[:3])
    assert all(d.failed and "device lost" in d.reason for d in got)


def test_run_source_skips_unusable_frames(bundle, ort_backend, images):
    runner = ExitRunner(bundle, ort_backend, threshold=0.4)
    frames = [Frame(0, images[0], "a.png", label=0), Frame(1, None, "bad.png", error="cannot read image bad.png"),
              Frame(2, np.zeros((0, 5, 3), np.uint8), "empty.png"), Frame(3, images[1], "b.png"),
              Frame(4, images[2], "c.png")]
    seen, skipped = [], []
    n = run_source(runner, frames, 2, lambda f, d: seen.append((f.index, d)), lambda f, r: skipped.append((f.index, r)))
    assert n == 3 and [i for i, _ in seen] == [0, 3, 4]
    assert [i for i, _ in skipped] == [1, 2]
    assert_same_decisions([d for _, d in seen], runner.run_images([images[0], images[1], images[2]]))


# --------------------------------------------------------------------------------------------------------------
# TensorRT: pure bookkeeping, and the whole backend over fake tensorrt / pycuda modules running the ONNX graphs


def test_trt_shape_bookkeeping():
    assert trtb.resolve_shape((-1, 3, 24, 24), 8) == (8, 3, 24, 24)
    assert trtb.resolve_shape((4, 3), 8) == (4, 3)
    assert trtb.resolve_shape((-1, -1, 5), 2, profile_max=(16, 7, 5)) == (2, 7, 5)
    with pytest.raises(ValueError):
        trtb.resolve_shape((-1, -1), 2)
    assert trtb.volume((2, 3, 4)) == 24
    batch, shapes = trtb.plan_buffers({"input": ((-1, 3, 8, 8), np.float32, (16, 3, 8, 8))}, 32)
    assert batch == 16 and shapes == {"input": (16, 3, 8, 8)}  # clipped to the profile
    batch, shapes = trtb.plan_buffers({"a": ((-1, 4), np.float32, (64, 4)), "b": ((-1, 2, 2), np.float32, (8, 2, 2))}, 32)
    assert batch == 8 and shapes == {"a": (8, 4), "b": (8, 2, 2)}
    spec = trtb.TensorSpec("x", True, np.dtype(np.float32), (-1, 3), (8, 3))
    assert spec.max_bytes == 8 * 3 * 4
    with pytest.raises(ValueError):
        trtb.plan_buffers({}, 0)


@pytest.mark.parametrize("seed", range(6))
def test_trt_compaction_copies_move_rows_in_place(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 20))
    rows = np.flatnonzero(rng.random(n) < 0.5)
    buf = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
    want = buf[rows].copy()
    raw = buf.view(np.uint8).reshape(-1)
    row_bytes = 3 * 4
    for dst, src, nbytes in trtb.compaction_copies(rows.tolist(), row_bytes):
        assert dst + nbytes <= src or src + nbytes <= dst, "overlapping copy"
        raw[dst : dst + nbytes] = raw[src : src + nbytes].copy()
    np.testing.assert_array_equal(buf[: len(rows)], want)
    assert trtb.compaction_copies([0, 1, 2], 4) == []  # already in place: nothing to copy
    assert trtb.compaction_copies([2, 3, 4], 4) == [(0, 8, 8), (8, 16, 4)]  # runs merged, chunked to avoid overlap
    with pytest.raises(ValueError):
        trtb.compaction_copies([2, 1], 4)


def test_trt_engine_compatibility(tmp_path):
    (tmp_path / "segment_0.engine").write_bytes(b"x")
    entry = {"file": "segment_0.engine", "tensorrt_version": "10.3.0", "gpu": "Orin", "precision": "fp16"}
    assert trtb.engine_compatible(entry, tmp_path, "10.3.0", "Orin") == (True, "")
    ok, why = trtb.engine_compatible(entry, tmp_path, "8.5.2", "Orin")
    assert not ok and "TensorRT 10.3.0" in why
    ok, why = trtb.engine_compatible(entry, tmp_path, "10.3.0", "NVIDIA H100")
    assert not ok and "GPU Orin" in why
    assert not trtb.engine_compatible(None, tmp_path, "10.3.0", "Orin")[0]
    assert not trtb.engine_compatible({**entry, "file": "missing.engine"}, tmp_path, "10.3.0", "Orin")[0]


class FakeCuda:
    """pycuda.driver over a numpy "device": pointers are offsets into one byte array (0 is never handed out)."""

    def __init__(self, size: int = 64 << 20):
        self.heap = np.zeros(size, dtype=np.uint8)
        self.top = 256
        self.live: Dict[int, int] = {}
        self.dtod = 0
        self.htod = 0
        self.dtoh = 0

    # pycuda.driver API subset
    def init(self):
        pass

    class _Ctx:
        def push(self):
            pass

        def pop(self):
            pass

    def Device(self, index):  # noqa: N802
        return SimpleNamespace(name=lambda: "Fake GPU", retain_primary_context=lambda: FakeCuda._Ctx())

    def Stream(self):  # noqa: N802
        return SimpleNamespace(handle=1, synchronize=lambda: None)

    def mem_alloc(self, nbytes):
        ptr = self.top
        self.top += (int(nbytes) + 255) // 256 * 256
        assert self.top <= self.heap.size, "fake device out of memory"
        self.live[ptr] = int(nbytes)
        cuda = self

        class Allocation(int):
            def free(self_inner):
                cuda.live.pop(int(self_inner), None)

        return Allocation(ptr)

    def pagelocked_empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def _check(self, ptr, nbytes):
        ptr = int(ptr)
        assert any(base <= ptr and ptr + nbytes <= base + size for base, size in self.live.items()), \
            f"access outside an allocation: {ptr}+{nbytes}"
        return ptr

    def memcpy_htod_async(self, dst, src, stream=None):
        src = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        p = self._check(dst, src.size)
        self.heap[p : p + src.size] = src
        self.htod += 1

    def memcpy_dtoh_async(self, dst, src, stream=None):
        view = dst.view(np.uint8).reshape(-1)
        p = self._check(src, view.size)
        view[...] = self.heap[p : p + view.size]
        self.dtoh += 1

    def memcpy_dtod_async(self, dst, src, nbytes, stream=None):
        d, s = self._check(dst, nbytes), self._check(src, nbytes)
        assert d + nbytes <= s or s + nbytes <= d, "overlapping device copy"
        self.heap[d : d + nbytes] = self.heap[s : s + nbytes].copy()
        self.dtod += 1

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.heap[ptr : ptr + n].view(dtype).reshape(shape).copy()

    def write(self, ptr, array):
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.heap[ptr : ptr + raw.size] = raw


def make_fake_trt(cuda: FakeCuda, profile_max: int = 16):
    """A tensorrt module whose engines are ONNX files (the "engine bytes" are the ONNX path) run by ONNX Runtime,
    reading and writing the fake device memory at the addresses the backend sets."""
    import onnxruntime as ort

    types = {"tensor(float)": np.dtype(np.float32), "tensor(int64)": np.dtype(np.int64)}

    class FakeContext:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}
            self.executions = 0

        def set_input_shape(self, name, shape):
            assert name in self.engine.inputs
            self.shapes[name] = tuple(int(d) for d in shape)
            return True

        def get_tensor_shape(self, name):
            if name in self.engine.inputs:
                return self.shapes[name]
            batch = next(iter(self.shapes.values()))[0]
            return (batch, *self.engine.out_static[name])

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            feeds = {n: cuda.read(self.addresses[n], self.shapes[n], self.engine.dtypes[n]) for n in self.engine.inputs}
            outs = self.engine.session.run(self.engine.outputs, feeds)
            for n, v in zip(self.engine.outputs, outs):
                cuda.write(self.addresses[n], v.astype(self.engine.dtypes[n]))
            self.executions += 1
            return True

    class FakeEngine:
        def __init__(self, path):
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]
            meta = list(self.session.get_inputs()) + list(self.session.get_outputs())
            self.dtypes = {m.name: types[m.type] for m in meta}
            self.static = {m.name: tuple(-1 if not isinstance(d, int) else d for d in m.shape) for m in meta}
            self.out_static = {n: self.static[n][1:] for n in self.outputs}
            self.num_io_tensors = len(meta)
            self._names = [m.name for m in meta]

        def get_tensor_name(self, i):
            return self._names[i]

        def get_tensor_mode(self, name):
            return FakeTrt.TensorIOMode.INPUT if name in self.inputs else FakeTrt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def get_tensor_shape(self, name):
            return self.static[name]

        def get_tensor_profile_shape(self, name, profile):
            s = self.static[name]
            return ((1, *s[1:]), (1, *s[1:]), (profile_max, *s[1:]))

        def create_execution_context(self):
            return FakeContext(self)

    class FakeTrt:
        __version__ = "10.3.0"

        class Logger:
            WARNING = 2

            def __init__(self, severity):
                pass

        class TensorIOMode:
            INPUT = "input"
            OUTPUT = "output"

        @staticmethod
        def nptype(dtype):
            return dtype

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return FakeEngine(bytes(data).decode())

    return FakeTrt


def test_tensorrt_backend_over_fakes_equals_onnxruntime(bundle, ort_backend, images, tmp_path):
    cuda = FakeCuda()
    fake_trt = make_fake_trt(cuda, profile_max=16)
    built: List[str] = []

    def builder(onnx_path, engine_path, precision, max_batch):
        built.append(Path(onnx_path).name)
        return str(onnx_path).encode()

    backend = trtb.TensorRTBackend(bundle, max_batch=32, trt_module=fake_trt, cuda_module=cuda, builder=builder,
                                   cache_dir=tmp_path / "cache")
    e = bundle.num_exits
    assert backend.max_batch == 16  # clipped to the engines' profile
    assert sorted(built) == sorted([f"segment_{i}.onnx" for i in range(e)] + [f"head_{i}.onnx" for i in range(e)])
    assert len(list((tmp_path / "cache").glob("*.engine"))) == 2 * e
    seg0 = backend.segments[0]
    assert seg0.specs["input"].max_shape == (16, *bundle.input_shape)
    assert seg0.allocated_bytes > 0 and "tensorrt 10.3.0 on Fake GPU" in backend.describe()
    live_before = dict(cuda.live)

    # the median exit-0 score: about half of every batch leaves there, scattered, so rows must be compacted
    threshold = float(np.median([d.gate_score for d in ExitRunner(bundle, ort_backend, max_exit=0).run_images(images)]))
    runner_trt = ExitRunner(bundle, backend, threshold=threshold, keep_cam=True)
    runner_ort = ExitRunner(bundle, ort_backend, threshold=threshold, keep_cam=True)
    got = runner_trt.run_images(images)  # 40 images: split into batches of 16, compacted on the "device"
    want = runner_ort.run_images(images)
    assert_same_decisions(got, want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-5)
    assert len({d.exit_index for d in got}) >= 2 and cuda.dtod > 0  # compaction moved rows on the device
    # only the small head outputs came back: one htod per segment-0 batch, no features copied to the host
    assert cuda.live == live_before  # nothing allocated per batch
    full = ExitRunner(bundle, backend, full=True).run_images(images[:5])
    assert_same_decisions(full, ExitRunner(bundle, ort_backend, full=True).run_images(images[:5]))
    backend.close()
    assert not cuda.live

    # second start: engines come from the cache, nothing rebuilt
    built.clear()
    again = trtb.TensorRTBackend(bundle, max_batch=32, trt_module=fake_trt, cuda_module=cuda, builder=builder,
                                 cache_dir=tmp_path / "cache")
    assert built == []
    again.close()


def test_tensorrt_backend_rebuild_off_is_an_error(bundle, tmp_path):
    cuda = FakeCuda()
    with pytest.raises(BackendError, match="rebuilding is off"):
        trtb.TensorRTBackend(bundle, trt_module=make_fake_trt(cuda), cuda_module=cuda, rebuild=False,
                             cache_dir=tmp_path)


def test_real_tensorrt_backend(bundle, images):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (Jetson / NVIDIA GPU only)")
    pytest.importorskip("pycuda", reason="pycuda is not installed here")
    backend = open_backend(bundle, "tensorrt", max_batch=8)
    try:
        got = ExitRunner(bundle, backend, threshold=0.5).run_images(images[:8])
        assert len(got) == 8 and not any(d.failed for d in got)
    finally:
        backend.close()


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
    stats.add(Decision(-1, "", float("nan"), 0, failed=True, reason="non-finite output of head_0 (signals: x)"), label=0)
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
    runner = ExitRunner(bundle, ort_backend, threshold=0.38, keep_cam=True)
    stats = RunStats(bundle.num_exits, [runner.exit_fraction(i) for i in range(bundle.num_exits)])
    writer = JsonlWriter(tmp_path / "mem.jsonl")
    frames = [Frame(k, images[k % len(images)], f"f{k}.png", label=0) for k in range(len(images))]

    def on_decision(frame, decision):
        stats.add(decision, frame.label)
        writer.write(frame_record(frame, decision, runner.classes))

    for _ in range(3):  # warm-up: allocator pools, caches
        run_source(runner, frames, 4, on_decision)
    before = rss_bytes()
    for _ in range(10):  # 400 more frames
        run_source(runner, frames, 4, on_decision)
        run_source(runner, frames[:8], 1, on_decision)
    growth = rss_bytes() - before
    writer.close()
    assert stats.frames == 3 * len(frames) + 10 * (len(frames) + 8)
    assert growth < 5 * 2**20, f"RSS grew by {growth / 2**20:.2f} MB over {10 * (len(frames) + 8)} frames"


def test_tensorrt_rebuild_uses_export_build_engine(bundle, monkeypatch, tmp_path):
    import edgeexit.export.tensorrt as export_trt

    calls = []

    def fake_build_engine(onnx_path, engine_path, **kwargs):
        calls.append((Path(onnx_path).name, kwargs))
        Path(engine_path).write_bytes(str(onnx_path).encode())
        return SimpleNamespace(path=Path(engine_path))

    monkeypatch.setattr(export_trt, "build_engine", fake_build_engine)
    cuda = FakeCuda()
    backend = trtb.TensorRTBackend(bundle, max_batch=4, trt_module=make_fake_trt(cuda), cuda_module=cuda,
                                   cache_dir=tmp_path)
    backend.close()
    assert len(calls) == 2 * bundle.num_exits
    name, kwargs = calls[0]
    assert kwargs["precision"] == "fp16" and kwargs["max_batch"] == 4 and kwargs["min_batch"] == 1
    assert sorted(backend.rebuilt) == sorted(c[0] for c in calls)


def test_gate_override_uses_that_gates_calibrated_thresholds(tmp_path, tiny_ckpt):
    """A calibrated bundle carries every gate's policy: --gate G runs G with its own calibrated thresholds."""
    from edgeexit.calibrate import calibrate
    from edgeexit.export import export_bundle
    from edgeexit.policy import ExitPolicy
    from edgeexit.runtime.backends import open_backend
    from edgeexit.runtime.bundle import load_bundle
    from edgeexit.runtime.chain import ExitRunner

    ckpt = tmp_path / "cal.pt"
    cal = calibrate(tiny_ckpt, out=ckpt, max_drop=5.0, log=lambda _m: None)
    bundle_dir = export_bundle(ckpt, tmp_path / "bundle", log=lambda _m: None)
    bundle = load_bundle(bundle_dir)
    other = next(g for g in cal["gates"] if g != cal["winner"])
    runner = ExitRunner(bundle, open_backend(bundle, kind="onnxruntime", providers="cpu"), gate=other)
    expected = ExitPolicy.from_dict(cal["gates"][other]["policy"])
    assert runner.policy.gate == other
    assert [float(t) for t in runner.policy.thresholds] == [float(t) for t in expected.thresholds]

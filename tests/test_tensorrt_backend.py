"""The TensorRT stage backend and engine builder against fake ``tensorrt`` / ``pycuda`` / ``libcuda`` modules that run
the ONNX graphs with ONNX Runtime (tests/trt_fakes.py); the real-TensorRT test runs only where TensorRT is."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime.backends import OrtBackend
from edgeexit.runtime.bundle import load_bundle, read_manifest
from edgeexit.runtime.chain import StageRunner
from edgeexit.runtime.engine import BackendError
from edgeexit.runtime import tensorrt_build as tb
from edgeexit.runtime.tensorrt_backend import TensorRTBackend, engine_compatible, plan_batch

from .trt_fakes import FakeCuda, FakeGraphLib, engine_blob, make_fake_trt, read_blob


@pytest.fixture(scope="module")
def stage_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to a stage bundle, with fake FP16 engines built and checked (read-only)."""
    from edgeexit.export.onnx_export import export_bundle

    root = export_bundle(tiny_ckpt, tmp_path_factory.mktemp("trt") / "b", samples=8, log=lambda _m: None)
    cuda = FakeCuda()
    tb.build_bundle_engines(root, fp16=True, max_batch=8, trt_module=make_fake_trt(cuda), cuda_module=cuda,
                            log=lambda _m: None)
    return Path(root)


@pytest.fixture(scope="module")
def cam_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """The same with a CAM-comparing gate (coh_ssim): stages take ``prev_cam`` and return ``cam``, which stays on
    the device from one stage to the next."""
    from edgeexit.export.onnx_export import export_bundle
    from edgeexit.policy import ExitPolicy

    policy = ExitPolicy.default(4, "coh_ssim", 0.5)
    root = export_bundle(tiny_ckpt, tmp_path_factory.mktemp("trt_cam") / "b", samples=8, policy=policy,
                         log=lambda _m: None)
    cuda = FakeCuda()
    tb.build_bundle_engines(root, fp16=True, max_batch=8, trt_module=make_fake_trt(cuda), cuda_module=cuda,
                            monolithic=False, log=lambda _m: None)
    return Path(root)


def _backend(bundle, cuda=None, **kwargs):
    cuda = cuda or FakeCuda()
    trt = make_fake_trt(cuda)
    return TensorRTBackend(bundle, max_batch=8, trt_module=trt, cuda_module=cuda, **kwargs), trt, cuda


def _images(bundle, n=24, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *bundle.input_shape)).astype(np.float32)


def _mixed_thresholds(bundle, x):
    """One threshold per kept internal exit at a quantile of its score on ``x`` (computed with the ONNX graphs),
    so frames leave at every stage (the tiny model's scores sit in a narrow band)."""
    pipe = bundle.pipeline()
    feeds = tb.graph_feeds(bundle, x)
    out = []
    for j, stage in enumerate(pipe.stages[:-1]):
        session = tb._ort_session(stage.path)
        (signals,) = session.run(["signals"], feeds[stage.file])
        score = signals[:, 0]
        threshold = float(np.quantile(score, 0.6 - 0.15 * j))
        out.append(threshold if (score < threshold).any() else float(score.max()) + 1.0)  # a constant score: stay
    return out


def _same(a, b):
    assert [(d.class_id, d.exit, d.failed) for d in a] == [(d.class_id, d.exit, d.failed) for d in b]
    np.testing.assert_allclose([d.confidence for d in a], [d.confidence for d in b], rtol=1e-5, atol=1e-6)


def test_build_records_one_checked_engine_per_graph(stage_bundle):
    bundle = load_bundle(stage_bundle)
    manifest = read_manifest(stage_bundle)
    files = list(bundle.files())
    assert len([f for f in files if f.kind == "stage"]) >= 2 and any(f.kind == "cam" for f in files)
    for f in files:
        assert f.engine is not None and f.engine.path.is_file() and f.engine.precision == "fp16"
        assert read_blob(f.engine.path.read_bytes())["flags"] == ["FP16"] and f.engine.max_batch == 8
    for pipe in manifest["pipelines"].values():
        for entry in (*pipe["stages"], *pipe["cams"]):
            checks = entry["engine"]["checks"]
            assert checks["ok"] and checks["inputs"] == "random inputs" and checks["samples"] == 16
            assert max(checks["max_rel_error"].values()) < 1e-5  # the fake runs the ONNX graph itself
        assert all(entry["engine"]["checks"]["class_agreement"] == 1.0 for entry in pipe["stages"])
    assert manifest["monolithic"]["engine"]["checks"]["ok"]


@pytest.mark.parametrize("which", ["stage_bundle", "cam_bundle"])
@pytest.mark.parametrize("batch", [1, 8])
def test_decisions_equal_onnxruntime(request, which, batch):
    bundle = load_bundle(request.getfixturevalue(which))
    if which == "cam_bundle":
        assert any(s.has_input("prev_cam") for s in bundle.pipeline().stages)
    x = _images(bundle)
    backend, trt, cuda = _backend(bundle)
    with backend, OrtBackend() as ort_backend:
        for threshold in (_mixed_thresholds(bundle, x), -1e9):  # frames leave at every stage; all at the first
            got = StageRunner(bundle, backend, threshold=threshold).run_batch(x, batch_size=batch)
            want = StageRunner(bundle, ort_backend, threshold=threshold).run_batch(x, batch_size=batch)
            _same(got, want)
            assert all(d.failed is None for d in got)
            assert len({d.exit for d in got}) >= 3 if threshold != -1e9 else {d.exit for d in got} == {0}
        assert backend.max_batch == 8 and "tensorrt 10.3.0 on Fake GPU" in backend.describe()
        assert not backend.rebuilt  # the bundle's own engines were taken
    assert cuda.contexts.count("push") == cuda.contexts.count("pop") == 1


def test_batch1_binds_once_and_copies_only_scalars(stage_bundle):
    bundle = load_bundle(stage_bundle)
    backend, trt, cuda = _backend(bundle)
    runner = StageRunner(bundle, backend, threshold=0.0)  # every frame leaves at the first stage
    runner.run_one(_images(bundle, 1)[0])
    first = runner._stages[0].context
    htod0, dtoh0 = len(cuda.htod), len(cuda.dtoh)
    frames = _images(bundle, 5)
    decisions = [runner.run_one(x) for x in frames]
    assert all(d.exit == runner.exits[0] for d in decisions)
    stage = bundle.pipeline().stages[0]
    for engine in runner._stages:
        calls = engine.context.calls
        assert all(calls[("set_tensor_address", n)] == 1 for n in (*engine.input_names, *engine.output_names))
        assert all(calls[("set_input_shape", n)] >= 1 for n in engine.input_names)
    assert first.calls[("execute_async_v3", "")] == 1 + 6  # the enqueue at bind, then one per frame
    assert all(e.context.calls[("execute_async_v3", "")] == 1 for e in runner._stages[1:])  # never reached
    # per frame: the frame in; class, confidence (and signals) out; features stay on the device
    assert len(cuda.htod) - htod0 == 5
    host_outputs = [n for n in stage.output_names if n not in ("features", "cam")]
    assert len(cuda.dtoh) - dtoh0 == 5 * len(host_outputs)
    features = stage.output("features")
    feature_bytes = int(np.prod(features.static_shape)) * 4
    assert all(nbytes != feature_bytes for _ptr, nbytes in cuda.dtoh[dtoh0:])
    # a batch through run() in between, then batch 1 again: the addresses are restored, decisions unchanged
    runner.run_batch(_images(bundle, 4))
    again = [runner.run_one(x) for x in frames]
    _same(again, decisions)
    backend.close()
    assert cuda.freed > 0


def test_cuda_graphs_replay_the_stages(stage_bundle):
    bundle = load_bundle(stage_bundle)
    x = _images(bundle, 12)
    plain, _, _ = _backend(bundle)
    cuda = FakeCuda()
    lib = FakeGraphLib(cuda)
    graphs, trt, _ = _backend(bundle, cuda, cuda_graphs=True, graph_lib=lib)
    threshold = _mixed_thresholds(bundle, x)
    with plain, graphs:
        want = StageRunner(bundle, plain, threshold=threshold).run_batch(x, batch_size=1)
        runner = StageRunner(bundle, graphs, threshold=threshold)
        got = runner.run_batch(x, batch_size=1)
        _same(got, want)
        assert len({d.exit for d in got}) > 2
        stages_run = sum(runner.exits.index(d.exit) + 1 for d in got)
        assert lib.launches == stages_run and len(lib.graphs) == len(runner.exits)
        # TensorRT enqueued once per stage at bind and once inside each capture; the frames only launch graphs
        assert trt.calls["execute_async_v3"] == 2 * len(runner.exits)
        assert "CUDA graphs" in graphs.describe()
    assert lib.destroyed == len(runner.exits)


def test_comparator_flags_a_corrupted_engine(stage_bundle, tmp_path):
    bundle = load_bundle(stage_bundle)
    stage = bundle.pipeline().stages[0]
    feeds = {"input": _images(bundle, 10)}
    backend, _, _ = _backend(bundle)
    with backend:
        good = tb.compare_engine(stage.path, backend.engine(stage), feeds)
        assert good["ok"] and good["class_agreement"] == 1.0 and "message" not in good
        blob = read_blob(stage.engine.path.read_bytes())
        bad_engine = backend.load(engine_blob(blob["onnx"], blob["max_batch"], noise=0.05), "corrupt")
        bad = tb.compare_engine(stage.path, bad_engine, feeds)
    assert not bad["ok"] and bad["class_agreement"] == 0.0 and bad["max_rel_error"]["confidence"] > 1e-2
    assert "\n" not in bad["message"] and "corrupt vs " + stage.file in bad["message"]
    # the builder refuses such an engine: one line, the bundle unchanged
    root = Path(shutil.copytree(stage_bundle, tmp_path / "b"))
    before = (root / "manifest.json").read_text()
    cuda = FakeCuda()
    trt = make_fake_trt(cuda)
    real_build = tb.build_engine

    def noisy(onnx_path, engine_path, **kwargs):
        built = real_build(onnx_path, engine_path, **kwargs)
        data = read_blob(Path(engine_path).read_bytes())
        Path(engine_path).write_bytes(engine_blob(data["onnx"], data["max_batch"], data["flags"], noise=0.05))
        return built

    with pytest.raises(tb.EngineCheckError, match=r"differs by .* tolerance|agrees on") as err:
        tb.build_bundle_engines(root, fp16=True, max_batch=8, build=noisy, trt_module=trt, cuda_module=cuda,
                                log=lambda _m: None)
    assert "\n" not in str(err.value) and "bundle is unchanged" in str(err.value)
    assert (root / "manifest.json").read_text() == before
    assert {p.name for p in root.glob("*.engine")} == {p.name for p in Path(stage_bundle).glob("*.engine")}


def test_int8_calibrates_stages_on_the_features_they_see(stage_bundle, tmp_path):
    root = Path(shutil.copytree(stage_bundle, tmp_path / "b"))
    cuda = FakeCuda()
    trt = make_fake_trt(cuda)
    bundle = load_bundle(root)
    images = _images(bundle, 10)
    seen = {}
    real_build = tb.build_engine

    def spy(onnx_path, engine_path, **kwargs):
        seen[Path(onnx_path).name] = (kwargs["int8"], kwargs["calibration_images"])
        return real_build(onnx_path, engine_path, **kwargs)

    bundle = tb.build_bundle_engines(root, fp16=True, int8=True, calibration_images=images, max_batch=8, build=spy,
                                     trt_module=trt, cuda_module=cuda, log=lambda _m: None)
    pipe = bundle.pipeline()
    assert [s.engine.precision for s in pipe.stages] == ["int8+fp16"] * len(pipe.stages)
    assert all(c.engine.precision == "fp16" and not seen[c.file][0] for c in pipe.cams)
    second = pipe.stages[1]
    feats = seen[second.file][1]["features_in"]
    assert feats.shape == (10, *second.input("features_in").static_shape)
    assert read_manifest(root)["pipelines"][pipe.gate]["stages"][1]["engine"]["checks"]["inputs"] == "calibration images"


def test_engines_are_rebuilt_for_another_tensorrt_and_cached(stage_bundle, tmp_path):
    bundle = load_bundle(stage_bundle)
    stage = bundle.pipeline().stages[0]
    assert engine_compatible(stage.engine, "10.3.0", "fake gpu") == (True, "")
    assert not engine_compatible(stage.engine, "8.6.1", "Fake GPU")[0]
    built = []

    def builder(onnx_path, engine_path, precision, max_batch):
        built.append((onnx_path.name, precision, max_batch))
        return engine_blob(onnx_path.read_bytes(), max_batch)

    cuda = FakeCuda()
    for _ in range(2):
        backend = TensorRTBackend(bundle, max_batch=4, trt_module=make_fake_trt(cuda, "8.6.1"), cuda_module=cuda,
                                  builder=builder, cache_dir=tmp_path / "cache")
        with backend:
            backend.engine(stage)
            assert backend.max_batch == 4
    assert built == [(stage.file, "fp16", 4)]  # the second backend read the cache
    # TensorRT 8.x returns the int64 class as int32: the chain's int64 host buffers still get the classes
    x = _images(bundle, 6)
    with OrtBackend() as ort_backend:
        want = StageRunner(bundle, ort_backend, threshold=_mixed_thresholds(bundle, x)).run_batch(x, batch_size=1)
    old = TensorRTBackend(bundle, max_batch=4, trt_module=make_fake_trt(cuda, "8.6.1"), cuda_module=cuda,
                          builder=builder, cache_dir=tmp_path / "cache")
    with old:
        runner = StageRunner(bundle, old, threshold=_mixed_thresholds(bundle, x))
        assert runner._stages[0].output_types["class"] == np.int32
        _same(runner.run_batch(x, batch_size=1), want)
        _same(runner.run_batch(x, batch_size=4), want)
    with pytest.raises(BackendError, match="rebuilding is off"):
        TensorRTBackend(bundle, trt_module=make_fake_trt(cuda, "8.6.1"), cuda_module=cuda, rebuild=False).engine(stage)
    assert plan_batch({"input": ((-1, 3, 8, 8), (16, 3, 8, 8))}, 32) == 16
    assert plan_batch({"input": ((2, 3, 8, 8), None)}, 32) == 2


def test_missing_tensorrt_is_one_line(monkeypatch, stage_bundle):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match="needs TensorRT and pycuda") as err:
        TensorRTBackend(load_bundle(stage_bundle))
    assert "\n" not in str(err.value)


def test_real_tensorrt_stage_engines(tiny_ckpt, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson or NVIDIA GPU machine only)")
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    from edgeexit.export.onnx_export import export_bundle

    root = export_bundle(tiny_ckpt, tmp_path / "b", samples=8, log=lambda _m: None)
    bundle = tb.build_bundle_engines(root, fp16=True, max_batch=8, log=lambda _m: None)
    x = _images(bundle, 16)
    with TensorRTBackend(bundle, max_batch=8) as backend, OrtBackend() as ort_backend:
        for batch in (1, 8):
            got = StageRunner(bundle, backend, threshold=0.6).run_batch(x, batch_size=batch)
            want = StageRunner(bundle, ort_backend, threshold=0.6).run_batch(x, batch_size=batch)
            agree = np.mean([a.class_id == b.class_id and a.exit == b.exit for a, b in zip(got, want)])
            assert agree >= 0.9  # FP16 may move frames near a threshold


def test_open_backend_tensorrt_opens_every_stage(stage_bundle):
    from edgeexit.runtime.backends import open_backend

    bundle = load_bundle(stage_bundle)
    cuda = FakeCuda()
    trt = make_fake_trt(cuda)
    lib = FakeGraphLib(cuda)
    with open_backend(bundle, "tensorrt", max_batch=8, trt_module=trt, cuda_module=cuda, cuda_graphs=True,
                      graph_lib=lib) as backend:
        assert isinstance(backend, TensorRTBackend) and backend.cuda_graphs
        assert len(trt.contexts) == len(bundle.pipeline().stages)  # opened up front: a bad engine fails here
    with pytest.raises(BackendError, match="--providers applies to the onnxruntime backend only"):
        open_backend(bundle, "tensorrt", providers="cpu", trt_module=trt, cuda_module=cuda)

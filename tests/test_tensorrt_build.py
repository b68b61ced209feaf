"""The TensorRT engine builder (edgeexit.runtime.tensorrt_build) against a fake ``tensorrt`` module that checks the
calls (tests/trt_fakes.py); whole bundles are built in test_tensorrt_backend.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime import tensorrt_build as tb
from edgeexit.runtime.bundle import load_bundle, sha256_file

from .trt_fakes import FakeCuda, make_fake_trt, read_blob


@pytest.fixture(scope="module")
def stages(tiny_bundle):
    return load_bundle(tiny_bundle).pipeline().stages


def test_calibration_batches():
    x = np.arange(10 * 2, dtype=np.float64).reshape(10, 2)
    batches = tb.CalibrationBatches(x, 4)
    got = list(batches)
    assert [b["input"].shape for b in got] == [(4, 2), (4, 2)] and batches.dropped == 2 and batches.num_batches == 2
    assert got[0]["input"].dtype == np.float32 and got[1]["input"].flags.c_contiguous
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in got]), x[:8])
    assert batches.next() is None
    batches.reset()
    np.testing.assert_array_equal(batches.next()["input"], x[:4])
    small = tb.CalibrationBatches({"features_in": np.zeros((3, 5)), "prev_cam": np.ones((3, 2, 2))}, 32)
    assert small.batch_size == 3 and small.num_batches == 1 and small.dropped == 0 and small.nbytes("prev_cam") == 48
    with pytest.raises(ValueError, match="different numbers"):
        tb.CalibrationBatches({"a": np.zeros((3, 1)), "b": np.zeros((4, 1))}, 2)
    with pytest.raises(ValueError):
        tb.CalibrationBatches(np.zeros((0, 3)), 2)


def test_calibrator_serves_device_buffers(tmp_path):
    cuda = FakeCuda()
    trt = make_fake_trt(cuda)
    batches = tb.CalibrationBatches({"features_in": np.ones((5, 2), np.float32), "prev_cam": np.zeros((5, 3), np.float32)}, 2)
    cal = tb.make_calibrator(trt, cuda, batches, tmp_path / "calib.cache")
    assert isinstance(cal, trt.IInt8EntropyCalibrator2) and cal.get_batch_size() == 2
    first = cal.get_batch(["prev_cam", "features_in"])
    assert first == [int(cal.buffers["prev_cam"]), int(cal.buffers["features_in"])]
    np.testing.assert_array_equal(cuda.read(first[1], (2, 2), np.float32), 1.0)
    assert cal.get_batch(["features_in", "prev_cam"]) is not None and cal.get_batch(["features_in"]) is None
    assert len(cuda.htod) == 4 and batches.dropped == 1  # 2 batches x 2 inputs; the 5th sample left out
    cal.write_calibration_cache(memoryview(b"table"))
    assert (tmp_path / "calib.cache").read_bytes() == b"table" and cal.read_calibration_cache() == b"table"
    cal.free()
    assert cuda.freed == 2


@pytest.mark.parametrize("version,flags", [("8.6.1.6", 1), ("10.3.0", 0)])
def test_build_engine_for_a_stage(stages, tmp_path, version, flags):
    cuda = FakeCuda()
    trt = make_fake_trt(cuda, version)
    stage = stages[1]
    result = tb.build_engine(stage.path, tmp_path / "s.engine", fp16=True, max_batch=16, opt_batch=4, workspace_mb=64,
                             trt_module=trt, cuda_module=cuda)
    builder = trt.builders[-1]
    assert builder.network.flags == flags  # EXPLICIT_BATCH only before TensorRT 10
    assert builder.config.flags == {"FP16"} and builder.config.pools == {"WORKSPACE": 64 << 20}
    (profile,) = builder.config.profiles
    rest = stage.input("features_in").static_shape
    assert profile.shapes == {"features_in": ((1, *rest), (4, *rest), (16, *rest))}
    assert read_blob((tmp_path / "s.engine").read_bytes())["flags"] == ["FP16"]
    assert result.precision == "fp16" and result.tensorrt_version == version and result.gpu == "Fake GPU"
    assert result.sha256 == sha256_file(tmp_path / "s.engine") and (result.min_batch, result.max_batch) == (1, 16)
    assert {t["name"]: t["dtype"] for t in result.io}["class"] == "int64"
    # no fast FP16 on this GPU: FP32 with a note
    slow = make_fake_trt(cuda, version, fast_fp16=False)
    assert tb.build_engine(stage.path, tmp_path / "f.engine", fp16=True, trt_module=slow, cuda_module=cuda).precision == "fp32"
    with pytest.raises(tb.EngineBuildError, match=f"{stage.file}.*UNSUPPORTED_NODE"):
        tb.build_engine(stage.path, tmp_path / "x.engine", trt_module=make_fake_trt(cuda, fail_parse=True))
    with pytest.raises(tb.EngineBuildError, match="could not build"):
        tb.build_engine(stage.path, tmp_path / "x.engine", trt_module=make_fake_trt(cuda, fail_build=True))
    assert not (tmp_path / "x.engine").exists()
    with pytest.raises(ValueError, match="min"):
        tb.build_engine(stage.path, tmp_path / "x.engine", min_batch=4, opt_batch=2, trt_module=trt)


def test_graph_feeds_follow_each_pipeline(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    x = np.random.default_rng(0).standard_normal((5, *bundle.input_shape)).astype(np.float32)
    feeds = tb.graph_feeds(bundle, x, batch=2)
    assert set(feeds) == {f.file for f in bundle.files()}
    for f in bundle.files():
        assert set(feeds[f.file]) == set(f.input_names)
        for t in f.inputs:
            assert feeds[f.file][t.name].shape == (5, *t.static_shape)
    pipe = bundle.pipeline()
    np.testing.assert_array_equal(feeds[pipe.stages[0].file]["input"], x)
    # stage 1 gets stage 0's features, and so does exit 0's CAM graph
    np.testing.assert_array_equal(feeds[pipe.stages[1].file]["features_in"], feeds[pipe.cam(pipe.kept[0]).file]["features"])


def test_tensorrt_missing_is_one_line(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, reason = tb.tensorrt_available()
    assert not ok and "TensorRT is not installed" in reason and "\n" not in reason
    with pytest.raises(tb.TensorRTMissing, match="not installed"):
        tb.build_bundle_engines(tiny_bundle, fp16=True, log=lambda _m: None)
    assert load_bundle(tiny_bundle).has_engines is False
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(FakeCuda(), "8.2.1"))
    ok, reason = tb.tensorrt_available()
    assert not ok and "older than 8.5" in reason


def test_export_tensorrt_is_the_runtime_builder():
    import edgeexit.export as ex
    import edgeexit.export.tensorrt as export_trt

    assert export_trt.build_bundle_engines is tb.build_bundle_engines and ex.TensorRTMissing is tb.TensorRTMissing


def test_runtime_builder_imports_without_torch_or_cycles():
    import subprocess

    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgeexit.runtime.tensorrt_backend as b, edgeexit.runtime.tensorrt_build as t\n"
            "assert 'edgeexit.runtime.backends' not in sys.modules, 'tensorrt_backend imports backends'\n"
            "print('ok')\n")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(repo), timeout=60,
                            env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

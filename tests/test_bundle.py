"""Bundle loading (edgeexit.runtime.bundle): schema, checksums, file-name safety, consistency, torch-free import."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgeexit.gates import SIGNAL_NAMES
from edgeexit.policy import ExitPolicy
from edgeexit.preprocess import Preprocess
from edgeexit.runtime.bundle import (
    MANIFEST, Bundle, BundleError, check_file_name, json_ready, load_bundle, manifest_schema, read_manifest,
    sha256_file, validate_manifest, write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _edit(bundle: Path, change) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    change(data)
    (bundle / MANIFEST).write_text(json.dumps(data))


def _tensor(specs, name):
    return next(t for t in specs if t["name"] == name)


def _one_line_error(bundle: Path, *needles: str, verify: bool = True) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(bundle, verify=verify)
    message = str(info.value)
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, message
    return message


# -- a good bundle ---------------------------------------------------------------------------------------------
def test_manifest_validates_against_shipped_schema(tiny_bundle):
    schema = manifest_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    jsonschema.validate(manifest, schema)
    validate_manifest(manifest)
    # strict JSON (no NaN / Infinity tokens): other tools on the device can read it
    json.loads((tiny_bundle / MANIFEST).read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_every_checksum_matches(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    entries = [*manifest["segments"], *manifest["heads"], manifest["monolithic"]]
    names = {e["file"] for e in entries}
    assert names == {p.name for p in tiny_bundle.iterdir()} - {MANIFEST}
    for entry in entries:
        assert sha256_file(tiny_bundle / entry["file"]) == entry["sha256"]
        assert (tiny_bundle / entry["file"]).stat().st_size == entry["size"]


def test_typed_access(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert isinstance(b, Bundle) and b.verified
    assert b.num_exits == 4 and len(b.heads) == 4
    assert b.classes == ("circle", "square", "stripes")
    assert isinstance(b.preprocess, Preprocess) and b.preprocess.crop == 24 and b.input_shape == (3, 24, 24)
    assert isinstance(b.policy, ExitPolicy) and b.policy.gate == "max_prob" and b.policy.num_exits == 4
    assert b.signals == SIGNAL_NAMES
    assert b.segments[0].input_names == ("input",) and b.segments[1].input_names == ("features_in",)
    assert b.segments[0].output("features").dynamic_batch
    assert b.heads[0].input_names == ("features",)
    assert set(b.heads[2].input_names) == {"features", "prev_cam"}
    assert b.heads[2].input("prev_cam").static_shape == b.heads[1].output("cam").static_shape
    assert b.heads[1].output("class").dtype == "int64"
    assert b.heads[1].output("signals").static_shape == (7,)
    assert len(b.cam_shapes) == 4 and all(h >= 1 and w >= 1 for h, w in b.cam_shapes)
    assert all(s.engine is None for s in b.segments) and not b.has_engines
    assert b.monolithic.file == "full.onnx" and b.monolithic.macs == b.reference_macs
    assert list(b.cumulative_macs) == sorted(b.cumulative_macs) and len(b.cumulative_macs) == 4
    assert b.cumulative_macs[-1] == sum(s.macs for s in b.segments) + sum(h.macs for h in b.heads)
    assert 0 < b.cumulative_fraction[0] < 1
    assert {"torch", "onnx", "opset", "edgeexit"} <= set(b.versions) and b.versions["opset"] >= 17
    assert b.checks["inputs"] == "validation" and b.checks["max_abs_error"]["signals"] <= 1e-4
    assert all(h.temperature == 1.0 for h in b.heads)
    assert [f.kind for f in b.files()] == ["segment"] * 4 + ["head"] * 4 + ["monolithic"]


# -- tampered bundles: each one line naming the file or field -----------------------------------------------------
def test_corrupted_file_rejected(bundle_copy):
    path = bundle_copy / "segment_1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(bundle_copy, "segment_1.onnx", "SHA-256")
    load_bundle(bundle_copy, verify=False)  # verify=False skips hashing


def test_corrupted_manifest_rejected(bundle_copy):
    (bundle_copy / MANIFEST).write_text('{"schema_version": 1, "segments": [')
    _one_line_error(bundle_copy, MANIFEST, "not valid JSON")
    (bundle_copy / MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    _one_line_error(bundle_copy, MANIFEST)


def test_missing_file_rejected(bundle_copy):
    (bundle_copy / "head_2.onnx").unlink()
    _one_line_error(bundle_copy, "heads[2].file", "head_2.onnx", "missing")
    _one_line_error(bundle_copy, "missing", verify=False)


def test_wrong_checksum_rejected(bundle_copy):
    _edit(bundle_copy, lambda d: d["heads"][0].update(sha256="0" * 64))
    _one_line_error(bundle_copy, "head_0.onnx", "heads[0].sha256")


@pytest.mark.parametrize("name", ["../x.onnx", "/etc/passwd", "sub/segment_0.onnx", "..\\x.onnx", "C:\\x.onnx", "..",
                                  "manifest.json"])
def test_path_outside_bundle_rejected(bundle_copy, name):
    _edit(bundle_copy, lambda d: d["segments"][1].update(file=name))
    message = _one_line_error(bundle_copy, "segments[1].file", "not a plain file name")
    assert repr(name) in message


def test_engine_path_outside_bundle_rejected(bundle_copy):
    _edit(bundle_copy, lambda d: d["heads"][1].update(engine={
        "file": "../evil.engine", "sha256": "0" * 64, "tensorrt_version": "10.3.0", "gpu": "Orin", "precision": "fp16"}))
    _one_line_error(bundle_copy, "heads[1].engine.file", "not a plain file name")


def test_symlink_leaving_bundle_rejected(bundle_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle_copy / "segment_0.onnx", outside)  # same bytes: the checksum alone would pass
    (bundle_copy / "segment_0.onnx").unlink()
    os.symlink(outside, bundle_copy / "segment_0.onnx")
    _one_line_error(bundle_copy, "segment_0.onnx", "outside the bundle")
    # a link to a file inside the bundle is fine
    (bundle_copy / "segment_0.onnx").unlink()
    shutil.copy(outside, bundle_copy / "real_segment_0.onnx")
    os.symlink("real_segment_0.onnx", bundle_copy / "segment_0.onnx")
    load_bundle(bundle_copy)


def test_schema_violation_names_field(bundle_copy):
    _edit(bundle_copy, lambda d: d["segments"][0].update(macs="lots"))
    _one_line_error(bundle_copy, "segments[0].macs")
    _edit(bundle_copy, lambda d: (d["segments"][0].update(macs=1), d.pop("policy")))
    _one_line_error(bundle_copy, "policy")


def test_inconsistent_exits_and_shapes_rejected(bundle_copy):
    original = json.loads((bundle_copy / MANIFEST).read_text())

    def restore_then(change):
        def apply(d):
            d.clear()
            d.update(json.loads(json.dumps(original)))
            change(d)
        _edit(bundle_copy, apply)

    restore_then(lambda d: d["heads"].pop())
    _one_line_error(bundle_copy, "heads")
    restore_then(lambda d: d["policy"].update(thresholds=[0.5], signs=[1.0], temperatures=[1.0, 1.0]))
    _one_line_error(bundle_copy, "policy")
    restore_then(lambda d: _tensor(d["heads"][2]["inputs"], "prev_cam").update(shape=["batch", 99, 99]))
    _one_line_error(bundle_copy, "heads[2]", "prev_cam")
    restore_then(lambda d: d["segments"][2]["inputs"][0].update(shape=["batch", 1, 2, 3]))
    _one_line_error(bundle_copy, "segments[2]", "features_in")
    restore_then(lambda d: _tensor(d["heads"][1]["outputs"], "logits").update(shape=["batch", 5]))
    _one_line_error(bundle_copy, "heads[1]", "classes")
    restore_then(lambda d: d.update(costs={"unit": "MACs", "cumulative_macs": [1, 2]}))
    _one_line_error(bundle_copy, "costs.cumulative_macs")
    restore_then(lambda d: d["heads"][3].update(temperature=2.0))
    _one_line_error(bundle_copy, "heads[3].temperature")
    restore_then(lambda d: d.update(schema_version=2))
    _one_line_error(bundle_copy, "schema_version")
    restore_then(lambda d: d["heads"][1].update(file="head_0.onnx", sha256=d["heads"][0]["sha256"]))
    _one_line_error(bundle_copy, "heads[1].file", "already used")
    restore_then(lambda d: None)
    load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "file")


# -- writing -----------------------------------------------------------------------------------------------------
def test_write_manifest_strict_json_and_infinite_thresholds(bundle_copy):
    manifest = read_manifest(bundle_copy)
    policy = ExitPolicy.from_dict(manifest["policy"]).override(thresholds=[0.5, math.inf, 0.7], max_exit=2)
    manifest["policy"] = policy.to_dict()  # thresholds [0.5, inf, -inf]
    write_manifest(bundle_copy, manifest)
    text = (bundle_copy / MANIFEST).read_text()
    assert "Infinity" not in text and '"inf"' in text and '"-inf"' in text
    loaded = load_bundle(bundle_copy)
    assert loaded.policy.thresholds == [0.5, math.inf, -math.inf]
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".")]  # no temporary left
    with pytest.raises(BundleError, match="classes"):
        write_manifest(bundle_copy, {**manifest, "classes": "not a list"})
    assert load_bundle(bundle_copy).policy.thresholds[1] == math.inf  # the failed write changed nothing


def test_json_ready_and_file_names():
    assert json_ready({"a": (1, np.float32(2.5), np.arange(2)), "b": [math.inf, -math.inf, math.nan]}) == {
        "a": [1, 2.5, [0, 1]], "b": ["inf", "-inf", "nan"]}
    assert check_file_name("segment_0.onnx", "f") == "segment_0.onnx"
    for bad in ("", "a/b", "../a", "/abs", "a\\b", "x\x00y", 3, None):
        with pytest.raises(BundleError):
            check_file_name(bad, "f")


# -- torch-free ---------------------------------------------------------------------------------------------------
def test_runtime_bundle_and_tensorrt_import_without_torch(tiny_bundle):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import edgeexit.runtime.bundle as rb, edgeexit.export.tensorrt as t, edgeexit.export.command, edgeexit.export.summary\n"
        "import edgeexit.export as ex; assert ex.TensorRTMissing is t.TensorRTMissing\n"
        "b = rb.load_bundle(sys.argv[1])\n"
        "ok, reason = t.tensorrt_available()\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print('ok', b.num_exits, ok)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True, env=env,
                            cwd=str(REPO), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok 4")

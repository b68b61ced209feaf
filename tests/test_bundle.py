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


def _stages(d):
    return d["pipelines"][d["default_gate"]]["stages"]


def _cams(d):
    return d["pipelines"][d["default_gate"]]["cams"]


def test_every_checksum_matches(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    entries = [*_stages(manifest), *_cams(manifest), manifest["monolithic"]]
    names = {e["file"] for e in entries}
    assert names == {p.name for p in tiny_bundle.iterdir()} - {MANIFEST}
    for entry in entries:
        assert sha256_file(tiny_bundle / entry["file"]) == entry["sha256"]
        assert (tiny_bundle / entry["file"]).stat().st_size == entry["size"]


def test_typed_access(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert isinstance(b, Bundle) and b.verified
    assert b.num_exits == 4 and b.default_gate == "max_prob" and set(b.pipelines) == {"max_prob"}
    assert b.classes == ("circle", "square", "stripes")
    assert isinstance(b.preprocess, Preprocess) and b.preprocess.crop == 24 and b.input_shape == (3, 24, 24)
    pipe = b.pipeline()
    assert isinstance(pipe.policy, ExitPolicy) and pipe.policy.gate == "max_prob" and pipe.policy.num_exits == 4
    assert b.policy is pipe.policy and pipe.signals == ("max_prob",) and pipe.kept == (0, 1, 2, 3)
    s = pipe.stages
    assert s[0].input_names == ("input",) and s[1].input_names == ("features_in",)
    assert s[0].output_names == ("features", "class", "confidence", "signals")
    assert s[-1].output_names == ("features", "class", "confidence")
    assert s[0].output("features").dynamic_batch and s[1].output("class").dtype == "int64"
    assert s[1].output("signals").static_shape == (1,) and s[1].segments == (1, 1) and s[1].exit == 1
    assert [c.exit for c in pipe.cams] == [0, 1, 2, 3] and pipe.cam(2).input_names == ("features",)
    assert all(f.engine is None for f in s) and not b.has_engines
    assert b.monolithic.file == "full.onnx" and b.monolithic.macs == b.reference_macs
    macs = b.exit_macs()
    assert list(macs) == sorted(macs) and len(macs) == 4
    assert macs[-1] == sum(b.segment_macs) + sum(b.head_macs) == sum(f.macs for f in s)
    assert {"torch", "onnx", "opset", "edgeexit"} <= set(b.versions) and b.versions["opset"] >= 17
    assert b.checks["inputs"] == "validation" and pipe.checks["max_abs_error"]["signals"] <= 1e-4
    assert pipe.checks["decisions"]["batch1"]["equal"] == pipe.checks["decisions"]["batch1"]["compared"]
    assert all(f.temperature == 1.0 for f in s)
    assert [f.kind for f in b.files()] == ["stage"] * 4 + ["cam"] * 4 + ["monolithic"]


def test_gate_registry_fills_the_schema_enum():
    from edgeexit.gates import GATE_NAMES

    assert manifest_schema()["$defs"]["gate"]["enum"] == list(GATE_NAMES)


# -- tampered bundles: each one line naming the file or field -----------------------------------------------------
def test_corrupted_file_rejected(bundle_copy):
    path = bundle_copy / "max_prob.stage_1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(bundle_copy, "max_prob.stage_1.onnx", "SHA-256")


def test_corrupted_manifest_rejected(bundle_copy):
    (bundle_copy / MANIFEST).write_text('{"schema_version": 2, "pipelines": [')
    _one_line_error(bundle_copy, MANIFEST, "not valid JSON")
    (bundle_copy / MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    _one_line_error(bundle_copy, MANIFEST)


def test_missing_file_rejected(bundle_copy):
    (bundle_copy / "max_prob.cam_2.onnx").unlink()
    _one_line_error(bundle_copy, "cams[2].file", "max_prob.cam_2.onnx", "missing")
    _one_line_error(bundle_copy, "missing", verify=False)


def test_wrong_checksum_rejected(bundle_copy):
    _edit(bundle_copy, lambda d: _stages(d)[0].update(sha256="0" * 64))
    _one_line_error(bundle_copy, "max_prob.stage_0.onnx", "stages[0].sha256")


def test_swapped_graph_is_named_at_load(bundle_copy):
    """A file replaced by another graph (hash updated too) is caught by its own inputs/outputs, full.onnx too."""
    def swap(d, target, source):
        shutil.copy(bundle_copy / source["file"], bundle_copy / target["file"])
        target["sha256"] = source["sha256"]

    _edit(bundle_copy, lambda d: swap(d, _stages(d)[2], _stages(d)[1]))
    _one_line_error(bundle_copy, "max_prob.stage_2.onnx", "inputs", "declares")


def test_swapped_monolithic_is_named_at_load(tiny_bundle, tmp_path):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    _edit(copy, lambda d: (shutil.copy(copy / _stages(d)[0]["file"], copy / "full.onnx"),
                           d["monolithic"].update(sha256=_stages(d)[0]["sha256"])))
    _one_line_error(copy, "full.onnx", "declares")


@pytest.mark.parametrize("name", ["../x.onnx", "/etc/passwd", "sub/stage_0.onnx", "..\\x.onnx", "C:\\x.onnx", "..",
                                  "manifest.json"])
def test_path_outside_bundle_rejected(bundle_copy, name):
    _edit(bundle_copy, lambda d: _stages(d)[1].update(file=name))
    message = _one_line_error(bundle_copy, "stages[1].file", "not a plain file name")
    assert repr(name) in message


def test_engine_path_outside_bundle_rejected(bundle_copy):
    _edit(bundle_copy, lambda d: _stages(d)[1].update(engine={
        "file": "../evil.engine", "sha256": "0" * 64, "tensorrt_version": "10.3.0", "gpu": "Orin", "precision": "fp16"}))
    _one_line_error(bundle_copy, "stages[1].engine.file", "not a plain file name")


def test_symlink_leaving_bundle_rejected(bundle_copy, tmp_path):
    name = "max_prob.stage_0.onnx"
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle_copy / name, outside)  # same bytes: the checksum alone would pass
    (bundle_copy / name).unlink()
    os.symlink(outside, bundle_copy / name)
    _one_line_error(bundle_copy, name, "outside the bundle")
    # a link to a file inside the bundle is fine
    (bundle_copy / name).unlink()
    shutil.copy(outside, bundle_copy / "real_stage_0.onnx")
    os.symlink("real_stage_0.onnx", bundle_copy / name)
    load_bundle(bundle_copy)


def test_schema_violation_names_field(bundle_copy):
    _edit(bundle_copy, lambda d: _stages(d)[0].update(macs="lots"))
    _one_line_error(bundle_copy, "stages[0]")
    _edit(bundle_copy, lambda d: (_stages(d)[0].update(macs=1), d.pop("pipelines")))
    _one_line_error(bundle_copy, "pipelines")


def test_inconsistent_stages_and_shapes_rejected(bundle_copy):
    original = json.loads((bundle_copy / MANIFEST).read_text())

    def restore_then(change):
        def apply(d):
            d.clear()
            d.update(json.loads(json.dumps(original)))
            change(d)
        _edit(bundle_copy, apply)

    def policy(d):
        return d["pipelines"]["max_prob"]["policy"]

    restore_then(lambda d: _stages(d).pop())
    _one_line_error(bundle_copy, "stages")
    restore_then(lambda d: policy(d).update(thresholds=[0.5], signs=[1.0], temperatures=[1.0, 1.0]))
    _one_line_error(bundle_copy, "policy")
    restore_then(lambda d: policy(d).update(exits=[0, 2], thresholds=[0.5, "inf", 0.5]))
    _one_line_error(bundle_copy, "stages end at exits", "[0, 1, 2, 3]")
    restore_then(lambda d: _stages(d)[2]["inputs"][0].update(shape=["batch", 1, 2, 3]))
    _one_line_error(bundle_copy, "stages[2]", "features_in")
    restore_then(lambda d: _tensor(_stages(d)[1]["outputs"], "signals").update(shape=["batch", 7]))
    _one_line_error(bundle_copy, "stages[1]", "signals")
    restore_then(lambda d: d["pipelines"]["max_prob"].update(signals=["margin"]))
    _one_line_error(bundle_copy, "signals", "max_prob")
    restore_then(lambda d: _stages(d)[3].update(temperature=2.0))
    _one_line_error(bundle_copy, "stages[3].temperature")
    restore_then(lambda d: d.update(schema_version=1))
    _one_line_error(bundle_copy, "schema_version", "re-export")
    restore_then(lambda d: d.update(default_gate="margin"))
    _one_line_error(bundle_copy, "default_gate")
    restore_then(lambda d: _stages(d)[1].update(file=_stages(d)[0]["file"], sha256=_stages(d)[0]["sha256"]))
    _one_line_error(bundle_copy, "stages[1]")
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
    pipe = manifest["pipelines"]["max_prob"]
    policy = ExitPolicy.from_dict(pipe["policy"]).override(thresholds=[0.5, math.inf, 0.7], max_exit=2)
    pipe["policy"] = policy.to_dict()  # thresholds [0.5, inf, -inf]
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
    assert check_file_name("margin.stage_0.onnx", "f") == "margin.stage_0.onnx"
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

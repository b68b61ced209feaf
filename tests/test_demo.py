"""The main job: `edgeexit run` with no arguments runs the shipped demo bundle over the shipped samples."""

from __future__ import annotations

import json
import subprocess
import sys

from edgeexit.runtime.bundle import load_bundle
from edgeexit.runtime.commands import DEMO_BUNDLE, DEMO_SAMPLES, demo_path


def test_demo_bundle_is_valid_and_calibrated():
    bundle = load_bundle(demo_path(DEMO_BUNDLE))  # schema, checksums, paths inside the bundle
    manifest = json.loads(demo_path(DEMO_BUNDLE).joinpath("manifest.json").read_text())
    assert manifest["calibrated"] is True and len(bundle.classes) == 10
    assert bundle.default_gate in bundle.pipelines and len(bundle.pipeline().stages) >= 2
    samples = [p for p in demo_path(DEMO_SAMPLES).rglob("*.png")]
    assert len(samples) >= 24


def test_run_without_arguments_runs_the_demo():
    r = subprocess.run([sys.executable, "-m", "edgeexit.cli", "run"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    n = len([p for p in demo_path(DEMO_SAMPLES).rglob("*.png")])
    assert len(lines) == n and all({"frame", "label", "exit", "latency_ms", "correct"} <= set(line) for line in lines)
    assert "accuracy" in r.stderr.lower() and "p95" in r.stderr.lower()


def test_reference_checkpoint_is_the_demo_bundles_model():
    """The demo's committed checkpoint (``benchmarks/make_demo.py``'s REFERENCE, what the README's demo figures are
    measured on) computes what the shipped demo bundle's full.onnx computes: the committed weights and the committed
    bundle are one model."""
    import numpy as np
    import onnxruntime as ort
    import pytest

    torch = pytest.importorskip("torch")
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from make_demo import REFERENCE
    from edgeexit.checkpoint import load_model
    from edgeexit.export.head_graph import FullGraph

    model, data = load_model(REFERENCE)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = FullGraph(model.segments, model.heads[-1]).eval()(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(demo_path(DEMO_BUNDLE) / "full.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert list(data["classes"]) == list(load_bundle(demo_path(DEMO_BUNDLE)).classes)

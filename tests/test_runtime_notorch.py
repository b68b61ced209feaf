"""The runtime works where torch cannot be imported (``sys.modules['torch'] = None`` in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeexit.runtime.backends import OrtBackend
from edgeexit.runtime.bundle import load_bundle
from edgeexit.runtime.chain import StageRunner
from edgeexit.runtime.backends import open_backend

from .test_runtime import bundle_path_for

REPO = Path(__file__).resolve().parents[1]

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


@pytest.fixture(scope="module")
def bundle_dir(request, tmp_path_factory, tiny_ckpt) -> Path:
    return bundle_path_for(request, tmp_path_factory, tiny_ckpt)


def run_python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def test_runtime_chain_without_torch(bundle_dir, tiny_folder, tmp_path):
    code = """
        import importlib, json, sys
        from pathlib import Path
        import numpy as np
        from PIL import Image
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch should be blocked")
        import edgeexit.runtime as rt
        for name in ("backends", "bundle", "chain", "commands", "engine", "doctor", "meters", "outputs", "sources", "summary",
                     "tensorrt_backend"):
            importlib.import_module("edgeexit.runtime." + name)
        bundle = rt.load_bundle(sys.argv[1])
        backend = rt.open_backend(bundle, "auto")
        runner = rt.StageRunner(bundle, backend, threshold=0.36, keep_cam=True)
        paths = sorted(Path(sys.argv[2]).glob("*/*.png"))
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        decisions = runner.run_images(images)
        from edgeexit.runtime.doctor import collect
        rows = {name: status for name, status, _ in collect()}
        assert sys.modules["torch"] is None, "something replaced the torch block"
        heavy = sorted(m for m, mod in list(sys.modules.items())
                       if mod is not None and m.split(".")[0] in ("torch", "onnx", "matplotlib"))
        print(json.dumps({"decisions": [[d.class_id, d.exit, d.confidence] for d in decisions],
                          "torch_row": rows["torch"], "heavy": heavy, "backend": backend.describe()}))
    """
    proc = run_python(code, str(bundle_dir), str(tiny_folder), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["torch_row"] == "blocked"
    # the same decisions as in this (torch-enabled) process
    from PIL import Image
    import numpy as np

    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, "onnxruntime", providers="cpu")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(tiny_folder.glob("*/*.png"))]
    want = StageRunner(bundle, backend, threshold=0.36).run_images(images)
    got = result["decisions"]
    assert [g[:2] for g in got] == [[d.class_id, d.exit] for d in want]
    np.testing.assert_allclose([g[2] for g in got], [d.confidence for d in want], atol=1e-6)


def test_cli_run_and_doctor_without_torch(bundle_dir, tiny_folder, tmp_path):
    code = """
        import sys
        from edgeexit.cli import main
        sys.argv = ["edgeexit"] + sys.argv[1:]
        try:
            main()
        finally:
            assert sys.modules["torch"] is None
    """
    out = tmp_path / "o.jsonl"
    proc = run_python(code, "run", str(bundle_dir), str(tiny_folder), "--out", str(out), "--batch", "4",
                      "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 36 and "accuracy" in proc.stdout
    proc = run_python(code, "doctor", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "blocked" in proc.stdout and "onnxruntime" in proc.stdout

"""Faults of the workstation commands (issue 11; torch needed): malformed checkpoints, export bounds, export
interrupted by SIGTERM, images above the pixel limit in explain. Each case: exit code 2 (or 130), one stderr line,
nothing the user had changed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from .test_faults import _env, digest, one_error

torch = pytest.importorskip("torch")


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from edgeexit.cli import main; sys.argv[0] = 'edgeexit'; main()",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def tampered(tiny_ckpt: Path, tmp_path: Path, **changes) -> Path:
    data = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    data.update(changes)
    path = tmp_path / "tampered.pt"
    torch.save(data, path)
    return path


@pytest.mark.parametrize("changes, words", [
    ({"preprocess": {"channels": 3, "resize": 24}}, "malformed preprocess"),
    ({"preprocess": {"channels": 3, "resize": 24, "crop": 24, "mean": [float("nan")] * 3, "std": [1.0] * 3}},
     "malformed preprocess"),
    ({"preprocess": "RGB"}, "malformed preprocess"),
    ({"config": {"arch": "resnet20"}}, "malformed config"),
    ({"config": [1, 2]}, "malformed config"),
    ({"classes": ["a", "b"]}, "2 class names for a model with 3 outputs"),
    ({"classes": "abc"}, "malformed classes"),
])
def test_malformed_checkpoint_is_one_line(tiny_ckpt, tmp_path, changes, words):
    path = tampered(tiny_ckpt, tmp_path, **changes)
    before = digest(path)
    line = one_error(cli("export", path, "--out", tmp_path / "bundle", "--no-check"))
    assert words in line and "tampered.pt" in line
    assert not (tmp_path / "bundle").exists() and digest(path) == before


def test_export_opset_out_of_range_is_one_line(tiny_ckpt, tmp_path):
    line = one_error(cli("export", tiny_ckpt, "--out", tmp_path / "bundle", "--opset", "99"))
    assert "--opset" in line and "99" in line
    assert not (tmp_path / "bundle").exists()


def test_export_killed_by_sigterm_leaves_no_temporary_directory(tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-c", "import sys; from edgeexit.cli import main; sys.argv[0] = 'edgeexit'; main()",
           "export", str(tiny_ckpt), "--out", str(tmp_path / "bundle"), "--samples", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".bundle.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert list(tmp_path.glob(".bundle.tmp-*")), "the export never started writing"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.startswith("edgeexit: error:")] == [
        f"edgeexit: error: interrupted; {tmp_path / 'bundle'} was left as it was"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_force_export_replaces_a_bundle_and_cleans_stale_temps(tiny_ckpt, tiny_bundle, tmp_path):
    import shutil

    out = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".bundle.tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "segment_0.onnx").write_bytes(b"half written")
    proc = cli("export", tiny_ckpt, "--out", out, "--force", "--no-check")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    from edgeexit.runtime.bundle import load_bundle

    load_bundle(out)


def test_explain_skips_an_image_above_the_pixel_limit(tiny_ckpt, tiny_folder, tmp_path):
    big = tmp_path / "huge.png"
    Image.new("1", (20000, 10000)).save(big)  # 200 MP: Pillow's DecompressionBombError before this change
    good = next(iter(sorted(tiny_folder.glob("*/*.png"))))
    proc = cli("explain", tiny_ckpt, big, good, "--out", tmp_path / "grids")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("edgeexit: warning:") and "huge.png" in line]
    assert len(warnings) == 1 and "too large" in warnings[0]
    assert "Traceback" not in proc.stderr and "DecompressionBomb" not in proc.stderr
    assert len(list((tmp_path / "grids").glob("*.png"))) == 1


def test_every_error_edgeexit_raises_shares_the_one_base():
    """The command layer prints any EdgeexitError as one line (cli.USER_ERRORS); an error class outside the base
    would surface as a traceback. Every *Error class defined in the package must derive from it, and its message is
    flattened to one line."""
    import importlib
    import inspect
    import pkgutil

    import edgeexit
    from edgeexit.errors import EdgeexitError

    found = {}
    for info in pkgutil.walk_packages(edgeexit.__path__, "edgeexit."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    assert len(found) >= 15
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, EdgeexitError))
    assert outside == []
    for cls in found.values():
        try:
            error = cls("first line\n  second line")
        except TypeError:  # a class with its own constructor
            continue
        assert str(error) == "first line second line"
    # a long message keeps both ends: the file it names and the cause at its end (a log's last line)
    long = str(EdgeexitError("bundle/x.onnx: " + "noise " * 300 + "the real cause"))
    assert len(long) <= 500 and long.startswith("bundle/x.onnx:") and long.endswith("the real cause")

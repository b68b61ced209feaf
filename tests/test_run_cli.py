"""`edgeexit run` and `edgeexit doctor` through the command line: every source type, bad inputs, overrides,
Ctrl-C / SIGTERM in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.runtime.bundle import load_bundle

from .test_runtime import bundle_path_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_dir(request, tmp_path_factory, tiny_ckpt) -> Path:
    return bundle_path_for(request, tmp_path_factory, tiny_ckpt)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def json_lines(text: str) -> List[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, tiny_folder) -> Path:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for p in sorted(tiny_folder.glob("*/*.png"))[::3]:
        frame = np.asarray(Image.open(p).convert("RGB").resize((64, 48)))
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    return path


# --------------------------------------------------------------------------------------------------------------
# sources


def test_run_image_file(bundle_dir, tiny_folder):
    image = sorted(tiny_folder.glob("square/*.png"))[0]
    result = invoke("run", bundle_dir, image)
    assert result.exit_code == 0, result.stderr
    [rec] = json_lines(result.stdout)  # stdout holds only the JSON lines
    assert rec["frame"] == 0 and rec["name"] == image.name and rec["failed"] is None
    assert rec["label"] in load_bundle(bundle_dir).classes and 0 <= rec["exit"] < 4
    assert rec["latency_ms"] > 0 and "true_id" not in rec
    assert "frames" in result.stderr and "latency" in result.stderr  # the summary goes to stderr


def test_run_folder_with_labels_reports_accuracy(bundle_dir, tiny_folder, tmp_path):
    out = tmp_path / "run.jsonl"
    result = invoke("run", bundle_dir, tiny_folder, "--out", out, "--batch", "5", "--threshold", "0.36")
    assert result.exit_code == 0, result.stderr
    records = json_lines(out.read_text())
    assert len(records) == 36
    assert [r["frame"] for r in records] == list(range(36))
    assert {r["true_label"] for r in records} == {"circle", "square", "stripes"}
    correct = sum(r["correct"] for r in records)
    assert "accuracy" in result.stdout and f"({correct}/36)" in result.stdout  # summary on stdout with --out
    assert "saving vs full depth" in result.stdout


def test_run_video_file_and_save(bundle_dir, video_file, tmp_path):
    save = tmp_path / "annotated"
    result = invoke("run", bundle_dir, video_file, "--save", save, "--batch", "3")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert len(records) == 12
    assert records[0]["name"] == "frame 0" and records[1]["time"] == pytest.approx(0.1, abs=0.02)
    videos = list(save.glob("clip.*"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    import cv2

    cap = cv2.VideoCapture(str(videos[0]))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == 12


def test_run_save_pngs_for_images(bundle_dir, tiny_folder, tmp_path):
    save = tmp_path / "png"
    result = invoke("run", bundle_dir, tiny_folder, "--save", save, "--max-frames", "4", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len(json_lines(result.stdout)) == 4
    pngs = sorted(save.rglob("*.png"))
    assert len(pngs) == 4 and pngs[0].parent.name == "circle"
    source = tiny_folder / pngs[0].relative_to(save)
    assert Image.open(pngs[0]).size == Image.open(source).size  # annotated at the source's resolution
    assert "edgeexit: bundle" not in result.stderr  # --quiet


def test_single_positional_source_uses_demo_bundle(monkeypatch, bundle_dir, tiny_folder):
    import edgeexit.runtime.commands as chain

    monkeypatch.setattr(chain, "demo_path", lambda parts: Path(bundle_dir) if parts == chain.DEMO_BUNDLE else Path("/nope"))
    image = sorted(tiny_folder.glob("circle/*.png"))[0]
    result = invoke("run", image)
    assert result.exit_code == 0, result.stderr
    assert len(json_lines(result.stdout)) == 1


# --------------------------------------------------------------------------------------------------------------
# bad inputs


def test_invalid_bundle_is_one_line_exit_2(tmp_path, tiny_folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    result = invoke("run", bad, tiny_folder)
    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = error_lines(result.stderr)
    assert line.startswith("edgeexit: error:") and "manifest.json" in line


def test_tampered_bundle_is_one_line_exit_2(tmp_path, bundle_dir, bundle, tiny_folder):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    name = bundle.pipeline().stages[1].file
    with open(copy / name, "ab") as fh:
        fh.write(b"\0")
    result = invoke("run", copy, tiny_folder)
    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert "SHA-256" in line and name in line


def test_corrupt_image_is_skipped_and_counted(bundle_dir, tiny_folder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "square" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "o.jsonl"
    result = invoke("run", bundle_dir, data, "--out", out, "--batch", "4")
    assert result.exit_code == 0, result.stderr
    assert len(json_lines(out.read_text())) == 36
    warnings = [l for l in result.stderr.splitlines() if "warning: skipped" in l]
    assert len(warnings) == 2 and any("broken.png" in w for w in warnings)
    row = next(l for l in result.stdout.splitlines() if "skipped (unreadable)" in l)
    assert row.rstrip(" │|").split()[-1] == "2"


def test_camera_that_cannot_be_opened_is_one_line_exit_2(bundle_dir):
    result = invoke("run", bundle_dir, "/dev/video97")
    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert line == "edgeexit: error: cannot open camera /dev/video97"


def test_missing_input_and_demo_assets(bundle_dir, monkeypatch, tmp_path):
    result = invoke("run", bundle_dir, tmp_path / "nothing.png")
    assert result.exit_code == 2 and "input not found" in result.stderr
    import edgeexit.runtime.commands as chain

    monkeypatch.setattr(chain, "DEMO_BUNDLE", ("assets", "no-such-demo"))
    result = invoke("run")
    assert result.exit_code == 2
    [line] = error_lines(result.stderr)
    assert "demo bundle is not installed" in line


def test_bad_options_are_one_line_exit_2(bundle_dir, tiny_folder):
    for args, needle in (
        (("--threshold", "high"), "--threshold"),
        (("--threshold", "0.5,0.5"), "internal exits"),
        (("--max-exit", "9"), "max_exit"),
        (("--gate", "sal_entropy"), "not in this bundle"),
        (("--gate", "nonsense"), "unknown gate"),
        (("--backend", "magic"), "unknown backend"),
        (("--providers", "cuda"), "not available"),
    ):
        result = invoke("run", bundle_dir, tiny_folder, *args)
        assert result.exit_code == 2, args
        [line] = error_lines(result.stderr)
        assert needle in line, (args, line)


# --------------------------------------------------------------------------------------------------------------
# overrides


def test_full_runs_to_the_last_exit(bundle_dir, bundle, tiny_folder):
    result = invoke("run", bundle_dir, tiny_folder, "--full", "--batch", "8", "--max-frames", "10")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert {r["exit"] for r in records} == {bundle.num_exits - 1}
    assert {r["macs"] for r in records} == {bundle.reference_macs}
    assert "100.0%" in result.stderr and "full depth" in result.stderr


def test_threshold_and_max_exit_overrides(bundle_dir, bundle, tiny_folder):
    e = bundle.num_exits
    first = json_lines(invoke("run", bundle_dir, tiny_folder, "--gate", "max_prob", "--threshold", "0").stdout)
    assert {r["exit"] for r in first} == {0}
    last = json_lines(invoke("run", bundle_dir, tiny_folder, "--gate", "max_prob", "--threshold",
                             ",".join(["1.5"] * (e - 1))).stdout)
    assert {r["exit"] for r in last} == {e - 1}
    capped = json_lines(invoke("run", bundle_dir, tiny_folder, "--gate", "max_prob", "--threshold", "1.5",
                               "--max-exit", "1").stdout)
    assert {r["exit"] for r in capped} == {1}


# --------------------------------------------------------------------------------------------------------------
# interrupts, in a real process


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OPENCV_LOG_LEVEL", None)
    return env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_prints_summary_and_keeps_lines(bundle_dir, tiny_folder, tmp_path, sig):
    out = tmp_path / "live.jsonl"
    to_file = sig == signal.SIGINT  # SIGINT: lines to --out; SIGTERM: lines to stdout
    cmd = [sys.executable, "-m", "edgeexit.cli", "run", str(bundle_dir), str(tiny_folder), "--loop"]
    if to_file:
        cmd += ["--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        seen: List[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if to_file:
                if out.exists() and out.read_text().count("\n") >= 5:
                    break
                time.sleep(0.05)
            else:
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
                if len(seen) >= 5:
                    break
            assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(sig)
        if to_file:
            stdout, stderr = proc.communicate(timeout=60)
        else:  # keep reading through the text wrapper: readline() may have buffered more lines already
            stdout = proc.stdout.read()
            stderr = proc.stderr.read()
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    if to_file:
        text, summary = out.read_text(), stdout
    else:
        text, summary = "".join(seen) + stdout, stderr
    assert text.endswith("\n")
    records = json_lines(text)  # every line written is whole
    assert len(records) >= 5
    assert [r["frame"] for r in records] == list(range(len(records)))
    assert "interrupted" in summary and "frames" in summary and "latency" in summary
    frames_row = next(l for l in summary.splitlines() if l.strip("│| ").startswith("frames"))
    counted = int(frames_row.rstrip(" │|").split()[-1])
    assert counted in (len(records) - 1, len(records))  # the signal may land between a line and its count


# --------------------------------------------------------------------------------------------------------------
# doctor


def test_doctor_table():
    result = invoke("doctor")
    assert result.exit_code == 0
    for word in ("python", "numpy", "onnxruntime", "CPU", "TensorRT", "pycuda", "OpenCV", "GStreamer", "cameras",
                 "power meter", "torch"):
        assert word in result.stdout, word
    as_json = json.loads(invoke("doctor", "--json").stdout)
    assert as_json["torch"]["status"] in ("present", "not installed", "blocked")
    assert as_json["onnxruntime"]["status"]

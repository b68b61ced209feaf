"""Tests for edgeexit.evaluate, edgeexit.plots and edgeexit.explain (and their commands), on the tiny checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeexit.calibrate import calibrate
from edgeexit.checkpoint import load_checkpoint
from edgeexit.cli import app
from edgeexit.evaluate import GATE_KEYS, REPORT_KEYS, REPORT_SCHEMA

from .conftest import write_folder

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeexit: error: "), result.stderr
    return lines[0]


def strict_json(path: Path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def is_png(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.read(8) != PNG_MAGIC:
            return False
    with Image.open(path) as img:
        return img.size[0] > 300 and img.size[1] > 200


@pytest.fixture(scope="module")
def calibrated(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "tiny_cal.pt"
    calibrate(tiny_ckpt, out=out, log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("test_data"), per_class=5, seed=3)


@pytest.fixture(scope="module")
def report_run(calibrated, test_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    result = runner.invoke(app, ["evaluate", str(calibrated), "--data", str(test_folder), "--out", str(out),
                                 "--corrupt", "noise,jpeg", "--severities", "1,3", "--quiet"])
    return result, out


def test_evaluate_writes_report_and_plots(report_run, calibrated, test_folder):
    result, out = report_run
    assert result.exit_code == 0, result.output
    assert "Exit gates" in result.stdout and "report.json" in result.stdout
    report = strict_json(out / "report.json")
    assert set(REPORT_KEYS) <= set(report) and report["schema"] == REPORT_SCHEMA
    cal = load_checkpoint(calibrated)["calibration"]
    assert report["n"] == 15 and report["data"] == str(test_folder) and report["winner"] == cal["winner"]
    assert set(report["gates"]) == set(cal["gates"])
    e = len(report["exit_accuracy"])
    assert len(report["exit_cost"]) == e and all(0 <= a <= 1 for a in report["exit_accuracy"])
    assert set(report["oracle"]) == {"mean_cost", "accuracy"}
    for name, g in report["gates"].items():
        assert set(GATE_KEYS) <= set(g), name
        assert 0 <= g["accuracy"] <= 1 and 0 < g["mean_cost"] <= report["exit_cost"][-1] + 1e-9
        assert sum(g["histogram"]) == report["n"] and len(g["auroc"]) == e - 1
        assert 0 <= g["auc"] <= 1
        assert len(g["curve"]) == len(cal["gates"][name]["path"])
    assert set(report["comparison"]) >= {"families", "best_softmax", "best_cam", "saliency_beats_softmax"}
    assert set(report["corruptions"]) == {"noise", "jpeg"}
    for kind, entry in report["corruptions"].items():
        assert list(entry["severities"]) == ["1", "3"] and len(entry["params"]) == 5
        for res in entry["severities"].values():
            assert set(res["gates"]) == set(report["gates"]) and res["n"] == report["n"]
    assert set(report["plots"]) == {"accuracy_vs_cost", "exit_histograms", "auroc_per_exit", "corruption"}
    for file in report["plots"].values():
        assert is_png(out / file), file
    assert not list(out.glob(".report.json.*"))


def test_evaluation_data_tunes_nothing(report_run, calibrated):
    """Operating points use calibration's thresholds, signs and temperatures; the calibrated point is on the curve."""
    _, out = report_run
    report = strict_json(out / "report.json")
    cal = load_checkpoint(calibrated)["calibration"]
    assert report["calibration"]["temperatures"] == cal["temperatures"]
    for name, g in report["gates"].items():
        pol = cal["gates"][name]["policy"]
        assert g["signs"] == pol["signs"]
        assert [t if t is not None else math.inf for t in g["thresholds"]] == pol["thresholds"]
        assert any(c == pytest.approx(g["mean_cost"]) and a == pytest.approx(g["accuracy"]) for c, a in g["curve"]), name


def test_evaluate_errors_are_one_line(tiny_ckpt, calibrated, test_folder, tmp_path):
    line = one_line_error(runner.invoke(app, ["evaluate", str(tiny_ckpt), "--data", str(test_folder), "--out", str(tmp_path)]))
    assert "run edgeexit calibrate first" in line
    line = one_line_error(runner.invoke(app, ["evaluate", str(calibrated), "--data", str(tmp_path / "nope")]))
    assert "not found" in line
    line = one_line_error(runner.invoke(app, ["evaluate", str(calibrated), "--data", str(test_folder), "--corrupt", "frost",
                                              "--out", str(tmp_path)]))
    assert "unknown corruption" in line
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(test_folder.rglob("*.png")), flat / "a.png")
    assert "class sub-folders" in one_line_error(runner.invoke(app, ["evaluate", str(calibrated), "--data", str(flat),
                                                                     "--out", str(tmp_path)]))


def test_evaluate_limit_and_default_out(calibrated, test_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", str(calibrated), "--data", str(test_folder), "--limit", "6", "--no-plots",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    report = strict_json(tmp_path / "reports" / calibrated.stem / "report.json")
    assert report["n"] == 6 and report["plots"] == {} and report["corruptions"] == {}


# ----------------------------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------------------------
def test_explain_one_grid_per_image(calibrated, test_folder, tmp_path):
    images = sorted(test_folder.rglob("*.png"))[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "explain"
    result = runner.invoke(app, ["explain", str(calibrated), *map(str, images), str(bad), "--out", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    written = sorted(out.glob("*.png"))
    assert len(written) == 3  # same stems from different class folders get distinct names
    assert all(is_png(p) for p in written)
    assert sorted(Path(line) for line in result.stdout.split()) == written  # the command lists what it wrote


def test_explain_nothing_readable_fails(calibrated, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    result = runner.invoke(app, ["explain", str(calibrated), str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "warning" in lines[0] and lines[1].startswith("edgeexit: error: none of the 1 image")
    assert not list((tmp_path / "x").glob("*.png"))


def test_cam_overlay_shape_and_range():
    from edgeexit.explain import cam_overlay

    img = np.zeros((24, 24, 3), np.uint8)
    cam = np.zeros((6, 6), np.float32)
    cam[1, 4] = 5.0
    over = cam_overlay(img, cam)
    assert over.shape == (24, 24, 3) and 0 <= over.min() and over.max() <= 1
    hot = np.unravel_index(np.argmax(over[..., 0]), over.shape[:2])  # jet's red end sits on the CAM's peak
    assert 4 <= hot[0] <= 8 and 16 <= hot[1] <= 20
    gray = cam_overlay(np.zeros((24, 24, 1), np.uint8), -np.ones((3, 3)))  # no positive mass: plain blend
    assert gray.shape == (24, 24, 3)


def test_evaluate_uses_each_gates_kept_exits(tiny_ckpt, test_folder, tmp_path):
    """A policy that keeps exit 1 only: images leave at exit 1 or the last, exits 0 and 2 have no stage (no AUROC,
    no cost), and the costs are those of that chain."""
    ckpt = tmp_path / "forced.pt"
    calibrate(tiny_ckpt, out=ckpt, exits="1", gates="margin,coh_ssim,learned", stage_overhead=0, log=lambda _m: None)
    out = tmp_path / "rep"
    result = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(test_folder), "--out", str(out), "--quiet",
                                 "--corrupt", "blur", "--severities", "2"])
    assert result.exit_code == 0, result.output
    report = strict_json(out / "report.json")
    cal = load_checkpoint(ckpt)["calibration"]
    for name, g in report["gates"].items():
        assert g["exits"] == [1], name
        assert g["histogram"][0] == g["histogram"][2] == 0 and sum(g["histogram"]) == report["n"]
        assert g["kept_auroc"][0] is None and g["kept_auroc"][2] is None and g["kept_auroc"][1] is not None
        assert len(g["auroc"]) == 3  # gate quality: every exit kept
        assert g["exit_cost"][0] is None and g["exit_cost"][2] is None
        assert g["exit_cost"][1] == pytest.approx(cal["gates"][name]["stage_cost"][0])
        hist = np.asarray(g["histogram"])
        assert g["mean_cost"] == pytest.approx((hist[1] * g["exit_cost"][1] + hist[3] * g["exit_cost"][3]) / hist.sum())
        assert report["corruptions"]["blur"]["severities"]["2"]["gates"][name]["histogram"][0] == 0


def test_explain_grids_carry_a_legend_of_their_abbreviations():
    from edgeexit.explain import abbreviation_legend
    from edgeexit.gates import GATES

    legend = abbreviation_legend()
    for spec in GATES.values():  # salH, pat, cos ... each explained
        assert f"{spec.label} = {spec.description}" in legend
    assert max(len(line) for line in legend.splitlines()) < 200


def test_evaluate_flags_a_loss_beyond_target_and_calibration_interval(calibrated, test_folder, tmp_path):
    from edgeexit.checkpoint import save_checkpoint
    from edgeexit.evaluate import evaluate

    ckpt = load_checkpoint(calibrated)
    assert ckpt["calibration"]["confidence"]["method"] == "paired percentile bootstrap"
    logs: list[str] = []
    report = evaluate(calibrated, test_folder, out=tmp_path / "r0", plots=False, log=logs.append)
    loss = report["gates"][report["winner"]]["drop"]
    assert report["calibration"]["confidence"] == ckpt["calibration"]["confidence"]
    # the same checkpoint with a target and an interval both below the loss measured here: flagged, once
    ckpt["calibration"]["target"]["max_drop"] = loss - 1.0
    ckpt["calibration"]["confidence"]["drop"].update(low=loss - 3.0, high=loss - 0.5)
    save_checkpoint(tmp_path / "tight.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    logs = []
    evaluate(tmp_path / "tight.pt", test_folder, out=tmp_path / "r1", plots=False, log=logs.append)
    flags = [m for m in logs if "exceeds the" in m]
    assert len(flags) == 1 and flags[0].startswith("edgeexit: warning: the accuracy loss here")
    # an interval that reaches the loss: not flagged (the calibration split's noise explains it)
    ckpt["calibration"]["confidence"]["drop"].update(high=loss + 0.5)
    save_checkpoint(tmp_path / "wide.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    logs = []
    evaluate(tmp_path / "wide.pt", test_folder, out=tmp_path / "r2", plots=False, log=logs.append)
    assert not [m for m in logs if "exceeds the" in m]

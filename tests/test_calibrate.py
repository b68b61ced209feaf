"""Tests for edgeexit.collect and edgeexit.calibrate (and the `edgeexit calibrate` command), on the tiny checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeexit import gates as G
from edgeexit.calibrate import CostModel, calibrate, calibrate_outputs, load_costs, model_costs, parse_gates
from edgeexit.checkpoint import load_checkpoint, load_model, save_checkpoint
from edgeexit.cli import app
from edgeexit.collect import calibration_images, collect
from edgeexit.policy import ExitPolicy
from edgeexit.preprocess import Preprocess
from edgeexit.thresholds import simulate

from .conftest import write_folder

runner = CliRunner()


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeexit: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cal_outputs(tiny_ckpt):
    """The tiny model's outputs on its calibration split."""
    model, ckpt = load_model(tiny_ckpt)
    images = calibration_images(ckpt)
    outputs = collect(model, images.images, images.labels, Preprocess.from_dict(ckpt["preprocess"]), batch_size=4)
    return model, ckpt, outputs


def costs_json(path: Path, segments, heads, metric="latency_ms", measured=None) -> Path:
    path.write_text(json.dumps({"schema": "edgeexit-costs/1", "metric": metric, "device": "test", "backend": "none",
                                "segments": segments, "heads": heads, "measured": measured or {}}))
    return path


# ----------------------------------------------------------------------------------------------------------------
# collect
# ----------------------------------------------------------------------------------------------------------------
def test_exit_outputs_record(cal_outputs):
    model, ckpt, out = cal_outputs
    n, e = len(out), model.num_exits
    assert n == ckpt["split"]["num_val"] and e == 4
    assert out.logits.shape == (n, e, len(ckpt["classes"])) and out.logits.dtype == np.float32
    assert len(out.cams) == e and all(c.shape[0] == n and c.ndim == 3 for c in out.cams)
    np.testing.assert_array_equal(out.classes, out.logits.argmax(axis=2))
    np.testing.assert_array_equal(out.correct, out.classes == out.labels[:, None])
    np.testing.assert_array_equal(out.patience, G.patience_counts(out.classes))
    temps = [1.0, 2.0, 0.5, 1.5]
    sig = out.signals(temps)
    assert sig.shape == (n, e, 7) and sig.dtype == np.float32
    for i in range(e):  # previous map of exit i = CAM of exit i - 1
        expected = G.exit_signals(out.logits[:, i], out.cams[i], out.cams[i - 1] if i else None, temps[i])
        np.testing.assert_allclose(sig[:, i], expected, atol=1e-6)
    # the CAM contract: mean of the map = logit of the predicted class - bias
    bias = model.heads[-1].fc.bias.detach().numpy()
    top = out.classes[:, -1]
    np.testing.assert_allclose(out.cams[-1].mean(axis=(1, 2)), out.logits[np.arange(n), -1, top] - bias[top], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# calibration on collected outputs
# ----------------------------------------------------------------------------------------------------------------
def test_calibration_meets_target_on_its_split(cal_outputs):
    model, _, out = cal_outputs
    costs = model_costs(model, stage_overhead=0)  # free calls: the tiny model's exits are worth keeping
    res = calibrate_outputs(out, costs, max_drop=1.0)
    cal = res.calibration
    target = cal["target"]["accuracy"]
    assert target == pytest.approx(out.exit_accuracy()[-1] - 0.01)
    assert set(cal["gates"]) == set(G.GATE_NAMES)
    assert cal["subset_search"]["subsets"] == 2 ** (out.num_exits - 1)
    classes, correct = out.classes, out.correct
    for gate, g in cal["gates"].items():
        pol = ExitPolicy.from_dict(g["policy"])
        assert pol.gate == gate and pol.temperatures == cal["temperatures"] and pol.learned is not None
        assert list(pol.kept_internal) == g["exits"] == pol.exits
        assert all(pol.learned[i] is not None for i in pol.kept_internal)
        assert all(pol.thresholds[i] == math.inf for i in range(out.num_exits - 1) if i not in pol.kept_internal)
        assert g["signs"] == pol.signs and all(s in (1.0, -1.0) for s in pol.signs)
        assert len(g["path"]) == len(g["path_thresholds"]) >= 1
        kept = list(pol.kept)
        chain_cost = costs.fractions(pol.exits)
        if gate == "learned":  # cross-fitted: the thresholds were searched on out-of-fold scores
            assert g["cross_fitted"]
            _, acc, cost = simulate(res.oriented[gate], correct[:, kept], chain_cost,
                                    [pol.thresholds[i] for i in pol.kept_internal])
        else:  # re-simulate the stored policy exactly as the runtime applies it, on its own stages
            ex = pol.decide(out.signals(pol.temperatures, pol.exits), classes)
            acc, cost = correct[np.arange(len(out)), ex].mean(), costs.exit_vector(pol.exits)[ex].mean()
            assert g["histogram"] == np.bincount(ex, minlength=out.num_exits).tolist()
        assert acc == pytest.approx(g["accuracy"]) and cost == pytest.approx(g["mean_cost"])
        assert acc >= target - 1e-9, gate  # the full-depth point always qualifies, so every gate meets it
        # the gate's subset is the cheapest of every subset tried that meets the target
        tried = g["subsets"]
        assert len(tried) == cal["subset_search"]["subsets"]
        assert g["mean_cost"] == pytest.approx(min(t["mean_cost"] for t in tried if t["meets_target"]))
    winner = cal["gates"][cal["winner"]]
    assert res.policy == winner["policy"]
    assert winner["mean_cost"] == min(g["mean_cost"] for g in cal["gates"].values() if g["meets_target"])


def test_confidence_holds_the_target_for_the_upper_bound(cal_outputs):
    from statistics import NormalDist

    from edgeexit.thresholds import loss_upper_bound

    model, _, out = cal_outputs
    costs = model_costs(model, stage_overhead=0)
    plain = calibrate_outputs(out, costs, max_drop=5.0, gate_names=["max_prob", "margin"]).calibration
    held = calibrate_outputs(out, costs, max_drop=5.0, gate_names=["max_prob", "margin"],
                             confidence_level=0.95).calibration
    assert held["target"]["confidence"] == 0.95 and plain["target"]["confidence"] is None
    z = NormalDist().inv_cdf(0.95)
    for gate, g in held["gates"].items():
        pol = ExitPolicy.from_dict(g["policy"])
        ex = pol.decide(out.signals(pol.temperatures, pol.exits), out.classes)
        rows = np.arange(len(out))
        assert 100 * loss_upper_bound(out.correct[rows, ex], out.correct[:, -1], z) <= 5.0 + 1e-9, gate
        assert g["mean_cost"] >= plain["gates"][gate]["mean_cost"] - 1e-12, gate  # confidence is paid in cost
    with pytest.raises(ValueError, match="--confidence"):
        calibrate_outputs(out, costs, budget=0.5, confidence_level=0.95)
    with pytest.raises(ValueError, match=r"\[0.5, 1\)"):
        calibrate_outputs(out, costs, max_drop=1.0, confidence_level=1.2)


def test_budget_target_and_gate_subset(cal_outputs):
    model, _, out = cal_outputs
    res = calibrate_outputs(out, model_costs(model, stage_overhead=0), budget=0.5, gate_names=["max_prob", "sal_entropy"])
    cal = res.calibration
    assert list(cal["gates"]) == ["max_prob", "sal_entropy"] and cal["target"]["kind"] == "budget"
    for g in cal["gates"].values():
        assert g["mean_cost"] <= 0.5 + 1e-12 and g["meets_target"]
    best = max(g["accuracy"] for g in cal["gates"].values())
    assert cal["gates"][cal["winner"]]["accuracy"] == best
    with pytest.raises(ValueError, match="not both"):
        calibrate_outputs(out, model_costs(model), max_drop=1.0, budget=0.5)
    with pytest.raises(ValueError, match="unknown gate"):
        parse_gates("max_prob,softmax")


def test_costs_change_the_thresholds(cal_outputs, tmp_path):
    model, _, out = cal_outputs
    cheap = load_costs(costs_json(tmp_path / "cheap.json", [1, 1, 1, 97], [0, 0, 0, 1]), 4)
    dear = load_costs(costs_json(tmp_path / "dear.json", [97, 1, 1, 1], [0, 0, 0, 1]), 4)
    assert cheap.fraction[0] < 0.05 and dear.fraction[0] > 0.9
    a = calibrate_outputs(out, cheap, budget=0.5).calibration
    b = calibrate_outputs(out, dear, budget=0.5).calibration
    thr_a = {g: v["policy"]["thresholds"] for g, v in a["gates"].items()}
    thr_b = {g: v["policy"]["thresholds"] for g, v in b["gates"].items()}
    assert thr_a != thr_b
    assert a["gates"][a["winner"]]["mean_cost"] != pytest.approx(b["gates"][b["winner"]]["mean_cost"])
    assert a["costs"]["unit"] == "latency_ms" and a["costs"]["source"].endswith("cheap.json")


def test_load_costs_formats_and_errors(tmp_path):
    measured = {"energy_mj": {"segments": [{"mean": 2.0}, {"mean": 1.0}], "heads": [0.5, 0.5]}}
    path = costs_json(tmp_path / "c.json", [1.0, 3.0], [0.25, 0.25], measured=measured)
    lat = load_costs(path, 2)
    assert lat.cumulative == (1.25, 4.5) and lat.reference == 4.25 and lat.unit == "latency_ms"
    en = load_costs(path, 2, "energy_mj")
    assert en.cumulative == (2.5, 4.0) and en.reference == 3.5 and en.unit == "energy_mj"
    with pytest.raises(ValueError, match="3 exits"):
        load_costs(path, 3)
    with pytest.raises(ValueError, match="no measured"):
        load_costs(costs_json(tmp_path / "d.json", [1, 1], [1, 1]), 2, "energy_mj")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_costs(tmp_path / "bad.json", 2)
    with pytest.raises(FileNotFoundError):
        load_costs(tmp_path / "missing.json", 2)
    assert CostModel.from_dict(lat.to_dict()) == lat


# ----------------------------------------------------------------------------------------------------------------
# the command and the checkpoint
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def moved_layout(tiny_ckpt, tiny_folder, tmp_path):
    """tmp/train (a copy of the training folder), tmp/test (other images), and a checkpoint recording tmp/train."""
    train = tmp_path / "train"
    shutil.copytree(tiny_folder, train)
    test = write_folder(tmp_path / "test", per_class=4, seed=9)
    ckpt = load_checkpoint(tiny_ckpt)
    ckpt["split"] = {**ckpt["split"], "data": str(train)}
    path = tmp_path / "model.pt"
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return path, train, test


def test_cli_calibrates_in_place_and_never_reads_the_test_folder(moved_layout, monkeypatch):
    path, train, test = moved_layout
    opened: list[Path] = []
    import edgeexit.data
    import edgeexit.imageio
    from PIL import Image

    real_load, real_open = edgeexit.imageio.load_image, Image.open

    def spy_load(p, *a, **k):
        opened.append(Path(p).resolve())
        return real_load(p, *a, **k)

    def spy_open(fp, *a, **k):
        if isinstance(fp, (str, Path)):
            opened.append(Path(fp).resolve())
        return real_open(fp, *a, **k)

    monkeypatch.setattr(edgeexit.imageio, "load_image", spy_load)
    monkeypatch.setattr(edgeexit.data, "load_image", spy_load)
    monkeypatch.setattr(Image, "open", spy_open)
    before = path.stat().st_mtime_ns
    result = runner.invoke(app, ["calibrate", str(path), "--max-drop", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "max_prob" in result.stdout and "policy: gate" in result.stdout
    ckpt = torch.load(path, weights_only=True)  # updated in place, still a weights-only checkpoint
    assert path.stat().st_mtime_ns != before
    assert ckpt["policy"]["gate"] == ckpt["calibration"]["winner"]
    assert ckpt["calibration"]["target"]["max_drop"] == 2.0
    assert ckpt["calibration"]["split"]["n"] == ckpt["split"]["num_val"]
    ExitPolicy.from_dict(ckpt["policy"])
    assert opened, "the spy saw no image reads"
    assert not any(test.resolve() in p.parents for p in opened), "calibration opened a test image"
    assert all(train.resolve() in p.parents for p in opened)
    assert len(set(opened)) == ckpt["split"]["num_val"]  # only the held-out validation part, no training image
    assert not list(path.parent.glob(".model.pt.*"))  # no temporary file left behind


def test_cli_missing_training_folder_and_data_override(moved_layout, tmp_path):
    path, train, _ = moved_layout
    moved = tmp_path / "moved_train"
    train.rename(moved)
    line = one_line_error(runner.invoke(app, ["calibrate", str(path), "--quiet"]))
    assert str(train) in line and "--data" in line
    out = tmp_path / "calibrated.pt"
    result = runner.invoke(app, ["calibrate", str(path), "--data", str(moved), "--out", str(out), "--gates",
                                 "max_prob,coh_ssim", "--budget", "0.6", "--quiet"])
    assert result.exit_code == 0, result.output
    cal = load_checkpoint(out)["calibration"]
    assert set(cal["gates"]) == {"max_prob", "coh_ssim"} and cal["split"]["data"] == str(moved.resolve())
    assert "policy" not in load_checkpoint(path) or load_checkpoint(path)["policy"] is None  # --out leaves CKPT alone


def test_cli_costs_json_changes_the_policy(tiny_ckpt, tmp_path):
    cheap = costs_json(tmp_path / "cheap.json", [1, 1, 1, 97], [0, 0, 0, 1])
    dear = costs_json(tmp_path / "dear.json", [97, 1, 1, 1], [0, 0, 0, 1])
    cals = {}
    for name, costs in (("cheap", cheap), ("dear", dear)):
        out = tmp_path / f"{name}.pt"
        result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--costs", str(costs), "--budget", "0.5",
                                     "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        cals[name] = load_checkpoint(out)["calibration"]
    a, b = cals["cheap"], cals["dear"]
    assert a["cost_source"] == str(cheap) and a["costs"]["unit"] == "latency_ms"
    assert [g["policy"]["thresholds"] for g in a["gates"].values()] != [g["policy"]["thresholds"] for g in b["gates"].values()]
    assert a["gates"][a["winner"]]["mean_cost"] != pytest.approx(b["gates"][b["winner"]]["mean_cost"])


def test_cli_errors_are_one_line(tiny_ckpt, tmp_path):
    assert "not both" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--max-drop", "1", "--budget", "0.5"]))
    assert "unknown gate" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--gates", "softmax"]))
    assert "not found" in one_line_error(runner.invoke(app, ["calibrate", str(tmp_path / "none.pt")]))
    bad = costs_json(tmp_path / "c.json", [1, 1], [1, 1])
    assert "exits" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--costs", str(bad)]))
    assert "--costs" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--cost-metric", "energy_mj"]))
    assert "--confidence" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--confidence", "0.99",
                                                                 "--budget", "0.5"]))
    assert "--confidence" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--confidence", "1.5"]))


# ----------------------------------------------------------------------------------------------------------------
# kept exits through the command
# ----------------------------------------------------------------------------------------------------------------
def test_cli_writes_every_gates_exits(tiny_ckpt, tmp_path):
    out = tmp_path / "cal.pt"
    result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--stage-overhead", "0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "exits" in result.stdout and f"searched 8 exit subset(s) x {len(G.GATE_NAMES)} gate(s)" in result.stderr
    ckpt = load_checkpoint(out)
    cal = ckpt["calibration"]
    assert cal["costs"]["boundary"] == 0.0 and cal["subset_search"]["subsets"] == 8
    for gate, g in cal["gates"].items():
        pol = ExitPolicy.from_dict(json.loads(json.dumps(g["policy"])))  # as the manifest will carry it
        assert pol.exits == g["exits"] and pol.gate == gate
    winner = ExitPolicy.from_dict(ckpt["policy"])
    assert winner.exits == cal["gates"][cal["winner"]]["exits"]
    assert f"(exits {','.join(map(str, winner.exits)) or 'none'})" in result.stdout


def test_cli_forces_exits_and_prices_calls(tiny_ckpt, tmp_path):
    forced = tmp_path / "forced.pt"
    result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--exits", "1", "--gates", "margin,patience",
                                 "--out", str(forced), "--quiet"])
    assert result.exit_code == 0, result.output
    cal = load_checkpoint(forced)["calibration"]
    assert all(g["exits"] == [1] for g in cal["gates"].values())
    assert all(ExitPolicy.from_dict(g["policy"]).kept == (1, 3) for g in cal["gates"].values())
    plain = tmp_path / "plain.pt"
    result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--exits", "none", "--gates", "margin",
                                 "--out", str(plain), "--quiet"])
    assert result.exit_code == 0, result.output
    g = load_checkpoint(plain)["calibration"]["gates"]["margin"]
    assert g["exits"] == [] and g["mean_cost"] == pytest.approx(1.0)
    # a call that costs far more than the tiny network: a second stage never pays, so a kept exit must take
    # every image (one call, cheaper compute) or the plain network wins
    dear = tmp_path / "dear.pt"
    result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--stage-overhead", "1e9", "--gates", "max_prob",
                                 "--out", str(dear), "--quiet"])
    assert result.exit_code == 0, result.output
    cal = load_checkpoint(dear)["calibration"]
    g = cal["gates"]["max_prob"]
    assert cal["costs"]["boundary"] == 1e9 and g["mean_cost"] <= 1.0
    assert g["exits"] == [] or (len(g["exits"]) == 1 and g["histogram"][-1] == 0)


def test_cli_exit_selection_errors_are_one_line(tiny_ckpt, tmp_path):
    def err(*args):
        return one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), *args]))

    assert "not an internal exit" in err("--exits", "3")
    assert "--exits needs" in err("--exits", "one,two")
    assert "not both" in err("--exits", "1", "--max-kept", "1")
    assert "--max-kept must be >= 0" in err("--max-kept", "-1")
    assert "--stage-overhead" in err("--stage-overhead", "-5")
    v1 = costs_json(tmp_path / "c.json", [1, 1, 1, 1], [0, 0, 0, 1])
    assert "--stage-overhead" in err("--costs", str(v1), "--stage-overhead", "100")
    bad = tmp_path / "v2.json"
    bad.write_text(json.dumps({"schema": "edgeexit-costs/2", "metric": "latency_ms", "segments": [1, 1, 1, 1],
                               "heads": [0, 0, 0, 1]}))
    assert "boundary" in err("--costs", str(bad))


def test_cli_reads_costs_v2(tiny_ckpt, tmp_path):
    """A profile's v2 file: compute costs plus the measured per-call overhead, which calibration charges per stage."""
    data = {"schema": "edgeexit-costs/2", "metric": "latency_ms", "segments": [0.1, 0.1, 0.1, 0.1],
            "heads": [0.01, 0.01, 0.01, 0.01], "boundary": 0.03,
            "stages": [{"exits": [1, 3], "latency_ms": 0.5}, {"exits": [3], "latency_ms": 0.44}],
            "measured": {"latency_ms": {"segments": [0.1, 0.1, 0.1, 0.1], "heads": [0.01, 0.01, 0.01, 0.01],
                                        "boundary": 0.03}}}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "cal.pt"
    result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--costs", str(path), "--gates", "max_prob",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    cal = load_checkpoint(out)["calibration"]
    assert cal["costs"]["boundary"] == 0.03 and cal["costs"]["stage_timings"] == data["stages"]
    g = cal["gates"]["max_prob"]
    model = CostModel.from_dict(cal["costs"])
    np.testing.assert_allclose(g["stage_cost"], model.exit_costs(g["exits"]) / (0.4 + 0.01 + 0.03))

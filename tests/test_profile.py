"""`edgeexit profile` on stage bundles: statistics, the boundary estimate and the MAC-share split (the cost rule
holds), the profile.json / costs.json v2 contract, seeded frame sampling, plots, meters, interruption. The CLI
runs on a tiny two-stage bundle (exits 1 and 3 of 4 kept) with ONNX Runtime CPU and a constant 5 W meter."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime import profile as prof_mod
from edgeexit.runtime.commands import ProfileOptions, profile_command
from edgeexit.runtime.profile import (COSTS_SCHEMA, boundary_estimate, costs_from_profile, latency_summary,
                                      load_frames, split_stage_costs)
from edgeexit.stages import exit_costs, reference_cost

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--backend", "onnxruntime", "--providers", "cpu", "--threads", "1", "--frames", "12", "--iterations", "20",
        "--warmup-ms", "20", "--block", "5", "--quiet"]
KEPT = (1, 3)  # the fixture bundle's stages end at exits 1 and 3 (exits 0 and 2 not kept)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "edgeexit.cli", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def _run(bundle, source, out, **kw):
    """profile_command in-process with fast settings; returns (code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    settings = dict(backend="onnxruntime", providers="cpu", threads=1, frames=4, iterations=4, warmup_ms=0, block=2,
                    quiet=True)
    settings.update(kw)
    code = profile_command(ProfileOptions(bundle=str(bundle), source=str(source), out=str(out), **settings),
                           stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_ckpt) -> Path:
    """``tiny_ckpt`` (4 exits) exported as a stage bundle keeping internal exit 1: stages end at exits 1 and 3."""
    from edgeexit.export.onnx_export import export_bundle
    from edgeexit.policy import ExitPolicy

    policy = ExitPolicy(gate="max_prob", thresholds=[math.inf, 0.5, math.inf], signs=[1.0] * 3,
                        temperatures=[1.0] * 4, exits=[1])
    out = tmp_path_factory.mktemp("profile_bundle") / "bundle"
    return export_bundle(tiny_ckpt, out, samples=8, policy=policy, log=lambda _m: None)


@pytest.fixture(scope="module")
def profiled(bundle_dir, tiny_folder, tmp_path_factory):
    """One `edgeexit profile` run (subprocess) with a constant 5 W meter: (out dir, completed process)."""
    out = tmp_path_factory.mktemp("profile") / "prof"
    proc = _cli("profile", bundle_dir, tiny_folder, "--out", out, "--meter", "constant", "--power-watts", "5", *FAST)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


# ------------------------------------------------------------------------------------------------------ statistics
def test_latency_summary_matches_numpy():
    values = [1.0, 2.0, 2.5, 3.0, 10.0, 4.0, 0.5, 7.25, 3.3, 2.2, 9.9, 1.1]
    s = latency_summary(values)
    v = np.asarray(values)
    assert s["count"] == len(values)
    assert s["min"] == v.min() and s["max"] == v.max()
    assert s["mean"] == pytest.approx(v.mean())
    for key, q in (("median", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert s[key] == pytest.approx(np.percentile(v, q)), key
    assert s["std"] == pytest.approx(v.std())
    assert s["cv"] == pytest.approx(v.std() / v.mean())


def test_latency_summary_edge_cases():
    empty = latency_summary([])
    assert empty["count"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["cv"])
    one = latency_summary([2.0, float("nan")])  # non-finite values are dropped
    assert one["count"] == 1 and one["p99"] == 2.0 and one["cv"] == 0.0


# ------------------------------------------------------------------------------------------------- the cost model
SEG_MACS = [400, 300, 330, 460]
HEAD_MACS = [10, 50, 47, 2]


def _synthetic(rate: float, boundary: float, kept_internal):
    """Stage times and full.onnx time of a device where compute = rate x MACs and every call costs ``boundary``."""
    seg = [rate * m for m in SEG_MACS]
    head = [rate * m for m in HEAD_MACS]
    cum = exit_costs(seg, head, kept_internal, boundary)
    return list(np.diff(np.concatenate([[0.0], cum]))), reference_cost(seg, head, boundary)


@pytest.mark.parametrize("kept", [(1,), (0, 2), (0, 1, 2)])
def test_boundary_estimate_recovers_the_call_overhead(kept):
    stages, mono = _synthetic(0.001, 0.05, kept)
    b, note = boundary_estimate(stages, mono, sum(HEAD_MACS[k] for k in kept), sum(SEG_MACS) + HEAD_MACS[-1])
    assert note is None and b == pytest.approx(0.05, rel=1e-9)


def test_boundary_estimate_clamps_and_refuses_one_stage():
    stages, mono = _synthetic(0.001, 0.05, (1,))
    b, note = boundary_estimate(stages, mono + 1.0, HEAD_MACS[1], sum(SEG_MACS) + HEAD_MACS[-1])  # mono slower
    assert b == 0.0 and "noise" in note
    b, note = boundary_estimate([1.0], 1.0, 0, 100)
    assert b is None and "one stage" in note


@pytest.mark.parametrize("kept", [(), (1,), (0, 2)])
def test_split_follows_the_cost_rule_and_mac_shares(kept):
    stage_values = [0.7, 0.4, 0.3][: len(kept) + 1]
    b = 0.05
    seg, head = split_stage_costs(stage_values, b, SEG_MACS, HEAD_MACS, kept)
    assert len(seg) == len(head) == len(SEG_MACS)
    # leaving at each kept exit costs exactly the stages measured up to it
    np.testing.assert_allclose(exit_costs(seg, head, kept, b), np.cumsum(stage_values), rtol=1e-12)
    # within a stage every segment and head (kept or not) is charged at one ms-per-MAC rate
    first = 0
    for value, last in zip(stage_values, [*kept, len(SEG_MACS) - 1]):
        rate = (value - b) / (sum(SEG_MACS[first:last + 1]) + HEAD_MACS[last])
        np.testing.assert_allclose(seg[first:last + 1], rate * np.asarray(SEG_MACS[first:last + 1]), rtol=1e-12)
        np.testing.assert_allclose(head[first:last + 1], rate * np.asarray(HEAD_MACS[first:last + 1]), rtol=1e-12)
        first = last + 1


# ------------------------------------------------------------------------------------------------ frame selection
def test_frames_are_a_seeded_sample_across_classes(tiny_folder):
    classes = ("circle", "square", "stripes")  # 12 images each, sorted by class on disk
    pre = lambda img: np.asarray(img, np.float32).transpose(2, 0, 1)  # noqa: E731
    x1, lab1, info = load_frames(str(tiny_folder), pre, classes, 9, seed=3)
    x2, lab2, _ = load_frames(str(tiny_folder), pre, classes, 9, seed=3)
    x3, lab3, _ = load_frames(str(tiny_folder), pre, classes, 9, seed=4)
    assert x1.shape[0] == 9 and info["distinct_frames"] == 9 and "seed 3" in info["selection"]
    np.testing.assert_array_equal(x1, x2)  # same seed, same frames in the same order
    assert lab1.tolist() == lab2.tolist()
    assert not np.array_equal(x1, x3)
    assert len(set(lab1.tolist())) >= 2  # not the first 9 files (all "circle")
    # every frame drawn once (no duplicates) while the source has enough
    assert len({x.tobytes() for x in x1}) == 9
    # a short source is cycled up to the frames asked for
    xc, labc, infoc = load_frames(str(tiny_folder), pre, classes, 50, seed=0)
    assert xc.shape[0] == 50 and infoc["distinct_frames"] == 36 and np.array_equal(xc[36:], xc[:14])


# ------------------------------------------------------------------------------------------------------ the CLI run
def test_profile_writes_files_and_plots(profiled):
    out, proc = profiled
    for name in ("profile.json", "costs.json", "latency_breakdown.png", "power_trace.png", "energy_per_frame.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    table = proc.stdout
    for text in ("stage_0", "stage_1", "full.onnx", "boundary (per call)", "leave at exit 1", "adaptive (batch 1)",
                 "full (batch 1)", "chain (batch 1)", "adaptive vs full", "estimate"):
        assert text in table, text


def test_costs_json_v2_contract(profiled, bundle_dir):
    out, _ = profiled
    costs = json.loads((out / "costs.json").read_text())
    p = json.loads((out / "profile.json").read_text())
    e = json.loads((bundle_dir / "manifest.json").read_text())["num_exits"]
    for key in ("schema", "metric", "device", "backend", "segments", "heads", "boundary", "stages", "measured",
                "split", "label", "is_estimate", "bundle", "num_exits", "batch", "clocks_locked", "created",
                "edgeexit_version"):
        assert key in costs, key
    assert costs["schema"] == COSTS_SCHEMA == "edgeexit-costs/2"
    assert costs["metric"] == "latency_ms" and costs["split"] == "stage time by MAC share"
    assert "onnxruntime" in costs["backend"] and costs["num_exits"] == e == 4
    assert len(costs["segments"]) == e and len(costs["heads"]) == e
    assert all(isinstance(v, float) and v >= 0 for v in costs["segments"] + costs["heads"])
    assert isinstance(costs["boundary"], float) and costs["boundary"] >= 0
    assert [s["index"] for s in costs["stages"]] == [0, 1]
    assert all(s["exits"] == list(KEPT) for s in costs["stages"])
    stage_ms = [s["latency_ms"] for s in costs["stages"]]
    assert stage_ms == pytest.approx([s["latency_ms_per_frame"] for s in p["stages"]], rel=1e-5)
    # the cost rule gives back the measured stages: leaving at exit 1 = stage 0, at exit 3 = stage 0 + stage 1
    np.testing.assert_allclose(exit_costs(costs["segments"], costs["heads"], KEPT[:-1], costs["boundary"]),
                               np.cumsum(stage_ms), rtol=1e-4)
    # heads that were not kept (0 and 2) are charged at their stage's ms-per-MAC rate, not left at zero
    seg_macs, head_macs = p["bundle"]["segment_macs"], p["bundle"]["head_macs"]
    rate0 = costs["segments"][0] / seg_macs[0]
    assert costs["heads"][0] == pytest.approx(rate0 * head_macs[0], rel=1e-4)
    assert costs["segments"][1] == pytest.approx(rate0 * seg_macs[1], rel=1e-4)
    lat, en = costs["measured"]["latency_ms"], costs["measured"]["energy_mj"]
    assert lat["segments"] == costs["segments"] and lat["heads"] == costs["heads"]
    assert lat["boundary"] == costs["boundary"]
    assert en["label"] == "estimate" and en["is_estimate"] is True
    # constant 5 W: energy (mJ) = 5 W x latency (ms), per segment, head and call
    np.testing.assert_allclose(en["segments"], 5 * np.asarray(lat["segments"]), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(en["heads"], 5 * np.asarray(lat["heads"]), rtol=1e-4, atol=1e-9)
    assert en["boundary"] == pytest.approx(5 * lat["boundary"], rel=1e-4, abs=1e-9)


def test_profile_json_contents(profiled, bundle_dir):
    out, _ = profiled
    p = json.loads((out / "profile.json").read_text())
    assert p["schema"] == "edgeexit-profile/2" and p["complete"] is True and p["interrupted"] is False
    assert p["bundle"]["kept_exits"] == list(KEPT) and p["bundle"]["gate"] == "max_prob"
    assert p["backend"]["kind"] == "onnxruntime" and p["backend"]["providers"] == ["CPUExecutionProvider"]
    assert p["meter"]["is_estimate"] is True and p["energy_label"] == "estimate"
    assert p["source"]["distinct_frames"] == 12 and "seed 0" in p["source"]["selection"]
    assert [s["name"] for s in p["stages"]] == ["stage_0", "stage_1"] and p["monolithic"]["name"] == "full.onnx"
    assert [s["exit"] for s in p["stages"]] == list(KEPT)
    for part in p["stages"] + [p["monolithic"]]:
        s = part["latency_ms"]
        assert s["count"] >= 20
        assert s["min"] <= s["median"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
        assert s["cv"] == pytest.approx(s["std"] / s["mean"], rel=1e-6)
        assert part["energy_mj"]["mean_watts"] == pytest.approx(5.0)
    e = p["bundle"]["num_exits"]
    for mode in ("adaptive", "full", "chain"):
        run = p["runs"][mode]
        assert run["frames"] == 12 and sum(run["exit_histogram"]) == 12 and run["batches"] == 12
        assert all(run["exit_histogram"][k] == 0 for k in range(e) if k not in KEPT)  # only kept exits are taken
        assert run["energy_mj_per_frame"]["total"] > 0 and run["energy_mj_per_frame"]["windows"] == 3  # 12 / block 5
    assert p["runs"]["full"]["exit_histogram"][-1] == 12 and p["runs"]["chain"]["exit_histogram"][-1] == 12
    sv = p["savings"]
    a, f = p["runs"]["adaptive"], p["runs"]["full"]
    assert sv["latency_mean"] == pytest.approx(1 - a["latency_ms"]["mean"] / f["latency_ms"]["mean"], rel=1e-6)
    pred = sv["predicted_from_stages"]["latency_ms"]
    assert pred["chain"] == pytest.approx(sum(s["latency_ms_per_frame"] for s in p["stages"]), rel=1e-6)
    assert [x["index"] for x in p["exits"]] == [*KEPT, "full"]
    # the modes ran interleaved: their blocks alternate in the power trace
    spans = [s["label"] for s in p["power_trace"]["spans"] if s["label"] in ("adaptive", "full", "chain")]
    assert spans[:3] == ["adaptive", "full", "chain"] and spans[3:6] == ["full", "chain", "adaptive"]


def test_calibrate_accepts_profile_costs(profiled, tiny_ckpt, tmp_path):
    calibrate = pytest.importorskip("edgeexit.calibrate", reason="edgeexit calibrate is not there yet")
    if "edgeexit-costs/2" not in Path(calibrate.__file__).read_text():
        pytest.skip("edgeexit calibrate does not read costs.json v2 yet")
    out, _ = profiled
    proc = _cli("calibrate", tiny_ckpt, "--costs", out / "costs.json", "--out", tmp_path / "cal.pt", "--quiet",
                "--gates", "max_prob,margin")
    assert proc.returncode == 0, proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------------------- in-process runs
def test_no_meter_no_matplotlib(bundle_dir, tiny_folder, tmp_path, monkeypatch):
    """--meter none: energy is null everywhere, costs.json still valid; without matplotlib: one line, no plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, _, stderr = _run(bundle_dir, tiny_folder, tmp_path / "p", frames=5, iterations=5, meter="none")
    assert code == 0, stderr
    msgs = [line for line in stderr.splitlines() if "matplotlib" in line]
    assert len(msgs) == 1 and "plots skipped" in msgs[0]
    assert not list((tmp_path / "p").glob("*.png"))
    costs = json.loads((tmp_path / "p" / "costs.json").read_text())
    assert costs["measured"]["energy_mj"] is None and costs["label"] == "measured"
    p = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert p["meter"] is None and p["power_trace"] is None
    assert all(part["energy_mj"] is None for part in p["stages"] + [p["monolithic"]])
    assert p["savings"]["energy"] is None
    with pytest.raises(ValueError, match="energy_mj"):
        costs_from_profile(p, "energy_mj")


def test_single_stage_bundle_gets_no_costs(tiny_ckpt, tiny_folder, tmp_path):
    """A pipeline of one stage cannot separate the call overhead from compute: profile.json, no costs.json."""
    from edgeexit.export.onnx_export import export_bundle
    from edgeexit.policy import ExitPolicy

    policy = ExitPolicy(gate="max_prob", thresholds=[math.inf] * 3, signs=[1.0] * 3, temperatures=[1.0] * 4, exits=[])
    bundle = export_bundle(tiny_ckpt, tmp_path / "b", samples=4, policy=policy, check=False, log=lambda _m: None)
    code, _, stderr = _run(bundle, tiny_folder, tmp_path / "o", meter="none", plots=False)
    assert code == 1 and "costs.json not written" in stderr and "one stage" in stderr
    assert (tmp_path / "o" / "profile.json").is_file() and not (tmp_path / "o" / "costs.json").exists()


def test_energy_metric_needs_a_meter(bundle_dir, tiny_folder, tmp_path):
    proc = _cli("profile", bundle_dir, tiny_folder, "--out", tmp_path / "x", "--meter", "none",
                "--cost-metric", "energy_mj", *FAST)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("edgeexit: error:") and "energy_mj" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("profile", bundle_dir, tiny_folder, "--meter", "constant", *FAST)  # no --power-watts
    assert proc.returncode == 2 and "power" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("profile", bundle_dir, tiny_folder, "--gate", "margin", "--meter", "none", *FAST)  # not exported
    assert proc.returncode == 2 and "margin" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_energy_metric_with_constant_meter(bundle_dir, tiny_folder, tmp_path):
    code, _, _ = _run(bundle_dir, tiny_folder, tmp_path / "e", meter="constant", power_watts=2.0,
                      cost_metric="energy_mj", plots=False)
    assert code == 0
    costs = json.loads((tmp_path / "e" / "costs.json").read_text())
    assert costs["metric"] == "energy_mj" and costs["label"] == "estimate" and costs["is_estimate"] is True
    assert costs["segments"] == costs["measured"]["energy_mj"]["segments"]
    assert costs["boundary"] == costs["measured"]["energy_mj"]["boundary"]


def test_profiler_windows(bundle_dir):
    """Each stage's loop: real frames loaded and the earlier stages run outside its window ("prep"), one window
    per chunk; batch 2 rows per call."""
    from edgeexit.runtime.backends import open_backend
    from edgeexit.runtime.bundle import load_bundle
    from edgeexit.runtime.meters import ConstantMeter

    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, "onnxruntime", providers="cpu", threads=1, max_batch=2)
    meter = ConstantMeter(3.0)
    p = prof_mod.Profiler(bundle, backend, meter, batch=2, warmup_ms=0, iterations=7, block=3)
    x = np.random.default_rng(0).standard_normal((8, *bundle.input_shape)).astype(np.float32)
    meter.start()
    p.warmup(x)
    p.time_parts()
    p.run_modes(x, None)
    reading = p.stop_meter()
    backend.close()
    assert [part.label for part in p.parts] == ["stage_0", "stage_1", "full.onnx"]
    assert all(len(part.times_ms) == 7 and part.rows == 2 for part in p.parts)
    labels = [lab for _, lab in reading.marks]
    assert labels.count("stage_1") == 4 and labels.count("prep") == 12  # 4 chunks of 2 frames, 3 loops
    e = prof_mod._label_energy(reading, "stage_1")
    assert e["windows"] == 4 and e["joules"] / e["seconds"] == pytest.approx(3.0)
    assert len(p.runs["adaptive"].batch_ms) == 4 and len(p.runs["chain"].exits) == 8
    assert labels.count("adaptive") == 2  # blocks of 3 frames rounded up to 2 batches of 2: 2 windows per mode


def test_interrupt_prints_partial_and_returns_130(bundle_dir, tiny_folder, tmp_path, monkeypatch):
    def boom(self, x, labels):
        raise KeyboardInterrupt

    monkeypatch.setattr(prof_mod.Profiler, "run_modes", boom)
    code, stdout, _ = _run(bundle_dir, tiny_folder, tmp_path / "i", iterations=3, meter="constant", power_watts=1.0)
    assert code == 130
    assert "INTERRUPTED" in stdout and "stage_0" in stdout
    p = json.loads((tmp_path / "i" / "profile.json").read_text())
    assert p["complete"] is False and p["interrupted"] is True
    assert len(p["stages"]) == 2 and p["runs"] == {}
    assert not (tmp_path / "i" / "costs.json").exists()  # costs need a complete profile


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_subprocess_exits_130(bundle_dir, tiny_folder, tmp_path):
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "edgeexit.cli", "profile", str(bundle_dir), str(tiny_folder), "--out", str(out),
           "--backend", "onnxruntime", "--providers", "cpu", "--meter", "none", "--frames", "4",
           "--warmup-ms", "60000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = proc.stderr.readline()
            if "warm-up" in line or not line:
                break
        assert "warm-up" in line
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "INTERRUPTED" in stdout
    p = json.loads((out / "profile.json").read_text())
    assert p["complete"] is False and p["interrupted"] is True


def test_profile_runs_without_torch(bundle_dir, tiny_folder, tmp_path):
    """The runtime never imports torch: profile with torch made unimportable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgeexit.cli import main\n"
            f"sys.argv = ['edgeexit', 'profile', {str(bundle_dir)!r}, {str(tiny_folder)!r}, '--out', "
            f"{str(tmp_path / 'nt')!r}, '--meter', 'none', '--frames', '3', '--iterations', '3', '--warmup-ms', '0', "
            "'--quiet', '--backend', 'onnxruntime']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "nt" / "costs.json").is_file()


def _fake_jetson(root: Path) -> None:
    """An Orin-Nano-like INA3221 hwmon tree (VDD_IN 5 W, VDD_CPU_GPU_CV 2 W, VDD_SOC 1 W) and locked clocks."""
    d = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    d.mkdir(parents=True)
    for k, (label, mv, ma) in {1: ("VDD_IN", 5000, 1000), 2: ("VDD_CPU_GPU_CV", 5000, 400),
                               3: ("VDD_SOC", 5000, 200)}.items():
        (d / f"in{k}_label").write_text(label + "\n")
        (d / f"in{k}_input").write_text(f"{mv}\n")
        (d / f"curr{k}_input").write_text(f"{ma}\n")
    for cpu in ("cpu0", "cpu1"):
        f = root / f"sys/devices/system/cpu/{cpu}/cpufreq"
        f.mkdir(parents=True)
        (f / "scaling_min_freq").write_text("1510400\n")
        (f / "scaling_max_freq").write_text("1510400\n")


def test_sampled_meter_with_rails(bundle_dir, tiny_folder, tmp_path):
    """A sampled meter (fake Jetson sysfs): measured energy per rail, windows stretched to >= 10 samples."""
    root = tmp_path / "jetson"
    _fake_jetson(root)
    code, stdout, _ = _run(bundle_dir, tiny_folder, tmp_path / "j", frames=6, iterations=5, meter="jetson",
                           rate_hz=400, meter_root=str(root), quiet=False, plots=False)
    assert code == 0
    p = json.loads((tmp_path / "j" / "profile.json").read_text())
    assert p["clocks_locked"] is True and "clocks locked" in stdout
    assert p["meter"]["is_estimate"] is False and p["energy_label"] == "measured"
    assert set(p["meter"]["rails"]) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    for part in p["stages"] + [p["monolithic"]]:
        assert part["energy_mj"]["label"] == "measured"
        assert part["energy_mj"]["mean_watts"] == pytest.approx(5.0, rel=1e-6)  # total = VDD_IN
        assert part["energy_mj"]["window_s"] >= 10 / 400 * 0.99  # at least 10 sample periods
        rails = part["energy_mj"]["per_rail_per_frame"]
        assert rails["VDD_CPU_GPU_CV"] == pytest.approx(0.4 * part["energy_mj"]["per_frame"], rel=1e-6)
    for mode in ("adaptive", "full", "chain"):
        e = p["runs"][mode]["energy_mj_per_frame"]
        assert e["label"] == "measured" and e["total"] > 0
        assert e["per_rail"]["VDD_SOC"] == pytest.approx(0.2 * e["total"], rel=1e-6)
    costs = json.loads((tmp_path / "j" / "costs.json").read_text())
    assert costs["measured"]["energy_mj"]["label"] == "measured" and costs["clocks_locked"] is True
    assert "(estimate)" not in stdout

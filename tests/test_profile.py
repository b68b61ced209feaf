"""`edgeexit profile`: statistics, the profile.json / costs.json contract, plots, calibration reading the costs,
interruption. The CLI runs in a subprocess on the tiny bundle with ONNX Runtime CPU and a constant 5 W meter."""

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
from edgeexit.runtime.profile import COSTS_SCHEMA, costs_from_profile, latency_summary, profile_command

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--backend", "onnxruntime", "--providers", "cpu", "--threads", "1", "--frames", "12", "--iterations", "20",
        "--warmup-ms", "20", "--quiet"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "edgeexit.cli", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def bundle_dir(request, tmp_path_factory, tiny_ckpt) -> Path:
    """The shared ``tiny_bundle`` fixture when conftest has it, else an export of ``tiny_ckpt``."""
    try:
        return Path(request.getfixturevalue("tiny_bundle"))
    except pytest.FixtureLookupError:
        from edgeexit.export import export_bundle

        out = tmp_path_factory.mktemp("profile_bundle") / "bundle"
        export_bundle(tiny_ckpt, out, log=lambda _m: None)
        return out


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


# ------------------------------------------------------------------------------------------------------ the CLI run
def test_profile_writes_files_and_plots(profiled):
    out, proc = profiled
    for name in ("profile.json", "costs.json", "latency_breakdown.png", "power_trace.png", "energy_per_frame.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    # the table: per-part rows, the adaptive vs full rows and the savings, energy labelled as an estimate
    table = proc.stdout
    for text in ("segment_0", "head_0", "adaptive (batch 1)", "full (batch 1)", "adaptive vs full", "estimate",
                 "clocks unknown" if prof_mod._clocks_value(None) == "unknown" else "clocks"):
        assert text in table, text


def test_costs_json_contract(profiled, bundle_dir):
    out, _ = profiled
    costs = json.loads((out / "costs.json").read_text())
    e = len(json.loads((bundle_dir / "manifest.json").read_text())["segments"])
    for key in ("schema", "metric", "device", "backend", "segments", "heads", "measured"):
        assert key in costs, key
    assert costs["schema"] == COSTS_SCHEMA == "edgeexit-costs/1"
    assert costs["metric"] == "latency_ms"
    assert isinstance(costs["device"], str) and costs["device"]
    assert "onnxruntime" in costs["backend"]
    assert len(costs["segments"]) == e and len(costs["heads"]) == e
    assert all(isinstance(v, float) and v > 0 for v in costs["segments"] + costs["heads"])
    lat, en = costs["measured"]["latency_ms"], costs["measured"]["energy_mj"]
    assert lat["segments"] == costs["segments"] and lat["heads"] == costs["heads"]
    assert len(en["segments"]) == e and len(en["heads"]) == e
    assert all(v > 0 for v in en["segments"] + en["heads"])
    assert en["label"] == "estimate" and en["is_estimate"] is True
    # constant 5 W: energy (mJ) = 5 W x latency (ms), per segment and head
    np.testing.assert_allclose(en["segments"], 5 * np.asarray(lat["segments"]), rtol=1e-4)
    np.testing.assert_allclose(en["heads"], 5 * np.asarray(lat["heads"]), rtol=1e-4)


def test_profile_json_contents(profiled, bundle_dir):
    out, _ = profiled
    p = json.loads((out / "profile.json").read_text())
    e = p["bundle"]["num_exits"]
    assert p["schema"] == "edgeexit-profile/1" and p["complete"] is True and p["interrupted"] is False
    for key in ("node", "processor"):
        assert key in p["device"]
    assert p["backend"]["kind"] == "onnxruntime" and p["backend"]["providers"] == ["CPUExecutionProvider"]
    assert p["versions"]["onnxruntime"] and p["versions"]["numpy"]
    assert p["meter"]["is_estimate"] is True and p["meter"]["label"] == "estimate"
    assert p["energy_label"] == "estimate"
    assert p["clocks_locked"] in (True, False, "unknown")
    assert len(p["segments"]) == e and len(p["heads"]) == e
    for part in p["segments"] + p["heads"]:
        s = part["latency_ms"]
        assert s["count"] >= 20
        assert s["min"] <= s["median"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
        assert s["cv"] == pytest.approx(s["std"] / s["mean"], rel=1e-6)
        assert part["energy_mj"]["label"] == "estimate" and part["energy_mj"]["mean_watts"] == pytest.approx(5.0)
    for mode in ("adaptive", "full"):
        run = p["runs"][mode]
        assert run["frames"] == 12 and sum(run["exit_histogram"]) == 12
        for key in ("mean", "median", "p95", "p99"):
            assert run["latency_ms"][key] > 0
        assert run["throughput_fps"] > 0
        assert run["energy_mj_per_frame"]["label"] == "estimate" and run["energy_mj_per_frame"]["total"] > 0
    assert p["runs"]["full"]["exit_histogram"][-1] == 12  # full depth: every frame at the last exit
    sv = p["savings"]
    for key in ("latency_mean", "latency_p50", "speedup", "throughput_gain", "energy", "energy_label"):
        assert sv[key] is not None, key
    assert sv["energy_label"] == "estimate"
    a, f = p["runs"]["adaptive"], p["runs"]["full"]
    assert sv["latency_mean"] == pytest.approx(1 - a["latency_ms"]["mean"] / f["latency_ms"]["mean"], rel=1e-6)
    assert sv["energy"] == pytest.approx(
        1 - a["energy_mj_per_frame"]["total"] / f["energy_mj_per_frame"]["total"], rel=1e-6)
    # the power trace marks both runs
    labels = {s["label"] for s in p["power_trace"]["spans"]}
    assert {"adaptive", "full"} <= labels


def test_calibrate_accepts_profile_costs(profiled, tiny_ckpt, tmp_path):
    calibrate = pytest.importorskip("edgeexit.calibrate", reason="edgeexit calibrate is not there yet")
    if not hasattr(calibrate, "load_costs"):
        pytest.skip("edgeexit.calibrate has no load_costs yet")
    out, _ = profiled
    costs = json.loads((out / "costs.json").read_text())
    e = len(costs["segments"])
    for metric in (None, "latency_ms", "energy_mj"):
        model = calibrate.load_costs(out / "costs.json", e, metric)
        assert model.unit == (metric or "latency_ms")
        assert len(model.cumulative) == e and model.reference > 0
    proc = _cli("calibrate", tiny_ckpt, "--costs", out / "costs.json", "--out", tmp_path / "cal.pt", "--quiet",
                "--gates", "max_prob,margin")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    import torch

    ckpt = torch.load(tmp_path / "cal.pt", map_location="cpu", weights_only=False)
    assert ckpt["calibration"]["costs"]["unit"] == "latency_ms"


# ------------------------------------------------------------------------------------------------- in-process runs
def test_no_meter_no_matplotlib(bundle_dir, tiny_folder, tmp_path, monkeypatch):
    """--meter none: energy is null everywhere, costs.json still valid; without matplotlib: one line, no plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    stdout, stderr = io.StringIO(), io.StringIO()
    code = profile_command(str(bundle_dir), str(tiny_folder), out=str(tmp_path / "p"), backend="onnxruntime",
                           providers="cpu", threads=1, frames=5, iterations=5, warmup_ms=0, meter="none",
                           stdout=stdout, stderr=stderr, quiet=True)
    assert code == 0, stderr.getvalue()
    msgs = [line for line in stderr.getvalue().splitlines() if "matplotlib" in line]
    assert len(msgs) == 1 and "plots skipped" in msgs[0]
    assert not list((tmp_path / "p").glob("*.png"))
    costs = json.loads((tmp_path / "p" / "costs.json").read_text())
    assert costs["measured"]["energy_mj"] is None and costs["label"] == "measured"
    p = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert p["meter"] is None and p["power_trace"] is None
    assert all(part["energy_mj"] is None for part in p["segments"] + p["heads"])
    assert p["savings"]["energy"] is None
    with pytest.raises(ValueError, match="energy_mj"):
        costs_from_profile(p, "energy_mj")


def test_energy_metric_needs_a_meter(bundle_dir, tiny_folder, tmp_path):
    proc = _cli("profile", bundle_dir, tiny_folder, "--out", tmp_path / "x", "--meter", "none",
                "--cost-metric", "energy_mj", *FAST)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("edgeexit: error:") and "energy_mj" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("profile", bundle_dir, tiny_folder, "--meter", "constant", *FAST)  # no --power-watts
    assert proc.returncode == 2 and "power" in proc.stderr and "Traceback" not in proc.stderr


def test_energy_metric_with_constant_meter(bundle_dir, tiny_folder, tmp_path):
    code = profile_command(str(bundle_dir), str(tiny_folder), out=str(tmp_path / "e"), backend="onnxruntime",
                           providers="cpu", threads=1, frames=4, iterations=4, warmup_ms=0, meter="constant",
                           power_watts=2.0, cost_metric="energy_mj", stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 0
    costs = json.loads((tmp_path / "e" / "costs.json").read_text())
    assert costs["metric"] == "energy_mj" and costs["label"] == "estimate" and costs["is_estimate"] is True
    assert costs["segments"] == costs["measured"]["energy_mj"]["segments"]


def test_device_inputs_path(bundle_dir, tiny_folder):
    """The GPU path (recorded inputs re-produced by the previous engine before each chunk, marked "stage" outside
    the part's power window), exercised on CPU engines."""
    from edgeexit.runtime.backends import open_backend
    from edgeexit.runtime.bundle import load_bundle
    from edgeexit.runtime.meters import ConstantMeter

    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, "onnxruntime", providers="cpu", threads=1)
    meter = ConstantMeter(3.0)
    p = prof_mod.Profiler(bundle, backend, meter, batch=2, warmup_ms=0, iterations=7)
    p._staged = True
    x = np.random.default_rng(0).standard_normal((8, *bundle.input_shape)).astype(np.float32)
    meter.start()
    p.warmup(x)
    assert len(p.records) == 4 and all(r["rows"] == 2 for r in p.records)
    p.time_parts()
    p.run_modes(x, None)
    reading = p.stop_meter()
    backend.close()
    assert [part.label for part in p.parts] == [f"segment_{i}" for i in range(4)] + [f"head_{i}" for i in range(4)]
    assert all(len(part.times_ms) == 7 and part.rows == 2 for part in p.parts)
    labels = [lab for _, lab in reading.marks]
    assert labels.count("segment_1") == 4 and "stage" in labels  # one window per recorded batch (chunk)
    e = prof_mod._label_energy(reading, "segment_1")
    assert e["windows"] == 4 and e["joules"] / e["seconds"] == pytest.approx(3.0)
    assert len(p.runs["adaptive"].batch_ms) == 4 and len(p.runs["adaptive"].exits) == 8


def test_interrupt_prints_partial_and_returns_130(bundle_dir, tiny_folder, tmp_path, monkeypatch):
    def boom(self, x, labels):
        raise KeyboardInterrupt

    monkeypatch.setattr(prof_mod.Profiler, "run_modes", boom)
    stdout = io.StringIO()
    code = profile_command(str(bundle_dir), str(tiny_folder), out=str(tmp_path / "i"), backend="onnxruntime",
                           providers="cpu", threads=1, frames=4, iterations=3, warmup_ms=0, meter="constant",
                           power_watts=1.0, stdout=stdout, stderr=io.StringIO())
    assert code == 130
    assert "INTERRUPTED" in stdout.getvalue() and "segment_0" in stdout.getvalue()
    p = json.loads((tmp_path / "i" / "profile.json").read_text())
    assert p["complete"] is False and p["interrupted"] is True
    assert len(p["segments"]) == p["bundle"]["num_exits"] and p["runs"] == {}
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
    stdout = io.StringIO()
    code = profile_command(str(bundle_dir), str(tiny_folder), out=str(tmp_path / "j"), backend="onnxruntime",
                           providers="cpu", threads=1, frames=6, iterations=5, warmup_ms=0, meter="jetson",
                           rate_hz=400, meter_root=str(root), stdout=stdout, stderr=io.StringIO(), quiet=True)
    assert code == 0
    p = json.loads((tmp_path / "j" / "profile.json").read_text())
    assert p["clocks_locked"] is True and "clocks locked" in stdout.getvalue()
    assert p["meter"]["is_estimate"] is False and p["energy_label"] == "measured"
    assert set(p["meter"]["rails"]) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    for part in p["segments"] + p["heads"]:
        assert part["energy_mj"]["label"] == "measured"
        assert part["energy_mj"]["mean_watts"] == pytest.approx(5.0, rel=1e-6)  # total = VDD_IN
        assert part["energy_mj"]["window_s"] >= 10 / 400 * 0.99  # at least 10 sample periods
        rails = part["energy_mj"]["per_rail_per_frame"]
        assert rails["VDD_CPU_GPU_CV"] == pytest.approx(0.4 * part["energy_mj"]["per_frame"], rel=1e-6)
    for mode in ("adaptive", "full"):
        e = p["runs"][mode]["energy_mj_per_frame"]
        assert e["label"] == "measured" and e["total"] > 0
        assert e["per_rail"]["VDD_SOC"] == pytest.approx(0.2 * e["total"], rel=1e-6)
    costs = json.loads((tmp_path / "j" / "costs.json").read_text())
    assert costs["measured"]["energy_mj"]["label"] == "measured" and costs["clocks_locked"] is True
    assert "(estimate)" not in stdout.getvalue()


def test_latency_breakdown_gives_every_segment_and_head_its_own_colour(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from edgeexit.runtime import plots_profile

    e = 9  # more exits than any fixed palette had
    result = {"segments": [{"latency_ms_per_frame": 0.1 + i} for i in range(e)],
              "heads": [{"latency_ms_per_frame": 0.05} for _ in range(e)], "settings": {"batch": 1},
              "device": "cpu", "backend": "onnxruntime"}
    figures = []
    monkeypatch.setattr(plots_profile, "_save", lambda fig, path: figures.append(fig))
    monkeypatch.setattr(plots_profile, "_subtitle", lambda _r: "")
    plots_profile.plot_latency_breakdown(result, tmp_path / "latency.png")
    handles, labels = figures[0].axes[0].get_legend_handles_labels()
    colours = {lab: tuple(h.patches[0].get_facecolor()) for h, lab in zip(handles, labels)}
    assert len(colours) == 2 * e and len(set(colours.values())) == 2 * e

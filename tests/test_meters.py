"""Tests for edgeexit.runtime.meters: fake sysfs trees, a fake clock and a fake NVML module."""
from __future__ import annotations

import os
import sys
import time

import pytest

from edgeexit.runtime import meters as M
from edgeexit.runtime.meters import (
    ConstantMeter,
    EnergyReading,
    JetsonINA3221Meter,
    MeterError,
    NvmlMeter,
    RaplMeter,
    available_meters,
    jetson_clocks_locked,
    open_meter,
)


# ---------------------------------------------------------------------------------------------- helpers
class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _w(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{value}\n")


def hwmon_dev(root, dev, hw, channels):
    """channels: {k: (label, mV, mA)}; returns the hwmon dir."""
    d = os.path.join(root, "sys/bus/i2c/drivers/ina3221", dev, "hwmon", hw)
    for k, (label, mv, ma) in channels.items():
        _w(os.path.join(d, f"in{k}_label"), label)
        _w(os.path.join(d, f"in{k}_input"), mv)
        _w(os.path.join(d, f"curr{k}_input"), ma)
    return d


def set_hwmon(d, k, mv, ma):
    _w(os.path.join(d, f"in{k}_input"), mv)
    _w(os.path.join(d, f"curr{k}_input"), ma)


def orin_nano_tree(root):
    """VDD_IN 5 W, VDD_CPU_GPU_CV 2 W, VDD_SOC 1 W on 1-0040; an "NC" rail (50 W, must be ignored) on 1-0041."""
    d = hwmon_dev(str(root), "1-0040", "hwmon3", {1: ("VDD_IN", 5000, 1000), 2: ("VDD_CPU_GPU_CV", 5000, 400),
                                                  3: ("VDD_SOC", 5000, 200)})
    d2 = hwmon_dev(str(root), "1-0041", "hwmon4", {1: ("NC", 5000, 10000)})
    return d, d2


def rapl_domain(root, name_dir, name, uj, max_uj):
    d = os.path.join(str(root), "sys/class/powercap", name_dir)
    _w(os.path.join(d, "name"), name)
    _w(os.path.join(d, "energy_uj"), uj)
    _w(os.path.join(d, "max_energy_range_uj"), max_uj)
    return d


class FakeNvml:
    """Implements the pynvml functions the meter uses."""

    class NVMLError(Exception):
        pass

    def __init__(self, energy_supported=True, power_supported=True, init_fails=False):
        self.energy_supported = energy_supported
        self.power_supported = power_supported
        self.init_fails = init_fails
        self.energy_mj = 1_000_000
        self.power_mw = 20_000
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        if i != 0:
            raise self.NVMLError("Invalid Argument")
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy_supported:
            raise self.NVMLError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):
        if not self.power_supported:
            raise self.NVMLError("Not Supported")
        return self.power_mw


# ------------------------------------------------------------------------------------------ Jetson hwmon
def test_hwmon_constant_power_rails_and_nc(tmp_path):
    orin_nano_tree(tmp_path)
    clk = FakeClock()
    m = JetsonINA3221Meter(root=str(tmp_path), clock=clk, threaded=False)
    assert m.rails == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert m.total_rail == "VDD_IN"
    p = m.read_power()
    assert p["total"] == pytest.approx(5.0) and p["VDD_SOC"] == pytest.approx(1.0)
    assert not any("NC" == k for k in p)
    m.start()
    for _ in range(4):
        clk.t += 0.5
        m.sample_now()
    clk.t += 1.0
    r = m.stop()
    assert isinstance(r, EnergyReading)
    assert r.duration_s == pytest.approx(3.0)
    assert r.joules == pytest.approx(15.0)  # VDD_IN = total, not the sum
    assert r.per_rail_joules == pytest.approx({"VDD_IN": 15.0, "VDD_CPU_GPU_CV": 6.0, "VDD_SOC": 3.0})
    assert r.mean_watts == pytest.approx(5.0)
    assert r.samples[0][0] == 100.0 and r.samples[-1][0] == 103.0
    assert all("total" in w for _, w in r.samples)
    assert r.is_estimate is False and r.meter == "jetson-ina3221" and r.failed_samples == 0 and r.ok
    assert m.last_reading is r


def test_hwmon_power_step_exact_trapezoid_and_marks(tmp_path):
    d, _ = orin_nano_tree(tmp_path)
    clk = FakeClock(0.0)
    m = JetsonINA3221Meter(root=str(tmp_path), clock=clk, threaded=False)
    m.start()                      # t=0, 5 W
    clk.t = 0.5
    m.mark("adaptive")             # a sample is taken at the mark
    clk.t = 2.0
    m.sample_now()                 # 5 W at t=2
    set_hwmon(d, 1, 5000, 1800)    # VDD_IN -> 9 W
    clk.t = 2.5
    m.mark("full")                 # (t=2.5, 9 W)
    clk.t = 3.0
    m.sample_now()                 # 9 W
    clk.t = 4.0
    r = m.stop()                   # 9 W at t=4
    # 0..2: 10 J; 2..2.5 trapezoid (5+9)/2*0.5 = 3.5 J; 2.5..4: 13.5 J
    assert r.joules == pytest.approx(27.0)
    assert r.per_rail_joules["VDD_IN"] == pytest.approx(27.0)
    assert r.per_rail_joules["VDD_SOC"] == pytest.approx(4.0)
    assert r.marks == [(0.5, "adaptive"), (2.5, "full")]
    segs = {s["label"]: s for s in r.segments()}
    assert segs["adaptive"]["joules"] == pytest.approx(1.5 * 5 + 3.5)
    assert segs["full"]["joules"] == pytest.approx(13.5)
    assert segs["full"]["mean_watts"] == pytest.approx(9.0)
    assert r.energy_between(1.0, 3.0) == pytest.approx(5 + 3.5 + 4.5)
    assert r.mark_times("full") == [2.5]
    d_ = r.to_dict()
    assert d_["marks"][1] == {"t": 2.5, "label": "full"} and "samples" not in d_
    assert len(r.to_dict(include_samples=True)["samples"]) == len(r.samples)


def test_agx_two_devices_no_vdd_in_sums_rails(tmp_path):
    root = str(tmp_path)
    hwmon_dev(root, "1-0040", "hwmon1", {1: ("VDD_GPU_SOC", 5000, 600), 2: ("VDD_CPU_CV", 5000, 400),
                                         3: ("VIN_SYS_5V0", 5000, 200)})
    hwmon_dev(root, "1-0041", "hwmon2", {2: ("VDDQ_VDD2_1V8AO", 1800, 500), 3: ("NC", 1000, 1000)})
    clk = FakeClock(0.0)
    m = JetsonINA3221Meter(root=root, clock=clk, threaded=False)
    assert m.total_rail is None
    assert m.rails == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert m.read_power()["total"] == pytest.approx(3.0 + 2.0 + 1.0 + 0.9)
    m.start()
    clk.t = 2.0
    r = m.stop()
    assert r.joules == pytest.approx(2 * 6.9)
    assert r.per_rail_joules["VDDQ_VDD2_1V8AO"] == pytest.approx(1.8)
    assert "sum of rails" in m.description


def test_jetpack4_iio_power_and_voltage_current_fallback(tmp_path):
    d = os.path.join(str(tmp_path), "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0")
    for k, name in enumerate(["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"]):
        _w(os.path.join(d, f"rail_name_{k}"), name)
    _w(os.path.join(d, "in_power0_input"), 4000)   # mW
    _w(os.path.join(d, "in_power1_input"), 1500)
    _w(os.path.join(d, "in_voltage2_input"), 5000)  # no in_power2: 5000 mV x 300 mA = 1.5 W
    _w(os.path.join(d, "in_current2_input"), 300)
    clk = FakeClock(10.0)
    m = JetsonINA3221Meter(root=str(tmp_path), clock=clk, threaded=False)
    assert m.total_rail == "POM_5V_IN"
    m.start()
    clk.t = 11.0
    m.sample_now()
    _w(os.path.join(d, "in_power0_input"), 6000)
    clk.t = 12.0
    r = m.stop()
    assert r.joules == pytest.approx(4.0 + 5.0)
    assert r.per_rail_joules["POM_5V_CPU"] == pytest.approx(3.0)
    assert r.per_rail_joules["POM_5V_GPU"] == pytest.approx(3.0)
    assert "iio" in m.description


def test_read_failure_mid_run_is_counted_not_raised(tmp_path):
    d, _ = orin_nano_tree(tmp_path)
    clk = FakeClock(0.0)
    m = JetsonINA3221Meter(root=str(tmp_path), clock=clk, threaded=False)
    m.start()
    os.rename(os.path.join(d, "curr1_input"), os.path.join(d, "curr1_input.bak"))
    clk.t = 1.0
    assert m.sample_now() is None
    _w(os.path.join(d, "curr1_input"), "garbage")
    clk.t = 1.5
    m.sample_now()
    os.replace(os.path.join(d, "curr1_input.bak"), os.path.join(d, "curr1_input"))
    clk.t = 2.0
    r = m.stop()
    assert r.failed_samples == 2 and not r.ok
    assert r.joules == pytest.approx(10.0)
    assert any("failed" in n for n in r.notes)


def test_stop_failure_holds_last_value(tmp_path):
    d, _ = orin_nano_tree(tmp_path)
    clk = FakeClock(0.0)
    m = JetsonINA3221Meter(root=str(tmp_path), clock=clk, threaded=False)
    m.start()
    clk.t = 1.0
    m.sample_now()
    os.remove(os.path.join(d, "in1_input"))
    clk.t = 2.0
    r = m.stop()  # does not raise
    assert r.failed_samples == 1
    assert r.joules == pytest.approx(10.0)  # last value held to the end of the window


def test_start_stop_misuse_and_context_manager(tmp_path):
    orin_nano_tree(tmp_path)
    clk = FakeClock(0.0)
    m = JetsonINA3221Meter(root=str(tmp_path), clock=clk, threaded=False)
    with pytest.raises(MeterError):
        m.stop()
    with pytest.raises(MeterError):
        m.mark("x")
    with m:
        clk.t = 1.0
    assert m.last_reading.joules == pytest.approx(5.0)
    with pytest.raises(MeterError):
        m.stop()


def test_real_thread_constant_power(tmp_path):
    orin_nano_tree(tmp_path)
    m = JetsonINA3221Meter(root=str(tmp_path), rate_hz=400)
    with m:
        m.mark("adaptive")
        time.sleep(0.15)
        m.mark("full")
        time.sleep(0.15)
    r = m.last_reading
    assert 0.28 < r.duration_s < 1.0
    assert r.joules == pytest.approx(5.0 * r.duration_s, rel=0.05)
    assert r.per_rail_joules["VDD_CPU_GPU_CV"] == pytest.approx(2.0 * r.duration_s, rel=0.05)
    assert len(r.samples) >= 10
    ts = [t for t, _ in r.samples]
    assert ts == sorted(ts)
    assert m._thread is None and not any(t.name.startswith("edgeexit-meter") for t in __import__("threading").enumerate())
    assert [lab for _, lab in r.marks] == ["adaptive", "full"]


def test_jetson_not_found_and_needs_root(tmp_path, monkeypatch):
    with pytest.raises(MeterError, match="INA3221"):
        JetsonINA3221Meter(root=str(tmp_path))
    orin_nano_tree(tmp_path)
    real = M._read_text

    def deny(path):
        if path.endswith("_input"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(M, "_read_text", deny)
    with pytest.raises(MeterError, match="needs root"):
        JetsonINA3221Meter(root=str(tmp_path))


# -------------------------------------------------------------------------------------------------- RAPL
def test_rapl_wraparound_and_subdomains_skipped(tmp_path):
    root = str(tmp_path)
    p0 = rapl_domain(root, "intel-rapl:0", "package-0", 900_000, 1_000_000)
    p1 = rapl_domain(root, "intel-rapl:1", "package-1", 100_000, 1_000_000)
    rapl_domain(root, "intel-rapl:0:0", "core", 5, 1_000_000)  # subdomain: ignored
    clk = FakeClock(0.0)
    m = RaplMeter(root=root, clock=clk, threaded=False)
    assert m.rails == ["package-0", "package-1"]
    m.start()
    clk.t = 1.0
    _w(os.path.join(p0, "energy_uj"), 300_000)   # wrapped: 300000 + 1e6 - 900000 = 0.4 J
    _w(os.path.join(p1, "energy_uj"), 300_000)   # 0.2 J
    m.sample_now()
    clk.t = 2.0
    _w(os.path.join(p0, "energy_uj"), 700_000)   # 0.4 J
    _w(os.path.join(p1, "energy_uj"), 500_000)   # 0.2 J
    r = m.stop()
    assert r.method == "counter"
    assert r.per_rail_joules == pytest.approx({"package-0": 0.8, "package-1": 0.4})
    assert r.joules == pytest.approx(1.2)
    assert r.mean_watts == pytest.approx(0.6)
    # trace: per-interval mean power at the end of each interval
    assert [t for t, _ in r.samples] == [1.0, 2.0]
    assert r.samples[0][1]["package-0"] == pytest.approx(0.4)
    assert r.samples[1][1]["total"] == pytest.approx(0.6)


def test_rapl_direct_wrap_formula():
    assert M._rapl_delta(900, 300, 1000) == 400
    assert M._rapl_delta(300, 900, 1000) == 600


def test_rapl_not_found_and_needs_root(tmp_path, monkeypatch):
    with pytest.raises(MeterError, match="not found"):
        RaplMeter(root=str(tmp_path))
    rapl_domain(str(tmp_path), "intel-rapl:0", "package-0", 1, 1000)
    real = M._read_text

    def deny(path):
        if path.endswith("energy_uj") and "max" not in os.path.basename(path):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(M, "_read_text", deny)
    with pytest.raises(MeterError, match="needs root"):
        RaplMeter(root=str(tmp_path))
    rows = {n: (ok, why) for n, ok, why in available_meters(root=str(tmp_path), nvml=FakeNvml(init_fails=True))}
    assert rows["rapl"][0] is False and "needs root" in rows["rapl"][1]


# -------------------------------------------------------------------------------------------------- NVML
def test_nvml_energy_counter_path():
    nv = FakeNvml()
    clk = FakeClock(0.0)
    m = NvmlMeter(nvml=nv, clock=clk, threaded=False)
    assert m.has_energy_counter and m.gpu_name == "Fake GPU" and nv.inits == 1
    assert m.read_power() == {"gpu": 20.0, "total": 20.0}
    m.start()
    for i in range(1, 10):
        clk.t = float(i)
        nv.energy_mj += 15_000
        m.sample_now()
    clk.t = 10.0
    nv.energy_mj += 15_000
    r = m.stop()
    assert r.method == "counter"
    assert r.joules == pytest.approx(150.0)          # counter, not the 200 J that sampled power would give
    assert r.per_rail_joules == {"gpu": pytest.approx(150.0)}
    assert len(r.samples) == 11 and r.samples[3][1]["total"] == pytest.approx(20.0)
    m.close()
    assert nv.shutdowns == 1


def test_nvml_counter_short_window_note():
    nv = FakeNvml()
    clk = FakeClock(0.0)
    m = NvmlMeter(nvml=nv, clock=clk, threaded=False)
    m.start()
    clk.t = 0.2
    nv.energy_mj += 4_000
    r = m.stop()
    assert r.joules == pytest.approx(4.0)
    assert any("too short" in n for n in r.notes)


def test_nvml_power_sampling_path():
    nv = FakeNvml(energy_supported=False)
    clk = FakeClock(0.0)
    m = NvmlMeter(nvml=nv, clock=clk, threaded=False)
    assert not m.has_energy_counter and m.has_power
    m.start()
    clk.t = 5.0
    m.sample_now()
    nv.power_mw = 40_000
    clk.t = 6.0
    m.sample_now()
    clk.t = 10.0
    r = m.stop()
    assert r.method == "trapezoid"
    # 0..5: 100 J; 5..6: (20+40)/2 = 30 J; 6..10: 160 J
    assert r.joules == pytest.approx(290.0)
    assert r.per_rail_joules["gpu"] == pytest.approx(290.0)


def test_nvml_counter_only_and_failures():
    nv = FakeNvml(power_supported=False)
    clk = FakeClock(0.0)
    m = NvmlMeter(nvml=nv, clock=clk, threaded=False)
    m.start()
    clk.t = 2.0
    nv.energy_mj += 60_000
    m.sample_now()
    nv.energy_supported = False      # read failure mid-run: counted, not raised
    clk.t = 3.0
    m.sample_now()
    nv.energy_supported = True
    clk.t = 4.0
    nv.energy_mj += 60_000
    r = m.stop()
    assert r.joules == pytest.approx(120.0) and r.method == "counter"
    assert r.failed_samples == 1
    assert r.samples[-1][1]["gpu"] == pytest.approx(30.0)


def test_nvml_unavailable_messages(monkeypatch):
    with pytest.raises(MeterError, match="NVML init failed"):
        NvmlMeter(nvml=FakeNvml(init_fails=True))
    with pytest.raises(MeterError, match="neither"):
        NvmlMeter(nvml=FakeNvml(energy_supported=False, power_supported=False))
    with pytest.raises(MeterError, match="GPU 3"):
        NvmlMeter(device_index=3, nvml=FakeNvml())
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(MeterError, match="pynvml not installed"):
        NvmlMeter()


# ---------------------------------------------------------------------------------------------- constant
def test_constant_meter_is_estimate():
    clk = FakeClock(0.0)
    m = ConstantMeter(7.5, clock=clk)
    assert m.is_estimate and "estimate" in m.name
    m.start()
    clk.t = 1.0
    m.mark("full")
    clk.t = 4.0
    r = m.stop()
    assert r.joules == pytest.approx(30.0) and r.is_estimate and "estimate" in r.meter
    assert r.method == "constant" and r.mean_watts == pytest.approx(7.5)
    assert r.segments()[0]["joules"] == pytest.approx(22.5)
    with pytest.raises(MeterError):
        ConstantMeter(float("nan"))


# --------------------------------------------------------------------------------------------- selection
def test_auto_selection_order(tmp_path):
    jet = tmp_path / "jet"
    orin_nano_tree(jet)
    rapl_domain(str(jet), "intel-rapl:0", "package-0", 1, 1000)
    assert isinstance(open_meter("auto", 5.0, root=str(jet), nvml=FakeNvml(), threaded=False), JetsonINA3221Meter)

    rap = tmp_path / "rapl"
    rapl_domain(str(rap), "intel-rapl:0", "package-0", 1, 1000)
    assert isinstance(open_meter("auto", 5.0, root=str(rap), nvml=FakeNvml(), threaded=False), NvmlMeter)
    assert isinstance(open_meter("auto", 5.0, root=str(rap), nvml=FakeNvml(init_fails=True)), RaplMeter)

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = FakeNvml(init_fails=True)
    m = open_meter("auto", 4.0, root=str(empty), nvml=bad)
    assert isinstance(m, ConstantMeter) and m.watts == 4.0
    assert open_meter("auto", None, root=str(empty), nvml=bad) is None
    assert open_meter("none", 4.0, root=str(jet)) is None
    assert isinstance(open_meter("constant", 3.0, root=str(jet)), ConstantMeter)
    assert isinstance(open_meter("rapl", None, root=str(jet)), RaplMeter)


def test_explicit_unavailable_raises_one_line(tmp_path):
    root = str(tmp_path)
    bad = FakeNvml(init_fails=True)
    cases = [("jetson", "INA3221"), ("rapl", "intel-rapl"), ("nvml", "NVML"), ("constant", "power_watts"),
             ("bogus", "unknown meter")]
    for spec, word in cases:
        with pytest.raises(MeterError) as ei:
            open_meter(spec, None, root=root, nvml=bad)
        msg = str(ei.value)
        assert word in msg and "\n" not in msg
        if spec != "bogus":
            assert msg.startswith(f"{spec} meter unavailable")


def test_available_meters(tmp_path):
    orin_nano_tree(tmp_path)
    rows = available_meters(root=str(tmp_path), nvml=FakeNvml(energy_supported=False))
    assert [r[0] for r in rows] == ["jetson", "nvml", "rapl", "constant"]
    d = {n: (ok, why) for n, ok, why in rows}
    assert d["jetson"][0] and "VDD_IN" in d["jetson"][1]
    assert d["nvml"][0] and "sampled power" in d["nvml"][1]
    assert d["rapl"] == (False, d["rapl"][1]) and "not found" in d["rapl"][1]
    assert d["constant"][0] is False and "power" in d["constant"][1]
    assert available_meters(root=str(tmp_path), power_watts=5.0, nvml=FakeNvml())[3][1] is True


# ------------------------------------------------------------------------------------------------ clocks
def test_jetson_clocks_locked(tmp_path):
    root = str(tmp_path)
    assert jetson_clocks_locked(root) is None
    for c in range(2):
        d = os.path.join(root, f"sys/devices/system/cpu/cpu{c}/cpufreq")
        _w(os.path.join(d, "scaling_min_freq"), 1510400)
        _w(os.path.join(d, "scaling_max_freq"), 1510400)
    g = os.path.join(root, "sys/class/devfreq/17000000.ga10b")
    _w(os.path.join(g, "min_freq"), 624750000)
    _w(os.path.join(g, "max_freq"), 624750000)
    assert jetson_clocks_locked(root) is True
    _w(os.path.join(g, "min_freq"), 306000000)
    assert jetson_clocks_locked(root) is False
    _w(os.path.join(g, "min_freq"), 624750000)
    _w(os.path.join(root, "sys/devices/system/cpu/cpu1/cpufreq/scaling_min_freq"), 729600)
    assert jetson_clocks_locked(root) is False

"""Drift guard (edgeexit.runtime.drift): synthetic confidence streams, the switch and the way back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeexit.runtime.bundle import json_ready, validate_manifest
from edgeexit.runtime.drift import DriftGuard, DriftReference, SwitchingRunner, calibrate_bound, reference_stats


def reference(window: int = 16) -> DriftReference:
    return DriftReference(mean=0.85, std=0.15, mean_conservative=0.9, std_conservative=0.12, bound=4.0,
                          window=window)


def stream(rng, n, mean, std):
    return np.clip(rng.normal(mean, std, n), 0, 1)


def test_clean_stream_never_switches():
    rng = np.random.default_rng(0)
    guard = DriftGuard(reference())
    assert all(guard.update(v) is None for v in stream(rng, 3000, 0.85, 0.15))
    assert not guard.conservative and guard.events == []


def test_degraded_stretch_switches_within_the_window_and_recovers():
    rng = np.random.default_rng(1)
    window = 16
    guard = DriftGuard(reference(), window=window)
    clean1, bad, clean2 = stream(rng, 200, 0.85, 0.15), stream(rng, 300, 0.6, 0.2), stream(rng, 300, 0.9, 0.12)
    policies = []
    for v in np.concatenate([clean1, bad]):
        policies.append(guard.record(guard.update(v))["policy"])
    kinds = [e[1] for e in guard.events]
    assert kinds == ["drift"]
    start = guard.events[0][0]
    assert 200 <= start < 200 + window  # switched within one window of the degraded stretch
    assert policies[start] == "calibrated" and policies[start + 1] == "conservative"
    # back to clean frames: the conservative policy (full depth) has its own reference, the guard comes back
    for v in clean2:
        guard.update(v)
    assert [e[1] for e in guard.events] == ["drift", "recovered"]
    assert 500 <= guard.events[1][0] < 500 + 2 * window
    assert "2 switch(es), 1 drift(s)" in guard.summary()


def test_hysteresis_and_failed_frames():
    guard = DriftGuard(reference(window=4))
    for v in [0.5] * 4:
        guard.update(v)
    assert guard.conservative
    # a stream halfway between: beyond recover * bound in the conservative reference, so it stays conservative
    ref = guard.reference
    halfway = ref.mean_conservative - 0.8 * ref.bound * ref.std_conservative / 2
    for _ in range(40):
        assert guard.update(halfway) is None
    assert guard.conservative
    assert guard.update(None) is None and guard.update(float("nan")) is None  # failed frames are not counted


def test_reference_round_trip_and_errors():
    ref = DriftReference(0.8, 0.1, 0.9, 0.1, 3.5, conservative_thresholds=(0.9, 0.95))
    assert DriftReference.from_dict(ref.to_dict()) == ref
    closed = DriftReference(0.8, 0.1, 0.9, 0.1, 3.5, conservative_thresholds=(math.inf, 0.95))  # exit 0 closed
    assert DriftReference.from_dict(json.loads(json.dumps(json_ready(closed.to_dict())))) == closed
    from edgeexit.runtime.commands import DEMO_BUNDLE, demo_path

    manifest = json.loads(demo_path(DEMO_BUNDLE).joinpath("manifest.json").read_text())
    drift = manifest["pipelines"][manifest["default_gate"]]["drift"]
    drift["conservative_thresholds"] = json_ready([math.inf, 0.9, 0.5])
    validate_manifest(manifest)  # a closed exit among the guard's thresholds is a valid bundle
    with pytest.raises(ValueError, match="window"):
        DriftGuard(ref, window=0)
    with pytest.raises(ValueError):
        DriftReference(0.8, -1.0, 0.9, 0.1, 3.5)


def test_calibrated_bound_keeps_clean_windows_quiet():
    rng = np.random.default_rng(3)
    conf = stream(rng, 5000, 0.85, 0.15)
    bound = calibrate_bound(conf, 32)
    mu, sd = reference_stats(conf)
    assert 3.0 <= bound < 6.0
    guard = DriftGuard(DriftReference(mu, sd, mu, sd, bound, 32))
    fresh = stream(np.random.default_rng(4), 20000, 0.85, 0.15)
    alarms = sum(guard.update(v) == "drift" for v in fresh)
    assert alarms <= 2  # sliding windows: ~20000 correlated tests, so a rare false alarm, and it recovers fast
    assert guard.conservative_frames / guard.frames < 0.01


class FakeRunner:
    def __init__(self, name):
        self.name, self.classes = name, ("a", "b")

    def run_batch(self, x, batch_size=None):
        return [self.name] * len(x)


def test_switching_runner_follows_the_guard():
    guard = DriftGuard(reference(window=2))
    runner = SwitchingRunner(FakeRunner("calibrated"), FakeRunner("conservative"), guard)
    assert runner.run_batch([0]) == ["calibrated"] and runner.classes == ("a", "b")
    guard.update(0.1), guard.update(0.1)
    assert runner.run_batch([0, 1]) == ["conservative", "conservative"]


def test_run_command_writes_drift_fields_and_summary(tmp_path):
    """The demo bundle with a drift block whose reference no real stream matches: the guard switches to full
    depth after one window, the JSON lines say so, the summary counts it; --no-drift leaves the lines as before."""
    import io
    import json
    import shutil

    from edgeexit.runtime.commands import RunOptions, demo_path, run_command

    bundle = tmp_path / "bundle"
    shutil.copytree(str(demo_path(("assets", "demo", "bundle"))), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    gate = manifest["default_gate"]
    manifest["pipelines"][gate]["drift"] = DriftReference(0.05, 0.01, 0.05, 0.01, 4.0, window=4).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    samples = str(demo_path(("assets", "demo", "samples")))

    def run(**kw):
        out, err = io.StringIO(), io.StringIO()
        assert run_command(RunOptions(str(bundle), samples, quiet=True, **kw), stdout=out, stderr=err) == 0
        return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()], err.getvalue()

    lines, summary = run()
    policies = [r["drift"]["policy"] for r in lines]
    assert policies[:4] == ["calibrated"] * 4 and set(policies[4:]) == {"conservative"}
    assert lines[3]["drift"]["event"] == "drift"
    last = max(r["exit"] for r in lines)
    assert all(r["exit"] == last for r in lines[4:])  # conservative = full depth
    assert "drift guard (window 4" in summary and "1 drift(s)" in summary
    plain, summary = run(no_drift=True)
    assert "drift" not in plain[0] and "drift guard" not in summary
    with pytest.raises(ValueError, match="drift-window"):
        run(drift_window=0)

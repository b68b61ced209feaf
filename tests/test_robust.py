"""Calibration for degraded inputs (edgeexit.robust): synthetic outputs, so the robust target can be checked
against the stored policy re-simulated as the runtime applies it."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.calibrate import CostModel, calibrate_outputs
from edgeexit.collect import ExitOutputs
from edgeexit.policy import ExitPolicy
from edgeexit.robust import Conditions, parse_severities, pool_outputs

E, C = 3, 4


def synthetic(n: int, p_right, gap_right, gap_wrong, seed: int) -> ExitOutputs:
    """Exit i is right with probability p_right[i]; the logit gap of its top class is N(gap_right, 0.7) when right
    and N(gap_wrong, 0.7) when wrong (an overconfident condition has gap_wrong close to gap_right). One exit per
    entry of p_right."""
    e = len(p_right)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    logits = rng.normal(0, 0.3, (n, e, C)).astype(np.float32)
    for i in range(e):
        right = rng.random(n) < p_right[i]
        other = (labels + rng.integers(1, C, n)) % C
        top = np.where(right, labels, other)
        gap = np.where(right, rng.normal(gap_right, 0.7, n), rng.normal(gap_wrong[i], 0.7, n))
        logits[np.arange(n), i, top] += gap
    cams = [rng.random((n, 4, 4)).astype(np.float32) for _ in range(e)]
    return ExitOutputs(logits, cams, labels)


def costs(e: int = E) -> CostModel:
    return CostModel((1.0,) * e, (0.0,) * e, 0.0, "macs", "test")


@pytest.fixture(scope="module")
def pooled():
    n = 1500
    clean = synthetic(n, (0.6, 0.8, 0.95), 3.0, (0.5, 0.5, 0.5), seed=1)
    fog = synthetic(n, (0.35, 0.6, 0.9), 3.0, (2.6, 2.0, 0.5), seed=2)  # wrong but confident early on
    return clean, fog, pool_outputs([clean, fog]), n


def per_condition_drop(policy: ExitPolicy, out: ExitOutputs) -> tuple:
    """(drop in points below the final exit, mean cost) of a stored policy, as the runtime decides."""
    ex = policy.decide(out.signals(policy.temperatures, policy.exits), out.classes)
    acc = out.correct[np.arange(len(out)), ex].mean()
    cost = costs(out.num_exits).exit_vector(policy.exits)[ex].mean()
    return 100 * (out.correct[:, -1].mean() - acc), cost


def test_robust_policy_meets_the_target_on_every_condition(pooled):
    clean, fog, pool, n = pooled
    cond = Conditions.blocks(["clean", "fog-3"], n, mode="worst", max_drop=1.0)
    res = calibrate_outputs(pool, costs(), max_drop=1.0, gate_names=["max_prob"], conditions=cond)
    g = res.calibration["gates"]["max_prob"]
    pol = ExitPolicy.from_dict(g["policy"])
    drops = [per_condition_drop(pol, out) for out in (clean, fog)]
    assert drops[0][0] <= 1.0 + 1e-9 and drops[1][0] <= 1.0 + 1e-9
    assert g["robust"]["per_condition"]["fog-3"]["drop"] == pytest.approx(drops[1][0])
    assert g["mean_cost"] == pytest.approx(drops[0][1]) and g["robust"]["clean_cost"] == pytest.approx(drops[0][1])
    assert res.calibration["target"]["robust"]["conditions"] == ["clean", "fog-3"]
    # the clean-only policy is cheaper on clean frames but breaks the target on the overconfident condition
    plain = ExitPolicy.from_dict(calibrate_outputs(clean, costs(), max_drop=1.0, gate_names=["max_prob"]).policy)
    plain_clean, plain_fog = per_condition_drop(plain, clean), per_condition_drop(plain, fog)
    assert plain_fog[0] > 2.0
    assert plain_clean[1] <= drops[0][1] + 1e-9
    assert drops[0][1] < 0.99  # and the robust policy still exits early on clean frames


def test_mean_mode_allows_a_worse_condition_up_to_the_worst_bound(pooled):
    _, fog, pool, n = pooled
    loose = Conditions.blocks(["clean", "fog-3"], n, mode="mean", max_drop=1.0, worst_drop=3.0)
    strict = Conditions.blocks(["clean", "fog-3"], n, mode="mean", max_drop=1.0, worst_drop=1.0)
    a = calibrate_outputs(pool, costs(), max_drop=1.0, gate_names=["max_prob"], conditions=loose).calibration
    b = calibrate_outputs(pool, costs(), max_drop=1.0, gate_names=["max_prob"], conditions=strict).calibration
    ga, gb = a["gates"]["max_prob"], b["gates"]["max_prob"]
    assert ga["meets_target"] and gb["meets_target"]
    assert ga["robust"]["worst_drop"] <= 3.0 + 1e-9 and gb["robust"]["worst_drop"] <= 1.0 + 1e-9
    assert ga["mean_cost"] <= gb["mean_cost"] + 1e-12


def test_confidence_holds_every_condition_on_its_paired_bound(pooled):
    """``--degrade --confidence``: the clean, mean and worst targets hold for the upper confidence bounds of the
    drops (paired per image), which costs more than holding them for the estimates."""
    from edgeexit.calibrate import confidence_z
    from edgeexit.thresholds import loss_upper_bound

    clean, fog, pool, n = pooled
    cond = Conditions.blocks(["clean", "fog-3"], n, mode="mean", max_drop=1.0, worst_drop=2.5)
    est = calibrate_outputs(pool, costs(), max_drop=1.0, gate_names=["max_prob"], conditions=cond).calibration
    held = calibrate_outputs(pool, costs(), max_drop=1.0, gate_names=["max_prob"], conditions=cond,
                             confidence_level=0.95).calibration
    g, r, z = held["gates"]["max_prob"], held["gates"]["max_prob"]["robust"], confidence_z(0.95)
    assert held["target"]["robust"]["z"] == pytest.approx(1.6449, abs=1e-4) and g["meets_target"]
    assert r["worst_drop_bound"] <= 2.5 + 1e-9 and r["mean_drop_bound"] <= 1.0 + 1e-9
    assert r["worst_drop_bound"] > r["worst_drop"]
    assert g["mean_cost"] > est["gates"]["max_prob"]["mean_cost"]
    pol = ExitPolicy.from_dict(g["policy"])
    taken = [out.correct[np.arange(n), pol.decide(out.signals(pol.temperatures, pol.exits), out.classes)]
             for out in (clean, fog)]
    assert r["worst_drop_bound"] == pytest.approx(100 * loss_upper_bound(taken[1], fog.correct[:, -1], z))
    rows = loss_upper_bound(np.stack(taken), np.stack([clean.correct[:, -1], fog.correct[:, -1]]), z)
    assert rows[1] == pytest.approx(loss_upper_bound(taken[1], fog.correct[:, -1], z))


def test_learned_gate_folds_are_grouped_by_image(pooled):
    _, _, pool, n = pooled
    cond = Conditions.blocks(["clean", "fog-3"], n)
    folds = cond.tile_folds(np.arange(2 * n) % 5)
    assert np.array_equal(folds[:n], folds[n:])


def test_guard_thresholds_keep_the_clean_policy_and_hold_the_target_on_degraded_copies():
    """--degraded-as guard: the policy is the clean calibration's; the drift block gets thresholds on the same kept
    exit (here exit 1 of 4, so one value that the runtime must place at exit 1) that meet the robust target on the
    degraded copy, and its conservative reference is measured for them (not for full depth)."""
    from edgeexit.calibrate import fit_guard_thresholds
    from edgeexit.runtime.chain import runner_policy

    n, e = 1500, 4
    clean = synthetic(n, (0.5, 0.75, 0.85, 0.95), 3.0, (0.5, 0.5, 0.5, 0.5), seed=1)
    fog = synthetic(n, (0.3, 0.55, 0.7, 0.9), 3.0, (2.6, 2.4, 2.0, 0.5), seed=2)  # wrong but confident early on
    cal = calibrate_outputs(clean, costs(e), max_drop=1.0, gate_names=["max_prob", "margin"], exits=[1]).calibration
    cond = Conditions.blocks(["clean", "fog-3"], n, mode="worst", max_drop=1.0)
    guard = fit_guard_thresholds(cal, pool_outputs([clean, fog]), costs(e), cond, max_drop=1.0)
    for gate in ("max_prob", "margin"):
        policy = ExitPolicy.from_dict(cal["gates"][gate]["policy"])
        drift = cal["gates"][gate]["drift"]
        assert policy.kept_internal == (1,) and guard[gate]["conservative"] == "thresholds"
        assert len(drift["conservative_thresholds"]) == 1
        strict = runner_policy(policy, list(drift["conservative_thresholds"]))  # as the runtime applies them
        assert strict.thresholds[1] > policy.thresholds[1]  # stricter where the clean policy is too eager on fog
        assert per_condition_drop(policy, fog)[0] > 1.0  # the clean policy alone fails on fog ...
        assert per_condition_drop(strict, fog)[0] <= 1.0 + 1e-9  # ... its guard thresholds hold there
        assert per_condition_drop(strict, clean)[1] < 1.0  # and still leave early: not full depth
        sig = clean.signals(policy.temperatures, policy.exits)
        taken = sig[np.arange(n), strict.decide(sig, clean.classes), 0]
        assert drift["mean_conservative"] == pytest.approx(taken.mean(), abs=1e-6)
        assert drift["std_conservative"] == pytest.approx(taken.std(), rel=0.02)


def test_guard_without_any_early_exit_is_full_depth_and_learned_is_never_fitted():
    """A degraded copy on which no early exit can be allowed (every early answer wrong and confident): the guard
    stores None, so the runtime runs the plain network in one call; the learned gate is skipped, and asking for it
    alone is an error."""
    from edgeexit.calibrate import fit_guard_thresholds

    n = 800
    clean = synthetic(n, (0.6, 0.8, 0.95), 3.0, (0.5, 0.5, 0.5), seed=1)
    dark = synthetic(n, (0.02, 0.02, 0.95), 3.0, (5.0, 5.0, 0.5), seed=4)  # more confident when wrong
    cal = calibrate_outputs(clean, costs(), max_drop=1.0, gate_names=["max_prob", "learned"]).calibration
    cond = Conditions.blocks(["clean", "dark-5"], n, mode="worst", max_drop=0.0)
    guard = fit_guard_thresholds(cal, pool_outputs([clean, dark]), costs(), cond, max_drop=0.0)
    assert set(guard) == {"max_prob"} and guard["max_prob"]["conservative"] == "full depth"
    assert cal["gates"]["max_prob"]["drift"]["conservative_thresholds"] is None
    with pytest.raises(ValueError, match="learned"):
        fit_guard_thresholds(cal, pool_outputs([clean, dark]), costs(), cond, max_drop=0.0, gate_names=["learned"])


def test_errors():
    with pytest.raises(ValueError, match="severities"):
        parse_severities("0,3")
    assert parse_severities("5,1,5") == [5, 1]
    with pytest.raises(ValueError, match="--robust"):
        Conditions.blocks(["clean"], 3, mode="median")
    with pytest.raises(ValueError, match="clean"):
        Conditions.blocks(["fog-1"], 3)
    pool = pool_outputs([synthetic(30, (0.5, 0.6, 0.9), 3, (1, 1, 1), 0)] * 2)
    with pytest.raises(ValueError, match="--budget"):
        calibrate_outputs(pool, costs(), budget=0.5, conditions=Conditions.blocks(["clean", "x-1"], 30))


def test_cli_degrade_writes_robust_statistics_and_drift(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from edgeexit.checkpoint import load_checkpoint
    from edgeexit.cli import app

    from .test_calibrate import one_line_error

    runner = CliRunner()
    out = tmp_path / "cal.pt"
    result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--out", str(out), "--quiet", "--gates", "max_prob,conf_coh",
                                 "--degrade", "noise,fog", "--severities", "1,5", "--stage-overhead", "0",
                                 "--confidence", "0.9"])
    assert result.exit_code == 0, result.output
    assert "4 condition(s)" in result.stderr and "worst loss" in result.stdout
    cal = load_checkpoint(out)["calibration"]
    assert cal["target"]["robust"]["conditions"] == ["clean", "noise-1", "noise-5", "fog-1", "fog-5"]
    assert cal["target"]["robust"]["z"] == pytest.approx(1.2816, abs=1e-4)
    for g in cal["gates"].values():
        r = g["robust"]
        assert set(r["per_condition"]) == set(cal["target"]["robust"]["conditions"])
        assert r["worst_drop"] == max(v["drop"] for k, v in r["per_condition"].items() if k != "clean")
        assert r["worst_drop_bound"] >= r["worst_drop"] - 1e-9  # --confidence: targets held on the bounds
        assert g["drift"]["bound"] >= 4.0 and g["drift"]["window"] == 32
    assert "--budget" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--degrade", "noise",
                                                            "--budget", "0.5"]))
    assert "unknown corruption" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--degrade", "snow"]))
    assert "severities" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--degrade", "noise",
                                                              "--severities", "7"]))
    assert "--robust" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--degrade", "noise",
                                                            "--robust", "median"]))
    assert "--degrade" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--degraded-as", "guard"]))
    assert "--degraded-as" in one_line_error(runner.invoke(app, ["calibrate", str(tiny_ckpt), "--degrade", "noise",
                                                                 "--degraded-as", "both"]))


def test_cli_degraded_as_guard_keeps_the_clean_policy_and_exports_the_guard(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from edgeexit.checkpoint import load_checkpoint
    from edgeexit.cli import app
    from edgeexit.runtime.bundle import load_bundle

    runner = CliRunner()
    common = ["--quiet", "--gates", "max_prob", "--stage-overhead", "0", "--max-drop", "1.0"]
    clean_out, guard_out = tmp_path / "clean.pt", tmp_path / "guard.pt"
    assert runner.invoke(app, ["calibrate", str(tiny_ckpt), "--out", str(clean_out), *common]).exit_code == 0
    result = runner.invoke(app, ["calibrate", str(tiny_ckpt), "--out", str(guard_out), *common,
                                 "--degrade", "noise,fog", "--severities", "3,5", "--degraded-as", "guard"])
    assert result.exit_code == 0, result.output
    assert "drift guard of max_prob" in result.stderr
    clean, guarded = load_checkpoint(clean_out), load_checkpoint(guard_out)
    assert guarded["policy"] == clean["policy"]  # the policy is the clean calibration's
    assert "robust" not in guarded["calibration"]["target"]
    g = guarded["calibration"]["guard"]
    assert g["target"]["conditions"] == ["clean", "noise-3", "noise-5", "fog-3", "fog-5"]
    drift = guarded["calibration"]["gates"]["max_prob"]["drift"]
    policy = ExitPolicy.from_dict(guarded["policy"])
    assert g["gates"]["max_prob"]["conservative"] == "thresholds"
    assert len(drift["conservative_thresholds"]) == len(policy.kept_internal)
    bundle = tmp_path / "bundle"
    assert runner.invoke(app, ["export", str(guard_out), "--out", str(bundle)]).exit_code == 0
    exported = load_bundle(bundle).pipeline().drift
    assert exported["conservative_thresholds"] == drift["conservative_thresholds"]


def test_bounds_walk_from_full_depth_and_stop_at_the_first_failure(monkeypatch):
    """With --confidence the path is tested in a fixed order (full depth first) and the walk never steps over a
    point that fails, even when cheaper points pass again; the estimates' binary search may."""
    from edgeexit.thresholds import PathPoint

    verdict = [True, True, False, True, True]  # path index -> meets
    path = [PathPoint([float(i)], 1.0, 1.0, 1.0) for i in range(len(verdict))]
    monkeypatch.setattr(Conditions, "evaluate", lambda self, s, c, f, t: {
        "index": int(t[0]), "accuracy": np.ones(2), "mean_cost": np.ones(2)})
    monkeypatch.setattr(Conditions, "meets", lambda self, ev: verdict[ev["index"]])
    held = Conditions.blocks(["clean", "fog-3"], 2, z=1.645)
    assert held.choose(path, None, None, None)[2]["index"] == 1
    estimate = Conditions.blocks(["clean", "fog-3"], 2)
    assert estimate.choose(path, None, None, None)[2]["index"] == 4

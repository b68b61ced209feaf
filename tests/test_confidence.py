"""Bootstrap intervals of a calibrated operating point and the small-split warning, on scores with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeexit.confidence import bootstrap_point, flag_test_drop, for_policy, images_needed, split_warning


def _point(n: int, wrong: int):
    """n images, the final exit always right, the policy wrong on ``wrong`` of them; cost 0.4 or 0.8."""
    final = np.ones(n, bool)
    taken = np.ones(n, bool)
    taken[:wrong] = False
    cost = np.where(np.arange(n) % 2 == 0, 0.4, 0.8)
    return taken, final, cost


def test_interval_matches_the_binomial_answer():
    # loss = 10 points, its standard error sqrt(p (1 - p) / n) = 1.5 points: 95% interval about 10 +- 2.94
    taken, final, cost = _point(400, 40)
    conf = bootstrap_point(taken, final, cost, n_boot=4000, seed=0)
    d, c = conf["drop"], conf["cost"]
    assert d["value"] == pytest.approx(10.0)
    assert d["low"] == pytest.approx(10 - 1.96 * 1.5, abs=0.5) and d["high"] == pytest.approx(10 + 1.96 * 1.5, abs=0.5)
    # cost: half 0.4, half 0.8 -> mean 0.6, standard error 0.2 / sqrt(400) = 0.01
    assert c["value"] == pytest.approx(0.6)
    assert c["low"] == pytest.approx(0.6 - 0.0196, abs=0.004) and c["high"] == pytest.approx(0.6 + 0.0196, abs=0.004)
    assert conf["method"] == "paired percentile bootstrap" and conf["n"] == 400 and conf["level"] == 0.95


def test_interval_is_seeded_paired_and_degenerate_when_nothing_varies():
    taken, final, cost = _point(120, 6)
    assert bootstrap_point(taken, final, cost, seed=3) == bootstrap_point(taken, final, cost, seed=3)
    assert bootstrap_point(taken, final, cost, seed=3) != bootstrap_point(taken, final, cost, seed=4)
    # the same answers at the chosen and the final exit: no loss in any resample (paired), cost constant
    same = bootstrap_point(final, final, np.full(120, 0.5))
    assert same["drop"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert same["cost"]["low"] == same["cost"]["high"] == 0.5
    with pytest.raises(ValueError):
        bootstrap_point([], [], [])


def test_small_split_warning_and_the_images_it_asks_for():
    taken, final, cost = _point(120, 6)  # 5-point loss on 120 images: interval ~ +-3.9 points
    conf = bootstrap_point(taken, final, cost)
    width = conf["drop"]["high"] - conf["drop"]["low"]
    assert 6 < width < 10
    message = split_warning(conf, 1.0)
    needed = images_needed(120, width, 1.0)
    assert needed == math.ceil(120 * width**2)
    assert message.startswith("the calibration split (120 images) is too small for a 1-point target")
    assert f"about {needed} held-out images" in message and "--confidence 0.95" in message
    # the answer is right: the same split repeated k times, k = needed / 120, has an interval about 1 point wide
    k = math.ceil(needed / 120)
    big = bootstrap_point(np.tile(taken, k), np.tile(final, k), np.tile(cost, k), n_boot=1000)
    assert big["drop"]["high"] - big["drop"]["low"] == pytest.approx(1.0, abs=0.15)
    assert split_warning(big, 1.2) is None
    assert split_warning(conf, None) is None  # a budget target: no accuracy target to check against
    assert "0-point target cannot be checked" in split_warning(conf, 0.0)


def test_evaluation_flag_needs_the_target_and_the_interval_exceeded():
    conf = {"drop": {"value": 0.5, "low": -0.5, "high": 1.5}}
    assert flag_test_drop(1.2, conf, 1.0) is None  # above the target but inside the calibration interval
    assert flag_test_drop(0.9, conf, 0.5) is None  # above the interval? no: 0.9 < 1.5
    flag = flag_test_drop(6.3, conf, 1.0)
    assert flag and "6.3 points, exceeds the 1-point target and the calibration interval (-0.5 to 1.5)" in flag
    assert flag_test_drop(6.3, None, 1.0) is None


def test_for_policy_follows_the_thresholds():
    # 2 exits: exit 0 is taken when the score >= 0.5; there it is right for half of the images
    scores = np.array([[0.9], [0.9], [0.1], [0.1]])
    correct = np.array([[True, True], [False, True], [True, True], [True, True]])
    conf = for_policy(scores, correct, [0.3, 1.0], [0.5], n_boot=200)
    assert conf["drop"]["value"] == pytest.approx(25.0) and conf["cost"]["value"] == pytest.approx(0.65)


def test_calibrate_stores_the_interval_and_warns_on_a_small_split(tiny_ckpt, tmp_path):
    from edgeexit.calibrate import calibrate

    logs: list[str] = []
    cal = calibrate(tiny_ckpt, out=tmp_path / "cal.pt", log=logs.append)
    conf = cal["confidence"]
    assert conf["n"] == cal["n"] and conf["drop"]["low"] <= conf["drop"]["value"] <= conf["drop"]["high"]
    winner = cal["gates"][cal["winner"]]
    assert conf["drop"]["value"] == pytest.approx(winner["drop"]) and conf["cost"]["value"] == pytest.approx(winner["mean_cost"])
    assert any(m.startswith("edgeexit: warning: the calibration split (") for m in logs), logs
    from edgeexit.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "cal.pt")["calibration"]["confidence"] == conf

"""Tests for edgeexit.policy and edgeexit.thresholds (numpy only)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from edgeexit import gates as G
from edgeexit.policy import ExitPolicy
from edgeexit.thresholds import (PathPoint, choose, choose_confident, greedy_path, loss_upper_bound, oracle, orient,
                                 simulate)


def synthetic(n=2000, e=5, seed=0):
    """Samples of varying difficulty; deeper exits are more often right; internal scores are noisy hints."""
    rng = np.random.default_rng(seed)
    ease = rng.normal(size=n)
    depth = np.linspace(-1.0, 1.5, e)
    correct = ease[:, None] + depth[None, :] + 0.5 * rng.normal(size=(n, e)) > 0
    scores = ease[:, None] + depth[None, : e - 1] + 0.5 * rng.normal(size=(n, e - 1))
    cost = np.cumsum(np.linspace(1.0, 2.0, e))
    return scores, correct, cost


# --------------------------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------------------------
def test_simulate_hand_example():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.1], [np.nan, 0.9]])
    correct = np.array([[1, 1, 1], [0, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=bool)
    cost = np.array([1.0, 2.0, 4.0])
    ex, acc, mean_cost = simulate(scores, correct, cost, [0.5, 0.5])
    np.testing.assert_array_equal(ex, [0, 1, 2, 1])  # nan never passes
    assert acc == pytest.approx(2 / 4)
    assert mean_cost == pytest.approx((1 + 2 + 4 + 2) / 4)
    ex, acc, mean_cost = simulate(scores, correct, cost, [math.inf, math.inf])
    np.testing.assert_array_equal(ex, [2, 2, 2, 2])
    assert acc == pytest.approx(3 / 4) and mean_cost == 4.0
    with pytest.raises(ValueError):
        simulate(scores, correct, cost, [0.5])
    with pytest.raises(ValueError):
        simulate(scores, correct, [1.0, 3.0, 2.0], [0.5, 0.5])  # decreasing cost


def test_oracle_hand_example():
    correct = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 1]], dtype=bool)
    cost = np.array([1.0, 2.0, 4.0])
    mean_cost, acc = oracle(correct, cost)
    assert mean_cost == pytest.approx((2 + 1 + 4 + 4) / 4)
    assert acc == pytest.approx(3 / 4)


def test_orient_signs_and_auroc():
    rng = np.random.default_rng(1)
    right = rng.random((500, 2)) < 0.6
    raw = np.stack([right[:, 0] + 0.3 * rng.normal(size=500), -right[:, 1].astype(float) + 0.3 * rng.normal(size=500)], axis=1)
    signs, aucs = orient(raw, np.concatenate([right, np.ones((500, 1), bool)], axis=1))
    np.testing.assert_array_equal(signs, [1.0, -1.0])
    assert np.all(aucs > 0.9)
    signs, aucs = orient(raw, np.ones((500, 2), bool))  # one class empty
    np.testing.assert_array_equal(signs, [1.0, 1.0])
    assert np.all(np.isnan(aucs))


def test_greedy_path_endpoints_monotone_and_fast():
    scores, correct, cost = synthetic(n=5000, e=7)
    t0 = time.perf_counter()
    path = greedy_path(scores, correct, cost, n_candidates=64)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    first, last = path[0], path[-1]
    assert first.thresholds == [math.inf] * 6
    assert first.mean_cost == pytest.approx(cost[-1]) and first.cost_fraction == pytest.approx(1.0)
    assert first.accuracy == pytest.approx(correct[:, -1].mean())
    assert last.mean_cost == pytest.approx(cost[0])  # every sample leaves at exit 0
    assert last.accuracy == pytest.approx(correct[:, 0].mean())
    costs = np.array([p.mean_cost for p in path])
    assert np.all(np.diff(costs) <= 1e-9)
    # every recorded point is what simulate gives for its thresholds
    for p in path[:: max(1, len(path) // 25)]:
        _, acc, c = simulate(scores, correct, cost, p.thresholds)
        assert acc == pytest.approx(p.accuracy) and c == pytest.approx(p.mean_cost)


def greedy_by_the_rule(scores, correct, cost, n_candidates):
    """The documented greedy rule by brute force: every proposal re-simulated from scratch (integer costs, so
    losses and savings are exact)."""
    from edgeexit.thresholds import _candidates

    n, k = scores.shape
    cands = [_candidates(scores[:, i], n_candidates) for i in range(k)]
    pos = [-1] * k

    def thresholds(p):
        return [float(cands[i][p[i]]) if p[i] >= 0 else math.inf for i in range(k)]

    def totals(p):
        ex, _, _ = simulate(scores, correct, cost, thresholds(p))
        return int(correct[np.arange(n), ex].sum()), float(np.asarray(cost)[ex].sum())

    path = [thresholds(pos)]
    while any(pos[i] + 1 < len(cands[i]) for i in range(k)):
        right, total = totals(pos)
        keys = []
        for i in range(k):
            if pos[i] + 1 >= len(cands[i]):
                continue
            trial = list(pos)
            trial[i] += 1
            r2, t2 = totals(trial)
            loss, saving = right - r2, total - t2
            ratio = loss / saving if saving > 0 else (-math.inf if loss < 0 else 0.0 if loss == 0 else math.inf)
            keys.append((ratio, -saving, i))
        pos[min(keys)[2]] += 1
        path.append(thresholds(pos))
    return path


@pytest.mark.parametrize("seed", range(12))
def test_greedy_path_follows_its_rule(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 120)), int(rng.integers(1, 4))
    scores = np.round(rng.random((n, k)), 1 + seed % 2)  # ties
    scores[rng.random((n, k)) < 0.05] = np.nan
    correct = rng.random((n, k + 1)) < rng.uniform(0.3, 0.9, k + 1)
    cost = np.cumsum(rng.integers(0, 4, k + 1)) + 1
    nc = int(rng.integers(2, 12))
    fast = [p.thresholds for p in greedy_path(scores, correct, cost, n_candidates=nc)]
    assert fast == greedy_by_the_rule(scores, correct, cost, nc)


def test_greedy_takes_free_savings_first():
    # exit 0's score says exactly who is right there: lowering it to 0.5 saves cost at no accuracy loss
    correct = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], dtype=bool)
    scores = np.array([[1.0], [1.0], [0.0], [0.0]])
    path = greedy_path(scores, correct, [1.0, 3.0], n_candidates=8)
    assert path[1].thresholds == [1.0] and path[1].accuracy == 1.0 and path[1].mean_cost == pytest.approx(2.0)
    assert path[-1].accuracy == 0.5 and path[-1].mean_cost == pytest.approx(1.0)
    assert choose(path, target_accuracy=1.0) is path[1]


def test_choose_target_and_budget():
    scores, correct, cost = synthetic(n=3000, e=5, seed=2)
    path = greedy_path(scores, correct, cost)
    full_acc = path[0].accuracy
    for target in (full_acc - 0.05, full_acc - 0.01, full_acc):
        p = choose(path, target_accuracy=target)
        assert p.accuracy >= target - 1e-12
        _, acc, _ = simulate(scores, correct, cost, p.thresholds)  # holds on the searched data
        assert acc >= target - 1e-12
        assert all(q.mean_cost >= p.mean_cost for q in path if q.accuracy >= target)
    assert choose(path, target_accuracy=full_acc - 0.05).cost_fraction < 0.9
    assert choose(path, target_accuracy=2.0) is path[0]  # unreachable -> full depth
    for budget in (0.3, 0.5, 0.8):
        p = choose(path, budget=budget)
        assert p.cost_fraction <= budget + 1e-12
        assert all(q.accuracy <= p.accuracy for q in path if q.cost_fraction <= budget)
    cheapest = choose(path, budget=0.0)
    assert cheapest.mean_cost == min(q.mean_cost for q in path)
    with pytest.raises(ValueError):
        choose(path)
    with pytest.raises(ValueError):
        choose(path, target_accuracy=0.5, budget=0.5)


def test_single_exit_path():
    correct = np.array([[True], [False]])
    path = greedy_path(np.zeros((2, 0)), correct, [3.0])
    assert len(path) == 1 and path[0].thresholds == [] and path[0].accuracy == 0.5
    assert isinstance(path[0], PathPoint)


def test_reference_cost_sets_cost_fraction():
    scores, correct, cost = synthetic(n=300, e=4, seed=3)
    path = greedy_path(scores, correct, cost, reference_cost=0.8 * cost[-1])
    assert path[0].cost_fraction == pytest.approx(1.25)
    p = choose(path, budget=1.0)
    assert p.mean_cost <= 0.8 * cost[-1] + 1e-9


# --------------------------------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------------------------------
def test_policy_validation_messages():
    ok = ExitPolicy.default(4, gate="margin", threshold=0.3)
    assert ok.num_exits == 4 and ok.thresholds == [0.3] * 3 and ok.signs == [1.0] * 3
    cases = [
        (dict(gate="bogus"), "unknown gate"),
        (dict(thresholds=[0.1, 0.2]), "thresholds must have E - 1 = 3"),
        (dict(signs=[1, 1]), "signs must have"),
        (dict(signs=[1, 0.5, 1]), "+1 or -1"),
        (dict(temperatures=[1, 1, 0, 1]), "temperatures"),
        (dict(gate="learned"), "needs learned params"),
        (dict(learned=[{"mean": [0] * 8, "std": [1] * 8, "weights": [0] * 8, "bias": 0.0}]), "learned must have"),
    ]
    base = ok.to_dict()
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("+", r"\+")):
            ExitPolicy.from_dict({**base, **change})
    with pytest.raises(ValueError, match="lacks"):
        ExitPolicy.from_dict({"gate": "margin"})


def test_policy_json_round_trip():
    learned = [G.fit_logistic(np.random.default_rng(i).normal(size=(30, 8)), np.arange(30) % 3 == 0) for i in range(3)]
    pol = ExitPolicy(
        gate="learned",
        thresholds=[0.7, math.inf, -math.inf],
        signs=[1, -1, 1],
        temperatures=[1.5, 1.2, 1.0, 0.9],
        learned=learned,
    )
    text = json.dumps(pol.to_dict())
    back = ExitPolicy.from_dict(json.loads(text))
    assert back == pol
    assert back.to_dict() == pol.to_dict()
    assert ExitPolicy.from_dict({**pol.to_dict(), "thresholds": [0.7, None, "-inf"]}) == pol


def test_should_exit_and_decide_with_signal_gate():
    pol = ExitPolicy(gate="sal_entropy", thresholds=[-0.5, -0.2], signs=[-1, -1], temperatures=[1, 1, 1])
    sig = np.zeros((3, 3, 7))
    sig[:, :, 3] = [[0.4, 0.9, 0.9], [0.7, 0.1, 0.9], [0.9, 0.9, 0.9]]
    np.testing.assert_array_equal(pol.should_exit(0, sig[:, 0]), [True, False, False])
    np.testing.assert_array_equal(pol.should_exit(2, sig[:, 2]), [True, True, True])  # last exit
    np.testing.assert_allclose(pol.oriented_score(1, sig[:, 1]), [-0.9, -0.1, -0.9])
    np.testing.assert_array_equal(pol.decide(sig, np.zeros((3, 3), int)), [0, 1, 2])
    with pytest.raises(ValueError):
        pol.oriented_score(2, sig[:, 2])


def test_patience_gate_through_policy():
    pol = ExitPolicy.default(4, gate="patience", threshold=2)
    classes = np.array([[1, 1, 2, 2], [1, 2, 2, 0], [1, 2, 3, 4], [5, 6, 7, 7]])
    sig = np.zeros((4, 4, 7))
    np.testing.assert_array_equal(pol.decide(sig, classes), [1, 2, 3, 3])
    np.testing.assert_array_equal(pol.should_exit(1, sig[:, 1], G.patience_counts(classes)[:, 1]), [1, 0, 0, 0])


def test_learned_gate_through_policy():
    rng = np.random.default_rng(3)
    n, e = 400, 3
    sig = rng.random((n, e, 7))
    classes = rng.integers(0, 3, (n, e))
    pat = G.patience_counts(classes)
    correct = sig[:, :, 0] + 0.1 * rng.normal(size=(n, e)) > 0.5  # max_prob predicts correctness
    learned = [G.fit_logistic(G.gate_features(sig[:, i], pat[:, i]), correct[:, i]) for i in range(e - 1)]
    pol = ExitPolicy(gate="learned", thresholds=[0.8, 0.8], signs=[1, 1], temperatures=[1] * e, learned=learned)
    score0 = pol.oriented_score(0, sig[:, 0], pat[:, 0])
    assert np.all((score0 >= 0) & (score0 <= 1))
    assert correct[score0 >= 0.8, 0].mean() > 0.9
    ex = pol.decide(sig, classes)
    manual = np.full(n, e - 1)
    for i in reversed(range(e - 1)):
        manual[G.logistic_score(G.gate_features(sig[:, i], pat[:, i]), learned[i]) >= 0.8] = i
    np.testing.assert_array_equal(ex, manual)
    json.dumps(pol.to_dict())


def test_policy_decide_matches_threshold_search():
    """orient -> greedy_path -> choose -> ExitPolicy.decide reproduces simulate on the same data."""
    rng = np.random.default_rng(4)
    n, e = 1500, 4
    scores, correct, cost = synthetic(n=n, e=e, seed=5)
    sig = rng.random((n, e, 7))
    sig[:, : e - 1, 4] = -scores  # sal_spread: lower means right
    signs, aucs = orient(sig[:, : e - 1, 4], correct)
    np.testing.assert_array_equal(signs, [-1, -1, -1])
    oriented = sig[:, : e - 1, 4] * signs[None, :]
    point = choose(greedy_path(oriented, correct, cost), target_accuracy=correct[:, -1].mean() - 0.02)
    pol = ExitPolicy(gate="sal_spread", thresholds=point.thresholds, signs=list(signs), temperatures=[1.0] * e)
    ex_sim, acc, _ = simulate(oriented, correct, cost, point.thresholds)
    ex_pol = pol.decide(sig, np.zeros((n, e), int))
    np.testing.assert_array_equal(ex_pol, ex_sim)
    assert correct[np.arange(n), ex_pol].mean() == pytest.approx(point.accuracy)


def test_override():
    pol = ExitPolicy(gate="sal_entropy", thresholds=[-0.3, -0.4, -0.5], signs=[-1, -1, -1], temperatures=[1] * 4)
    same = pol.override(thresholds=-0.2)
    assert same.thresholds == [-0.2] * 3 and same.signs == [-1] * 3 and pol.thresholds == [-0.3, -0.4, -0.5]
    switched = pol.override(gate="max_prob", thresholds=[0.9, 0.8, 0.7])
    assert switched.gate == "max_prob" and switched.signs == [1.0] * 3  # uncalibrated gate: signs +1
    with pytest.raises(ValueError, match="needs thresholds"):
        pol.override(gate="margin")
    with pytest.raises(ValueError, match="learned"):
        pol.override(gate="learned", thresholds=0.5)
    capped = pol.override(max_exit=1)
    assert capped.thresholds[1] == -math.inf
    sig = np.full((5, 4, 7), 0.99)  # high entropy everywhere: nobody leaves before max_exit
    np.testing.assert_array_equal(pol.decide(sig, np.zeros((5, 4), int)), [3] * 5)
    np.testing.assert_array_equal(capped.decide(sig, np.zeros((5, 4), int)), [1] * 5)
    assert pol.override(max_exit=3) == pol
    with pytest.raises(ValueError):
        pol.override(max_exit=4)
    assert ExitPolicy.from_dict(json.loads(json.dumps(capped.to_dict()))) == capped


def test_loss_upper_bound_formula():
    # 100 images: 10 right only at the final exit, 4 right only at the taken exit, the rest agree
    final = np.array([1] * 10 + [0] * 4 + [1] * 50 + [0] * 36)
    taken = np.array([0] * 10 + [1] * 4 + [1] * 50 + [0] * 36)
    d = final - taken  # mean 0.06, mean(d^2) 0.14
    expected = 0.06 + 1.645 * math.sqrt((0.14 - 0.06 ** 2) / 100)
    assert loss_upper_bound(taken, final, 1.645) == pytest.approx(expected)
    assert loss_upper_bound(taken, final, 0.0) == pytest.approx(d.mean())  # z = 0: the estimate itself
    assert loss_upper_bound(final, final, 3.0) == 0.0  # no disagreement: no uncertainty


def test_choose_confident_stops_at_the_first_failing_point():
    rng = np.random.default_rng(3)
    n = 4000
    correct = np.ones((n, 3), dtype=bool)
    correct[:, 0] = rng.random(n) < 0.7  # a weak first exit whose score says little about it
    correct[:, 1] = rng.random(n) < 0.9
    scores = rng.random((n, 2))
    cost = [0.3, 0.6, 1.0]
    path = greedy_path(scores, correct, cost, n_candidates=32)
    z, max_loss = 1.645, 0.02
    point = choose_confident(path, scores, correct, cost, max_loss, z)
    rows = np.arange(n)

    def bound(p):
        ex, _, _ = simulate(scores, correct, cost, p.thresholds)
        return loss_upper_bound(correct[rows, ex], correct[:, -1], z)

    i = path.index(point)
    assert all(bound(p) <= max_loss for p in path[: i + 1])  # every point up to the chosen one passed, in order
    assert i == len(path) - 1 or bound(path[i + 1]) > max_loss  # and the next one is the first that failed
    estimate = choose(path, target_accuracy=correct[:, -1].mean() - max_loss)
    assert point.mean_cost >= estimate.mean_cost  # holding the bound costs at least as much as the estimate
    # a zero-loss target keeps only savings that lose no image at all (here: none beyond the first few points)
    strict = choose_confident(path, scores, correct, cost, 0.0, z)
    assert bound(strict) <= 0.0 and path.index(strict) < i
    with pytest.raises(ValueError, match="non-empty"):
        choose_confident([], scores, correct, cost, max_loss, z)

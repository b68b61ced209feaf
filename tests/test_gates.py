"""Tests for edgeexit.gates and edgeexit.metrics (numpy only)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeexit import gates as G
from edgeexit.metrics import accuracy_cost_auc, auroc, percentiles

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# naive per-sample reference implementation (loops, plain floats)
# --------------------------------------------------------------------------------------------------------------
def naive_resize_weights(src: int, dst: int):
    """w[k][j] = overlap of [k*src/dst, (k+1)*src/dst) with [j, j+1), divided by src/dst."""
    scale = src / dst
    out = []
    for k in range(dst):
        lo, hi = k * scale, (k + 1) * scale
        out.append([max(0.0, min(hi, j + 1) - max(lo, j)) / scale for j in range(src)])
    return out


def naive_dist(m):
    h, w = len(m), len(m[0])
    r = [[max(float(v), 0.0) for v in row] for row in m]
    tot = sum(sum(row) for row in r)
    if tot <= 0:
        return [[1.0 / (h * w)] * w for _ in range(h)]
    return [[v / tot for v in row] for row in r]


def naive_resize(m, hh, ww):
    h, w = len(m), len(m[0])
    ry, rx = naive_resize_weights(h, hh), naive_resize_weights(w, ww)
    return [
        [sum(ry[a][i] * m[i][j] * rx[b][j] for i in range(h) for j in range(w)) for b in range(ww)]
        for a in range(hh)
    ]


def naive_signals(logits, cam, prev, t):
    z = [v / t for v in logits]
    mx = max(z)
    ex = [math.exp(v - mx) for v in z]
    p = [v / sum(ex) for v in ex]
    ps = sorted(p, reverse=True)
    ent = -sum(v * math.log(v) for v in p if v > 0)
    out = [ps[0], ps[0] - ps[1], 1 - ent / math.log(len(p))]
    d = naive_dist(cam)
    h, w = len(d), len(d[0])
    out.append(-sum(v * math.log(v) for row in d for v in row if v > 0) / math.log(h * w))
    cx = sum(d[i][j] * (j + 0.5) / w for i in range(h) for j in range(w))
    cy = sum(d[i][j] * (i + 0.5) / h for i in range(h) for j in range(w))
    out.append(sum(d[i][j] * (((j + 0.5) / w - cx) ** 2 + ((i + 0.5) / h - cy) ** 2) for i in range(h) for j in range(w)))
    if prev is None:
        return out + [0.0, 0.0]
    dp = naive_dist(prev)
    hh, ww = min(h, len(dp)), min(w, len(dp[0]))
    a = [v for row in naive_resize(d, hh, ww) for v in row]
    b = [v for row in naive_resize(dp, hh, ww) for v in row]
    cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    a = [x / max(a) for x in a]
    b = [y / max(b) for y in b]
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((x - ma) ** 2 for x in a) / n
    vb = sum((y - mb) ** 2 for y in b) / n
    cv = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / n
    c1, c2 = 0.01**2, 0.03**2
    ssim = (2 * ma * mb + c1) * (2 * cv + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return out + [cos, ssim]


def test_exit_signals_match_naive_loop():
    rng = np.random.default_rng(0)
    shapes = [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((7, 7), (3, 5)), ((3, 5), (7, 7)), ((6, 4), None), ((5, 5), (5, 5))]
    for (hw, prev_hw), t in zip(shapes, [1.0, 0.5, 2.0, 1.3, 1.0, 0.7]):
        b, c = 5, 6
        logits = rng.normal(scale=3.0, size=(b, c))
        cam = rng.normal(size=(b, *hw))
        cam[0] = -np.abs(cam[0])  # no positive mass -> uniform
        prev = None if prev_hw is None else rng.normal(size=(b, *prev_hw))
        got = G.exit_signals(logits, cam, prev, t)
        assert got.dtype == np.float32 and got.shape == (b, 7)
        for k in range(b):
            want = naive_signals(logits[k].tolist(), cam[k].tolist(), None if prev is None else prev[k].tolist(), t)
            np.testing.assert_allclose(got[k], np.array(want), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# softmax signals
# --------------------------------------------------------------------------------------------------------------
def test_softmax_stable_and_temperature():
    p = G.softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])
    hot = G.softmax(np.array([[2.0, 0.0]]), temperature=0.01)
    assert hot[0, 0] > 0.999999
    flat = G.softmax(np.array([[2.0, 0.0]]), temperature=1e6)
    np.testing.assert_allclose(flat, [[0.5, 0.5]], atol=1e-5)
    with pytest.raises(ValueError):
        G.softmax(np.zeros((1, 2)), temperature=0.0)


def test_softmax_signals_known_values():
    s = G.softmax_signals(np.array([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(s[0], [0.5, 0.0, 0.0], atol=1e-12)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    np.testing.assert_allclose(s[1], [0.75, 0.5, 1 - h / math.log(2)], atol=1e-12)
    one_hot = G.softmax_signals(np.array([[0.0, 800.0, 0.0, 0.0]]))
    np.testing.assert_allclose(one_hot[0], [1.0, 1.0, 1.0], atol=1e-12)
    single = G.softmax_signals(np.array([[3.0], [-2.0]]))
    np.testing.assert_allclose(single, np.ones((2, 3)))


# --------------------------------------------------------------------------------------------------------------
# saliency signals and edge cases
# --------------------------------------------------------------------------------------------------------------
def test_cam_distribution_edge_cases():
    zero = G.cam_distribution(np.zeros((1, 3, 4)))
    np.testing.assert_allclose(zero, np.full((1, 3, 4), 1 / 12))
    neg = G.cam_distribution(-np.ones((1, 2, 2)))
    np.testing.assert_allclose(neg, np.full((1, 2, 2), 0.25))
    mixed = G.cam_distribution(np.array([[[3.0, -1.0], [1.0, np.nan]]]))
    np.testing.assert_allclose(mixed, [[[0.75, 0.0], [0.25, 0.0]]])
    tiny = G.cam_distribution(np.full((1, 2, 2), 1e-300))
    np.testing.assert_allclose(tiny.sum(), 1.0)
    assert G.cam_distribution(np.ones((2, 5, 5), dtype=np.float32)).dtype == np.float64


def test_entropy_and_spread_known_values():
    one_hot = np.zeros((1, 5, 7))
    one_hot[0, 2, 3] = 4.0
    uniform = np.ones((1, 4, 4))
    np.testing.assert_allclose(G.spatial_entropy(one_hot), [0.0], atol=1e-12)
    np.testing.assert_allclose(G.spatial_spread(one_hot), [0.0], atol=1e-12)
    np.testing.assert_allclose(G.spatial_entropy(uniform), [1.0])
    np.testing.assert_allclose(G.spatial_entropy(np.zeros((1, 3, 3))), [1.0])  # all-zero -> uniform
    np.testing.assert_allclose(G.spatial_entropy(-np.ones((1, 3, 3))), [1.0])  # negative -> uniform
    # uniform n x n: (1 - 1/n^2) / 6 ; 2x2 -> 0.125
    np.testing.assert_allclose(G.spatial_spread(np.ones((1, 2, 2))), [0.125])
    np.testing.assert_allclose(G.spatial_spread(uniform), [(1 - 1 / 16) / 6])
    # two opposite corners of a 2x2 map: centroid (.5,.5), squared distance .125 each
    corners = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    np.testing.assert_allclose(G.spatial_spread(corners), [0.125])
    np.testing.assert_allclose(G.spatial_entropy(corners), [0.5])  # log 2 / log 4
    # size independence: a block-upsampled map has a close spread and the same entropy ordering
    m = np.random.default_rng(1).random((1, 4, 4))
    up = np.kron(m[0], np.ones((2, 2)))[None]
    assert abs(G.spatial_spread(up)[0] - G.spatial_spread(m)[0]) < 0.02


def test_one_by_one_map():
    one = np.array([[[2.5]], [[-1.0]]])
    np.testing.assert_array_equal(G.spatial_entropy(one), [0.0, 0.0])
    np.testing.assert_array_equal(G.spatial_spread(one), [0.0, 0.0])
    other = np.random.default_rng(2).random((2, 4, 4))
    np.testing.assert_allclose(G.map_cosine(one, other), [1.0, 1.0])
    np.testing.assert_allclose(G.map_ssim(one, other), [1.0, 1.0])
    sig = G.exit_signals(np.zeros((2, 3)), one, other)
    assert np.all(np.isfinite(sig))


# --------------------------------------------------------------------------------------------------------------
# resizing and coherence
# --------------------------------------------------------------------------------------------------------------
def test_resize_matrix_known_and_rows_sum_to_one():
    np.testing.assert_array_equal(G.resize_matrix(5, 5), np.eye(5))
    np.testing.assert_allclose(G.resize_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(G.resize_matrix(2, 4), [[1, 0], [1, 0], [0, 1], [0, 1]])
    np.testing.assert_allclose(G.resize_matrix(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(G.resize_matrix(2, 3), [[1, 0], [0.5, 0.5], [0, 1]])
    np.testing.assert_allclose(G.resize_matrix(7, 1), np.full((1, 7), 1 / 7))
    for src, dst in itertools.product([1, 2, 3, 5, 7, 8, 13], repeat=2):
        r = G.resize_matrix(src, dst)
        assert r.shape == (dst, src) and r.dtype == np.float64
        np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(r, np.array(naive_resize_weights(src, dst)), atol=1e-12)
    for bad in [(0, 3), (3, 0), (2.5, 3)]:
        with pytest.raises(ValueError):
            G.resize_matrix(*bad)


def test_resize_map_and_common_grid():
    m = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    down = G.resize_map(m, (2, 2))
    np.testing.assert_allclose(down, [[[2.5, 4.5], [10.5, 12.5]]])
    ry, rx = G.resize_matrix(4, 3), G.resize_matrix(4, 5)
    np.testing.assert_allclose(G.resize_map(m, (3, 5))[0], ry @ m[0] @ rx.T)
    np.testing.assert_allclose(G.resize_map(m, (3, 5)).mean(), m.mean())
    assert G.common_grid((8, 8), (4, 4)) == (4, 4)
    assert G.common_grid((7, 7), (3, 5)) == (3, 5)
    assert G.common_grid((3, 9), (6, 2)) == (3, 2)


def test_coherence_first_exit_is_zero():
    cam = np.random.default_rng(3).random((3, 4, 4))
    np.testing.assert_array_equal(G.map_cosine(cam, None), np.zeros(3))
    np.testing.assert_array_equal(G.map_ssim(cam, None), np.zeros(3))
    sig = G.exit_signals(np.zeros((3, 4)), cam, None)
    np.testing.assert_array_equal(sig[:, 5:], 0.0)


def test_coherence_identical_and_disjoint_maps():
    rng = np.random.default_rng(4)
    cam = rng.random((3, 6, 6))
    np.testing.assert_allclose(G.map_cosine(cam, cam), 1.0, atol=1e-12)
    np.testing.assert_allclose(G.map_ssim(cam, cam), 1.0, atol=1e-12)
    # scale does not matter; two uniform maps are identical
    np.testing.assert_allclose(G.map_cosine(cam, 5 * cam), 1.0, atol=1e-12)
    np.testing.assert_allclose(G.map_ssim(np.zeros((1, 3, 3)), np.ones((1, 3, 3))), [1.0])
    a = np.array([[[1.0, 0.0], [0.0, 0.0]]])
    b = np.array([[[0.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_allclose(G.map_cosine(a, b), [0.0], atol=1e-15)
    # q one-hot on 4 cells: mu = 1/4, var = 3/16, cov = -1/16
    c1, c2 = 0.01**2, 0.03**2
    want = (2 / 16 + c1) * (-2 / 16 + c2) / ((2 / 16 + c1) * (6 / 16 + c2))
    np.testing.assert_allclose(G.map_ssim(a, b), [want])
    assert G.map_ssim(a, b)[0] < 0


def test_coherence_across_grid_sizes():
    rng = np.random.default_rng(5)
    coarse = rng.random((2, 4, 4))
    fine = np.kron(coarse, np.ones((1, 2, 2)))  # 8x8 block copy of the 4x4 map
    np.testing.assert_allclose(G.map_cosine(fine, coarse), 1.0, atol=1e-12)
    np.testing.assert_allclose(G.map_ssim(fine, coarse), 1.0, atol=1e-12)
    np.testing.assert_allclose(G.map_ssim(coarse, fine), 1.0, atol=1e-12)
    a, b = rng.random((4, 7, 7)), rng.random((4, 3, 5))
    for f in (G.map_cosine, G.map_ssim):
        ab, ba = f(a, b), f(b, a)
        np.testing.assert_allclose(ab, ba, atol=1e-12)  # symmetric: both go to the 3x5 grid
        assert np.all(ab <= 1.0 + 1e-12) and np.all(ab >= -1.0)
    with pytest.raises(ValueError):
        G.map_cosine(a, b[:2])


# --------------------------------------------------------------------------------------------------------------
# patience and gate scores
# --------------------------------------------------------------------------------------------------------------
def test_patience_counts_and_incremental():
    classes = np.array([[3, 3, 1, 1, 1], [0, 1, 0, 1, 0], [2, 2, 2, 2, 2]])
    want = np.array([[1, 2, 1, 2, 3], [1, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(G.patience_counts(classes), want)
    count, prev = None, None
    for i in range(classes.shape[1]):
        count = G.next_patience(count, prev, classes[:, i])
        prev = classes[:, i]
        np.testing.assert_array_equal(count, want[:, i])


def test_gate_score_dispatch():
    rng = np.random.default_rng(6)
    sig = rng.random((4, 7)).astype(np.float32)
    pat = np.array([1, 2, 3, 1])
    for k, name in enumerate(G.SIGNAL_NAMES):
        np.testing.assert_allclose(G.gate_score(name, sig, pat), sig[:, k])
    np.testing.assert_array_equal(G.gate_score("patience", sig, pat), pat.astype(float))
    feats = G.gate_features(sig, pat)
    assert feats.shape == (4, 8)
    np.testing.assert_array_equal(feats[:, 7], pat)
    params = G.fit_logistic(feats, np.array([True, False, True, False]))
    np.testing.assert_allclose(G.gate_score("learned", sig, pat, params), G.logistic_score(feats, params))
    with pytest.raises(ValueError):
        G.gate_score("learned", sig, pat)
    with pytest.raises(ValueError):
        G.gate_score("nope", sig, pat)
    assert G.GATE_NAMES[-2:] == ("patience", "learned") and G.FEATURE_NAMES[-1] == "patience"


# --------------------------------------------------------------------------------------------------------------
# learned gate and temperature
# --------------------------------------------------------------------------------------------------------------
def test_fit_logistic_separates_and_is_monotone():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 3))
    x[:, 2] = 5.0  # constant column
    y = x[:, 0] + 0.3 * x[:, 1] > 0
    params = G.fit_logistic(x, y)
    json.dumps(params)  # JSON-able
    assert set(params) == {"mean", "std", "weights", "bias"}
    assert params["weights"][2] == 0.0
    prob = G.logistic_score(x, params)
    assert np.all((prob >= 0) & (prob <= 1))
    assert np.mean((prob > 0.5) == y) > 0.95
    # it is the optimum of the documented objective: the gradient vanishes
    xs = (x - np.array(params["mean"])) / np.array(params["std"])
    w = np.array(params["weights"])
    resid = prob - y
    np.testing.assert_allclose(xs.T @ resid / len(y) + 1e-2 * w, 0.0, atol=1e-7)
    assert abs(resid.mean()) < 1e-7
    # without the L2 penalty separable data is separated exactly
    hard = G.fit_logistic(x, y, l2=0.0)
    assert np.all((G.logistic_score(x, hard) > 0.5) == y)
    grid = np.zeros((50, 3))
    grid[:, 0] = np.linspace(-3, 3, 50)
    assert np.all(np.diff(G.logistic_score(grid, params)) > 0)  # monotone in the informative feature


def test_fit_logistic_degenerate_targets():
    x = np.random.default_rng(8).normal(size=(20, 2))
    for value in (True, False):
        params = G.fit_logistic(x, np.full(20, value))
        assert params["weights"] == [0.0, 0.0]
        prob = G.logistic_score(x, params)
        assert np.allclose(prob, prob[0]) and ((prob[0] > 0.9) if value else (prob[0] < 0.1))
    tiny = G.fit_logistic(np.array([[0.0], [1.0]]), np.array([False, True]), l2=0.0)
    assert np.all(np.isfinite(tiny["weights"])) and math.isfinite(tiny["bias"])


def _nll(logits, labels, t):
    return G.softmax_nll(logits, labels, t)


def test_fit_temperature_lowers_nll():
    rng = np.random.default_rng(9)
    n, c = 600, 10
    labels = rng.integers(0, c, n)
    pred = np.where(rng.random(n) < 0.6, labels, rng.integers(0, c, n))
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), pred] += 12.0  # overconfident: 60 % right, ~100 % sure
    t = G.fit_temperature(logits, labels)
    assert 0.05 <= t <= 20 and t > 1.5
    assert _nll(logits, labels, t) < _nll(logits, labels, 1.0) - 0.5
    assert _nll(logits, labels, t) <= min(_nll(logits, labels, t * 1.05), _nll(logits, labels, t / 1.05)) + 1e-9
    # underconfident logits get T < 1
    soft = np.zeros((n, c))
    soft[np.arange(n), labels] = 0.5
    assert G.fit_temperature(soft, labels) < 1.0
    assert _nll(soft, labels, G.fit_temperature(soft, labels)) <= _nll(soft, labels, 1.0)


# --------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------
def test_auroc_matches_brute_force_with_ties():
    rng = np.random.default_rng(10)
    for _ in range(5):
        s = rng.integers(0, 5, 200).astype(float)
        pos = rng.random(200) < 0.4 + 0.1 * s / 5
        p, q = s[pos], s[~pos]
        brute = ((p[:, None] > q[None, :]).sum() + 0.5 * (p[:, None] == q[None, :]).sum()) / (p.size * q.size)
        assert auroc(s, pos) == pytest.approx(brute, abs=1e-12)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert auroc([1, 1, 1], [1, 0, 1]) == 0.5
    assert math.isnan(auroc([1, 2], [1, 1])) and math.isnan(auroc([1, 2], [0, 0]))


def test_accuracy_cost_auc():
    assert accuracy_cost_auc([0.2, 0.6, 1.0], [0.7, 0.7, 0.7]) == pytest.approx(0.7)
    assert accuracy_cost_auc([0.5], [0.8]) == pytest.approx(0.8)
    # unsorted input, flat extension to 0 and 1: 0.2*0.5 + 0.6*(0.5+0.9)/2 + 0.2*0.9
    assert accuracy_cost_auc([0.8, 0.2], [0.9, 0.5]) == pytest.approx(0.1 + 0.42 + 0.18)
    assert accuracy_cost_auc([20, 80], [0.5, 0.9], full_cost=100) == pytest.approx(0.7)
    assert math.isnan(accuracy_cost_auc([], []))


def test_percentiles():
    out = percentiles(range(101), qs=(50, 99))
    assert out["p50"] == 50 and out["p99"] == 99 and out["n"] == 101 and out["max"] == 100


# --------------------------------------------------------------------------------------------------------------
# torch-free imports
# --------------------------------------------------------------------------------------------------------------
def test_core_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import edgeexit.gates, edgeexit.metrics, edgeexit.policy, edgeexit.thresholds\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'scipy'))\n"
        "assert not [m for m in bad if sys.modules[m] is not None], bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_combined_gates_are_products_with_a_coherence_veto():
    rng = np.random.default_rng(7)
    sig = rng.random((5, 7))
    sig[0, G.SIGNAL_NAMES.index("coh_cosine")] = 0.0  # first kept exit: no previous map, no veto
    p, m, cos = (sig[:, G.SIGNAL_NAMES.index(n)] for n in ("max_prob", "margin", "coh_cosine"))
    want = p * np.where(cos == 0, 1.0, cos)
    np.testing.assert_allclose(G.gate_score("conf_coh", sig), want)
    np.testing.assert_allclose(G.gate_score("margin_coh", sig), m * np.where(cos == 0, 1.0, cos))
    spec = G.gate_spec("conf_coh")
    cols = spec.signals  # an exported stage computes only these
    np.testing.assert_allclose(G.gate_score("conf_coh", sig[:, [G.SIGNAL_NAMES.index(c) for c in cols]], columns=cols), want)
    with pytest.raises(ValueError, match="coh_cosine"):
        G.gate_score("conf_coh", sig[:, :1], columns=("max_prob",))
    assert spec.needs_prev_cam and spec.signal_cost > 0 and G.signals_for(["conf_coh"]) == ("max_prob", "coh_cosine")

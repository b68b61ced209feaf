"""Exit selection by cost (issue 10, item 3): subset-aware signals, the subset search of calibration, costs.json v1/v2,
and evaluation on each gate's own stages. Synthetic ExitOutputs where the right subset is known; no torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgeexit import gates as G
from edgeexit.calibrate import CostModel, ScoreColumns, calibrate_outputs, load_costs
from edgeexit.collect import ExitOutputs
from edgeexit.evaluate import analyse
from edgeexit.metrics import accuracy_cost_auc
from edgeexit.policy import ExitPolicy

E = 4  # exits 0, 1, 2 internal, 3 the backbone's classifier


def synthetic(right: np.ndarray, seed: int = 0, grids=(8, 8, 4, 4), classes: int = 3) -> ExitOutputs:
    """Outputs where exit k is right and confident (max_prob ~ 0.99) exactly where ``right[:, k]``, and wrong and
    unsure (max_prob ~ 0.4) elsewhere; CAMs are random maps of the given grids."""
    rng = np.random.default_rng(seed)
    n = right.shape[0]
    labels = rng.integers(0, classes, n)
    wrong = (labels + 1) % classes
    logits = np.zeros((n, E, classes), dtype=np.float32)
    for k in range(E):
        logits[right[:, k], k, labels[right[:, k]]] = 6.0
        logits[~right[:, k], k, wrong[~right[:, k]]] = 0.3
    cams = [rng.normal(size=(n, g, g)).astype(np.float32) for g in grids]
    return ExitOutputs(logits, cams, labels)


def groups(n: int, shares) -> np.ndarray:
    """Group id of every sample: the first shares[0] * n samples are group 0, and so on."""
    bounds = np.cumsum([0] + [round(s * n) for s in shares])
    gid = np.full(n, len(shares), dtype=np.int64)
    for g in range(len(shares)):
        gid[bounds[g]:bounds[g + 1]] = g
    return gid


def costs(heads=(0.0, 0.0, 0.0, 0.0), boundary=0.0, segments=(1.0, 1.0, 1.0, 1.0)) -> CostModel:
    return CostModel(tuple(segments), tuple(heads), float(boundary), "units", "test")


@pytest.fixture(scope="module")
def useless_middle() -> ExitOutputs:
    """Exit 0 is right (and sure) on 30 %, exit 1 never, exit 2 on 60 %, the last exit on all."""
    gid = groups(400, [0.3, 0.3])
    right = np.stack([gid == 0, np.zeros(400, bool), gid <= 1, np.ones(400, bool)], axis=1)
    return synthetic(right)


@pytest.fixture(scope="module")
def all_useful() -> ExitOutputs:
    """Each internal exit is right (and sure) on its own group of samples (40, 20, 10 %), the last exit on all."""
    gid = groups(400, [0.4, 0.2, 0.1])
    right = np.stack([gid == 0, gid == 1, gid == 2, np.ones(400, bool)], axis=1)
    return synthetic(right, seed=1)


def exits_of(out: ExitOutputs, model: CostModel, gate: str = "max_prob", **kw) -> list:
    cal = calibrate_outputs(out, model, max_drop=0.5, gate_names=[gate], temperatures=[1.0] * E, folds=3, **kw)
    return cal.calibration["gates"][gate]["exits"]


# ----------------------------------------------------------------------------------------------------------------
# which exits calibration keeps
# ----------------------------------------------------------------------------------------------------------------
def test_a_useless_exit_with_a_dear_head_is_dropped(useless_middle):
    assert exits_of(useless_middle, costs(heads=(0.0, 5.0, 0.0, 0.0))) == [0, 2]


def test_free_heads_and_calls_keep_every_useful_exit(all_useful, useless_middle):
    assert exits_of(all_useful, costs()) == [0, 1, 2]
    # an exit that never helps costs nothing here either, but ties go to the smaller subset
    assert exits_of(useless_middle, costs()) == [0, 2]


def test_a_large_stage_overhead_keeps_fewer_exits(all_useful):
    kept = [exits_of(all_useful, costs(boundary=b)) for b in (0.0, 0.6, 1.5, 10.0)]
    assert kept == [[0, 1, 2], [0, 1], [0], []]  # at 10 one call of the plain network beats any chain


def test_stage_costs_follow_the_one_rule(all_useful):
    model = costs(heads=(0.5, 0.5, 0.5, 0.25), boundary=2.0)
    # exits (0, 2): stage 0 = segment 0 + head 0, stage 1 = segments 1-2 + head 2, stage 2 = segment 3 + head 3
    np.testing.assert_allclose(model.exit_costs((0, 2)), [1 + 0.5 + 2, 3 + 1.0 + 4, 4 + 1.25 + 6])
    assert model.reference == pytest.approx(4 + 0.25 + 2)
    np.testing.assert_allclose(model.exit_vector((0, 2)), [3.5 / 6.25, math.nan, 8 / 6.25, 11.25 / 6.25])
    np.testing.assert_allclose(model.single_exit_fractions(), [3.5 / 6.25, 4.5 / 6.25, 5.5 / 6.25, 1.0])
    cal = calibrate_outputs(all_useful, model, max_drop=0.5, gate_names=["max_prob"], temperatures=[1.0] * E)
    g = cal.calibration["gates"]["max_prob"]
    np.testing.assert_allclose(g["stage_cost"], model.fractions(g["exits"]))
    hist = np.asarray(g["histogram"])
    assert g["mean_cost"] == pytest.approx(hist @ np.nan_to_num(model.exit_vector(g["exits"])) / hist.sum())


def test_forced_exits_and_max_kept(all_useful):
    model = costs()
    res = calibrate_outputs(all_useful, model, max_drop=0.5, exits=(1,), temperatures=[1.0] * E, folds=3)
    cal = res.calibration
    assert cal["subset_search"]["forced"] == [1] and cal["subset_search"]["subsets"] == 1
    for gate, g in cal["gates"].items():
        pol = ExitPolicy.from_dict(g["policy"])
        assert g["exits"] == [1] and pol.exits == [1], gate
        assert pol.thresholds[0] == pol.thresholds[2] == math.inf
        assert g["histogram"][0] == g["histogram"][2] == 0
        assert pol.learned[0] is None and pol.learned[2] is None and pol.learned[1] is not None
    plain = calibrate_outputs(all_useful, model, max_drop=0.5, exits=(), gate_names=["margin"],
                              temperatures=[1.0] * E).calibration["gates"]["margin"]
    assert plain["exits"] == [] and plain["histogram"] == [0, 0, 0, 400] and plain["mean_cost"] == pytest.approx(1.0)
    capped = calibrate_outputs(all_useful, model, max_drop=0.5, max_kept=1, gate_names=["max_prob"],
                               temperatures=[1.0] * E).calibration
    assert capped["subset_search"]["subsets"] == 4 and len(capped["gates"]["max_prob"]["exits"]) == 1
    with pytest.raises(ValueError, match="not an internal exit"):
        calibrate_outputs(all_useful, model, exits=(3,))
    with pytest.raises(ValueError, match="not both"):
        calibrate_outputs(all_useful, model, exits=(1,), max_kept=1)


def test_budget_picks_the_most_accurate_subset_within_budget(all_useful):
    cal = calibrate_outputs(all_useful, costs(boundary=0.2), budget=0.7, gate_names=["max_prob"],
                            temperatures=[1.0] * E).calibration
    g = cal["gates"]["max_prob"]
    within = [t for t in g["subsets"] if t["meets_target"]]
    assert g["meets_target"] and g["mean_cost"] <= 0.7 + 1e-12
    assert g["accuracy"] == pytest.approx(max(t["accuracy"] for t in within))


# ----------------------------------------------------------------------------------------------------------------
# signals of a chain that skips exits
# ----------------------------------------------------------------------------------------------------------------
def test_coherence_compares_with_the_previous_kept_exit(useless_middle):
    out = useless_middle
    temps = [1.0, 2.0, 0.5, 1.5]
    sig = out.signals(temps, exits=(1, 2))
    prev = None
    for k in (1, 2, 3):  # the kept chain: exits 1, 2 and the last
        direct = G.exit_signals(out.logits[:, k], out.cams[k], None if prev is None else out.cams[prev], temps[k])
        np.testing.assert_array_equal(sig[:, k], direct)
        prev = k
    assert np.all(sig[:, 1, 5:] == 0)  # the first kept exit has no previous CAM
    assert np.all(np.isnan(sig[:, 0, 5:]))  # exit 0 has no stage: its coherence is not computed
    np.testing.assert_array_equal(sig[:, 0, :5], G.exit_signals(out.logits[:, 0], out.cams[0], None, temps[0])[:, :5])
    # the default chain keeps every exit, as before
    full = out.signals(temps)
    for k in range(E):
        direct = G.exit_signals(out.logits[:, k], out.cams[k], out.cams[k - 1] if k else None, temps[k])
        np.testing.assert_array_equal(full[:, k], direct)
    with pytest.raises(ValueError, match="before exit"):
        out.coherence(2, 1)


def test_patience_counts_kept_exits_only():
    classes = np.array([[3, 1, 3, 3], [0, 0, 1, 0]])
    np.testing.assert_array_equal(G.kept_patience(classes, (0, 2, 3)), [[1, 0, 2, 3], [1, 0, 1, 1]])
    np.testing.assert_array_equal(G.kept_patience(classes, (0, 1, 2, 3)), G.patience_counts(classes))


def test_learned_gate_features_follow_the_subset(useless_middle):
    out = useless_middle
    temps = [1.0] * E
    cols = ScoreColumns(out, temps, folds=3, seed=0)
    features = G.gate_features(G.exit_signals(out.logits[:, 2], out.cams[2], out.cams[0], 1.0),
                               G.kept_patience(out.classes, (0, 2, 3))[:, 2])
    _, params = cols.learned(2, (0,))
    assert params == G.fit_logistic(features, out.correct[:, 2])
    np.testing.assert_array_equal(cols.patience(3, (0, 2)), G.kept_patience(out.classes, (0, 2, 3))[:, 3])
    assert cols.learned(2, (0, 1))[1] != params  # after exits 0 and 1 the features differ (coherence vs exit 1)
    res = calibrate_outputs(out, costs(), max_drop=0.5, exits=(0, 2), gate_names=["learned"], temperatures=temps,
                            folds=3)
    pol = ExitPolicy.from_dict(res.policy)
    assert pol.learned[2] == params and pol.learned[1] is None and pol.exits == [0, 2]


# ----------------------------------------------------------------------------------------------------------------
# evaluation applies each gate's chain with the same rule
# ----------------------------------------------------------------------------------------------------------------
def test_evaluation_on_the_calibration_data_reproduces_it(all_useful):
    model = costs(heads=(0.1, 0.1, 0.1, 0.05), boundary=0.3)
    cal = calibrate_outputs(all_useful, model, max_drop=0.5, temperatures=[1.0] * E, folds=3).calibration
    rep = analyse(all_useful, cal, model)
    for name, g in rep["gates"].items():
        c = cal["gates"][name]
        assert g["exits"] == c["exits"]
        if name != "learned":  # the learned gate was searched on out-of-fold scores
            assert g["accuracy"] == pytest.approx(c["accuracy"]) and g["mean_cost"] == pytest.approx(c["mean_cost"])
            assert g["histogram"] == c["histogram"]
            np.testing.assert_allclose(g["curve"], c["path"])
            assert g["auc"] == pytest.approx(c["auc"]) and g["auroc"] == pytest.approx(c["auroc"], nan_ok=True)
        dropped = [i for i in range(E - 1) if i not in c["exits"]]
        assert all(math.isnan(g["kept_auroc"][i]) and math.isnan(g["exit_cost"][i]) for i in dropped)
    np.testing.assert_allclose(rep["oracle"]["mean_cost"], cal["oracle"]["mean_cost"])


# ----------------------------------------------------------------------------------------------------------------
# costs.json
# ----------------------------------------------------------------------------------------------------------------
def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


V2 = {"schema": "edgeexit-costs/2", "metric": "latency_ms", "device": "test", "backend": "none",
      "segments": [1.0, 3.0], "heads": [0.25, 0.25], "boundary": 0.5,
      "stages": [{"exits": [0], "latency_ms": 2.0}, {"exits": [], "latency_ms": 4.9}],
      "measured": {"latency_ms": {"segments": [1.0, 3.0], "heads": [0.25, 0.25], "boundary": 0.5},
                   "energy_mj": {"segments": [2.0, 1.0], "heads": [0.5, 0.5], "boundary": {"mean": 0.25}}}}


def test_costs_v2_carries_the_call_overhead(tmp_path):
    lat = load_costs(write(tmp_path / "c.json", V2), 2)
    assert lat.boundary == 0.5 and lat.unit == "latency_ms"
    assert lat.cumulative == (1.75, 5.5) and lat.reference == 4.75
    assert [s["exits"] for s in lat.stage_timings] == [[0], []]
    en = load_costs(tmp_path / "c.json", 2, "energy_mj")
    assert en.boundary == 0.25 and en.cumulative == (2.75, 4.5) and en.reference == 3.75
    assert CostModel.from_dict(lat.to_dict()) == lat
    v1 = load_costs(write(tmp_path / "v1.json", {**V2, "schema": "edgeexit-costs/1"}), 2)
    assert v1.boundary == 0.0 and v1.stage_timings == ()  # v1 measured every part as its own call


@pytest.mark.parametrize("change, message", [
    ({"schema": "edgeexit-costs/3"}, "edgeexit-costs/1\" or \"edgeexit-costs/2"),
    ({"boundary": None}, "boundary"),
    ({"boundary": -1}, "boundary"),
    ({"boundary": "fast"}, "boundary"),
    ({"stages": [{"exits": [5]}]}, "stages"),
    ({"stages": {"exits": [0]}}, "stages"),
    ({"heads": [0.25]}, "heads has 1 entries"),
])
def test_bad_costs_files_are_one_line_errors(tmp_path, change, message):
    data = {**V2, **change}
    if change.get("boundary", 0) is None:
        del data["boundary"]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        load_costs(write(tmp_path / "bad.json", data), 2)
    assert "\n" not in str(info.value) and str(tmp_path / "bad.json") in str(info.value)


def test_energy_without_boundary_is_refused(tmp_path):
    data = json.loads(json.dumps(V2))
    del data["measured"]["energy_mj"]["boundary"]
    with pytest.raises(ValueError, match="needs 'boundary'.*energy_mj"):
        load_costs(write(tmp_path / "c.json", data), 2, "energy_mj")


def test_gate_quality_does_not_depend_on_the_kept_exits(all_useful):
    """AUC and AUROC compare gates on the chain that keeps every exit: forcing a late exit changes the operating
    point, not the figures the gates are compared by (a chain without cheap exits would otherwise look better)."""
    model = costs(heads=(0.1, 0.1, 0.1, 0.05), boundary=0.3)
    kw = dict(max_drop=0.5, gate_names=["max_prob", "coh_cosine", "patience"], temperatures=[1.0] * E, folds=3)
    free = calibrate_outputs(all_useful, model, **kw).calibration["gates"]
    late = calibrate_outputs(all_useful, model, exits=(2,), **kw).calibration["gates"]
    for gate in free:
        assert late[gate]["exits"] == [2] and late[gate]["mean_cost"] != pytest.approx(free[gate]["mean_cost"])
        assert late[gate]["auc"] == free[gate]["auc"]
        assert late[gate]["auroc"] == pytest.approx(free[gate]["auroc"], nan_ok=True)
        every = free[gate]["all_exits"]
        assert ExitPolicy.from_dict(every["policy"]).exits == [0, 1, 2]
        assert free[gate]["auc"] == pytest.approx(
            accuracy_cost_auc([c for c, _ in every["path"]], [a for _, a in every["path"]]))

"""Degraded inputs: leave-one-group-out calibration and a stream with the drift guard.

    python benchmarks/robust.py --ckpt benchmarks/models/cifar10-resnet20.pt --test ../shared/data/cifar10/test --name cifar10
    python benchmarks/robust.py --gray48 --name gray48        # builds the second data set and model (see below)

Generalisation (``groups``): the 11 corruption kinds of ``edgeexit.corrupt`` fall into four groups (noise: noise,
shot; blur: blur, defocus, motion; weather: fog, brightness, contrast, saturate; digital: jpeg, pixelate). For each
group, the policy is calibrated (``calibrate_outputs`` with ``robust.Conditions``, target: clean and mean drop <= 1.0,
worst <= 2.5 points) on the held-out training split and its copies corrupted with the *other* groups' kinds at
severities 1, 3, 5, then reported on test images corrupted with the held-out group's kinds at severities 1-5: kinds
and whole families it never saw. Every kind is unseen in exactly one fold; the summary pools the 55 unseen
conditions (each with the policy of its fold). Baseline: the usual clean-only calibration, on the same conditions.

``--folds kind`` (leave-one-kind-out, the protocol issue 13 names): one fold per kind, calibrated on the other ten
kinds; a kind's near relatives (shot for noise, defocus for blur) are then seen, so it can read lower than the
group protocol, which is the stricter test and the default.

Stream (``stream``): per fold and held-out kind at severity 3 and 5: ``L`` clean test frames, ``L`` corrupted ones,
``L`` clean again (different images in each stretch), run through the policy as the runtime decides
(``ExitPolicy.decide``), with and without the drift guard (``runtime.drift.DriftGuard``, the calibration's reference
and bound), for three policies: clean-calibrated and robust, each with full depth through the stages as the guard's
conservative policy, and clean-calibrated with the guard's thresholds fitted on the fold's degraded copies
(``calibrate --degrade ... --degraded-as guard``: same stages, stricter thresholds). Per stretch: accuracy, drop
below full depth on the same frames, mean cost, and when the guard switched.

Thresholds, temperatures, kept exits, learned gates and the drift reference are fitted on the checkpoint's
held-out training split (and its corrupted copies) only; test images are read once, for the report.

``--gray48``: the second data set is CIFAR-10 converted to grayscale and resized to 48 x 48 (written under
runs/gray48/), and a small multi-exit ResNet-20 is trained on it for ``--epochs`` epochs with ``edgeexit train``.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from edgeexit.calibrate import calibrate_outputs, fit_guard_thresholds, model_costs  # noqa: E402
from edgeexit.checkpoint import load_model  # noqa: E402
from edgeexit.collect import calibration_images, collect, labelled_images  # noqa: E402
from edgeexit.corrupt import corrupt  # noqa: E402
from edgeexit.policy import ExitPolicy  # noqa: E402
from edgeexit.preprocess import Preprocess  # noqa: E402
from edgeexit.robust import Conditions, condition_name, pool_outputs  # noqa: E402
from edgeexit.runtime.chain import runner_policy  # noqa: E402
from edgeexit.runtime.drift import DriftGuard, DriftReference  # noqa: E402

GROUPS = {"noise": ["noise", "shot"], "blur": ["blur", "defocus", "motion"],
          "weather": ["fog", "brightness", "contrast", "saturate"], "digital": ["jpeg", "pixelate"]}
FOLD_TEXT = {"group": "Leave-one-group-out: each kind is reported in the fold that never saw its group",
             "kind": "Leave-one-kind-out: each kind is reported in the fold calibrated on the other ten kinds"}
GATES = ["max_prob", "margin", "entropy_conf", "sal_entropy", "coh_cosine", "conf_coh", "margin_coh", "patience",
         "learned"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Collector:
    """Model outputs per condition, each collected once (corruption seed fixed per condition)."""

    def __init__(self, model, images, preprocess: Preprocess, batch_size: int = 256):
        self.model, self.images, self.preprocess, self.batch_size = model, images, preprocess, batch_size
        self.cache: Dict[str, Any] = {}

    def get(self, kind: str | None, severity: int = 0):
        name = "clean" if kind is None else condition_name(kind, severity)
        if name not in self.cache:
            x = self.images.images if kind is None else corrupt(self.images.images, kind, severity,
                                                                seed=1000 + 17 * severity)
            self.cache[name] = collect(self.model, x, self.images.labels, self.preprocess, self.batch_size, "cpu",
                                       False)
        return self.cache[name]


def apply_policy(policy_dict: Dict[str, Any], out, costs, drift: Dict[str, Any] | None = None) -> Dict[str, np.ndarray]:
    """What the runtime decides per image: right (bool), cost (fraction of the plain network), confidence; the
    same for the drift guard's conservative policy (``cons_*``: the drift block's conservative thresholds on the
    same stages, or full depth through them); and full depth's answer (``full_right``, what drops are measured
    against)."""
    pol = ExitPolicy.from_dict(policy_dict)
    sig = out.signals(pol.temperatures, pol.exits)
    idx = np.arange(len(out))
    vec = costs.for_gate(pol.gate).exit_vector(pol.exits)
    ex = pol.decide(sig, out.classes)
    strict = (drift or {}).get("conservative_thresholds")
    cons = (np.full(len(out), out.num_exits - 1) if strict is None  # as the runtime applies them:
            else runner_policy(pol, [float(t) for t in strict]).decide(sig, out.classes))
    return {"right": out.correct[idx, ex], "cost": vec[ex], "conf": sig[idx, ex, 0], "full_right": out.correct[:, -1],
            "cons_right": out.correct[idx, cons], "cons_cost": vec[cons], "cons_conf": sig[idx, cons, 0]}


def condition_row(res: Dict[str, np.ndarray]) -> Dict[str, float]:
    acc, final = float(res["right"].mean()), float(res["full_right"].mean())
    return {"accuracy": acc, "final": final, "drop": 100 * (final - acc), "mean_cost": float(res["cost"].mean())}


def evaluate_policy(policy_dict, test: Collector, kinds: List[str], costs) -> Dict[str, Any]:
    clean = condition_row(apply_policy(policy_dict, test.get(None), costs))
    rows = {condition_name(k, s): condition_row(apply_policy(policy_dict, test.get(k, s), costs))
            for k in kinds for s in range(1, 6)}
    return {"clean": clean, "unseen": rows}


def summarise(rows: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    drops = {k: v["drop"] for k, v in rows.items()}
    worst = max(drops, key=drops.get)
    return {"mean_drop": float(np.mean(list(drops.values()))), "worst_drop": drops[worst], "worst_condition": worst,
            "mean_cost": float(np.mean([v["mean_cost"] for v in rows.values()])), "n_conditions": len(rows)}


def stream_run(streams: List[Dict[str, np.ndarray]], reference: DriftReference | None, window: int) -> Dict[str, Any]:
    """Run the stretches in order; per stretch accuracy, drop below full depth, cost; guard switches."""
    guard = DriftGuard(reference, window) if reference is not None else None
    stretches, t = [], 0
    for part in streams:
        right, cost = [], []
        for i in range(len(part["right"])):
            key = "cons_" if guard is not None and guard.conservative else ""
            right.append(part[key + "right"][i])
            cost.append(part[key + "cost"][i])
            if guard is not None:
                guard.update(float(part[key + "conf"][i]))
            t += 1
        acc, final = float(np.mean(right)), float(np.mean(part["full_right"]))
        stretches.append({"accuracy": acc, "drop": 100 * (final - acc), "mean_cost": float(np.mean(cost))})
    return {"stretches": stretches, "events": [] if guard is None else [[i, k, round(z, 2)] for i, k, z in guard.events]}


def take(res: Dict[str, np.ndarray], idx: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: v[idx] for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=Path("benchmarks/models/cifar10-resnet20.pt"))
    ap.add_argument("--test", type=Path, default=Path("../shared/data/cifar10/test"))
    ap.add_argument("--name", default="cifar10")
    ap.add_argument("--n-test", type=int, default=10000, help="test images per condition (10000: the whole CIFAR-10 test split)")
    ap.add_argument("--n-cal", type=int, default=2500, help="held-out training images per condition")
    ap.add_argument("--cal-severities", default="1,3,5")
    ap.add_argument("--folds", choices=["group", "kind"], default="group",
                    help="leave one group of kinds out (default; stricter) or one kind")
    ap.add_argument("--max-kept", type=int, default=3)
    ap.add_argument("--confidence", type=float, default=None,
                    help="hold every calibration target (clean-only and robust) on its one-sided upper bound at this "
                         "level, as calibrate --confidence does [default: the estimates]")
    ap.add_argument("--stream-length", type=int, default=300)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--gray48", action="store_true", help="build and use the grayscale 48 px data set and model")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--render", action="store_true", help="only rewrite robust.md from the results' robust.json")
    args = ap.parse_args()
    if args.render:
        import json

        out_dir = RESULTS / "robust" / args.name
        results = json.loads((out_dir / "robust.json").read_text())
        (out_dir / "robust.md").write_text(render(results, args, results["args"]))
        return
    started = time.time()
    if args.gray48:
        args.ckpt, args.test = build_gray48(args.epochs)
    model, ckpt = load_model(args.ckpt)
    model.eval()
    pre = Preprocess.from_dict(ckpt["preprocess"])
    costs = model_costs(model)
    gray = pre.channels == 1
    groups = {g: [k for k in kinds if not (gray and k == "saturate")] for g, kinds in GROUPS.items()}
    if args.folds == "kind":
        groups = {k: [k] for kinds in groups.values() for k in kinds}
    cal_images = calibration_images(ckpt)
    if args.n_cal < len(cal_images.images):  # a stratified-enough subset: every n-th held-out image
        keep = np.linspace(0, len(cal_images.images) - 1, args.n_cal).astype(int)
        cal_images = SimpleNamespace(images=cal_images.images[keep], labels=np.asarray(cal_images.labels)[keep])
    test_images = labelled_images(args.test, ckpt, limit=args.n_test, seed=0)
    log(f"{len(cal_images.images)} calibration images per condition, {len(test_images.images)} test images")
    cal, test = Collector(model, cal_images, pre), Collector(model, test_images, pre)
    sev = [int(s) for s in args.cal_severities.split(",")]
    every_kind = [k for kinds in groups.values() for k in kinds]

    log("clean-only calibration (baseline)")
    base = calibrate_outputs(cal.get(None), costs, max_drop=1.0, gate_names=GATES, max_kept=args.max_kept,
                             confidence_level=args.confidence).calibration
    results: Dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                               "groups": groups, "gates": GATES, "folds": {}}
    base_eval = {g: evaluate_policy(base["gates"][g]["policy"], test, every_kind, costs) for g in GATES}
    results["baseline"] = {"winner": base["winner"], "gates": base_eval}
    pooled_rows: Dict[str, Dict[str, Dict[str, float]]] = {g: {} for g in GATES + ["winner"]}
    base_rows: Dict[str, Dict[str, Dict[str, float]]] = {g: {} for g in GATES + ["winner"]}
    clean_rows: Dict[str, List[Dict[str, float]]] = {g: [] for g in GATES + ["winner"]}
    stream_rows = []
    for held, unseen in groups.items():
        seen = [k for g, kinds in groups.items() if g != held for k in kinds]
        log(f"fold {held}: calibrate on clean + {', '.join(seen)} at {sev}; report on {', '.join(unseen)} 1-5")
        names = ["clean"] + [condition_name(k, s) for k in seen for s in sev]
        parts = [cal.get(None)] + [cal.get(k, s) for k in seen for s in sev]
        cond = Conditions.blocks(names, len(cal_images.images), mode="mean", max_drop=1.0, worst_drop=2.5)
        t0 = time.time()
        pool = pool_outputs(parts)
        res = calibrate_outputs(pool, costs, max_drop=1.0, gate_names=GATES, max_kept=args.max_kept,
                                conditions=cond, confidence_level=args.confidence).calibration
        log(f"  pooled search on {len(cond.ids)} samples: {time.time() - t0:.0f} s; winner {res['winner']}")
        fold = {"seen": seen, "unseen": unseen, "winner": res["winner"], "gates": {}}
        for g in GATES + ["winner"]:
            name = res["winner"] if g == "winner" else g
            ev = evaluate_policy(res["gates"][name]["policy"], test, unseen, costs)
            bev = base_eval[base["winner"] if g == "winner" else g]
            fold["gates"][g] = {"gate": name, "exits": res["gates"][name]["exits"],
                                "calibration": res["gates"][name].get("robust"),
                                "meets_calibration_target": res["gates"][name]["meets_target"],
                                "test_clean": ev["clean"], "test_unseen": summarise(ev["unseen"]),
                                "unseen": ev["unseen"]}
            pooled_rows[g].update(ev["unseen"])
            clean_rows[g].append(ev["clean"])
            base_rows[g].update({k: bev["unseen"][k] for k in ev["unseen"]})
        results["folds"][held] = fold
        # stream: clean / degraded / clean, with and without the guard, clean-calibrated and robust winners
        n = len(test_images.images)
        L = min(args.stream_length, n // 3)
        order = np.random.default_rng(0).permutation(n)
        a, b, c = order[:L], order[L:2 * L], order[2 * L:3 * L]
        # the clean policy with the guard's thresholds fitted on this fold's copies (calibrate --degraded-as guard)
        guarded = copy.deepcopy(base)
        fold["guard"] = fit_guard_thresholds(guarded, pool, costs, cond, max_drop=1.0,
                                             confidence_level=args.confidence, gate_names=[base["winner"]])
        for kind in unseen:
            for s in (3, 5):
                for label, pol_src in (("clean-calibrated", base), ("robust", res), ("clean + guard thresholds", guarded)):
                    win = pol_src["winner"]
                    pol, drift = pol_src["gates"][win]["policy"], pol_src["gates"][win]["drift"]
                    ref = DriftReference.from_dict(drift)
                    clean_res = apply_policy(pol, test.get(None), costs, drift)
                    bad_res = apply_policy(pol, test.get(kind, s), costs, drift)
                    parts_s = [take(clean_res, a), take(bad_res, b), take(clean_res, c)]
                    for guard in (True,) if pol_src is guarded else (False, True):  # unguarded: = clean-calibrated
                        run = stream_run(parts_s, ref if guard else None, args.window)
                        stream_rows.append({"fold": held, "kind": kind, "severity": s, "policy": label, "gate": win,
                                            "guard": guard, "length": L, **run})
        log(f"  fold {held} done ({time.time() - started:.0f} s)")
    summary = {}
    for g in GATES + ["winner"]:
        cr = clean_rows[g]
        summary[g] = {"robust": summarise(pooled_rows[g]), "clean_only": summarise(base_rows[g]),
                      "test_clean_drop_mean": float(np.mean([r["drop"] for r in cr])),
                      "test_clean_drop_max": float(np.max([r["drop"] for r in cr])),
                      "test_clean_cost_mean": float(np.mean([r["mean_cost"] for r in cr]))}
    bw = base_eval[base["winner"]]["clean"]
    summary["baseline_winner_clean"] = {"gate": base["winner"], **bw}
    results["summary"] = summary
    results["stream"] = stream_rows
    results["seconds"] = round(time.time() - started, 1)
    results["command"] = "python " + " ".join(sys.argv)
    out_dir = RESULTS / "robust" / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "robust.json", results)
    (out_dir / "robust.md").write_text(render(results, args))
    log(f"wrote {out_dir} in {results['seconds']:.0f} s")


def unseen_accuracy(r: Dict[str, Any], gate: str) -> str:
    """Mean accuracy over the unseen conditions of the robust policies (each fold's), and at full depth: what a user
    sees, beside the drop that the targets are about."""
    rows = [v for f in r["folds"].values() for v in f["gates"][gate]["unseen"].values()]
    return f"{100 * np.mean([v['accuracy'] for v in rows]):.1f} ({100 * np.mean([v['final'] for v in rows]):.1f})"


def render(r: Dict[str, Any], args, recorded: Dict[str, Any] | None = None) -> str:
    s = r["summary"]
    command = r.get("command") or " ".join(sys.argv)
    lines = [f"# Degraded inputs: {args.name}", "",
             f"`{command}` ({r['machine']['date']}, {r['seconds']:.0f} s)", "",
             FOLD_TEXT[r["args"].get("folds", "group")] + "; 'unseen' pools every "
             "kind at severities 1-5 (drop: points below full depth on the same images; cost: % of the plain "
             "network). 'clean-only' = the usual calibration on the clean held-out split.", ""]
    rows = []
    for g in GATES + ["winner"]:
        v = s[g]
        rows.append([g, f"{v['test_clean_drop_mean']:.2f} (max {v['test_clean_drop_max']:.2f})",
                     f"{100 * v['test_clean_cost_mean']:.1f}",
                     f"{v['robust']['mean_drop']:.2f}", f"{v['robust']['worst_drop']:.2f} {v['robust']['worst_condition']}",
                     f"{100 * v['robust']['mean_cost']:.1f}", unseen_accuracy(r, g),
                     f"{v['clean_only']['mean_drop']:.2f}", f"{v['clean_only']['worst_drop']:.2f} {v['clean_only']['worst_condition']}",
                     f"{100 * v['clean_only']['mean_cost']:.1f}"])
    lines.append(markdown_table(["gate", "clean drop", "clean cost %", "unseen mean drop", "unseen worst",
                                 "unseen cost %", "unseen acc % (full depth)", "clean-only: mean drop", "clean-only: worst", "clean-only: cost %"],
                                rows))
    b = s["baseline_winner_clean"]
    lines += ["", f"Clean-only winner on clean test: {b['gate']}, drop {b['drop']:.2f}, cost {100 * b['mean_cost']:.1f}%.", "",
              "Per fold (winner): " + "; ".join(f"{h}: {f['winner']} exits {f['gates']['winner']['exits']}"
                                                 for h, f in r["folds"].items()), "", "## Stream", "",
              f"{r['stream'][0]['length'] if r['stream'] else 0} clean, then degraded, then clean frames; "
              f"window {args.window}; events: (frame, kind, z).", ""]
    rows = []
    for x in r["stream"]:
        st = x["stretches"]
        rows.append([f"{x['kind']}-{x['severity']}", x["policy"], x["gate"], "on" if x["guard"] else "off",
                     *[f"{p['drop']:.1f} / {100 * p['mean_cost']:.0f}" for p in st],
                     " ".join(f"{e[1]}@{e[0]}" for e in x["events"]) or "-"])
    lines.append(markdown_table(["policy", "guard", "degraded: mean drop", "worst drop", "mean cost %",
                                 "clean again: mean cost %", "first switch after (frames)"], stream_summary(r["stream"])))
    lines.append("")
    lines.append(markdown_table(["condition", "policy", "gate", "guard", "clean drop / cost %",
                                 "degraded drop / cost %", "clean again drop / cost %", "switches"], rows))
    return "\n".join(lines) + "\n"


def stream_summary(rows: List[Dict[str, Any]]) -> List[List[str]]:
    """Per (policy, guard) over every stream: the degraded stretch's mean / worst drop and mean cost, the second
    clean stretch's cost, and the median delay of the first drift event after the degraded stretch starts."""
    out = []
    for label in ("clean-calibrated", "robust", "clean + guard thresholds"):
        for guard in (False, True):
            sel = [x for x in rows if x["policy"] == label and x["guard"] == guard]
            if not sel:
                continue
            deg = [x["stretches"][1] for x in sel]
            delays = [next((e[0] - x["length"] for e in x["events"] if e[1] == "drift" and e[0] >= x["length"]), None)
                      for x in sel]
            found = [d for d in delays if d is not None]
            out.append([label, "on" if guard else "off", f"{np.mean([d['drop'] for d in deg]):.2f}",
                        f"{max(d['drop'] for d in deg):.2f}", f"{100 * np.mean([d['mean_cost'] for d in deg]):.1f}",
                        f"{100 * np.mean([x['stretches'][2]['mean_cost'] for x in sel]):.1f}",
                        (f"{int(np.median(found))} (median; {len(found)}/{len(sel)} streams switched)" if found
                         else "-") if guard else "-"])
    return out


def build_gray48(epochs: int, train_per_class: int = 1500, test_per_class: int = 300):
    """CIFAR-10 -> grayscale 48 x 48 PNG folders under runs/gray48/{train,test} (the first ``train_per_class`` /
    ``test_per_class`` images of each class, to fit 2 cores); a multi-exit ResNet-20 trained on it by
    ``edgeexit train`` (its own 10% validation split is the calibration split)."""
    from PIL import Image

    root = Path("runs/gray48")
    src = Path("../shared/data/cifar10")
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        done = root / split / ".done"
        if done.exists():
            continue
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            for p in sorted(cls.glob("*.png"))[:per_class]:
                dst = root / split / cls.name / p.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.open(p).convert("L").resize((48, 48), Image.BILINEAR).save(dst)
        done.touch()
    ckpt = Path("runs/gray48-resnet20.pt")
    if not ckpt.exists():
        log(f"training the gray48 model ({epochs} epochs)")
        subprocess.run([sys.executable, "-m", "edgeexit.cli", "train", "--data", str(root / "train"), "--arch", "resnet20",
                        "--input-size", "48", "--channels", "1", "--epochs", str(epochs), "--out", str(ckpt),
                        "--quiet"], check=True)
    return ckpt, root / "test"


if __name__ == "__main__":
    main()

"""What does computing a gate's signals add to a stage? (ONNX Runtime CPU, batch 1, one thread)

    python benchmarks/signal_cost.py --ckpt benchmarks/models/cifar10-resnet20.pt

For every gate, the stage of exit ``--exit`` (its segment + head, the gate's signals, the previous exit's CAM for
the coherence gates) is exported and timed alone against the same stage for the max_prob gate, whose only
signal is the confidence every stage outputs anyway (minimum over
repeats of a 300-call loop's mean, the variants interleaved). The per-call overhead (``boundary``) is measured as
in ``edgeexit profile``: every exit kept as its own margin stage, ``(sum of stages - full.onnx - heads at its
rate) / (stages - 1)`` (``edgeexit.runtime.profile.boundary_estimate``). The ratio extra / boundary is the
``signal_cost`` of ``edgeexit.gates.GATES`` that calibration charges each internal stage of that gate.
Writes benchmarks/results/signal-cost/signal_cost.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from edgeexit.gates import GATES  # noqa: E402


def loop_us(session, feed, calls: int = 300) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        session.run(None, feed)
    return (time.perf_counter_ns() - t0) / calls / 1e3


def main() -> None:
    import onnxruntime as ort
    import torch

    from edgeexit.checkpoint import load_model
    from edgeexit.export.onnx_export import _export_onnx
    from edgeexit.export.stage_graph import StageGraph
    from edgeexit.runtime.backends import session_options
    from edgeexit.runtime.profile import boundary_estimate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=Path("benchmarks/models/cifar10-resnet20.pt"))
    parser.add_argument("--exit", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "signal-cost")
    args = parser.parse_args()
    model, _ = load_model(args.ckpt)
    e, k = model.num_exits, args.exit
    x = torch.zeros(1, *model.input_shape)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        cams = [model.heads[i].forward_cam(feats[i]).cam for i in range(e)]
    hw = [tuple(int(v) for v in c.shape[1:]) for c in cams]
    options = session_options(1)
    tmp = Path(tempfile.mkdtemp())

    def session(graph, args_, names, outs):
        path = tmp / f"g{len(list(tmp.iterdir()))}.onnx"
        _export_onnx(graph.eval(), args_, path, names, outs, 17)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    variants = {}
    for gate, spec in GATES.items():
        prev = hw[k - 1] if spec.needs_prev_cam else None
        graph = StageGraph([model.segments[k]], model.heads[k], cam_hw=hw[k], temperature=1.0, signals=spec.signals,
                           prev_hw=prev)
        names = ["features_in"] + (["prev_cam"] if prev else [])
        a = (feats[k - 1],) + ((cams[k - 1],) if prev else ())
        outs = ["features", "class", "confidence"] + (["signals"] if spec.signals else [])
        variants[gate] = (session(graph, a, names, outs), {n: t.numpy() for n, t in zip(names, a)})
    # the boundary: every exit its own margin stage, and full.onnx
    from edgeexit.export.head_graph import FullGraph

    chain = []
    for i in range(e):
        graph = StageGraph([model.segments[i]], model.heads[i], cam_hw=hw[i], temperature=1.0,
                           signals=("margin",) if i < e - 1 else ())
        a = (x if i == 0 else feats[i - 1],)
        outs = ["features", "class", "confidence"] + (["signals"] if i < e - 1 else [])
        chain.append((session(graph, a, ["input" if i == 0 else "features_in"], outs),
                      {("input" if i == 0 else "features_in"): a[0].numpy()}))
    mono = (session(FullGraph(model.segments, model.heads[-1]), (x,), ["input"], ["logits"]), {"input": x.numpy()})
    best = {g: np.inf for g in variants}
    stage_best = [np.inf] * e
    mono_best = np.inf
    for _ in range(args.repeats):
        for g, (sess, feed) in variants.items():
            best[g] = min(best[g], loop_us(sess, feed))
        for i, (sess, feed) in enumerate(chain):
            stage_best[i] = min(stage_best[i], loop_us(sess, feed))
        mono_best = min(mono_best, loop_us(*mono))
    costs = model.costs()
    boundary, _ = boundary_estimate(stage_best, mono_best, sum(costs.head_macs[:-1]), costs.reference_macs)
    base = best["max_prob"]  # every stage emits class and confidence (= max_prob) anyway: the rest is extra
    rows, out = [], {}
    for g, v in best.items():
        extra = max(0.0, v - base)
        out[g] = {"stage_us": v, "extra_us": extra, "extra_over_boundary": extra / boundary if boundary else None,
                  "registry_signal_cost": GATES[g].signal_cost}
        rows.append([g, f"{v:.1f}", f"{extra:.1f}", f"{extra / boundary:.2f}" if boundary else "-",
                     f"{GATES[g].signal_cost:g}"])
    write_json(args.out / "signal_cost.json", {"machine": machine(), "exit": k, "boundary_us": boundary,
                                               "monolithic_us": mono_best, "gates": out})
    md = (f"# Signal cost of each gate's stage (exit {k}), ONNX Runtime CPU, 1 thread (`python benchmarks/signal_cost.py`)\n\n"
          f"per-call overhead (boundary) {boundary:.1f} us; full.onnx {mono_best:.1f} us\n\n"
          + markdown_table(["gate", "stage us", "extra vs max_prob us", "extra / boundary", "GATES signal_cost"], rows))
    (args.out / "signal_cost.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()

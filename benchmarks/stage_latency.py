"""Does stopping at an exit cost its MAC fraction? Stage bundles of 224x224 backbones on ONNX Runtime CPU, batch 1.

    python benchmarks/stage_latency.py --mix benchmarks/results/cifar10/runtime.json --frames 20 --repeats 3

For ResNet-18 and MobileNetV2 (this project's backbones, 224x224, exits at the default MAC fractions, random
weights: the latency of a graph does not depend on its weights), the bundle is exported with the same kept exits
as the demo's calibrated pipeline. In ONE run, modes interleaved frame by frame, every frame is run: by
``full.onnx`` in a bare session (the plain network) and by the stage chain forced to stop at each kept exit
(``--threshold inf --max-exit k``). Reported per exit: latency / monolithic beside MACs / plain network.

Then the *expected* saving with the demo's exit mix (the share of CIFAR-10 test frames its adaptive run took at
each kept exit, read from ``--mix``): ``E[latency] = sum_k p_k latency_k``, ``E[MACs] = sum_k p_k MACs_k``, and
``realised / MAC saving = (1 - E[latency] / monolithic) / (1 - E[MACs] / plain MACs)``; 1 means every MAC saved is
time saved. The spread is that ratio computed on each repeat alone.
Writes benchmarks/results/stage-latency/stage_latency.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from edgeexit.policy import ExitPolicy  # noqa: E402
from edgeexit.runtime.backends import open_backend, session_options  # noqa: E402
from edgeexit.runtime.bundle import load_bundle  # noqa: E402
from edgeexit.runtime.chain import StageRunner  # noqa: E402

ARCHS = (("resnet18", 1.0), ("mobilenetv2", 1.0))


def export(arch: str, width: float, kept: list[int], out: Path) -> Path:
    import torch

    from edgeexit.export import export_bundle
    from edgeexit.models.multiexit import multi_exit

    torch.manual_seed(0)
    model = multi_exit(arch, 10, 224, width=width).eval()
    e = model.num_exits
    policy = ExitPolicy("max_prob", [0.5 if i in kept else math.inf for i in range(e - 1)], [1.0] * (e - 1),
                        [1.0] * e, exits=kept)
    return export_bundle(model, out, policy=policy, samples=2, log=lambda _m: None)


def measure(bundle_dir: Path, frames: int, repeats: int, threads: int) -> dict:
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, "onnxruntime", providers="cpu", threads=threads)
    kept = list(bundle.pipeline().kept)
    stops = {k: StageRunner(bundle, backend, threshold="inf", max_exit=k) for k in kept}
    mono = ort.InferenceSession(str(bundle.monolithic.path), session_options(threads), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(frames, *bundle.input_shape)).astype(np.float32)
    modes = {"monolithic": lambda f: mono.run(["logits"], {"input": f[None]}),
             **{f"exit {k}": stops[k].run_one for k in kept}}
    for fn in modes.values():  # warm-up
        fn(x[0])
        fn(x[-1])
    order = list(modes)
    lat = {m: np.zeros((repeats, frames)) for m in modes}
    for r in range(repeats):
        for i in range(frames):
            shift = (i + r) % len(order)
            for m in order[shift:] + order[:shift]:
                t0 = time.perf_counter_ns()
                modes[m](x[i])
                lat[m][r, i] = (time.perf_counter_ns() - t0) / 1e6
    macs = dict(zip(kept, bundle.exit_macs()))
    return {"kept": kept, "lat": lat, "macs": macs, "reference_macs": bundle.reference_macs,
            "stages": len(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", type=Path, default=RESULTS / "cifar10" / "runtime.json",
                        help="runtime.json of the demo (its kept exits and exit histogram)")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "stage-latency")
    args = parser.parse_args()
    demo = json.loads(args.mix.read_text())
    kept_all = list(demo["kept_exits"])
    hist = np.asarray(demo["exit_histogram"], dtype=np.float64)
    mix = {k: hist[k] / hist.sum() for k in kept_all}
    kept = kept_all[:-1]

    results, md = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, width in ARCHS:
            r = measure(export(arch, width, kept, Path(tmp) / arch), args.frames, args.repeats, args.threads)
            last = r["kept"][-1]
            # the demo's exits are indices of a 7-exit model; the last one maps to this model's last exit
            p = {(k if k != kept_all[-1] else last): v for k, v in mix.items()}
            mono_min = r["lat"]["monolithic"].min(axis=0).mean()
            per_exit = {}
            for k in r["kept"]:
                stop = r["lat"][f"exit {k}"]
                per_exit[k] = {"latency_ms": float(stop.min(axis=0).mean()),
                               "latency_over_monolithic": float(stop.min(axis=0).mean() / mono_min),
                               "macs_over_plain": r["macs"][k] / r["reference_macs"]}

            def realised(lat_of) -> float:
                e_lat = sum(p[k] * lat_of(k) for k in r["kept"]) / lat_of("monolithic")
                e_mac = sum(p[k] * r["macs"][k] for k in r["kept"]) / r["reference_macs"]
                return (1 - e_lat) / (1 - e_mac)

            best = realised(lambda m: r["lat"][m if m == "monolithic" else f"exit {m}"].min(axis=0).mean())
            reps = [realised(lambda m, i=i: r["lat"][m if m == "monolithic" else f"exit {m}"][i].mean())
                    for i in range(args.repeats)]
            e_mac = sum(p[k] * r["macs"][k] for k in r["kept"]) / r["reference_macs"]
            results[arch] = {"kept_exits": r["kept"], "monolithic_ms": float(mono_min), "per_exit": per_exit,
                             "exit_mix": {str(k): float(v) for k, v in p.items()}, "expected_mac_ratio": e_mac,
                             "realised_over_mac_saving": best, "realised_over_mac_saving_per_repeat": reps}
            rows = [[f"exit {k}", f"{v['latency_ms']:.2f}", f"{v['latency_over_monolithic']:.3f}",
                     f"{v['macs_over_plain']:.3f}", f"{100 * p[k]:.1f}%"] for k, v in per_exit.items()]
            md += [f"## {arch} 224x224 (random weights), monolithic {mono_min:.2f} ms\n",
                   markdown_table(["stop at", "ms", "latency / monolithic", "MACs / plain network", "demo mix"], rows),
                   f"\nexpected with the demo's mix: MACs {e_mac:.3f} of the plain network; realised saving / MAC saving "
                   f"**{best:.3f}** (repeats {', '.join(f'{v:.3f}' for v in reps)})\n"]
    write_json(args.out / "stage_latency.json", {"machine": machine(), "frames": args.frames, "repeats": args.repeats,
                                                 "threads": args.threads, "demo": str(args.mix), "models": results})
    text = (f"# Stopping at each exit, ONNX Runtime CPU, batch 1, {args.threads} thread, {args.frames} frames x "
            f"{args.repeats} repeats, interleaved (`python benchmarks/stage_latency.py`)\n\n" + "\n".join(md))
    (args.out / "stage_latency.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

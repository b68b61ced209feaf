"""Runtime benchmark (ONNX Runtime CPU, batch 1): does leaving early save real time?

    python benchmarks/runtime.py --bundle edgeexit/assets/demo/bundle --images ../shared/data/cifar10/test --frames 1000

In ONE run, on the same preprocessed test frames, every mode runs every frame ``--repeats`` times, the modes
interleaved frame by frame in a rotating order (drift on a shared machine hits every mode alike):
  * ``monolithic``: ``full.onnx`` in a bare ONNX Runtime session (``session.run``), the plain network;
  * ``full``: ``edgeexit run --full`` (the runner on ``full.onnx``, buffers bound once);
  * ``adaptive``: the bundle's stages and calibrated policy;
  * ``worst``: every stage run, no exit taken (thresholds +inf).
Reported per mode: the mean over frames of each frame's minimum over the repeats (the least noisy figure), and the
mean, p50 and p99 of all timings; ratios to ``monolithic`` and their spread across the repeats (each repeat's mean
ratio). Also: the gate's share of an adaptive frame (the decision code timed alone, per decision, times the
decisions a frame makes), accuracy against the final exit, the MAC ratio, and batch 32 (compaction) vs batch 1.
Writes benchmarks/results/<name>/runtime.json, runtime.md and runtime.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from edgeexit.imageio import load_image, scan_image_folder  # noqa: E402
from edgeexit.metrics import percentiles  # noqa: E402
from edgeexit.runtime.backends import open_backend, session_options  # noqa: E402
from edgeexit.runtime.bundle import load_bundle  # noqa: E402
from edgeexit.runtime.chain import StageRunner  # noqa: E402


def load_frames(root: Path, n: int, seed: int, runner: StageRunner) -> tuple[np.ndarray, np.ndarray]:
    folder = scan_image_folder(root, runner.classes)
    idx = np.random.default_rng(seed).permutation(len(folder))[:n]
    x = runner.prepare([load_image(folder.paths[i], runner.preprocess.channels) for i in idx])
    return x, np.asarray([folder.labels[i] for i in idx])


def gate_us_per_decision(runner: StageRunner, repeats: int = 200_000) -> float:
    """Host time of one exit decision as the batch-1 loop makes it: read the score from the bound output and
    compare it with the oriented threshold (``StageRunner._run_one``)."""
    host = np.zeros((1, 1), np.float32)
    sign, thr = (runner._signs[0], runner._thresholds[0]) if runner._signs else (1.0, np.inf)
    t0 = time.perf_counter_ns()
    for _ in range(repeats):
        score = float(host[0, 0])
        if sign * score >= thr:
            pass
    loop = time.perf_counter_ns() - t0
    t0 = time.perf_counter_ns()
    for _ in range(repeats):
        pass
    empty = time.perf_counter_ns() - t0
    return max(0.0, (loop - empty) / repeats / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="labelled image folder (e.g. CIFAR-10 test/)")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per session [1]")
    parser.add_argument("--gate", default=None, help="an exported gate [the bundle's]")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--name", default="cifar10")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import onnxruntime as ort

    bundle = load_bundle(args.bundle)
    backend = open_backend(bundle, "onnxruntime", providers="cpu", threads=args.threads, gate=args.gate)
    adaptive = StageRunner(bundle, backend, gate=args.gate)
    worst = StageRunner(bundle, backend, gate=args.gate, threshold="inf")
    full_backend = open_backend(bundle, "onnxruntime", providers="cpu", threads=args.threads, full=True)
    full = StageRunner(bundle, full_backend, full=True)
    mono = ort.InferenceSession(str(bundle.monolithic.path), session_options(args.threads),
                                providers=["CPUExecutionProvider"])
    x, labels = load_frames(args.images, args.frames, args.seed, adaptive)
    n = len(x)

    modes = {"monolithic": lambda f: mono.run(["logits"], {"input": f[None]}), "full": full.run_one,
             "adaptive": adaptive.run_one, "worst": worst.run_one}
    for k in range(min(args.warmup, n)):  # warm every mode on real frames
        for fn in modes.values():
            fn(x[k])
    order = list(modes)
    lat = {m: np.zeros((args.repeats, n)) for m in modes}
    decisions = [None] * n
    for r in range(args.repeats):
        for k in range(n):
            shift = (k + r) % len(order)
            for m in order[shift:] + order[:shift]:
                fn = modes[m]
                t0 = time.perf_counter_ns()
                out = fn(x[k])
                lat[m][r, k] = (time.perf_counter_ns() - t0) / 1e6
                if m == "adaptive":
                    decisions[k] = out

    exits = np.array([d.exit for d in decisions])
    preds = np.array([d.class_id for d in decisions])
    full_preds = np.array([full.run_one(x[k]).class_id for k in range(n)])
    macs = np.array([d.macs for d in decisions], dtype=np.float64)
    mac_ratio = float(macs.mean() / bundle.reference_macs)
    stage_of = {k: j for j, k in enumerate(adaptive.exits)}
    decisions_per_frame = float(np.mean([min(stage_of[e] + 1, len(adaptive.exits) - 1) for e in exits]))
    gate_us = gate_us_per_decision(adaptive)

    # batch 32 with compaction vs batch 1, adaptive, same frames
    t0 = time.perf_counter()
    batched = adaptive.run_batch(x, batch_size=args.batch)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [adaptive.run_one(x[k]) for k in range(n)]
    t_single = time.perf_counter() - t0
    same = all(a.class_id == b.class_id and a.exit == b.exit for a, b in zip(batched, single))

    min_of = {m: float(v.min(axis=0).mean()) for m, v in lat.items()}
    stats = {m: percentiles(v.reshape(-1)) for m, v in lat.items()}
    per_repeat = {m: v.mean(axis=1) for m, v in lat.items()}

    def ratio(m: str, ref: str = "monolithic") -> dict:
        reps = per_repeat[m] / per_repeat[ref]
        return {"min_mean": min_of[m] / min_of[ref], "mean": stats[m]["mean"] / stats[ref]["mean"],
                "p50": stats[m]["p50"] / stats[ref]["p50"], "repeats": reps.tolist(),
                "spread": float(reps.max() - reps.min())}

    adaptive_over_full = min_of["adaptive"] / min_of["full"]
    acc_adaptive, acc_full = float((preds == labels).mean()), float((full_preds == labels).mean())
    gate_share = gate_us * decisions_per_frame / 1e3 / min_of["adaptive"]
    result = {
        "machine": machine(), "bundle": str(args.bundle), "gate": adaptive.policy.gate, "kept_exits": list(adaptive.exits),
        "frames": n, "repeats": args.repeats, "threads": args.threads, "backend": backend.describe(),
        "latency_ms": {m: {"min_mean": min_of[m], **stats[m]} for m in modes},
        "ratios_to_monolithic": {m: ratio(m) for m in ("full", "adaptive", "worst")},
        "adaptive_over_full": adaptive_over_full,
        "mac_ratio": mac_ratio,
        "realised_over_mac_saving": (1 - adaptive_over_full) / (1 - mac_ratio) if mac_ratio < 1 else None,
        "gate_time": {"us_per_decision": gate_us, "decisions_per_frame": decisions_per_frame, "share_of_adaptive_frame": gate_share},
        "exit_histogram": np.bincount(exits, minlength=bundle.num_exits).tolist(),
        "accuracy": {"adaptive": acc_adaptive, "final_exit": acc_full, "drop_points": 100 * (acc_full - acc_adaptive)},
        "batch": {"size": args.batch, "fps_batched": n / t_batch, "fps_batch1": n / t_single,
                  "speedup": t_single / t_batch, "same_decisions_as_batch1": same},
    }
    out = args.out or RESULTS / args.name
    write_json(out / "runtime.json", result)
    rat = result["ratios_to_monolithic"]
    rows = [[m, f"{min_of[m]:.3f}", f"{stats[m]['mean']:.3f}", f"{stats[m]['p50']:.3f}", f"{stats[m]['p99']:.3f}",
             "1" if m == "monolithic" else f"{rat[m]['min_mean']:.3f} (repeats {', '.join(f'{v:.3f}' for v in rat[m]['repeats'])})"]
            for m in modes]
    md = [f"# Runtime on {args.name}: ONNX Runtime CPU, batch 1, {n} frames x {args.repeats} repeats, modes interleaved "
          f"per frame; gate {adaptive.policy.gate}, stages end at exits {', '.join(map(str, adaptive.exits))}\n",
          markdown_table(["mode", "mean of per-frame min ms", "mean ms", "p50 ms", "p99 ms", "/ monolithic (per-frame min)"], rows),
          "\n" + markdown_table(["measure", "value", "target"], [
              ["adaptive / monolithic", f"{rat['adaptive']['min_mean']:.3f}", "<= 0.65"],
              ["worst case (every stage, no exit) / monolithic", f"{rat['worst']['min_mean']:.3f}", "<= 1.10"],
              ["--full / monolithic", f"{rat['full']['min_mean']:.3f}", "<= 1.02"],
              ["gate share of an adaptive frame", f"{100 * gate_share:.2f}% ({gate_us:.3f} us x {decisions_per_frame:.2f} decisions)", "<= 1%"],
              ["test accuracy adaptive / final exit", f"{100 * acc_adaptive:.2f}% / {100 * acc_full:.2f}% (drop "
               f"{100 * (acc_full - acc_adaptive):.2f} points)", "drop <= 1.0"],
              ["adaptive MACs / plain network", f"{mac_ratio:.3f}", ""],
              ["realised saving / MAC saving (adaptive vs --full)", "-" if result["realised_over_mac_saving"] is None
               else f"{result['realised_over_mac_saving']:.3f}", ""],
              [f"batch {args.batch} with compaction / batch 1 throughput", f"{result['batch']['speedup']:.2f}x "
               f"({result['batch']['fps_batched']:.0f} vs {result['batch']['fps_batch1']:.0f} frames/s)", ""],
              ["batched decisions equal batch-1 decisions", str(same), "True"],
              ["exit histogram", " ".join(map(str, result["exit_histogram"])), ""],
          ])]
    (out / "runtime.md").write_text("\n".join(md) + "\n")
    _plot({m: v.min(axis=0) for m, v in lat.items()}, out / "runtime.png", args.name)
    print("\n".join(md))


def _plot(lat: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, v in lat.items():
        s = np.sort(v)
        ax.plot(s, np.arange(1, len(s) + 1) / len(s), label=f"{m} (mean {v.mean():.3f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("frame latency, minimum over repeats (ms, log scale)")
    ax.set_ylabel("fraction of frames")
    ax.set_title(f"Per-frame latency, ONNX Runtime CPU, batch 1 ({name})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Runtime benchmark (ONNX Runtime CPU): does the chain really save time, and what does chaining cost?

    python benchmarks/runtime.py --bundle edgeexit/assets/demo/bundle --images ../shared/data/cifar10/test --frames 1000

In ONE run, on the same preprocessed frames, with modes interleaved frame by frame (so drift on a shared machine
hits every mode alike):
  * monolithic `full.onnx` vs the chained bundle at full depth (every segment, last head only), batch 1;
  * adaptive (the bundle's calibrated policy) vs full depth, beside the MAC ratio of the exits taken;
  * the gate's share of frame latency (policy decision + patience + score, timed on the real signals);
  * batch 32 with compaction vs batch 1 (throughput);
  * p50 / p95 / p99 per frame of every mode.
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

from edgeexit.gates import next_patience  # noqa: E402
from edgeexit.imageio import load_image, scan_image_folder  # noqa: E402
from edgeexit.metrics import percentiles  # noqa: E402
from edgeexit.runtime.backends import open_backend, session_options  # noqa: E402
from edgeexit.runtime.bundle import load_bundle  # noqa: E402
from edgeexit.runtime.chain import ExitRunner  # noqa: E402


def load_frames(root: Path, n: int, seed: int, runner: ExitRunner) -> tuple[np.ndarray, np.ndarray]:
    folder = scan_image_folder(root, runner.classes)
    idx = np.random.default_rng(seed).permutation(len(folder))[:n]
    x = runner.prepare([load_image(folder.paths[i], runner.preprocess.channels) for i in idx])
    return x, np.asarray([folder.labels[i] for i in idx])


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter_ns()
    out = fn(*args)
    return (time.perf_counter_ns() - t0) / 1e6, out


def gate_ms_per_frame(runner: ExitRunner, signals_per_exit: list[np.ndarray], classes: list[np.ndarray], repeats: int) -> float:
    """Mean host time of the gate per frame: for every exit a frame passes, the decision the chain makes there."""
    policy, last = runner.policy, runner.num_exits - 1
    total, frames = 0.0, len(signals_per_exit)
    for _ in range(repeats):
        for sig_rows, cls_rows in zip(signals_per_exit, classes):
            t0 = time.perf_counter_ns()
            prev_pat = prev_cls = None
            for i in range(sig_rows.shape[0]):
                sig, cls = sig_rows[i : i + 1], cls_rows[i : i + 1]
                pat = next_patience(prev_pat, prev_cls, cls)
                raw = runner._gate_raw(i, sig, pat)
                if i < last:
                    policy.passes(i, raw)
                prev_pat, prev_cls = pat, cls
            total += (time.perf_counter_ns() - t0) / 1e6
    return total / (repeats * frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="labelled image folder (e.g. CIFAR-10 test/)")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=50, help="frames per mode before switching (1: every frame)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per session [default: ORT's]")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--name", default="cifar10")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import onnxruntime as ort

    bundle = load_bundle(args.bundle)
    backend = open_backend(bundle, kind="onnxruntime", providers="cpu", threads=args.threads)
    adaptive = ExitRunner(bundle, backend)
    full = ExitRunner(bundle, backend, full=True)
    mono = ort.InferenceSession(str(bundle.monolithic.path), session_options(args.threads), providers=["CPUExecutionProvider"])
    mono_in = mono.get_inputs()[0].name
    x, labels = load_frames(args.images, args.frames, args.seed, adaptive)
    n = len(x)

    for k in range(min(args.warmup, n)):  # warm every mode on real frames
        mono.run(None, {mono_in: x[k : k + 1]})
        full.run_batch(x[k : k + 1])
        adaptive.run_batch(x[k : k + 1])

    modes = {"monolithic": lambda f: mono.run(None, {mono_in: f}), "chained_full": full.run_batch,
             "adaptive": adaptive.run_batch}
    lat = {m: np.zeros(n) for m in modes}
    decisions = [None] * n
    order = list(modes)
    # Interleaved in blocks of --block frames, rotating the mode order: drift on a shared machine hits every mode
    # alike, while each mode runs warm as on a device (--block 1 alternates every frame: every mode runs cache-cold).
    for b, start in enumerate(range(0, n, args.block)):
        for m in order[b % 3 :] + order[: b % 3]:
            for k in range(start, min(n, start + args.block)):
                ms, out = timed(modes[m], x[k : k + 1])
                lat[m][k] = ms
                if m == "adaptive":
                    decisions[k] = out[0]

    exits = np.array([d.exit_index for d in decisions])
    preds = np.array([d.class_id for d in decisions])
    mac_ratio = float(np.mean([adaptive.cumulative_macs[e] for e in exits]) / adaptive.reference_macs)
    full_preds = np.array([d.class_id for d in full.run_batch(x)])

    # the gate's share: re-run the heads' signals of the exits each frame passed, time only the gate code
    sig_rows, cls_rows = [], []
    for k in range(min(n, 200)):
        sigs, clss = [], []
        for i in range(exits[k] + 1):
            d = ExitRunner(bundle, backend, max_exit=i).run_batch(x[k : k + 1])[0] if i < exits[k] else decisions[k]
            sigs.append(d.signals)
            clss.append(d.class_id)
        sig_rows.append(np.stack(sigs).astype(np.float32))
        cls_rows.append(np.array(clss))
    gate_ms = gate_ms_per_frame(adaptive, sig_rows, cls_rows, repeats=20)

    # batch 32 with compaction vs batch 1, adaptive, same frames
    t0 = time.perf_counter()
    batched = []
    for s in range(0, n, args.batch):
        batched += adaptive.run_batch(x[s : s + args.batch])
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [adaptive.run_batch(x[k : k + 1])[0] for k in range(n)]
    t_single = time.perf_counter() - t0
    same = all(a.class_id == b.class_id and a.exit_index == b.exit_index for a, b in zip(batched, single))

    stats = {m: percentiles(v) for m, v in lat.items()}
    mean = {m: float(v.mean()) for m, v in lat.items()}
    med = {m: float(np.median(v)) for m, v in lat.items()}
    latency_ratio = mean["adaptive"] / mean["chained_full"]
    result = {
        "machine": machine(), "bundle": str(args.bundle), "frames": n, "threads": args.threads, "block": args.block,
        "providers": backend.describe() if hasattr(backend, "describe") else "CPUExecutionProvider",
        "latency_ms": stats,
        "chained_full_over_monolithic": {"mean": mean["chained_full"] / mean["monolithic"], "median": med["chained_full"] / med["monolithic"]},
        "adaptive_over_full": {"mean": latency_ratio, "median": med["adaptive"] / med["chained_full"]},
        "adaptive_over_monolithic": {"mean": mean["adaptive"] / mean["monolithic"], "median": med["adaptive"] / med["monolithic"]},
        "mac_ratio": mac_ratio,
        "realised_over_mac_saving": (1 - latency_ratio) / (1 - mac_ratio) if mac_ratio < 1 else None,
        "gate_ms_per_frame": gate_ms, "gate_share_of_adaptive_frame": gate_ms / mean["adaptive"],
        "exit_histogram": np.bincount(exits, minlength=adaptive.num_exits).tolist(),
        "accuracy": {"adaptive": float((preds == labels).mean()), "full": float((full_preds == labels).mean())},
        "batch": {"size": args.batch, "fps_batched": n / t_batch, "fps_batch1": n / t_single,
                  "speedup": t_single / t_batch, "same_decisions_as_batch1": same},
    }
    out = args.out or RESULTS / args.name
    write_json(out / "runtime.json", result)
    rows = [[m, f"{stats[m]['mean']:.3f}", f"{stats[m]['p50']:.3f}", f"{stats[m]['p95']:.3f}", f"{stats[m]['p99']:.3f}"] for m in modes]
    md = [f"# Runtime on {args.name}: ONNX Runtime CPU, batch 1, {n} frames, one run interleaved in blocks of {args.block}\n",
          markdown_table(["mode", "mean ms", "p50 ms", "p95 ms", "p99 ms"], rows),
          "\n" + markdown_table(["measure", "value", "target"], [
              ["chained full depth / monolithic (mean)", f"{result['chained_full_over_monolithic']['mean']:.3f}", "<= 1.05"],
              ["adaptive / full depth latency (mean)", f"{latency_ratio:.3f}", ""],
              ["adaptive MACs / plain network", f"{mac_ratio:.3f}", ""],
              ["realised saving / MAC saving", "—" if result["realised_over_mac_saving"] is None else f"{result['realised_over_mac_saving']:.3f}", ">= 0.9"],
              ["gate share of an adaptive frame", f"{100 * result['gate_share_of_adaptive_frame']:.2f}%", "<= 2%"],
              [f"batch {args.batch} with compaction / batch 1 throughput", f"{result['batch']['speedup']:.2f}x "
               f"({result['batch']['fps_batched']:.0f} vs {result['batch']['fps_batch1']:.0f} frames/s)", ""],
              ["batched decisions equal batch-1 decisions", str(same), "True"],
              ["accuracy adaptive / full", f"{100 * result['accuracy']['adaptive']:.2f}% / {100 * result['accuracy']['full']:.2f}%", ""],
          ])]
    (out / "runtime.md").write_text("\n".join(md))
    _plot(lat, out / "runtime.png", args.name)
    print("\n".join(md))


def _plot(lat: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, v in lat.items():
        s = np.sort(v)
        ax.plot(s, np.arange(1, len(s) + 1) / len(s), label=f"{m} (mean {v.mean():.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("frame latency (ms, log scale)")
    ax.set_ylabel("fraction of frames")
    ax.set_title(f"Per-frame latency, ONNX Runtime CPU, batch 1 ({name})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

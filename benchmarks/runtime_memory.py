"""Memory stays flat: RSS of the runtime after warm-up and after N frames (default 10,000), torch-free.

    python benchmarks/runtime_memory.py BUNDLE [SOURCE] --frames 10000 --batch 4 --out memory.json

Every frame goes the full ``edgeexit run`` path (preprocessing, the exit chain with compaction, the JSON line
written to a null sink, run statistics, CAMs kept as for --save). SOURCE is a folder or image (looped); without
it, random frames of the model's input size are used. RSS is read from /proc/self/statm (Linux, no psutil).
Prints one JSON object (and writes it to --out): RSS after warm-up and at the end, the growth, frames, seconds.
Exit code 1 when the growth exceeds --limit-mb (default 5).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeexit.runtime.backends import open_backend  # noqa: E402
from edgeexit.runtime.bundle import load_bundle  # noqa: E402
from edgeexit.runtime.chain import StageRunner, run_source  # noqa: E402
from edgeexit.runtime.outputs import JsonlWriter, frame_record  # noqa: E402
from edgeexit.runtime.sources import Frame, open_source  # noqa: E402
from edgeexit.runtime.summary import RunStats  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic(n: int, shape, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = [rng.integers(0, 256, (shape[1] + 8, shape[2] + 8, 3), dtype=np.uint8) for _ in range(32)]
    for k in range(n):
        yield Frame(k, pool[k % len(pool)], f"frame {k}", label=k % 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("source", nargs="?", default=None)
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threshold", default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--providers", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-mb", type=float, default=5.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    bundle = load_bundle(args.bundle)
    backend = open_backend(bundle, args.backend, providers=args.providers, threads=args.threads,
                           max_batch=args.batch)
    runner = StageRunner(bundle, backend, threshold=args.threshold, keep_cam=True)
    stats = RunStats(runner.num_exits, [runner.exit_fraction(i) for i in range(runner.num_exits)])
    sink = open(os.devnull, "w")
    writer = JsonlWriter(stream=sink)

    def on_decision(frame, decision):
        writer.write(frame_record(frame, decision, runner.classes))
        stats.add(decision, frame.label)

    def frames(n):
        if args.source is None:
            return synthetic(n, runner.input_shape)
        return open_source(args.source, loop=True, max_frames=n, classes=tuple(runner.classes))

    runner.warmup(args.batch)
    run_source(runner, frames(args.warmup), args.batch, on_decision)
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    run_source(runner, frames(args.frames), args.batch, on_decision)
    seconds = time.perf_counter() - t0
    gc.collect()
    after = rss_mb()
    backend.close()
    result = {
        "bundle": str(args.bundle), "backend": backend.describe(), "batch": args.batch, "frames": args.frames,
        "warmup_frames": args.warmup, "rss_after_warmup_mb": round(before, 3), "rss_after_mb": round(after, 3),
        "growth_mb": round(after - before, 3), "seconds": round(seconds, 3),
        "fps": round(args.frames / seconds, 1) if seconds > 0 else None,
        "exit_histogram": stats.exit_counts, "limit_mb": args.limit_mb,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["growth_mb"] <= args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())

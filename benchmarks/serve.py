"""Serving benchmark: N simulated camera streams against one local `edgeexit serve` (Triton via PyTriton).

    python benchmarks/serve.py --images ../shared/data/cifar10/test

Starts `edgeexit serve` on 127.0.0.1 (the system Python's venv, as the tests build it) with the demo bundle, then,
in ONE run, for N = 1, 4, 16, 64 concurrent streams and for both models (``bundle``: early exit with compaction
inside Triton's batches; ``bundle_full``: the plain network), sends CIFAR-10 test frames as PNG bytes. Each stream
is closed-loop: it sends its next frame when the previous one is answered (a camera that sends as fast as the
server answers), so the figures are the server's capacity at N outstanding requests. The cells are repeated in
``--rounds`` rounds, the two models' order alternating between rounds, so drift on a shared machine hits both.

Per cell: requests sent and answered (a response without ``failed``), lost (sent - answered), throughput
(answered / wall time), client-side latency p50/p99 (send -> answer), frames per executed batch (Triton's
``nv_inference_count / nv_inference_exec_count``), mean cost (MACs of the exits taken / the plain network's) and
accuracy. Writes benchmarks/results/<name>/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from edgeexit.runtime.bundle import load_bundle  # noqa: E402
from edgeexit.imageio import scan_image_folder  # noqa: E402
from edgeexit.metrics import percentiles  # noqa: E402
from edgeexit.serve.client import ServeClient  # noqa: E402
from edgeexit.serve.launch import PROJECT_ROOT, serve_python, start_server  # noqa: E402

DEMO_BUNDLE = PROJECT_ROOT / "edgeexit" / "assets" / "demo" / "bundle"


def triton_counts(metrics_port: int, model: str) -> tuple[int, int]:
    """(inferences, executions) Triton has counted for a model: frames and batches run."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()

    def value(metric: str) -> int:
        found = re.search(rf'{metric}\{{model="{re.escape(model)}",version="1"\}} (\d+)', text)
        return int(found.group(1)) if found else 0

    return value("nv_inference_count"), value("nv_inference_exec_count")


def run_cell(url: str, model: str, streams: int, images: list[bytes], per_stream: int, offset: int) -> dict:
    """``streams`` closed-loop cameras, ``per_stream`` frames each; every request's frame index, latency, answer."""
    records: list[list[tuple]] = [[] for _ in range(streams)]
    clients = [ServeClient(url, model) for _ in range(streams)]
    start = threading.Barrier(streams + 1)

    def camera(s: int) -> None:
        start.wait()
        for j in range(per_stream):
            k = (offset + s * per_stream + j) % len(images)
            t0 = time.perf_counter()
            try:
                row = clients[s].classify_images([images[k]])[0]
            except Exception as exc:  # noqa: BLE001 (counted as lost)
                row = {"error": str(exc)}
            records[s].append((k, (time.perf_counter() - t0) * 1e3, row))

    threads = [threading.Thread(target=camera, args=(s,)) for s in range(streams)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return {"wall_s": wall, "records": [r for rs in records for r in rs], "sent": streams * per_stream}


def summarise(cells: list[dict], labels: np.ndarray, reference_macs: int, num_exits: int) -> dict:
    records = [r for c in cells for r in c["records"]]
    answered = [(k, ms, row) for k, ms, row in records if "error" not in row and row["failed"] is None]
    sent = sum(c["sent"] for c in cells)
    wall = sum(c["wall_s"] for c in cells)
    latency = percentiles([m for _, m, _ in answered], (50, 99))
    exits = np.bincount([row["exit"] for _, _, row in answered], minlength=num_exits)
    inferences = sum(c["inferences"] for c in cells)
    executions = sum(c["executions"] for c in cells)
    return {
        "sent": sent, "received": len(records), "answered": len(answered), "lost": sent - len(answered),
        "errors": sum("error" in row for _, _, row in records),
        "failed": sum("error" not in row and row["failed"] is not None for _, _, row in records),
        "wall_s": wall, "throughput_fps": len(answered) / wall if wall else None,
        "latency_ms": {"mean": latency["mean"], "p50": latency["p50"], "p99": latency["p99"]},
        "frames_per_batch": inferences / executions if executions else None,
        "mean_cost": float(np.mean([row["macs"] for _, _, row in answered]) / reference_macs) if answered else None,
        "accuracy": float(np.mean([row["class_id"] == labels[k] for k, _, row in answered])) if answered else None,
        "exit_histogram": exits.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    ap.add_argument("--images", type=Path, required=True, help="Labelled test folder (CIFAR-10 test/).")
    ap.add_argument("--streams", default="1,4,16,64")
    ap.add_argument("--frames", type=int, default=1024, help="Frames per (streams, model) cell and round, split "
                    "over the streams.")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--queue-delay-us", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per session on the server.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serve")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]

    bundle = load_bundle(args.bundle)
    num_exits = bundle.num_exits
    folder = scan_image_folder(args.images, bundle.classes)
    order = np.random.default_rng(args.seed).permutation(len(folder))
    images = [Path(folder.paths[i]).read_bytes() for i in order]
    labels = np.asarray([folder.labels[i] for i in order])
    out_dir = RESULTS / args.name
    out_dir.mkdir(parents=True, exist_ok=True)

    python = serve_python()
    server_args = ["--max-batch", str(args.max_batch), "--queue-delay-us", str(args.queue_delay_us),
                   "--instances", str(args.instances), "--stats-interval", "0"]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    srv = start_server(python, args.bundle, out_dir / "server.log", server_args)
    models = (srv.model, f"{srv.model}_full")
    cells: dict[tuple, list] = {(n, m): [] for n in streams for m in models}
    try:
        srv.wait_ready()
        for m in models:  # warm-up: connections, sessions, the batcher
            run_cell(srv.url, m, 4, images, 16, 0)
        reference = run_cell(srv.url, models[1], 1, images, 1, 0)["records"][0][2]["macs"]
        for r in range(args.rounds):
            for n in streams:
                for m in (models if r % 2 == 0 else models[::-1]):
                    per_stream = max(1, args.frames // n)
                    before = triton_counts(srv.metrics_port, m)
                    cell = run_cell(srv.url, m, n, images, per_stream, offset=r * args.frames)
                    after = triton_counts(srv.metrics_port, m)
                    cell["inferences"], cell["executions"] = after[0] - before[0], after[1] - before[1]
                    cells[(n, m)].append(cell)
                    print(f"round {r} streams {n:3d} {m:12s}: {len(cell['records'])} answers in "
                          f"{cell['wall_s']:.2f} s", file=sys.stderr, flush=True)
    finally:
        code = srv.stop()
    summary = {f"{n}/{m}": {"streams": n, "model": m, **summarise(cells[(n, m)], labels, reference, num_exits)}
               for n in streams for m in models}
    result = {"command": " ".join(sys.argv), "machine": machine(), "server_python": str(python),
              "server_args": server_args, "server_exit_code": code, "bundle": str(args.bundle),
              "frames_per_cell_and_round": args.frames, "rounds": args.rounds, "cells": summary}
    write_json(out_dir / "serve.json", result)
    (out_dir / "serve.md").write_text(render(result, streams, models))
    print((out_dir / "serve.md").read_text())


def render(result: dict, streams: list[int], models: tuple) -> str:
    cells = result["cells"]
    rows = []
    for n in streams:
        for m in models:
            c = cells[f"{n}/{m}"]
            rows.append([n, m, c["sent"], c["answered"], c["lost"], f"{c['throughput_fps']:.0f}",
                         f"{c['latency_ms']['p50']:.2f}", f"{c['latency_ms']['p99']:.2f}",
                         f"{c['frames_per_batch']:.2f}" if c["frames_per_batch"] else "-",
                         f"{100 * c['mean_cost']:.1f}", f"{100 * c['accuracy']:.2f}"])
    ratios = []
    for n in streams:
        a, f = cells[f"{n}/{models[0]}"], cells[f"{n}/{models[1]}"]
        ratios.append([n, f"{a['throughput_fps'] / f['throughput_fps']:.2f}",
                       f"{a['latency_ms']['p50'] / f['latency_ms']['p50']:.2f}",
                       f"{a['latency_ms']['p99'] / f['latency_ms']['p99']:.2f}"])
    m = result["machine"]
    text = (f"# edgeexit serve: {', '.join(map(str, streams))} camera streams\n\n"
            f"`{result['command']}`\n\n{m['date']}, {m.get('cpu_model')}, {m['cpu_count']} CPUs; server on "
            f"{result['server_python']} with {' '.join(result['server_args'])}; {result['rounds']} rounds of "
            f"{result['frames_per_cell_and_round']} frames per cell; server exit code {result['server_exit_code']}.\n\n")
    text += markdown_table(["streams", "model", "sent", "answered", "lost", "frames/s", "p50 ms", "p99 ms",
                            "frames per batch", "mean cost %", "accuracy %"], rows)
    text += "\nAdaptive / full:\n\n" + markdown_table(["streams", "throughput", "p50 latency", "p99 latency"], ratios)
    return text


if __name__ == "__main__":
    main()

"""Chained stages against the plain network on a CUDA GPU, with PyTorch as the engine.

    python benchmarks/gpu_stages.py --ckpt benchmarks/models/cifar10-resnet20.pt --out OUTDIR

What the TensorRT stage backend does, measured with the same stage graphs the exporter writes
(``edgeexit.export.stage_graph.StageGraph``; the plain network is ``full.onnx``'s ``FullGraph``): one call per
stage, features stay on the GPU, only ``class`` and ``confidence`` come back to the host (pinned buffers, one
synchronisation per stage, since the exit decision is taken on the host). Each stage runs either eagerly or as a
captured CUDA graph (``--cuda-graphs`` in the TensorRT backend). For every subset of kept internal exits (at most
``--max-kept``, plus all of them) and every batch size and precision it times "stop after stage j" for each j and
the plain network, interleaved in rotating order, ``--repeats`` x ``--iters`` calls each; it reports the median
per call of each repeat, the ratios to the plain network of the same repeat, and their spread.

This is a stand-in where TensorRT cannot run: PyTorch's kernels are not TensorRT's (no layer fusion), so the
absolute times differ; what carries over is the cost of a stage boundary (launch, copy back, synchronisation)
relative to a small network's compute on a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

from edgeexit.checkpoint import load_model
from edgeexit.export.head_graph import FullGraph
from edgeexit.export.stage_graph import StageGraph
from edgeexit.gates import gate_spec
from edgeexit.stages import internal_subsets, stage_ranges


def cam_grids(model, example: torch.Tensor) -> List[tuple]:
    with torch.no_grad():
        feats = model.forward_intermediates(example)
        return [tuple(int(v) for v in model.heads[i].forward_cam(f).cam.shape[1:]) for i, f in enumerate(feats)]


def build_stages(model, kept: Sequence[int], gate: str, grids: Sequence[tuple]) -> List[StageGraph]:
    ranges = stage_ranges(kept, model.num_exits)
    signals = gate_spec(gate).signals
    return [StageGraph(list(model.segments[a:k + 1]), model.heads[k], cam_hw=grids[k], temperature=1.0,
                       signals=signals if j < len(ranges) - 1 else ()).eval() for j, (a, k) in enumerate(ranges)]


def _host_like(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype)
    return host.pin_memory() if t.is_cuda else host


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


class Chain:
    """Stage calls with the runtime's data flow: features on the GPU, class + confidence copied to pinned host
    memory and synchronised after each stage (the host decides whether to go on)."""

    def __init__(self, stages: Sequence[torch.nn.Module], x: torch.Tensor, graphs: bool) -> None:
        self.stages, self.x, self.graphs = list(stages), x, graphs
        self.host = []
        with torch.no_grad():
            h = x
            self.outs = []
            for s in self.stages:
                out = s(h)
                self.outs.append(out)
                self.host.append((_host_like(out[1]), _host_like(out[2])))
                h = out[0]
        self.cuda_graphs = []
        if graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):  # warm up on a side stream before capture (PyTorch's rule)
                    h = x
                    for s in self.stages:
                        h = s(h)[0]
            torch.cuda.current_stream().wait_stream(stream)
            self.outs = []
            h = x
            for s in self.stages:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g), torch.no_grad():
                    out = s(h)
                self.cuda_graphs.append(g)
                self.outs.append(out)
                h = out[0]

    def run_to(self, j: int) -> None:
        with torch.no_grad():
            h = self.x
            for i in range(j + 1):
                if self.graphs:
                    self.cuda_graphs[i].replay()
                    out = self.outs[i]
                else:
                    out = self.stages[i](h)
                    h = out[0]
                cls, conf = self.host[i]
                cls.copy_(out[1], non_blocking=True)
                conf.copy_(out[2], non_blocking=True)
                _sync()


class Plain:
    def __init__(self, full: torch.nn.Module, x: torch.Tensor, graphs: bool) -> None:
        self.full, self.x, self.graphs = full, x, graphs
        with torch.no_grad():
            logits = full(x)
        self.host = _host_like(torch.argmax(logits, dim=1))
        if graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):
                    full(x)
            torch.cuda.current_stream().wait_stream(stream)
            self.g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.g), torch.no_grad():
                self.cls = torch.argmax(full(x), dim=1)

    def run(self) -> None:
        with torch.no_grad():
            if self.graphs:
                self.g.replay()
                cls = self.cls
            else:
                cls = torch.argmax(self.full(self.x), dim=1)
            self.host.copy_(cls, non_blocking=True)
            _sync()


def time_interleaved(variants: Dict[str, Callable[[], None]], iters: int, repeats: int) -> Dict[str, List[float]]:
    """Median ms per call of each variant in each repeat; variants interleaved call by call, in rotating order."""
    names = list(variants)
    for fn in variants.values():
        for _ in range(10):
            fn()
    times = {n: [[] for _ in range(repeats)] for n in names}
    for r in range(repeats):
        for i in range(iters):
            shift = i % len(names)
            for n in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                variants[n]()
                times[n][r].append((time.perf_counter() - t0) * 1e3)
    return {n: [statistics.median(v) for v in times[n]] for n in names}


def _spread(values: Sequence[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(data: dict, runtime: dict | None) -> str:
    """Markdown: per precision/batch/mode, the plain network, the kept exits' chain and the extremes.

    With ``runtime`` (a ``benchmarks/runtime.py`` JSON of the same bundle), the adaptive frame's expected ratio
    for that run's kept exits: sum over stages j of P(leave at stage j) x t(stop after j) / t(plain), per repeat,
    with the exit mix that the CPU run measured (decisions do not depend on the engine); batch 1 only."""
    kept = tuple(runtime["kept_exits"][:-1]) if runtime else (2, 3, 5)
    hist = runtime["exit_histogram"] if runtime else None
    lines = [f"# Chained stages on a GPU ({data['machine']['gpu']}, PyTorch {data['machine']['torch']})", "",
             "`python benchmarks/gpu_stages.py --ckpt CKPT --iters 30 --out DIR` on the demo's ResNet-20 architecture "
             "(latency does not depend on the weights: the run used the previous demo weights) (median of "
             f"{data['machine']['iters']} calls per repeat, {data['machine']['repeats']} repeats, variants interleaved; "
             "ratios per repeat, mean (min-max)). Stage graphs as exported, features kept on the GPU, class and "
             "confidence copied to pinned host memory and synchronised after every stage.", "",
             f"| precision | batch | CUDA graphs | plain (us) | stop after each stage, kept {list(kept)} (us) "
             "| every stage / plain | adaptive / plain | 6 exits: every stage / plain | no exit kept / plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = data["rows"]
    for key in sorted({(r["precision"], r["batch"], r["cuda_graphs"]) for r in rows}, key=lambda k: (k[0], k[1], not k[2])):
        group = {tuple(r["kept"]): r for r in rows if (r["precision"], r["batch"], r["cuda_graphs"]) == key}
        r, every, none = group[kept], group[max(group, key=len)], group[()]
        stops = " / ".join(f"{statistics.mean(s) * 1e3:.0f}" for s in r["stop_ms"])
        adaptive = "-"
        if hist and key[1] == 1:  # a batch runs until its last frame leaves: no per-frame mix
            mix = [hist[k] / sum(hist) for k in r["exits"]]
            adaptive = _spread([sum(m * r["stop_ms"][j][i] for j, m in enumerate(mix)) / r["plain_ms"][i]
                                for i in range(len(r["plain_ms"]))])
        lines.append(f"| {key[0]} | {key[1]} | {'yes' if key[2] else 'no'} | {statistics.mean(r['plain_ms']) * 1e3:.0f} "
                     f"| {stops} | {_spread(r['stop_over_plain'][-1])} | {adaptive} "
                     f"| {_spread(every['stop_over_plain'][-1])} | {_spread(none['stop_over_plain'][-1])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--gate", default="max_prob")
    p.add_argument("--max-kept", type=int, default=3)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (eager only)")
    p.add_argument("--report", type=Path, help="write the Markdown table of this gpu_stages.json (no timing)")
    p.add_argument("--runtime", type=Path, help="with --report: a runtime.py JSON whose exit mix gives the adaptive ratio")
    a = p.parse_args()
    if a.report:
        runtime = json.loads(a.runtime.read_text()) if a.runtime else None
        (a.out / "README.md").write_text(report(json.loads(a.report.read_text()), runtime))
        print((a.out / "README.md").read_text())
        return
    torch.backends.cudnn.benchmark = True
    dev = torch.device(a.device)
    model, ckpt = load_model(a.ckpt)
    size = int(ckpt["preprocess"]["input_size"]) if "input_size" in ckpt.get("preprocess", {}) else 32
    n = model.num_exits
    subsets = sorted(set(internal_subsets(n, a.max_kept)) | {tuple(range(n - 1))}, key=lambda s: (len(s), s))
    rows = []
    t_start = time.time()
    for prec, batch, graphs in itertools.product(a.precisions.split(","), [int(b) for b in a.batches.split(",")],
                                                 (True, False) if dev.type == "cuda" else (False,)):
        dtype = torch.float16 if prec == "fp16" else torch.float32
        m = load_model(a.ckpt)[0].to(dev, dtype=dtype).eval()
        x = torch.randn(batch, 3, size, size, device=dev, dtype=dtype)
        grids = cam_grids(m, x)
        plain = Plain(FullGraph(m.segments, m.heads[-1]).eval(), x, graphs)
        for kept in subsets:
            chain = Chain(build_stages(m, kept, a.gate, grids), x, graphs)
            variants = {"plain": plain.run}
            variants.update({f"stop{j}": (lambda j=j: chain.run_to(j)) for j in range(len(chain.stages))})
            med = time_interleaved(variants, a.iters, a.repeats)
            ratios = {k: [v / pl for v, pl in zip(med[k], med["plain"])] for k in med if k != "plain"}
            rows.append({"precision": prec, "batch": batch, "cuda_graphs": graphs, "kept": list(kept),
                         "exits": [k for _, k in stage_ranges(kept, n)], "plain_ms": med["plain"],
                         "stop_ms": [med[f"stop{j}"] for j in range(len(chain.stages))],
                         "stop_over_plain": [ratios[f"stop{j}"] for j in range(len(chain.stages))]})
        print(f"{prec} batch {batch} graphs {graphs}: {len(subsets)} subsets, {time.time() - t_start:.0f}s", flush=True)
    info = {"gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (dry run)", "torch": torch.__version__, "python": platform.python_version(),
            "ckpt": str(a.ckpt), "gate": a.gate, "iters": a.iters, "repeats": a.repeats,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_stages.json").write_text(json.dumps({"machine": info, "rows": rows}))
    print(f"wrote {a.out / 'gpu_stages.json'}")


if __name__ == "__main__":
    main()

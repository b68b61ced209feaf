"""Rebuild the demo model's torch checkpoint from the ONNX files of a bundle (the demo bundle by default).

    python benchmarks/recover_demo_checkpoint.py [--git-rev 38fe1e0 | --bundle DIR] [--out runs/cifar10-resnet20.pt]

The reference model (`benchmarks/make_demo.py`, about an hour to train on 2 CPU cores) is not committed; its
weights are, inside the demo bundle's legacy per-segment / per-head ONNX files. The exporter folded every
BatchNorm into the convolution before it (eval mode), so each ONNX ``Conv`` carries ``W' = W * g / sqrt(v + eps)``
and ``b' = beta - g * m / sqrt(v + eps)``. This script builds the model from the manifest's config, records the
order in which torch runs its convolutions (a forward hook), and loads the k-th ONNX ``Conv`` of each file into
the k-th convolution run, with the BatchNorm after it set to the identity plus ``b'`` (gamma 1, beta ``b'``,
mean 0, var ``1 - eps``). In eval mode the rebuilt model computes what the ONNX files compute (checked against
``full.onnx`` and every head, to 1e-4). It is not fit for further training (the BatchNorm statistics are gone).

By default the legacy demo bundle is read from this repository's history (commit 38fe1e0, the last one that
shipped every segment and head as its own ONNX file; later demo bundles hold only the kept exits' stages).

The split (seed, fraction, held-out fingerprint) is re-derived from the training folder exactly as `train` does,
so `calibrate` reads the same held-out 10% the model was validated on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit import __version__  # noqa: E402
from edgeexit.checkpoint import save_checkpoint  # noqa: E402
from edgeexit.data import load_split  # noqa: E402
from edgeexit.models import build_model  # noqa: E402
from edgeexit.train import split_fingerprint  # noqa: E402


LEGACY_DEMO_REV = "38fe1e0"
DEMO_PATH = "edgeexit/assets/demo/bundle"


def bundle_from_git(rev: str, dest: Path) -> Path:
    """Write the files of the demo bundle as committed at ``rev`` into ``dest``."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:{DEMO_PATH}"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{DEMO_PATH}/{name}"], check=True,
                              capture_output=True).stdout
        (dest / name).write_bytes(blob)
    return dest


def onnx_layers(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """(conv weight, bias) of every Conv node and (weight, bias) of every Gemm/MatMul+Add, in graph order."""
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs, linears = [], []
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = init[node.input[1]]
            b = init[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0], np.float32)
            convs.append((w, b))
        elif node.op_type == "Gemm":
            linears.append((init[node.input[1]], init[node.input[2]]))
    if not linears and any(n.endswith("fc.weight") for n in init):
        name = next(n for n in init if n.endswith("fc.weight"))
        linears.append((init[name], init[name.replace("weight", "bias")]))
    return convs, linears


def conv_order(module: nn.Module, x: torch.Tensor) -> tuple[list[nn.Conv2d], torch.Tensor]:
    """The module's convolutions in the order a forward pass runs them, and its output."""
    order: list[nn.Conv2d] = []
    hooks = [m.register_forward_hook(lambda m, *_: order.append(m)) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        out = module(x)
    for h in hooks:
        h.remove()
    return order, out


def following_bn(module: nn.Module) -> dict[int, nn.BatchNorm2d]:
    """id(conv) -> the BatchNorm2d that follows it in registration order (every conv here has one)."""
    mods = list(module.modules())
    out = {}
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = next((n for n in mods[i + 1:] if isinstance(n, (nn.BatchNorm2d, nn.Conv2d))), None)
            if isinstance(nxt, nn.BatchNorm2d):
                out[id(m)] = nxt
    return out


def load_folded(module: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    convs, linears = onnx_layers(path)
    order, _ = conv_order(module, x)
    if len(order) != len(convs):
        raise SystemExit(f"{path.name}: {len(convs)} ONNX convolutions, {len(order)} in the model")
    bns = following_bn(module)
    with torch.no_grad():
        for conv, (w, b) in zip(order, convs):
            if tuple(conv.weight.shape) != w.shape:
                raise SystemExit(f"{path.name}: conv shape {tuple(conv.weight.shape)} vs ONNX {w.shape}")
            conv.weight.copy_(torch.from_numpy(w.copy()))
            bn = bns.get(id(conv))
            if bn is None:
                raise SystemExit(f"{path.name}: a convolution without BatchNorm (unexpected for these backbones)")
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        fcs = [m for m in module.modules() if isinstance(m, nn.Linear)]
        for fc, (w, b) in zip(fcs, linears):
            fc.weight.copy_(torch.from_numpy((w if w.shape == tuple(fc.weight.shape) else w.T).copy()))
            fc.bias.copy_(torch.from_numpy(b.copy()))
        return module(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="a legacy bundle directory (else --git-rev)")
    parser.add_argument("--git-rev", default=LEGACY_DEMO_REV, help="read the legacy demo bundle from this commit")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "cifar10-resnet20.pt")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "train")
    args = parser.parse_args()
    if args.bundle is None:
        args.bundle = bundle_from_git(args.git_rev, Path(tempfile.mkdtemp(prefix="edgeexit-legacy-demo-")))
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    if not (args.bundle / "segment_0.onnx").is_file():
        raise SystemExit(f"{args.bundle} has no per-segment ONNX files (segment_i.onnx): not a legacy bundle")
    model = build_model(manifest["model"]).eval()
    x = torch.randn(4, *manifest["input"]["shape"], generator=torch.Generator().manual_seed(0))
    feats = x
    for i, (seg, head) in enumerate(zip(model.segments, model.heads)):
        feats_in = feats
        feats = load_folded(seg, feats_in, args.bundle / f"segment_{i}.onnx")
        load_folded(head, feats, args.bundle / f"head_{i}.onnx")
    # check: every head's logits and the monolithic logits equal the ONNX files'
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    worst = 0.0
    with torch.no_grad():
        inter = model.forward_intermediates(x)
        for i, head in enumerate(model.heads):
            sess = ort.InferenceSession(str(args.bundle / f"head_{i}.onnx"), opts, providers=["CPUExecutionProvider"])
            feed = {"features": inter[i].numpy()}
            if i:
                feed["prev_cam"] = model.heads[i - 1].forward_cam(inter[i - 1]).cam.numpy()
            (logits,) = sess.run(["logits"], feed)
            worst = max(worst, float(np.abs(logits - head(inter[i]).numpy()).max()))
        sess = ort.InferenceSession(str(args.bundle / "full.onnx"), opts, providers=["CPUExecutionProvider"])
        (full,) = sess.run(["logits"], {"input": x.numpy()})
        worst = max(worst, float(np.abs(full - model(x)[-1].numpy()).max()))
    if worst > 1e-4:
        raise SystemExit(f"rebuilt model differs from the ONNX files by {worst:.3g}")
    print(f"rebuilt model matches the bundle's ONNX files (max abs logit error {worst:.2g})")

    classes = list(manifest["classes"])
    folder, train_idx, val_idx = load_split(args.data, 0.1, 0, classes)
    inp = manifest["input"]
    payload = {
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": classes,
        "preprocess": {"channels": int(inp["shape"][0]), "resize": int(inp["resize"]), "crop": int(inp["crop"]),
                       "mean": list(inp["mean"]), "std": list(inp["std"])},
        "split": {"data": str(Path(args.data).resolve()), "seed": 0, "val_fraction": 0.1,
                  "num_train": len(train_idx), "num_val": len(val_idx), "limit": None,
                  "val_files_sha256": split_fingerprint(folder.root, [folder.paths[i] for i in val_idx])},
        "costs": {"segment_macs": manifest["costs"]["segment_macs"], "head_macs": manifest["costs"]["head_macs"]},
        "epoch": 30, "history": [], "policy": None,
        "versions": {"edgeexit": __version__, "torch": str(torch.__version__)},
        "recovered_from": str(args.bundle),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, payload)
    print(f"wrote {args.out} ({len(val_idx)} held-out images in its calibration split)")


if __name__ == "__main__":
    main()

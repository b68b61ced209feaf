"""Record a training run (recipe, time, per-exit validation accuracy per epoch) from its checkpoint.

    python benchmarks/record_training.py benchmarks/models/cifar10-resnet20.pt --name cifar10

Writes benchmarks/results/<name>/train.json and train.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

from edgeexit.checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--where", default="the machine was shared during part of the run",
                        help="Where and how the epochs ran (the record cannot tell).")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.ckpt)
    history = ckpt["history"]
    seconds = [h["seconds"] for h in history]
    cfg = ckpt["train_config"]
    record = {
        "machine": machine(), "checkpoint": str(args.ckpt), "train_config": cfg, "model": ckpt["config"],
        "costs": ckpt["costs"], "epochs": len(history), "seconds_total": sum(seconds),
        "seconds_per_epoch": {"min": min(seconds), "median": sorted(seconds)[len(seconds) // 2], "max": max(seconds)},
        "final_val_accuracy_per_exit": history[-1]["val_accuracy"], "history": history,
    }
    out = RESULTS / args.name
    write_json(out / "train.json", record)
    fractions = [c / ckpt["costs"]["reference_macs"] for c in ckpt["costs"]["cumulative_macs"]]
    md = [f"# Training record: {args.name}\n",
          f"{cfg['arch']} width {cfg['width']}, {len(history)} epochs, batch {cfg['batch_size']}, lr {cfg['lr']}, "
          f"distill {cfg['distill']}, schedule {cfg['schedule']}, augmentation {ckpt.get('augment') or cfg.get('augment', 'auto')}"
          f"{' + AugMix' if cfg.get('augmix') else ''}"
          f"{', from ' + cfg['init_weights'] if cfg.get('init_weights') else ''}; {sum(seconds) / 60:.0f} min of epochs "
          f"(per epoch {min(seconds):.0f}-{max(seconds):.0f} s; {args.where}).\n",
          markdown_table(["exit", "cost % of plain network", "final val acc %"],
                         [[i, f"{100 * f:.1f}", f"{a:.2f}"] for i, (f, a) in enumerate(zip(fractions, history[-1]["val_accuracy"]))])]
    (out / "train.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

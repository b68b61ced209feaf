"""Training: loss goes down on every exit, heads-only freezes the backbone, resume, corrupt files, DDP, CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeexit.checkpoint import CheckpointError, load_checkpoint, load_model
from edgeexit.data import decode_images, eval_batches, load_split, split_indices
from edgeexit.preprocess import Preprocess
from edgeexit.train import TrainConfig, exit_weights, train

from .conftest import write_folder


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(arch="resnet20", width=0.25, exits=[2, 5], input_size=24, epochs=2, batch_size=16, lr=0.05,
                val_fraction=0.25, seed=0)
    base.update(kw)
    return TrainConfig(data=str(data), out=str(out), **base)


def test_split_is_reproducible_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 50)
    a_train, a_val = split_indices(labels, 0.1, seed=3)
    b_train, b_val = split_indices(labels, 0.1, seed=3)
    assert np.array_equal(a_val, b_val) and np.array_equal(a_train, b_train)
    assert not set(a_train) & set(a_val) and len(a_train) + len(a_val) == 200
    assert np.bincount(labels[a_val]).tolist() == [5, 5, 5, 5]
    assert not np.array_equal(split_indices(labels, 0.1, seed=4)[1], a_val)


def test_sdn_schedule_ramps_internal_weights():
    fractions = [0.15, 0.5, 1.0]
    assert exit_weights(fractions, 0, 10, "sdn") == pytest.approx([0.01, 0.01, 1.0])
    assert exit_weights(fractions, 9, 10, "sdn") == pytest.approx([0.15, 0.5, 1.0])
    assert exit_weights(fractions, 0, 10, "constant") == pytest.approx([0.15, 0.5, 1.0])


@pytest.mark.slow
def test_short_cifar_run_lowers_every_exit_loss(cifar_root, tmp_path):
    cfg = _cfg(cifar_root / "train", tmp_path / "m.pt", input_size=32, limit=400, epochs=4, batch_size=32, lr=0.05,
               val_fraction=0.1, distill=0.3)
    folder, train_idx, _ = load_split(cfg.data, cfg.val_fraction, cfg.seed)
    from edgeexit.train import _subset

    idx = _subset(train_idx, folder.labels, cfg.limit, cfg.seed)
    torch.manual_seed(cfg.seed)
    ckpt = train(cfg, log=lambda _m: None, progress=False)
    model, _ = load_model(tmp_path / "m.pt")
    from edgeexit.models import build_model

    torch.manual_seed(cfg.seed)
    initial = build_model(ckpt["config"]).eval()  # same seed -> the weights training started from
    pre = Preprocess.from_dict(ckpt["preprocess"])
    images = decode_images([folder.paths[i] for i in idx], [folder.labels[i] for i in idx], pre, square=False)
    x = next(eval_batches(images.images, pre, len(images)))
    y = torch.from_numpy(images.labels)
    with torch.no_grad():
        before = [F.cross_entropy(z, y).item() for z in initial(x)]
        after = [F.cross_entropy(z, y).item() for z in model(x)]
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert len(ckpt["history"]) == 4 and len(ckpt["history"][-1]["val_accuracy"]) == model.num_exits


def test_heads_only_leaves_backbone_and_bn_stats_unchanged(tiny_folder, tiny_ckpt, tmp_path):
    start = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    backbone_file = tmp_path / "backbone.pt"
    # a plain backbone state dict, as a user's pretrained model would come
    from edgeexit.train import backbone_state_names

    model, _ = load_model(tiny_ckpt)
    names = backbone_state_names(model)
    torch.save({plain: start[name] for plain, name in names.items()}, backbone_file)
    out = tmp_path / "heads.pt"
    train(_cfg(tiny_folder, out, exits=[2, 4, 6], mode="heads", init_weights=str(backbone_file), epochs=2),
          log=lambda _m: None, progress=False)
    after = torch.load(out, weights_only=True)["state_dict"]
    seg_keys = [k for k in after if k.startswith("segments.")]
    assert any("running_mean" in k for k in seg_keys)
    for k in seg_keys:  # weights and BatchNorm running statistics alike
        assert torch.equal(after[k], start[k]), k
    assert any(not torch.equal(after[k], start[k]) for k in after if k.startswith("heads.0."))


def test_resume_continues_from_saved_epoch(tiny_folder, tmp_path, monkeypatch):
    full = train(_cfg(tiny_folder, tmp_path / "a.pt", epochs=2), log=lambda _m: None, progress=False)
    import edgeexit.train as train_module

    real_save = train_module.save_checkpoint

    def save_then_interrupt(path, payload):  # Ctrl-C right after the first epoch's checkpoint
        real_save(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_folder, tmp_path / "b.pt", epochs=2), log=lambda _m: None, progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 1
    logs: list[str] = []
    resumed = train(_cfg(tiny_folder, tmp_path / "b.pt", epochs=2, resume=True), log=logs.append, progress=False)
    assert any("resuming" in m and "after epoch 1" in m for m in logs)
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    for k, v in full["state_dict"].items():  # bit-identical to the uninterrupted run on CPU
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = write_folder(tmp_path / "data", per_class=8)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "square" / "empty.jpg").write_bytes(b"")
    logs: list[str] = []
    with pytest.warns(UserWarning) as record:
        ckpt = train(_cfg(data, tmp_path / "m.pt", epochs=2, val_fraction=0.2), log=logs.append, progress=False)
    # one warning for both files, not one per file or per epoch
    assert len(record) == 1 and "skipped 2 unreadable images" in str(record[0].message), [str(r.message) for r in record]
    assert any("2 unreadable images skipped" in m for m in logs), logs
    assert ckpt["split"]["skipped"] == 2


def test_cli_prints_unreadable_images_as_one_warning_line(tmp_path):
    data = write_folder(tmp_path / "data", per_class=6)
    (data / "circle" / "broken.png").write_bytes(b"not a png")
    r = _cli("train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--arch", "resnet20", "--width", "0.25",
             "--exits", "2", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeexit: warning: skipped 1 unreadable image: "), r.stderr
    assert "input: 32x32 px from the default for resnet20" in r.stdout


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an edgeexit checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeexit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_errors_are_one_line(tmp_path, tiny_folder):
    r = _cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nowhere" in r.stderr
    r = _cli("train", "--data", str(tiny_folder), "--out", str(tmp_path / "m.pt"), "--exits", "2,x")
    assert r.returncode == 2 and "--exits" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgeexit ")
    r = _cli("train", "--help")
    for option in ("--exit-fractions", "--mode", "--distill", "--init-weights", "--resume", "--seed", "--val-fraction"):
        assert option in r.stdout


@pytest.mark.slow
def test_distributed_training_with_gloo_two_processes(tiny_folder, tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "edgeexit.cli", "train", "--data", str(tiny_folder), "--out", str(out), "--arch", "resnet20",
           "--width", "0.25", "--exits", "2,5", "--epochs", "2", "--batch-size", "16", "--val-fraction", "0.25",
           "--device", "cpu", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 2
    # one epoch line per epoch: only rank 0 logs and writes
    assert r.stdout.count("epoch 2/2") == 1
    # both ranks saw a different half of each batch: steps = images // global batch
    assert ckpt["step"] == 2 * (ckpt["split"]["num_train"] // 16)


def test_large_inputs_train_on_cpu(tmp_path):
    """96x96 inputs (the canvas benchmark's size) train without crashing: see training_memory_format."""
    data = write_folder(tmp_path / "data", per_class=4, size=96)
    ckpt = train(_cfg(data, tmp_path / "m.pt", input_size=96, epochs=1, batch_size=8, val_fraction=0.25),
                 log=lambda _m: None, progress=False)
    assert ckpt["epoch"] == 1


def test_tiny_data_set_smaller_than_a_batch_trains(tmp_path):
    data = write_folder(tmp_path / "data", per_class=3)
    ckpt = train(_cfg(data, tmp_path / "m.pt", epochs=1, batch_size=128, val_fraction=0.34), log=lambda _m: None,
                 progress=False)
    assert ckpt["epoch"] == 1


def test_resume_refuses_a_changed_split_and_drops_calibration(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "m.pt"
    train(_cfg(data, out, epochs=1), log=lambda _m: None, progress=False)
    ckpt = load_checkpoint(out)
    assert len(ckpt["split"]["val_files_sha256"]) == 64
    from edgeexit.checkpoint import save_checkpoint

    ckpt["policy"] = {"gate": "max_prob"}  # pretend it was calibrated
    save_checkpoint(out, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    resumed = train(_cfg(data, out, epochs=2, resume=True), log=lambda _m: None, progress=False)
    assert resumed["policy"] is None  # new weights: the old thresholds no longer apply
    write_folder(tmp_path / "data", per_class=12, seed=5)  # more files: another split
    with pytest.raises(ValueError, match="held-out split"):
        train(_cfg(data, out, epochs=3, resume=True), log=lambda _m: None, progress=False)


def test_wrong_files_and_names_are_one_line_errors_before_any_work(tmp_path, tiny_folder):
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    for args in (("calibrate", str(png)), ("train", "--data", str(tiny_folder), "--out", str(tmp_path / "m.pt"),
                                           "--arch", "resnet18", "--init-weights", str(png))):
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.strip().endswith(f"{png}: it is a PNG image"), r.stderr
        assert "weights_only" not in r.stderr and r.stderr.count("\n") == 1
    torch.save({"a": np.zeros(1).dtype}, tmp_path / "object.pt")  # not tensors: refused by weights_only
    r = _cli("calibrate", str(tmp_path / "object.pt"))
    assert r.returncode == 2 and "weights_only" not in r.stderr and "Please use" not in r.stderr, r.stderr
    r = _cli("train", "--data", str(tmp_path / "not-read"), "--out", str(tmp_path / "m.pt"), "--arch", "resnet21")
    assert r.returncode == 2 and "unknown architecture 'resnet21'" in r.stderr  # before the folder is looked at


def test_cli_sets_a_passive_omp_wait_policy_unless_the_user_chose(monkeypatch):
    import edgeexit.cli as cli

    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if preset is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", preset)
        monkeypatch.setattr(sys, "argv", ["edgeexit", "--version"])
        with pytest.raises(SystemExit):
            cli.main()
        assert os.environ["OMP_WAIT_POLICY"] == expected


def test_usage_lines_and_help_read_as_usual(tmp_path):
    r = _cli("explain", "--help")
    assert "explain [OPTIONS] CKPT IMAGE..." in r.stdout and "{" not in r.stdout and "list[" not in r.stdout
    r = _cli("run", "--help")
    assert "run [OPTIONS] [BUNDLE] [SOURCE]" in r.stdout
    r = _cli("export", "--help", env={**os.environ, "COLUMNS": "200"})
    assert "[required when CKPT is a checkpoint]" in r.stdout


def test_augmix_training_runs_and_is_recorded(tmp_path):
    data = write_folder(tmp_path / "data", per_class=3)
    ckpt = train(_cfg(data, tmp_path / "m.pt", epochs=1, augmix=True), log=lambda _m: None, progress=False)
    assert ckpt["train_config"]["augmix"] is True and ckpt["epoch"] == 1
    assert all(np.isfinite(h["loss"]) for h in ckpt["history"])

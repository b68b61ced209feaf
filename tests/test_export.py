"""edgeexit export: head graph == numpy gates, ONNX Runtime == torch for every backbone, chained decisions, atomicity,
--force, the CLI, and the TensorRT builder driven through a fake ``tensorrt`` module."""

from __future__ import annotations

import math

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeexit.gates import SIGNAL_NAMES, exit_signals, softmax
from edgeexit.models import multi_exit
from edgeexit.policy import ExitPolicy
from edgeexit.runtime.bundle import MANIFEST, BundleError, load_bundle, sha256_file

from edgeexit.export import onnx_export
from edgeexit.export import tensorrt as trtx
from edgeexit.export.head_graph import SignalGraph
from edgeexit.export.stage_graph import class_cam
from edgeexit.export.onnx_export import ExportCheckError, ExportError, export_bundle

QUIET = dict(log=lambda _m: None)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one torch thread is faster than two contended ones (2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# -- the head graph mirrors edgeexit.gates -------------------------------------------------------------------------
GRIDS = [((4, 4), (8, 8)), ((8, 8), (4, 4)), ((3, 5), (7, 2)), ((1, 1), (4, 4)), ((4, 4), (1, 1)), ((1, 1), (1, 1)),
         ((6, 6), (6, 6)), ((4, 4), None), ((1, 1), None)]


def _edge_maps(rng, b, hw, prev_hw):
    cam = rng.normal(0.0, 2.0, (b, *hw)).astype(np.float32)
    cam[0] = 0.0  # all zero -> uniform
    cam[1] = -np.abs(cam[1]) - 0.1  # all negative -> uniform
    cam[2] = 0.0
    cam[2, -1, 0] = 3.0  # one-hot
    cam[3] = 7.0  # constant positive
    cam[4] *= 1e3  # large values
    cam[5] *= 1e-20  # tiny values
    prev = None
    if prev_hw is not None:
        prev = rng.normal(0.0, 2.0, (b, *prev_hw)).astype(np.float32)
        prev[0] = 0.0  # both uniform: SSIM 1
        prev[2] = 0.0
        prev[2, 0, -1] = 1.0  # one-hot elsewhere
        prev[3] = -1.0
        prev[6] = np.abs(prev[6])
    return cam, prev


@pytest.mark.parametrize("hw,prev_hw", GRIDS)
@pytest.mark.parametrize("num_classes", [1, 2, 10])
def test_signal_graph_equals_numpy(hw, prev_hw, num_classes):
    rng = np.random.default_rng(hash((hw, prev_hw, num_classes)) % 2**32)
    b = 12
    cam, prev = _edge_maps(rng, b, hw, prev_hw)
    logits = rng.normal(0.0, 3.0, (b, num_classes)).astype(np.float32)
    logits[7] = 0.0  # all equal
    logits[8, 0] = 500.0  # saturated softmax
    logits[9] *= 1e-6
    for temperature in (1.0, 0.4, 3.0):
        graph = SignalGraph(num_classes, hw, prev_hw, temperature)
        probs, signals = graph(torch.from_numpy(logits), torch.from_numpy(cam), None if prev is None else torch.from_numpy(prev))
        expected = exit_signals(logits, cam, prev, temperature)
        assert signals.shape == (b, len(SIGNAL_NAMES)) and signals.dtype == torch.float32
        np.testing.assert_allclose(signals.numpy(), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(probs.numpy(), softmax(logits, temperature), atol=1e-6, rtol=0)
        if prev is None:
            assert np.all(signals.numpy()[:, 5:] == 0.0)


def test_signal_graph_rejects_wrong_prev():
    with pytest.raises(ValueError):
        SignalGraph(3, (2, 2), (2, 2))(torch.zeros(1, 3), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError):
        SignalGraph(3, (2, 2), None)(torch.zeros(1, 3), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError):
        SignalGraph(3, (2, 2), None, temperature=0.0)


def test_head_graph_cam_is_forward_cam():
    torch.manual_seed(0)
    model = multi_exit("resnet20", 5, 16, width=0.25, exits=[2, 5]).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        outs = [h.forward_cam(f) for h, f in zip(model.heads, feats)]
        for i, (head, f) in enumerate(zip(model.heads, feats)):
            hw = tuple(outs[i].cam.shape[1:])
            prev = tuple(outs[i - 1].cam.shape[1:]) if i else None
            logits, cls, cam = class_cam(head, f, hw)
            probs, signals = SignalGraph(head.fc.out_features, hw, prev, 1.3)(logits, cam, outs[i - 1].cam if i else None)
            torch.testing.assert_close(logits, outs[i].logits)
            torch.testing.assert_close(cam, outs[i].cam, atol=1e-5, rtol=1e-5)
            assert torch.equal(cls, outs[i].logits.argmax(1))
            ref = exit_signals(logits.numpy(), cam.numpy(), outs[i - 1].cam.numpy() if i else None, 1.3)
            np.testing.assert_allclose(signals.numpy(), ref, atol=1e-5)


# -- every built-in backbone: ONNX Runtime == torch ------------------------------------------------------------------
BACKBONES = [("resnet20", 0.25, 16), ("resnet32", 0.25, 16), ("resnet56", 0.25, 16), ("resnet18", 0.125, 32),
             ("mobilenetv2", 0.25, 16)]


@pytest.mark.parametrize("arch,width,size", BACKBONES)
def test_every_backbone_exports_with_parity(arch, width, size, tmp_path):
    torch.manual_seed(0)
    model = multi_exit(arch, 4, size, width=width, exit_fractions=[0.3, 0.7])
    model.to(memory_format=torch.channels_last)  # as training leaves it: the export must not care
    out = export_bundle(model, tmp_path / "b", samples=6, **QUIET)
    bundle = load_bundle(out)
    e = model.num_exits
    assert bundle.num_exits == e == 3
    pipe = bundle.pipeline()
    assert bundle.checks["inputs"] == "random" and pipe.checks["decisions"]["batch1"]["compared"] == 6
    assert all(v <= 1e-4 for v in pipe.checks["max_abs_error"].values()), pipe.checks["max_abs_error"]
    for f in bundle.files():  # opset, dynamic batch axis on every tensor
        proto = onnx.load(str(f.path))
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert all(t.shape[0] == "batch" for t in (*f.inputs, *f.outputs))
    # independent check, batch size 3 (not the export's example batch)
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = torch.randn(3, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        outs = [h.forward_cam(f) for h, f in zip(model.heads, feats)]
    for j, stage in enumerate(pipe.stages):
        a, k = stage.segments
        feed = {stage.input_names[0]: (x if a == 0 else feats[a - 1]).numpy()}
        got = dict(zip(stage.output_names, _session(stage.path).run(None, feed)))
        np.testing.assert_allclose(got["features"], feats[k].numpy(), atol=1e-4 * max(1.0, float(feats[k].abs().max())))
        np.testing.assert_array_equal(got["class"], outs[k].logits.argmax(1).numpy())
        np.testing.assert_allclose(got["confidence"], softmax(outs[k].logits.numpy()).max(1), atol=1e-4)
        if "signals" in got:
            ref = exit_signals(outs[k].logits.numpy(), outs[k].cam.numpy(), outs[k - 1].cam.numpy() if k else None)
            np.testing.assert_allclose(got["signals"][:, 0], ref[:, SIGNAL_NAMES.index("max_prob")], atol=1e-4)
        (cam,) = _session(pipe.cam(k).path).run(["cam"], {"features": feats[k].numpy()})
        np.testing.assert_allclose(cam, outs[k].cam.numpy(), atol=1e-4)
    (full,) = _session(bundle.monolithic.path).run(["logits"], {"input": x.numpy()})
    np.testing.assert_allclose(full, outs[-1].logits.numpy(), atol=1e-4)


def test_stage_graph_computes_only_the_gates_signals(tmp_path):
    """A margin stage is a few nodes on top of its segments; an all-signals (learned) stage carries ~200 more."""
    from edgeexit.export.stage_graph import StageGraph

    torch.manual_seed(0)
    model = multi_exit("resnet20", 3, 16, width=0.25, exits=[2, 5]).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        f0 = model.segments[0](x)
        cam0 = model.heads[0].forward_cam(f0).cam
        f1 = model.segments[1](f0)
        out1 = model.heads[1].forward_cam(f1)
    hw0, hw1 = tuple(cam0.shape[1:]), tuple(out1.cam.shape[1:])
    counts = {}
    for names, prev in ((("margin",), None), (SIGNAL_NAMES, hw0)):
        graph = StageGraph([model.segments[1]], model.heads[1], cam_hw=hw1, temperature=1.3, signals=names,
                           prev_hw=prev).eval()
        args = (f0,) + ((cam0,) if prev else ())
        path = tmp_path / f"s{len(names)}.onnx"
        ins = ["features_in"] + (["prev_cam"] if prev else [])
        onnx_export._export_onnx(graph, args, path, ins, ["features", "class", "confidence", "signals"], 17)
        counts[len(names)] = len(onnx.load(str(path)).graph.node)
        got = _session(path).run(None, {n: a.numpy() for n, a in zip(ins, args)})
        ref = exit_signals(out1.logits.numpy(), out1.cam.numpy(), cam0.numpy() if prev else None, 1.3)
        cols = [SIGNAL_NAMES.index(n) for n in names]
        np.testing.assert_allclose(got[3], ref[:, cols], atol=1e-5)
    assert counts[7] - counts[1] > 100, counts


# -- chained decisions ------------------------------------------------------------------------------------------------
def test_chained_decisions_equal_torch(tiny_ckpt, tmp_path):
    """A policy keeping exits 1 and 2 (coherence gate: exit 2 compares with exit 1, the previous *kept* exit), with
    baked temperatures: the runtime at batch 1 and batch 32 takes the same exits and classes as the torch model."""
    from edgeexit.checkpoint import load_model
    from edgeexit.export.onnx_export import validation_inputs
    from edgeexit.preprocess import Preprocess
    from edgeexit.runtime.backends import open_backend
    from edgeexit.runtime.chain import StageRunner

    model, ckpt = load_model(tiny_ckpt)
    x, source = validation_inputs(ckpt, Preprocess.from_dict(ckpt["preprocess"]), ckpt["classes"], 64, lambda _m: None)
    assert source == "validation"
    x = np.ascontiguousarray(np.concatenate([x, np.flip(x, 3)]))  # more samples: mirrored images
    temps = [1.5, 0.7, 1.2, 1.0]
    with torch.no_grad():
        outs = model.forward_exits(torch.from_numpy(x))
    logits = [o.logits.numpy() for o in outs]
    cams = [o.cam.numpy() for o in outs]
    sig = np.zeros((len(x), 4, len(SIGNAL_NAMES)), np.float32)
    sig[:, 1] = exit_signals(logits[1], cams[1], None, temps[1])
    sig[:, 2] = exit_signals(logits[2], cams[2], cams[1], temps[2])
    sig[:, 3] = exit_signals(logits[3], cams[3], cams[2], temps[3])
    classes = np.stack([lg.argmax(1) for lg in logits], 1)
    gate = SIGNAL_NAMES.index("coh_cosine")
    policy = ExitPolicy("coh_cosine", [math.inf, 1.1, float(np.median(sig[:, 2, gate]))], [1.0, 1.0, 1.0], temps,
                        exits=[1, 2])  # exit 1 has no previous kept exit: coherence 0, never passes 1.1
    expected = policy.decide(sig, classes)
    assert len(set(expected.tolist())) >= 2  # the policy really splits the samples

    out = export_bundle(tiny_ckpt, tmp_path / "b", policy=policy, samples=16, **QUIET)
    bundle = load_bundle(out)
    pipe = bundle.pipeline()
    assert [s.temperature for s in pipe.stages] == temps[1:] and pipe.kept == (1, 2, 3)
    assert pipe.stages[1].has_input("prev_cam") and pipe.stages[0].has_output("cam")
    assert not pipe.stages[0].has_input("prev_cam") and not pipe.stages[2].has_input("prev_cam")
    runner = StageRunner(bundle, open_backend(bundle, "onnxruntime", providers="cpu"))
    score = sig[:, 2, gate]
    far = np.abs(score - policy.thresholds[2]) > 1e-4
    for got in ([runner.run_one(f) for f in x], runner.run_batch(x, batch_size=32)):
        exits = np.asarray([d.exit for d in got])
        cls = np.asarray([d.class_id for d in got])
        np.testing.assert_array_equal(exits[far], expected[far])
        np.testing.assert_array_equal(cls[far], classes[np.arange(len(x)), expected][far])
    assert (~far).sum() <= 2


# -- atomicity and --force --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return multi_exit("resnet20", 3, 16, width=0.25, exits=[4])


def _interrupt_after(monkeypatch, target, name, n):
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


@pytest.mark.parametrize("where", ["onnx_files", "checks", "manifest"])
def test_interrupted_export_leaves_nothing(small_model, tmp_path, monkeypatch, where):
    if where == "onnx_files":
        calls = _interrupt_after(monkeypatch, onnx_export, "_export_onnx", 3)
    elif where == "checks":
        calls = _interrupt_after(monkeypatch, onnx_export, "check_pipeline_parity", 0)
    else:
        calls = _interrupt_after(monkeypatch, onnx_export, "write_manifest", 0)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(small_model, tmp_path / "b", samples=4, **QUIET)
    assert calls["n"] >= 1
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "b")


def test_force_semantics(small_model, tmp_path, monkeypatch):
    out = tmp_path / "b"
    first = ExitPolicy.default(2, threshold=0.5)
    export_bundle(small_model, out, policy=first, check=False, **QUIET)
    assert load_bundle(out).checks is None
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(small_model, out, policy=ExitPolicy.default(2, threshold=0.8), check=False, **QUIET)
    assert load_bundle(out).policy.thresholds == [0.5]
    # a replacement interrupted before it is complete leaves the old bundle in place
    _interrupt_after(monkeypatch, onnx_export, "_export_onnx", 2)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(small_model, out, force=True, policy=ExitPolicy.default(2, threshold=0.8), check=False, **QUIET)
    monkeypatch.undo()
    assert load_bundle(out).policy.thresholds == [0.5]
    assert _leftovers(tmp_path, "b") == []
    # replaced once the new one is complete (interrupted in the very last step, removing the old bundle)
    _interrupt_after(monkeypatch, onnx_export.shutil, "rmtree", 0)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(small_model, out, force=True, policy=ExitPolicy.default(2, threshold=0.7), check=False, **QUIET)
    monkeypatch.undo()
    assert load_bundle(out).policy.thresholds == [0.7]
    # --force never deletes something that is not a bundle
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(small_model, other, force=True, check=False, **QUIET)
    assert (other / "cat.jpg").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_bundle(small_model, tmp_path / "file", force=True, check=False, **QUIET)


def test_failed_check_names_file_and_tensor(small_model, tmp_path, monkeypatch):
    from edgeexit.export.stage_graph import StageGraph

    class Broken(StageGraph):
        def forward(self, x, prev_cam=None):
            out = list(super().forward(x, prev_cam))
            if self.signal_names:
                out[3] = out[3] + 1e-3
            return tuple(out)

    monkeypatch.setattr(onnx_export, "StageGraph", Broken)
    with pytest.raises(ExportCheckError) as info:
        export_bundle(small_model, tmp_path / "b", samples=4, **QUIET)
    message = str(info.value)
    assert "max_prob.stage_0.onnx" in message and "'signals'" in message and "0.001" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_uncalibrated_warning_and_bad_arguments(small_model, tmp_path):
    lines = []
    export_bundle(small_model, tmp_path / "b", check=False, log=lines.append)
    assert any(line.startswith("not calibrated: ") for line in lines)
    with pytest.raises(ExportError, match="opset"):
        export_bundle(small_model, tmp_path / "c", opset=13, **QUIET)
    with pytest.raises(ExportError, match="exits"):
        export_bundle(small_model, tmp_path / "c", policy=ExitPolicy.default(5), **QUIET)
    with pytest.raises(ExportError, match="class names"):
        export_bundle(small_model, tmp_path / "c", classes=["a"], **QUIET)
    assert not (tmp_path / "c").exists()


# -- CLI ------------------------------------------------------------------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    result = CliRunner().invoke(app, ["export", *map(str, args)])
    try:
        stderr = result.stderr or ""
    except ValueError:  # older click: stderr mixed into output
        stderr = ""
    return result, result.output if stderr in result.output else result.output + stderr


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    result, text = _cli(tmp_path / "missing.pt", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in text.splitlines() if line.startswith("edgeexit: error:")]
    assert len(errors) == 1 and "missing.pt" in errors[0]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result, text = _cli(tmp_path / "junk.pt", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "Traceback" not in text and "junk.pt" in text
    result, text = _cli(tmp_path / "junk.pt")
    assert result.exit_code == 2 and "--out" in text
    result, text = _cli(tmp_path / "junk.pt", "--out", tmp_path / "b", "--fp16")
    assert result.exit_code == 2 and "--tensorrt" in text
    assert not (tmp_path / "b").exists()


def test_cli_export_and_bundle_paths(tiny_ckpt, tiny_bundle, tmp_path):
    ok, _ = trtx.tensorrt_available()
    out = tmp_path / "b"
    result, text = _cli(tiny_ckpt, "--out", out, "--samples", 4, "--tensorrt")
    assert result.exit_code == 0, text
    assert "max_prob.stage_0.onnx" in text and "full.onnx" in text and text.count("parity of the") == 1
    if not ok:
        assert "warning: no TensorRT engines built: TensorRT is not installed" in text
    load_bundle(out)
    result, text = _cli(tiny_ckpt, "--out", out, "--no-check")
    assert result.exit_code == 2 and "--force" in text
    result, text = _cli(tiny_bundle)  # a bundle without --tensorrt
    assert result.exit_code == 2 and "--tensorrt" in text
    if not ok:
        result, text = _cli(tiny_bundle, "--tensorrt")
        assert result.exit_code == 2 and "TensorRT is not installed" in text and "Traceback" not in text


def test_validation_inputs_fall_back_to_random(tmp_path):
    from edgeexit.export.onnx_export import validation_inputs
    from edgeexit.preprocess import Preprocess

    lines = []
    ckpt = {"split": {"data": str(tmp_path / "gone"), "seed": 0, "val_fraction": 0.2}}
    x, source = validation_inputs(ckpt, Preprocess(3, 16, 16), ["a", "b"], 5, lines.append)
    assert source == "random" and x.shape == (5, 3, 16, 16) and x.dtype == np.float32
    assert len(lines) == 1 and "random" in lines[0]

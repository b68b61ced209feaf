"""The body of ``edgeexit export`` (the typer command in cli.py only parses options and maps errors to one line).

Two paths:
- CKPT is a checkpoint: export the ONNX bundle (torch), then with ``--tensorrt`` build engines when TensorRT is
  here (otherwise one warning line: the ONNX bundle is written, engines are built later on the device);
- CKPT is a bundle directory (has manifest.json) and ``--tensorrt``: rebuild its engines from its ONNX files
  (torch-free; this is what runs on a Jetson).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..runtime.bundle import Bundle, is_bundle_dir, load_bundle
from ..runtime.guards import SigtermAsInterrupt
from ..runtime.tensorrt_build import TensorRTMissing, build_bundle_engines, tensorrt_available

__all__ = ["export_command"]


def export_command(
    ckpt: Path,
    out: Optional[Path],
    *,
    force: bool = False,
    opset: int = 17,
    samples: int = 64,
    check: bool = True,
    tensorrt: bool = False,
    fp16: bool = False,
    int8: bool = False,
    calib_images: int = 256,
    calib_data: Optional[Path] = None,
    max_batch: int = 32,
    gates: Optional[list] = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> Bundle:
    """Run the export; raises ValueError subclasses (CheckpointError, BundleError, ExportError), OSError,
    TensorRTError with one-line messages. SIGTERM acts as Ctrl-C does: the temporary directory is removed."""
    with SigtermAsInterrupt():
        return _export(ckpt, out, force=force, opset=opset, samples=samples, check=check, tensorrt=tensorrt,
                       fp16=fp16, int8=int8, calib_images=calib_images, calib_data=calib_data, max_batch=max_batch,
                       gates=gates, echo=echo, warn=warn)


def _export(
    ckpt: Path,
    out: Optional[Path],
    *,
    force: bool,
    opset: int,
    samples: int,
    check: bool,
    tensorrt: bool,
    fp16: bool,
    int8: bool,
    calib_images: int,
    calib_data: Optional[Path],
    gates: Optional[list] = None,
    max_batch: int,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> Bundle:
    if (fp16 or int8) and not tensorrt:
        raise ValueError("--fp16 / --int8 set the precision of TensorRT engines: add --tensorrt")
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    ckpt = Path(ckpt)
    calibration = calib_data
    check_images = None
    if is_bundle_dir(ckpt):
        if not tensorrt:
            raise ValueError(f"{ckpt} is a bundle directory: pass --tensorrt to build its TensorRT engines, "
                             "or give a checkpoint to export")
        if out is not None and Path(out).resolve() != ckpt.resolve():
            raise ValueError("--out does not apply when building engines for an existing bundle (they go beside its files)")
        bundle_dir = ckpt
        load_bundle(bundle_dir)  # a broken bundle fails before TensorRT is looked for
        ok, reason = tensorrt_available()
        if not ok:
            raise TensorRTMissing(reason)
    else:
        if ckpt.is_dir():
            raise ValueError(f"{ckpt} is a directory without manifest.json: neither a checkpoint nor a bundle")
        if out is None:
            raise ValueError("--out DIR is required: the bundle directory to write")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ValueError("exporting a checkpoint needs torch (pip install 'edgeexit[train]'); "
                             "on the device, build engines from an exported bundle: edgeexit export --tensorrt BUNDLE") from None
        from .onnx_export import export_bundle, validation_inputs

        bundle_dir = export_bundle(ckpt, out, force=force, opset=opset, samples=samples, check=check, gates=gates,
                                   log=echo)
        if tensorrt and int8 and calibration is None:
            from ..checkpoint import load_checkpoint
            from ..preprocess import Preprocess

            data = load_checkpoint(ckpt)
            pre = Preprocess.from_dict(data["preprocess"])
            images, source = validation_inputs(data, pre, data["classes"], calib_images, echo)
            if source != "validation":
                raise ValueError(f"INT8 needs calibration images: the data of {ckpt} is not at hand; pass --calib-data DIR "
                                 f"(the ONNX bundle is written: {bundle_dir})")
            calibration = images
        if tensorrt:
            ok, reason = tensorrt_available()
            if not ok:
                warn(f"no TensorRT engines built: {reason}")
                tensorrt = False
            else:  # the engines are checked against their ONNX graphs on held-out images, as the export was
                from ..checkpoint import load_checkpoint
                from ..preprocess import Preprocess

                data = load_checkpoint(ckpt)
                held_out, source = validation_inputs(data, Preprocess.from_dict(data["preprocess"]), data["classes"],
                                                     samples, echo)
                check_images = held_out if source == "validation" else None
    if tensorrt:
        build_bundle_engines(bundle_dir, fp16=fp16, int8=int8, calibration_images=calibration, calib_count=calib_images,
                             max_batch=max_batch, check_images=check_images, log=echo)
    return load_bundle(bundle_dir, verify=False)

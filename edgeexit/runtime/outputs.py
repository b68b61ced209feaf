"""Outputs of ``edgeexit run``: one JSON line per frame, and annotated frames (label, exit, CAM overlay).

- :class:`JsonlWriter`: stdout or a file; every line is written whole and flushed at once, so an interrupted run
  keeps every line already written.
- :class:`FrameSaver`: PNG files for image sources, one video (``cv2.VideoWriter``: .mp4, else .avi) for video and
  live sources. Each frame, at the source's resolution, shows the predicted label, its confidence and the exit
  index, with the CAM of the deciding exit over the centre crop the model saw: jet colours whose opacity follows
  the map (the object stays visible where the model does not look) and an outline of the map's upper half.

Only numpy and pillow are needed for PNGs; OpenCV is imported for videos only.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, TextIO, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "JsonlWriter",
    "FrameSaver",
    "frame_record",
    "jet",
    "annotate",
    "crop_box",
]



def _num(value: Any, digits: int = 6) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def printable_name(name: Any) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by os.fsdecode as surrogates) become
    ``\\xNN`` escapes instead of making the JSON line unwritable."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace") if isinstance(name, (str, bytes)) else str(name)


def frame_record(frame: Any, decision: Any, classes: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    """The JSON record of one frame: frame index, file name or source time, prediction, exit, gate score,
    latency, true label when known, and the failure reason (null when it did not fail)."""
    rec: Dict[str, Any] = {"frame": int(frame.index)}
    if frame.source_time is not None:
        rec["time"] = _num(frame.source_time, 4)
    rec["name"] = printable_name(frame.name)
    failed = bool(decision.failed)
    rec["class_id"] = None if failed else int(decision.class_id)
    rec["label"] = None if failed else decision.label
    rec["confidence"] = None if failed else _num(decision.confidence)
    rec["exit"] = int(decision.exit)
    rec["gate_score"] = None if failed else _num(decision.gate_score)
    rec["latency_ms"] = _num(decision.latency_ms, 4)
    rec["macs"] = int(decision.macs)
    if frame.label is not None:
        rec["true_id"] = int(frame.label)
        if classes is not None and 0 <= int(frame.label) < len(classes):
            rec["true_label"] = classes[int(frame.label)]
        rec["correct"] = (not failed) and int(decision.class_id) == int(frame.label)
    rec["failed"] = decision.failed if failed else None
    return rec


class JsonlWriter:
    """JSON lines to stdout (``path`` None or "-") or appended to ``path``.

    A file is locked (``flock``, exclusive) for the whole run, so a second run naming the same file fails with a
    one-line error instead of interleaving torn lines. Before the first line is appended the file's content is
    checked under that lock: it must be empty or JSON lines (a file of anything else is refused: ValueError, the
    file untouched); a last line without its newline (a killed writer) gets one, so every new line is whole."""

    def __init__(self, path: Union[None, str, Path] = None, stream: Optional[TextIO] = None):
        self.path = None if path in (None, "-") else Path(path)  # type: ignore[arg-type]
        self.lines = 0
        if self.path is not None:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: TextIO = _open_locked_jsonl(self.path)
            self._own = True
        else:
            self._fh = stream if stream is not None else sys.stdout
            self._own = False

    @property
    def to_stdout(self) -> bool:
        return self.path is None

    def write(self, record: Dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n"
        self._fh.write(line)  # one call: the line is in the buffer whole, or not at all
        self._fh.flush()
        self.lines += 1

    def close(self) -> None:
        fh, self._fh = self._fh, None  # type: ignore[assignment]
        if fh is None:
            return
        try:
            fh.flush()
            if self._own:
                try:
                    os.fsync(fh.fileno())
                except (OSError, ValueError, io.UnsupportedOperation):
                    pass
                fh.close()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_locked_jsonl(path: Path) -> TextIO:
    """Open ``path`` for appending (created if missing, never truncated), locked, after the content check."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        _lock(fd, path)
        size = os.fstat(fd).st_size
        if size:
            head = os.pread(fd, 64, 0).lstrip()
            if head and not head.startswith(b"{"):
                raise ValueError(f"--out {path} exists and is not a JSON lines file: refusing to write into it "
                                 "(choose a new file, or an earlier --out to append to)")
            if os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
        return io.open(fd, "w", encoding="utf-8", buffering=1, closefd=True)
    except BaseException:
        os.close(fd)
        raise


def _lock(fd: int, path: Path) -> None:
    """An exclusive, non-blocking lock of the whole file (released when the file is closed)."""
    try:
        import fcntl  # noqa: PLC0415 (POSIX only)
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"--out {path} is being written by another process (another edgeexit run?): "
                         "choose another file") from None
    except OSError:  # a file system without locks (some network mounts): write unlocked
        pass


# --------------------------------------------------------------------------------------------------------------
# drawing


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map: values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)). Blue (0) -> red (1)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def crop_box(height: int, width: int, resize: int, crop: int) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) in the original frame of the centre crop the preprocessing takes
    (shorter side resized to ``resize``, then a ``crop`` x ``crop`` centre crop)."""
    scale = resize / min(height, width)
    new_h, new_w = max(crop, round(height * scale)), max(crop, round(width * scale))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    sy, sx = height / new_h, width / new_w
    return (int(round(top * sy)), int(round(left * sx)), int(round((top + crop) * sy)), int(round((left + crop) * sx)))


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1
        return ImageFont.load_default()


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` (bool HxW) within ``width`` pixels of its border (4-neighbour erosion, numpy only)."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        inner = shrunk
    return mask & ~inner


def annotate(
    image: np.ndarray,
    decision: Any,
    resize: Optional[int] = None,
    crop: Optional[int] = None,
    alpha: float = 0.6,
) -> np.ndarray:
    """An annotated copy (uint8 RGB, the frame's own size) of a frame: the CAM m (scaled to [0, 1]) of the deciding
    exit over the centre crop (``resize``/``crop`` from the bundle's preprocessing; the whole frame when omitted),
    blended per pixel with opacity ``alpha * m`` and outlined where m >= 0.5, and a see-through text bar with the
    label, the confidence and the exit index (or the failure)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)
    h, w = img.shape[:2]
    if resize and crop:
        top, left, bottom, right = crop_box(h, w, resize, crop)
    else:
        top, left, bottom, right = 0, 0, h, w
    out = img.astype(np.float32)
    line = max(1, min(h, w) // 200)
    cam = getattr(decision, "cam", None)
    if cam is not None and not decision.failed and bottom > top and right > left:
        m = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        m = np.maximum(m, 0.0)
        peak = float(m.max()) if m.size else 0.0
        m = m / peak if peak > 0 else m
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize((right - left, bottom - top), Image.BILINEAR))
        weight = (alpha * np.clip(resized, 0.0, 1.0))[:, :, None]
        region = out[top:bottom, left:right]
        region[...] = (1.0 - weight) * region + weight * jet(resized).astype(np.float32)
        region[outline(resized >= 0.5, line)] = (255.0, 255.0, 255.0)
    pil = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if (top, left, bottom, right) != (0, 0, pil.height, pil.width):
        draw.rectangle([left, top, right - 1, bottom - 1], outline=(255, 255, 255), width=line)
    if decision.failed:
        text = f"FAILED: {decision.failed or ''}"[:80]
    else:
        text = f"{decision.label} {100 * float(decision.confidence):.0f}%  exit {decision.exit}"
    size = max(8, min(pil.height, pil.width) // 20)
    bar = int(size * 1.6)
    shaded = np.asarray(pil).copy()
    shaded[:bar] = shaded[:bar] // 2  # darkened, not blacked out: the frame stays visible under the text
    pil = Image.fromarray(shaded)
    ImageDraw.Draw(pil).text((size // 3, (bar - size) // 2), text, fill=(255, 255, 255), font=_font(size))
    return np.asarray(pil)


# --------------------------------------------------------------------------------------------------------------
# saving


def _safe_relative(name: str) -> Path:
    parts = [p for p in Path(str(name).replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    return Path(*parts) if parts else Path("frame")


def new_path(path: Path) -> Path:
    """``path`` if nothing is there, else the first free ``stem-1.ext``, ``stem-2.ext`` ... (never overwrite)."""
    candidate, n = Path(path), 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _save_new_png(picture: np.ndarray, path: Path) -> Path:
    """Write a PNG to a file that did not exist (exclusive create; ``new_path`` naming when taken)."""
    while True:
        path = new_path(path)
        try:
            with open(path, "xb") as fh:
                Image.fromarray(picture).save(fh, format="PNG")
            return path
        except FileExistsError:  # taken between the check and the create: next name
            continue


class FrameSaver:
    """Annotated frames under ``directory``: PNGs (image and folder sources, named after the input file) or one
    video (other sources: ``<video stem>.mp4`` or ``<kind>.mp4``; .avi with MJPG when no mp4 encoder is there).
    Only new files are written: a name already taken gets ``-1``, ``-2`` ... before its extension."""

    def __init__(self, directory: Union[str, Path], source: Any, preprocess: Any = None, warn: Any = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.as_video = getattr(source, "kind", "image") not in ("image", "folder")
        self.fps = float(getattr(source, "fps", None) or 25.0)
        stem = Path(getattr(source, "path", "") or "").stem if getattr(source, "kind", "") == "video" else ""
        self.video_stem = stem or getattr(source, "kind", "video")
        self.resize = getattr(preprocess, "resize", None)
        self.crop = getattr(preprocess, "crop", None)
        self._warn = warn or (lambda m: print(m, file=sys.stderr))
        self._writer: Any = None
        self._tried = False
        self._size: Optional[Tuple[int, int]] = None
        self.video_path: Optional[Path] = None
        self.saved = 0

    def save(self, frame: Any, decision: Any) -> None:
        picture = annotate(frame.image, decision, self.resize, self.crop)
        if not self.as_video:
            path = self.directory / _safe_relative(frame.name).with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_new_png(picture, path)
            self.saved += 1
            return
        if self._writer is None and not self._tried:
            self._tried = True
            self._open(picture.shape[1], picture.shape[0])
        if self._writer is None:  # no encoder: fall back to PNGs
            _save_new_png(picture, self.directory / f"{self.video_stem}_{int(frame.index):06d}.png")
            self.saved += 1
            return
        if (picture.shape[1], picture.shape[0]) != self._size:
            picture = np.asarray(Image.fromarray(picture).resize(self._size, Image.BILINEAR))
        self._writer.write(np.ascontiguousarray(picture[:, :, ::-1]))  # OpenCV wants BGR
        self.saved += 1

    def _open(self, width: int, height: int) -> None:
        try:
            import cv2  # noqa: PLC0415
        except ImportError:
            self._warn("edgeexit: warning: OpenCV is missing: saving annotated frames as PNG instead of a video")
            return
        for suffix, codec in ((".mp4", "mp4v"), (".avi", "MJPG")):
            path = new_path(self.directory / f"{self.video_stem}{suffix}")
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), self.fps, (width, height))
            if writer.isOpened():
                self._writer, self._size, self.video_path = writer, (width, height), path
                return
            writer.release()
            path.unlink(missing_ok=True)
        self._warn(f"edgeexit: warning: no video encoder for {self.directory}: saving annotated frames as PNG")

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()

    def __enter__(self) -> "FrameSaver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Input sources for the on-device runtime: one URI, as jetson-inference takes it (torch-free).

``open_source(uri)`` accepts

==========================================  ===========================================================
``photo.jpg``                               one image file
``images/``                                 a folder of images, recursive; ``images/<class>/...`` gives labels
``clip.mp4`` (.avi .mkv .mov .webm ...)     a video file (OpenCV)
``0``, ``/dev/video0``, ``v4l2:///dev/video0``  a V4L2 camera (USB webcam) (OpenCV, CAP_V4L2)
``csi://0``                                 a Jetson CSI camera (OpenCV + GStreamer ``nvarguscamerasrc``)
``rtsp://host:port/path``                   a network stream (OpenCV, GStreamer when built in, else FFMPEG)
==========================================  ===========================================================

and returns a :class:`Source`: an iterable of :class:`Frame` (uint8 HxWx3 **RGB**). Capture runs in a daemon
thread feeding a bounded queue. Live sources (camera, csi, rtsp) drop the *oldest* queued frame when inference
falls behind (counted in ``Source.dropped``), so the runtime always works on recent frames; files, folders and
videos never drop: the capture thread waits for the consumer.

OpenCV (``cv2``) is imported only for video, camera and stream inputs. The capture backend is injectable
(``capture_factory``), so the live-source logic is testable without hardware.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..imageio import IMAGE_EXTENSIONS, is_image_file, load_image
from ..errors import EdgeexitError, one_line

__all__ = [
    "Frame",
    "Source",
    "SourceError",
    "Capture",
    "CaptureFactory",
    "open_source",
    "opencv_capture",
    "csi_pipeline",
    "rtsp_pipeline",
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "OPENCV_MISSING",
]

VIDEO_EXTENSIONS = (
    ".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts",
    ".m2ts", ".3gp", ".ogv", ".mjpeg", ".mjpg", ".h264", ".264", ".h265", ".265", ".hevc",
)

OPENCV_MISSING = (
    "video and camera sources need OpenCV: pip install 'edgeexit[video]' "
    "(on Jetson use JetPack's python3-opencv)"
)

# OpenCV property ids (stable enum values), so fake captures work without cv2.
CAP_PROP_POS_MSEC = 0
CAP_PROP_FRAME_WIDTH = 3
CAP_PROP_FRAME_HEIGHT = 4
CAP_PROP_FPS = 5
CAP_PROP_FRAME_COUNT = 7
CAP_PROP_BUFFERSIZE = 38

CSI_DEFAULTS = (1280, 720, 30.0)  # width, height, fps
OPEN_TIMEOUT_MS = 10_000  # streams: OpenCV's open and read timeouts
_OPEN_WAIT_S = 15.0  # the safety net around an open that ignores them
_MAX_DECODE_FAILURES = 25  # consecutive undecodable video frames that mean "the end" when the count is unknown
_JOIN_TIMEOUT_S = 2.0
_POLL_S = 0.1


class SourceError(EdgeexitError):
    """An input that cannot be opened or read; the message is one line and names the URI or path."""


@dataclass
class Frame:
    """One input frame.

    ``index``: 0-based position in source order (for live sources the capture count, so dropped frames leave
    gaps; it keeps increasing across ``loop`` passes). ``image``: uint8 HxWx3 RGB, or None when ``error`` is set
    (an unreadable file: the runtime counts it as skipped). ``name``: the file name (relative to the folder for
    folders) or ``"frame N"`` for video and live sources. ``source_time``: seconds, the position in the video
    (of the current pass when looping) or the wall time since capture started for live sources; None for images.
    ``label``: the class index from class sub-folders (None when unknown).
    """

    index: int
    image: Optional[np.ndarray]
    name: str
    source_time: Optional[float] = None
    label: Optional[int] = None
    error: Optional[str] = None


class Capture(Protocol):
    """The subset of ``cv2.VideoCapture`` the sources use (``set`` is optional)."""

    def isOpened(self) -> bool: ...  # noqa: N802 (OpenCV naming)

    def read(self) -> Tuple[bool, Optional[np.ndarray]]: ...

    def release(self) -> None: ...

    def get(self, prop_id: int) -> float: ...


# capture_factory(target, backend) -> Capture. target: a camera index (int), a device path, a file path, a
# GStreamer pipeline or a URL; backend: "any", "v4l2", "gstreamer" or "ffmpeg".
CaptureFactory = Callable[[Union[int, str], str], Capture]


# --------------------------------------------------------------------------------------------------------------
# OpenCV helpers


def quiet_native_logs() -> None:
    """Silence OpenCV's and FFmpeg's own stderr lines ("moov atom not found", "[ WARN:0@0.1] ...") before cv2 is
    first used: edgeexit reports every failure in its own one line. Settings the user made stay."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET, read when the FFmpeg backend starts
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        except Exception:  # noqa: BLE001 (older builds)
            pass


def _import_cv2() -> Any:
    quiet_native_logs()
    try:
        import cv2  # noqa: PLC0415 (lazy on purpose)
    except ImportError:
        raise SourceError(OPENCV_MISSING) from None
    return cv2


def opencv_capture(target: Union[int, str], backend: str = "any") -> Capture:
    """The default capture factory: ``cv2.VideoCapture(target, api)``."""
    cv2 = _import_cv2()
    apis = {
        "any": cv2.CAP_ANY,
        "v4l2": getattr(cv2, "CAP_V4L2", cv2.CAP_ANY),
        "gstreamer": getattr(cv2, "CAP_GSTREAMER", cv2.CAP_ANY),
        "ffmpeg": getattr(cv2, "CAP_FFMPEG", cv2.CAP_ANY),
    }
    if backend not in apis:
        raise ValueError(f"unknown capture backend {backend!r}; expected one of {', '.join(apis)}")
    timeouts = [getattr(cv2, name, None) for name in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC")]
    if isinstance(target, str) and "://" in target and None not in timeouts:
        try:  # a server that accepts and never answers must not block for FFmpeg's default (minutes)
            return cv2.VideoCapture(target, apis[backend], [timeouts[0], OPEN_TIMEOUT_MS, timeouts[1], OPEN_TIMEOUT_MS])
        except (TypeError, cv2.error):  # builds without the params overload
            pass
    return cv2.VideoCapture(target, apis[backend])


def call_interruptibly(fn: Callable[[], Any], timeout_s: float, what: str,
                       dispose: Callable[[Any], None] = lambda _v: None) -> Any:
    """``fn()`` in a daemon thread while this thread waits on an event (interruptibly), so Ctrl-C and SIGTERM act
    at once even when ``fn`` blocks inside native code (OpenCV opening a stream that never answers). After
    ``timeout_s`` it raises SourceError naming ``what``. A result that arrives after the caller gave up goes to
    ``dispose``."""
    lock = threading.Lock()
    done = threading.Event()
    state: dict = {"abandoned": False}

    def work() -> None:
        try:
            value, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
            value, error = None, exc
        with lock:
            state.update(value=value, error=error)
            late = state["abandoned"]
        done.set()
        if late and value is not None:
            dispose(value)

    threading.Thread(target=work, name="edgeexit-open", daemon=True).start()
    finished = False
    try:
        finished = done.wait(timeout_s)
    finally:
        with lock:
            if not done.is_set():
                state["abandoned"] = True
    if not finished:
        raise SourceError(f"cannot open {what}: no answer within {timeout_s:g} s")
    if state["error"] is not None:
        raise state["error"]
    return state["value"]


def opencv_has_gstreamer() -> bool:
    """True when the installed OpenCV was built with GStreamer (JetPack's is; the pip wheels are not)."""
    quiet_native_logs()
    try:
        import cv2  # noqa: PLC0415
    except ImportError:
        return False
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1].upper()
    return False


def _fps_fraction(fps: float) -> str:
    """A GStreamer framerate: 30 -> "30/1", 29.97 -> "30000/1001" (NTSC rates), 12.5 -> "25/2"."""
    fps = float(fps)
    if fps == round(fps):
        return f"{int(round(fps))}/1"
    ntsc = round(fps * 1.001)
    if abs(ntsc * 1000 / 1001 - fps) < 0.005:
        return f"{ntsc * 1000}/1001"
    frac = Fraction(fps).limit_denominator(1000)
    return f"{frac.numerator}/{frac.denominator}"


def csi_pipeline(
    sensor_id: int = 0,
    width: Optional[int] = None,
    height: Optional[int] = None,
    fps: Optional[float] = None,
    flip_method: int = 0,
) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (``csi://N``), for ``cv2.VideoCapture(..., CAP_GSTREAMER)``.

    Defaults: 1280x720 at 30 fps. ``appsink drop=1 max-buffers=1`` keeps only the newest frame.
    """
    w, h, f = width or CSI_DEFAULTS[0], height or CSI_DEFAULTS[1], fps or CSI_DEFAULTS[2]
    if int(sensor_id) < 0 or int(w) <= 0 or int(h) <= 0 or float(f) <= 0:
        raise ValueError(f"invalid CSI settings: sensor-id={sensor_id} {w}x{h} @ {f} fps")
    rate = _fps_fraction(f)
    return (
        f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
        f"video/x-raw(memory:NVMM),width={int(w)},height={int(h)},framerate={rate},format=NV12 ! "
        f"nvvidconv flip-method={int(flip_method)} ! "
        f"video/x-raw,width={int(w)},height={int(h)},format=BGRx ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    )


def rtsp_pipeline(uri: str, latency_ms: int = 200) -> str:
    """A GStreamer pipeline for an RTSP stream (decodebin picks the hardware decoder on Jetson)."""
    return (
        f"rtspsrc location={uri} latency={int(latency_ms)} ! decodebin ! videoconvert ! "
        "video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    )


def _redact(uri: str) -> str:
    """Hide a password in ``rtsp://user:password@host/...`` for messages."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _to_rgb(image: Any) -> np.ndarray:
    """An OpenCV frame (BGR, BGRA or grayscale; uint8 or uint16) as contiguous uint8 HxWx3 RGB."""
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported frame dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"unsupported frame shape {image.shape}")
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    return np.ascontiguousarray(image[:, :, 2::-1])


def _get(cap: Any, prop: int) -> float:
    try:
        value = float(cap.get(prop))
    except Exception:  # noqa: BLE001 (a fake or broken backend: treat as unknown)
        return 0.0
    return value if math.isfinite(value) else 0.0


def _release(cap: Any) -> None:
    if cap is None:
        return
    try:
        cap.release()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------------------------
# Sources


class Source:
    """An iterable of :class:`Frame` fed by a capture thread through a bounded queue.

    Attributes: ``uri``, ``kind`` ("image", "folder", "video", "camera", "csi", "rtsp"), ``is_live``,
    ``frames_total`` (frames this source will yield when known, for progress bars), ``fps`` (nominal, when known),
    ``classes`` (folder class names, or None), ``dropped`` (live frames dropped because the consumer fell
    behind), ``skipped`` (unreadable files yielded with ``error``), ``unknown_folders`` (``{sub-folder that is
    no class of the model: images}``, left out when ``labelled``), ``ended_reason`` (why iteration ended).

    The capture thread starts on the first ``next()`` (or ``start()``). Use as a context manager, or call
    ``close()``, to stop it when the consumer stops early.
    """

    kind = "source"
    is_live = False

    def __init__(self, uri: str, *, loop: bool = False, max_frames: Optional[int] = None, queue_size: int = 8):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        self.uri = uri
        self.loop = bool(loop)
        self.max_frames = max_frames
        self.queue_size = int(queue_size)
        self.frames_total: Optional[int] = None
        self.fps: Optional[float] = None
        self.classes: Optional[Tuple[str, ...]] = None
        self.dropped = 0
        self.skipped = 0
        self.unknown_folders: dict = {}  # sub-folders that are no class of the model -> their image count
        self.labelled = False  # class sub-folders give labels (then unknown_folders were left out)
        self.ended_reason: Optional[str] = None
        self._buffer: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._finished = False
        self._closed = False
        self._error: Optional[BaseException] = None
        self._yielded = 0

    # -- subclass interface ------------------------------------------------------------------------------------

    def _frames(self) -> Iterator[Frame]:
        """Produce frames (runs in the capture thread); set ``ended_reason`` before returning."""
        raise NotImplementedError

    def _release_resources(self) -> None:
        """Release what ``open_source`` opened when the capture thread never started."""

    def describe(self) -> str:
        return f"{self.kind} {self.uri}"

    # -- public API --------------------------------------------------------------------------------------------

    @property
    def display(self) -> str:
        return _redact(self.uri)

    def start(self) -> "Source":
        """Start the capture thread (idempotent; iteration starts it too)."""
        with self._cond:
            if self._thread is not None or self._closed:
                return self
            self._thread = threading.Thread(
                target=self._run, name=f"edgeexit-source-{self.kind}", daemon=True
            )
            self._thread.start()
        return self

    def __iter__(self) -> "Source":
        return self

    def __next__(self) -> Frame:
        if self.max_frames is not None and self._yielded >= self.max_frames:
            if self.ended_reason is None:
                self.ended_reason = f"max_frames reached ({self.max_frames})"
            self.close()
            raise StopIteration
        self.start()
        with self._cond:
            while not self._buffer and not self._finished and not self._closed:
                self._cond.wait(_POLL_S)
            if self._buffer:
                frame = self._buffer.popleft()
                self._cond.notify_all()
            elif self._error is not None:
                error, self._error = self._error, None
                raise SourceError(f"{self.kind} {self.display}: capture failed: {type(error).__name__}: {error}") \
                    from error
            else:
                raise StopIteration
        self._yielded += 1
        if frame.error is not None:
            self.skipped += 1
        return frame

    def close(self) -> None:
        """Stop the capture thread (promptly: it wakes within ~0.1 s unless blocked inside the driver)."""
        with self._cond:
            self._stop.set()
            self._closed = True
            thread = self._thread
            self._buffer.clear()
            self._cond.notify_all()
        if thread is None:
            self._release_resources()
            if self.ended_reason is None:
                self.ended_reason = "closed"
        elif thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # -- capture thread ----------------------------------------------------------------------------------------

    def _put(self, frame: Frame) -> bool:
        """Queue one frame; False when the source is stopping."""
        with self._cond:
            if self.is_live:
                while len(self._buffer) >= self.queue_size:
                    self._buffer.popleft()
                    self.dropped += 1
            else:
                while len(self._buffer) >= self.queue_size and not self._stop.is_set():
                    self._cond.wait(_POLL_S)
            if self._stop.is_set():
                return False
            self._buffer.append(frame)
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        error: Optional[BaseException] = None
        produced = 0
        frames = self._frames()
        try:
            if self.max_frames == 0:
                self.ended_reason = "max_frames reached (0)"
            else:
                for frame in frames:
                    if not self._put(frame):
                        break
                    produced += 1
                    if not self.is_live and self.max_frames is not None and produced >= self.max_frames:
                        self.ended_reason = f"max_frames reached ({self.max_frames})"
                        break
        except BaseException as exc:  # noqa: BLE001 (delivered to the consumer)
            error = exc
        finally:
            try:
                frames.close()
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
            if self.ended_reason is None:
                if error is not None:
                    self.ended_reason = one_line(f"capture failed: {type(error).__name__}: {error}")
                elif self._stop.is_set():
                    self.ended_reason = "closed"
                else:
                    self.ended_reason = "end of input"
            with self._cond:
                self._error = error
                self._finished = True
                self._cond.notify_all()


class ImageFilesSource(Source):
    """One image file or a folder of images."""

    def __init__(
        self,
        uri: str,
        root: Path,
        files: list[Path],
        labels: list[Optional[int]],
        *,
        kind: str,
        classes: Optional[Tuple[str, ...]],
        **kwargs: Any,
    ):
        super().__init__(uri, **kwargs)
        self.kind = kind
        self.root = root
        self.files = files
        self.labels = labels
        self.classes = classes
        n = len(files)
        self.frames_total = self.max_frames if self.loop else (
            n if self.max_frames is None else min(n, self.max_frames)
        )

    def sample(self, n: int, rng: np.random.Generator) -> None:
        """Before iterating: keep ``n`` files drawn without replacement in ``rng``'s random order over the whole
        folder (all of them, shuffled, when it has fewer), so the frames spread across its classes."""
        keep = rng.permutation(len(self.files))[: max(0, int(n))]
        self.files = [self.files[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.frames_total = len(self.files)

    def _name(self, path: Path) -> str:
        if self.kind == "image":
            return path.name
        return path.relative_to(self.root).as_posix()

    def _frames(self) -> Iterator[Frame]:
        index = 0
        while True:
            good = 0
            for path, label in zip(self.files, self.labels):
                if self._stop.is_set():
                    return
                try:
                    image, error = load_image(path, channels=3), None
                    good += 1
                except Exception as exc:  # noqa: BLE001 (ImageError and anything else PIL raises)
                    image, error = None, one_line(str(exc) if str(path) in str(exc) else f"cannot read image {path}: {exc}")
                yield Frame(index, image, self._name(path), None, label, error)
                index += 1
            if not self.loop:
                self.ended_reason = "end of input"
                return
            if good == 0:
                self.ended_reason = "no readable images"
                return

    def describe(self) -> str:
        if self.kind == "image":
            return f"image {self.display}"
        text = f"folder {self.display} ({len(self.files)} images"
        if self.classes:
            text += f", {len(self.classes)} classes"
        return text + (", looping)" if self.loop else ")")


def video_problem(path: Path) -> str:
    """Why a video file did not open, in the words FFmpeg would have printed (its own log lines are silenced):
    an empty file, an MP4/MOV without its index ("moov atom not found": a recording cut off before it was
    finalised), else the generic reason."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
            if size == 0:
                return "empty file"
            if head[4:8] in (b"ftyp", b"mdat", b"moov", b"free", b"wide", b"skip"):  # ISO base media (MP4, MOV)
                fh.seek(0)
                boxes, pos = set(), 0
                while pos + 8 <= size and len(boxes) < 64:
                    fh.seek(pos)
                    box = fh.read(16)
                    n, kind = int.from_bytes(box[:4], "big"), box[4:8]
                    if n == 1 and len(box) >= 16:
                        n = int.from_bytes(box[8:16], "big")
                    boxes.add(kind)
                    if n < 8:
                        break
                    pos += n
                if b"moov" not in boxes:
                    return "moov atom not found: the recording was cut off before it was finalised"
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    return "unsupported codec or corrupt file?"


class VideoSource(Source):
    """A video file decoded with OpenCV; never drops frames."""

    kind = "video"

    def __init__(self, uri: str, path: Path, factory: CaptureFactory, **kwargs: Any):
        super().__init__(uri, **kwargs)
        self.path = path
        self._factory = factory
        self.lost = 0  # undecodable frames, skipped and counted
        self._cap: Any = self._open()
        if self._cap is None:
            raise SourceError(f"cannot open video {path} ({video_problem(path)})")
        count = int(_get(self._cap, CAP_PROP_FRAME_COUNT))
        fps = _get(self._cap, CAP_PROP_FPS)
        self.fps = fps if fps > 0 else None
        self.width = int(_get(self._cap, CAP_PROP_FRAME_WIDTH)) or None
        self.height = int(_get(self._cap, CAP_PROP_FRAME_HEIGHT)) or None
        self.video_frames = count if count > 0 else None
        if self.loop:
            self.frames_total = self.max_frames
        elif self.video_frames is not None:
            self.frames_total = self.video_frames if self.max_frames is None else min(self.video_frames, self.max_frames)
        else:
            self.frames_total = None

    def _open(self) -> Any:
        try:
            cap = self._factory(str(self.path), "any")
        except SourceError:
            raise
        except Exception:  # noqa: BLE001 (a backend that throws counts as "cannot open")
            return None
        if cap is None or not cap.isOpened():
            _release(cap)
            return None
        return cap

    def _release_resources(self) -> None:
        cap, self._cap = self._cap, None
        _release(cap)

    def _frames(self) -> Iterator[Frame]:
        cap, self._cap = self._cap, None
        index = 0
        try:
            while True:
                if cap is None:
                    cap = self._open()
                    if cap is None:
                        raise SourceError(f"cannot reopen video {self.path}")
                position, lost = yield from self._decode_pass(cap, index)
                index += position
                _release(cap)
                cap = None
                if self._stop.is_set():
                    return
                if position == lost:
                    self.ended_reason = "no frames decoded" if index == lost else self._end_text()
                    return
                if not self.loop:
                    self.ended_reason = self._end_text()
                    return
        finally:
            _release(cap)

    def _decode_pass(self, cap: Any, first_index: int) -> Iterator[Frame]:
        """One pass over the video. An undecodable frame is yielded as a skipped frame (``error`` set) and
        decoding goes on: the pass ends at a failure at or past the frame count, or after ``_MAX_DECODE_FAILURES``
        failures in a row.
        Failures after the last good frame are the end, not lost frames, unless the video's frame count says
        those frames exist. Returns (frames passed, frames lost)."""
        position = lost = pending = 0
        last_time = -1.0
        count = self.video_frames

        def lost_frames(n: int) -> Iterator[Frame]:
            nonlocal position, lost
            for _ in range(n):
                index = first_index + position
                yield Frame(index, None, f"frame {index}", None, None, f"cannot decode frame {index}")
                position += 1
                lost += 1

        while not self._stop.is_set():
            ok, image = cap.read()
            if not ok or image is None:
                pending += 1
                if count is not None and position + pending >= count:  # (a count that is too low: read on)
                    yield from lost_frames(max(0, count - position))
                    break
                if pending >= _MAX_DECODE_FAILURES:
                    if count is not None:
                        yield from lost_frames(pending)
                    break
                continue
            yield from lost_frames(pending)
            pending = 0
            seconds = self._position(cap, position, last_time)
            if seconds is not None:
                last_time = seconds
            index = first_index + position
            yield Frame(index, _to_rgb(image), f"frame {index}", seconds, None, None)
            position += 1
        self.lost += lost
        return position, lost

    def _end_text(self) -> str:
        return "end of video" + (f" ({self.lost} undecodable frames skipped)" if self.lost else "")

    def _position(self, cap: Any, position: int, last_time: float) -> Optional[float]:
        """Seconds into the video: CAP_PROP_POS_MSEC when it is sane, else frame / fps."""
        ms = _get(cap, CAP_PROP_POS_MSEC)
        if ms > 0 or (ms == 0 and position == 0):
            seconds = ms / 1000.0
            if seconds > last_time:
                return seconds
        if self.fps:
            return position / self.fps
        return None

    def describe(self) -> str:
        parts = []
        if self.width and self.height:
            parts.append(f"{self.width}x{self.height}")
        if self.fps:
            parts.append(f"{self.fps:g} fps")
        if self.video_frames:
            parts.append(f"{self.video_frames} frames")
        if self.loop:
            parts.append("looping")
        return f"video {self.display}" + (f" ({', '.join(parts)})" if parts else "")


class LiveSource(Source):
    """A camera (V4L2 or CSI) or a network stream: drops the oldest queued frame when the consumer falls behind."""

    is_live = True

    def __init__(
        self,
        uri: str,
        *,
        kind: str,
        label: str,
        candidates: list[Tuple[Union[int, str], str]],
        factory: CaptureFactory,
        width: Optional[int] = None,
        height: Optional[int] = None,
        fps: Optional[float] = None,
        retries: int = 3,
        retry_delay_s: float = 0.5,
        **kwargs: Any,
    ):
        kwargs.pop("loop", None)  # live sources do not loop
        super().__init__(uri, **kwargs)
        self.kind = kind
        self.label = label  # "camera /dev/video0", "stream rtsp://..."
        self.candidates = candidates
        self.backend: Optional[str] = None
        self.retries = max(0, int(retries))
        self.retry_delay_s = max(0.0, float(retry_delay_s))
        self._factory = factory
        self._want = (width, height, fps)
        self.frames_total = self.max_frames
        self._cap: Any = self._try_open()
        if self._cap is None:
            hint = ""
            if kind == "csi":
                hint = " (GStreamer pipeline failed: is this a Jetson with nvargus-daemon running?)"
            raise SourceError(f"cannot open {label}{hint}")
        self.width = int(_get(self._cap, CAP_PROP_FRAME_WIDTH)) or width
        self.height = int(_get(self._cap, CAP_PROP_FRAME_HEIGHT)) or height
        measured = _get(self._cap, CAP_PROP_FPS)
        self.fps = measured if measured > 0 else fps

    def _try_open(self) -> Any:
        for target, backend in self.candidates:
            try:
                cap = call_interruptibly(lambda: self._factory(target, backend), _OPEN_WAIT_S, self.label, _release)
            except SourceError:
                raise
            except Exception:  # noqa: BLE001 (a backend that throws counts as "cannot open")
                continue
            if cap is not None and cap.isOpened():
                self.backend = backend
                self._configure(cap, backend)
                return cap
            _release(cap)
        return None

    def _configure(self, cap: Any, backend: str) -> None:
        setter = getattr(cap, "set", None)
        if setter is None or backend != "v4l2":
            return
        width, height, fps = self._want
        try:
            if width:
                setter(CAP_PROP_FRAME_WIDTH, float(width))
            if height:
                setter(CAP_PROP_FRAME_HEIGHT, float(height))
            if fps:
                setter(CAP_PROP_FPS, float(fps))
            setter(CAP_PROP_BUFFERSIZE, 1.0)  # low latency: the driver keeps one frame
        except Exception:  # noqa: BLE001 (settings are best effort)
            pass

    def _release_resources(self) -> None:
        cap, self._cap = self._cap, None
        _release(cap)

    def _frames(self) -> Iterator[Frame]:
        cap, self._cap = self._cap, None
        noun = "stream" if self.kind == "rtsp" else "camera"
        start = time.monotonic()
        index = 0
        failures = 0
        try:
            while not self._stop.is_set():
                ok, image = cap.read() if cap is not None else (False, None)
                if self._stop.is_set():
                    return
                if ok and image is not None:
                    failures = 0
                    yield Frame(index, _to_rgb(image), f"frame {index}", time.monotonic() - start, None, None)
                    index += 1
                    continue
                if failures >= self.retries:
                    self.ended_reason = f"{noun} stopped delivering after {self.retries} retries"
                    return
                failures += 1
                _release(cap)
                cap = None
                if self._stop.wait(self.retry_delay_s):
                    return
                cap = self._try_open()
        finally:
            _release(cap)

    def describe(self) -> str:
        parts = []
        if self.backend:
            parts.append({"v4l2": "V4L2", "gstreamer": "GStreamer", "ffmpeg": "FFMPEG"}.get(self.backend, self.backend))
        if self.width and self.height:
            parts.append(f"{self.width}x{self.height}")
        if self.fps:
            parts.append(f"{self.fps:g} fps")
        return self.label + (f" ({', '.join(parts)})" if parts else "")


# --------------------------------------------------------------------------------------------------------------
# open_source


def _list_dir(folder: Path, seen_dirs: set, seen_files: set) -> Tuple[list[Path], list[Path]]:
    """(sub-folders, image files) of ``folder``, sorted, hidden entries left out; ([], []) when ``folder`` was
    listed before (a symlink back to a parent) or cannot be read. Each real file (device and inode, a symlink
    followed) is listed once across calls."""
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen_dirs:
            return [], []
        seen_dirs.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return [], []
    subdirs: list[Path] = []
    files: list[Path] = []
    for entry in entries:
        try:
            if entry.is_dir():
                subdirs.append(Path(entry.path))
            elif entry.is_file() and is_image_file(entry.name):
                target = entry.stat()  # follows a symlink to the real file
                if (target.st_dev, target.st_ino) not in seen_files:
                    seen_files.add((target.st_dev, target.st_ino))
                    files.append(Path(entry.path))
        except OSError:  # a dangling link, or an entry removed meanwhile
            continue
    return subdirs, files


def _walk_images(folder: Path, seen_dirs: set, seen_files: set) -> list[Path]:
    """Image files under ``folder`` in sorted depth-first order, following symlinks at most once per real
    directory (so links to a parent cannot loop) and listing each real file once."""
    found: list[Path] = []
    stack = [folder]
    while stack:
        subdirs, files = _list_dir(stack.pop(), seen_dirs, seen_files)
        found += files
        stack.extend(reversed(subdirs))
    return found


def _scan_folder(root: Path, classes: Optional[Tuple[str, ...]]
                 ) -> Tuple[list[Path], list[Optional[int]], Optional[Tuple[str, ...]], dict]:
    """Recursive image listing (cycle-safe: see ``_walk_images``). Top-level sub-folders are classes (label order
    pinned by ``classes``); images directly in ``root`` have label None. When ``classes`` is given and some
    sub-folders are classes, the other sub-folders are left out; when none is, the tree is unlabelled (every
    image, label None). Either way the unknown sub-folders come back as ``{folder: image count}`` to report."""
    seen_dirs: set = set()
    seen_files: set = set()
    try:
        os.scandir(root).close()
    except OSError as exc:
        raise SourceError(f"cannot list folder {root}: {exc.strerror or exc}") from None
    sub_dirs, top_files = _list_dir(root, seen_dirs, seen_files)
    per_class = [(d.name, _walk_images(d, seen_dirs, seen_files)) for d in sub_dirs]
    per_class = [(name, files) for name, files in per_class if files]
    if not per_class:
        return top_files, [None] * len(top_files), (tuple(classes) if classes else None), {}
    class_list = tuple(classes) if classes else tuple(name for name, _ in per_class)
    index = {name: i for i, name in enumerate(class_list)}
    unknown = {name: len(found) for name, found in per_class if name not in index}
    labelled = len(unknown) < len(per_class)
    files: list[Path] = list(top_files)
    labels: list[Optional[int]] = [None] * len(top_files)
    for name, class_files in per_class:
        if labelled and name in unknown:
            continue
        files += class_files
        labels += [index.get(name)] * len(class_files)
    return files, labels, class_list, unknown


def _probe_stream(uri: str, timeout_s: float = 5.0) -> None:
    """Connect to the stream's host and port first, so a refused or unknown host is named in edgeexit's own line
    (FFmpeg would say "Connection refused" on its own lines, which are silenced). A server that accepts is left
    to OpenCV; a probe that cannot decide (timeout, bad URI) decides nothing."""
    import socket  # noqa: PLC0415

    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port or (322 if parts.scheme.lower() == "rtsps" else 554)
    except ValueError:
        return
    if not host:
        return
    try:
        call_interruptibly(lambda: socket.create_connection((host, port), timeout=timeout_s).close(),
                           timeout_s + 1.0, f"stream {_redact(uri)}")
    except ConnectionRefusedError:
        raise SourceError(f"cannot open stream {_redact(uri)}: connection refused by {host}:{port}") from None
    except socket.gaierror as exc:
        raise SourceError(f"cannot open stream {_redact(uri)}: unknown host {host} ({exc.strerror})") from None
    except (OSError, SourceError):
        return


def _camera_device(text: str) -> Optional[Tuple[Union[int, str], str]]:
    """("0" | "/dev/video0") -> (capture target, display name), or None when ``text`` is not a camera."""
    if text.isdigit():
        n = int(text)
        return n, (f"/dev/video{n}" if sys.platform.startswith("linux") else f"camera {n}")
    if text.startswith("/dev/video"):
        # OpenCV's V4L2 backend opens by index everywhere, by name only in some builds: /dev/videoN -> N
        suffix = text[len("/dev/video"):]
        return (int(suffix) if suffix.isdigit() else text), text
    return None


def open_source(
    uri: str,
    *,
    loop: bool = False,
    max_frames: Optional[int] = None,
    classes: Optional[Tuple[str, ...]] = None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    fps: Optional[float] = None,
    queue_size: int = 8,
    retries: int = 3,
    retry_delay_s: float = 0.5,
    capture_factory: Optional[CaptureFactory] = None,
) -> Source:
    """Open one input URI (see the module docstring). Raises SourceError (one line, naming the input) for a
    missing path, an empty folder, an unsupported file type or a camera/stream/video that cannot be opened.

    ``classes`` pins folder label order (the model's classes). ``width``/``height``/``fps`` apply to cameras
    (CSI defaults 1280x720@30). ``loop`` restarts files/folders/videos; ``max_frames`` caps the frames yielded.
    ``retries``/``retry_delay_s``: reopen attempts when a live source stops delivering, before ending cleanly.
    ``capture_factory(target, backend)`` replaces ``cv2.VideoCapture`` (tests, custom backends).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"empty input URI: {uri!r}")
    uri = uri.strip()
    factory = capture_factory or opencv_capture
    common = dict(max_frames=max_frames, queue_size=queue_size)
    live = dict(factory=factory, width=width, height=height, fps=fps, retries=retries, retry_delay_s=retry_delay_s)
    lower = uri.lower()

    # live sources
    if lower.startswith("csi://"):
        sensor = uri[len("csi://"):].strip("/")
        if not sensor.isdigit():
            raise SourceError(f"invalid CSI camera URI {uri} (expected csi://N, e.g. csi://0)")
        w, h, f = width or CSI_DEFAULTS[0], height or CSI_DEFAULTS[1], fps or CSI_DEFAULTS[2]
        live.update(width=w, height=h, fps=f)
        pipeline = csi_pipeline(int(sensor), w, h, f)
        return LiveSource(uri, kind="csi", label=f"camera {uri}", candidates=[(pipeline, "gstreamer")], **common, **live)
    if lower.startswith("v4l2://"):
        device = uri[len("v4l2://"):]
        camera = _camera_device(device)
        if camera is None:
            raise SourceError(f"invalid V4L2 camera URI {uri} (expected v4l2:///dev/videoN)")
        return LiveSource(uri, kind="camera", label=f"camera {camera[1]}", candidates=[(camera[0], "v4l2")], **common, **live)
    camera = _camera_device(uri)
    if camera is not None:
        backend = "v4l2" if sys.platform.startswith("linux") else "any"
        return LiveSource(uri, kind="camera", label=f"camera {camera[1]}", candidates=[(camera[0], backend)], **common, **live)
    if lower.startswith(("rtsp://", "rtsps://")):
        candidates: list[Tuple[Union[int, str], str]] = []
        if opencv_has_gstreamer():  # try GStreamer first (hardware decode on Jetson), then FFMPEG
            candidates.append((rtsp_pipeline(uri), "gstreamer"))
        candidates.append((uri, "ffmpeg"))
        if capture_factory is None:  # a real network stream (an injected capture may fake the host)
            _probe_stream(uri)
        return LiveSource(uri, kind="rtsp", label=f"stream {_redact(uri)}", candidates=candidates, **common, **live)

    # files
    if lower.startswith("file://"):
        uri_path = uri[len("file://"):]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise SourceError(
            f"unsupported input URI {_redact(uri)} (scheme {scheme}://; expected a file, a folder, a camera index, "
            "/dev/videoN, v4l2://, csi:// or rtsp://)"
        )
    else:
        uri_path = uri
    path = Path(uri_path).expanduser()
    files_kwargs = dict(loop=loop, **common)
    if path.is_dir():
        files, labels, class_list, unknown = _scan_folder(path, classes)
        if not files:
            if unknown:
                raise SourceError(f"no images in folder {path} in class folders the model knows (it has "
                                  f"{', '.join(sorted(unknown)[:5])})")
            raise SourceError(f"no images in folder {path} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        source = ImageFilesSource(uri, path, files, labels, kind="folder", classes=class_list, **files_kwargs)
        source.unknown_folders = unknown
        source.labelled = any(label is not None for label in labels)
        return source
    if not path.exists():
        raise SourceError(f"input not found: {path}")
    if not path.is_file():
        raise SourceError(f"unsupported input {path} (not a file, a folder or a camera)")
    suffix = path.suffix.lower()
    if is_image_file(path):
        return ImageFilesSource(uri, path.parent, [path], [None], kind="image", classes=None, **files_kwargs)
    if suffix in VIDEO_EXTENSIONS:
        return VideoSource(uri, path, factory, **files_kwargs)
    raise SourceError(
        f"unsupported file type {suffix or '(none)'}: {path} (images: {' '.join(IMAGE_EXTENSIONS)}; "
        f"videos: {' '.join(VIDEO_EXTENSIONS[:6])} ...)"
    )

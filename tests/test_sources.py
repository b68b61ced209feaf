"""Tests for edgeexit.runtime.sources: files, folders, video, and live-source logic with a fake capture."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeexit.runtime import sources
from edgeexit.runtime.sources import Frame, SourceError, csi_pipeline, open_source


# ----------------------------------------------------------------------------------------------------------------
# helpers


def write_png(path: Path, colour=(10, 20, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return path


class FakeCapture:
    """cv2.VideoCapture stand-in: frame k is BGR (k % 256, 20, 30); ``n_frames`` None = endless."""

    def __init__(self, n_frames=None, period=0.0, opened=True, error=None):
        self.n_frames = n_frames
        self.period = period
        self.opened = opened
        self.error = error
        self.count = 0
        self.released = False
        self.exhausted = threading.Event()

    def isOpened(self):  # noqa: N802
        return self.opened and not self.released

    def read(self):
        if self.error is not None:
            raise self.error
        if self.period:
            time.sleep(self.period)
        if self.released or (self.n_frames is not None and self.count >= self.n_frames):
            self.exhausted.set()
            return False, None
        image = np.empty((4, 6, 3), np.uint8)
        image[:] = (self.count % 256, 20, 30)
        self.count += 1
        return True, image

    def release(self):
        self.released = True

    def get(self, prop_id):
        return {sources.CAP_PROP_FRAME_WIDTH: 6.0, sources.CAP_PROP_FRAME_HEIGHT: 4.0}.get(prop_id, 0.0)


class Factory:
    """Hands out the given captures in order (then closed ones) and records (target, backend)."""

    def __init__(self, *captures):
        self.captures = list(captures)
        self.calls = []

    def __call__(self, target, backend):
        self.calls.append((target, backend))
        return self.captures.pop(0) if self.captures else FakeCapture(opened=False)


def blue(frame: Frame) -> int:
    """The fake capture's frame number, read back from the RGB image (B is the last channel)."""
    return int(frame.image[0, 0, 2])


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(20):
        writer.write(np.full((48, 64, 3), (i * 12, 40, 200), np.uint8))  # BGR: blue ramps, red constant
    writer.release()
    return path


# ----------------------------------------------------------------------------------------------------------------
# image files and folders


def test_image_file(tmp_path):
    path = write_png(tmp_path / "photo.png", colour=(200, 100, 50))
    with open_source(str(path)) as src:
        assert not src.is_live and src.frames_total == 1 and src.kind == "image"
        assert str(path) in src.describe()
        frames = list(src)
    assert len(frames) == 1
    frame = frames[0]
    assert frame.index == 0 and frame.name == "photo.png" and frame.label is None and frame.error is None
    assert frame.image.dtype == np.uint8 and frame.image.shape == (6, 8, 3)
    assert tuple(frame.image[0, 0]) == (200, 100, 50)
    assert frame.source_time is None
    assert src.skipped == 0 and src.dropped == 0


def test_folder_with_class_subfolders(tmp_path):
    write_png(tmp_path / "cat" / "a.png")
    write_png(tmp_path / "cat" / "b.jpg")
    write_png(tmp_path / "dog" / "c.png")
    write_png(tmp_path / "dog" / "deeper" / "d.png")  # recursive
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with open_source(str(tmp_path)) as src:
        assert src.classes == ("cat", "dog") and src.frames_total == 4
        frames = list(src)
    assert [(f.name, f.label) for f in frames] == [
        ("cat/a.png", 0), ("cat/b.jpg", 0), ("dog/c.png", 1), ("dog/deeper/d.png", 1)
    ]
    assert [f.index for f in frames] == [0, 1, 2, 3]

    # the model's classes pin the order; a class folder the model does not know is left out (run reports it)
    with open_source(str(tmp_path), classes=("dog", "cat")) as src:
        assert [f.label for f in src] == [1, 1, 0, 0]
    with open_source(str(tmp_path), classes=("bird", "dog")) as src:
        assert [f.label for f in src] == [1, 1]
        assert src.unknown_folders == {"cat": 2} and src.labelled
    with open_source(str(tmp_path), classes=("bird",)) as src:  # no folder is a class: an unlabelled tree
        assert [f.label for f in src] == [None] * 4
        assert src.unknown_folders == {"cat": 2, "dog": 2} and not src.labelled


def test_flat_folder_corrupt_and_empty_files(tmp_path):
    write_png(tmp_path / "a.png", colour=(1, 2, 3))
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    write_png(tmp_path / "d.png", colour=(4, 5, 6))
    with open_source(str(tmp_path)) as src:
        assert src.classes is None
        frames = list(src)
        assert src.skipped == 2
    assert [f.name for f in frames] == ["a.png", "b.png", "c.png", "d.png"]
    assert all(f.label is None for f in frames)
    good = [f for f in frames if f.error is None]
    bad = [f for f in frames if f.error is not None]
    assert [f.name for f in good] == ["a.png", "d.png"] and tuple(good[1].image[0, 0]) == (4, 5, 6)
    assert [f.name for f in bad] == ["b.png", "c.png"]
    assert all(f.image is None and "\n" not in f.error and f.name in f.error for f in bad)


def test_folder_loop_and_max_frames(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", colour=(i, i, i))
    with open_source(str(tmp_path), loop=True, max_frames=7) as src:
        assert src.frames_total == 7
        frames = list(src)
    assert [f.index for f in frames] == list(range(7))
    assert [f.name for f in frames] == ["0.png", "1.png", "2.png"] * 2 + ["0.png"]
    with open_source(str(tmp_path), max_frames=2) as src:
        assert src.frames_total == 2 and len(list(src)) == 2


# ----------------------------------------------------------------------------------------------------------------
# video files


def test_video_file(video_file):
    with open_source(str(video_file)) as src:
        assert src.kind == "video" and not src.is_live
        assert src.frames_total == 20 and src.fps == pytest.approx(10.0)
        assert "64x48" in src.describe()
        frames = list(src)
    assert len(frames) == 20 and [f.index for f in frames] == list(range(20))
    assert [f.name for f in frames][:2] == ["frame 0", "frame 1"]
    for i, frame in enumerate(frames):
        assert frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
        r, g, b = frame.image[24, 32].astype(int)
        assert abs(r - 200) <= 8 and abs(g - 40) <= 8 and abs(b - i * 12) <= 8  # BGR -> RGB
    times = [f.source_time for f in frames]
    assert times[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times[-1] == pytest.approx(1.9, abs=0.05)
    assert src.ended_reason == "end of video"


def test_video_loop_and_max_frames(video_file):
    with open_source(str(video_file), loop=True, max_frames=45) as src:
        assert src.frames_total == 45
        frames = list(src)
    assert [f.index for f in frames] == list(range(45))
    # second pass starts at the first frame again
    assert np.abs(frames[20].image.astype(int) - frames[0].image.astype(int)).max() <= 2
    assert frames[20].source_time == pytest.approx(0.0, abs=1e-6)
    with open_source(str(video_file), max_frames=5) as src:
        assert src.frames_total == 5 and len(list(src)) == 5


def test_video_without_opencv(video_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(SourceError) as info:
        open_source(str(video_file))
    assert str(info.value) == sources.OPENCV_MISSING
    assert "pip install 'edgeexit[video]'" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# live sources (fake capture)


def test_live_drops_oldest_keeps_newest():
    cam = FakeCapture(n_frames=50)
    src = open_source("/dev/video0", capture_factory=Factory(cam), queue_size=4, retries=0)
    assert src.is_live and src.frames_total is None
    src.start()
    assert cam.exhausted.wait(5)
    src._thread.join(5)
    frames = list(src)
    assert [f.index for f in frames] == [46, 47, 48, 49]  # the newest ones
    assert [blue(f) for f in frames] == [46, 47, 48, 49]
    assert src.dropped == 46
    assert src.ended_reason == "camera stopped delivering after 0 retries"


def test_live_camera_faster_than_slow_consumer():
    cam = FakeCapture(period=0.002)
    queue_size = 2
    with open_source("0", capture_factory=Factory(cam), queue_size=queue_size) as src:
        it = iter(src)
        frames = [next(it)]
        for _ in range(7):
            time.sleep(0.03)  # slow inference
            produced = cam.count
            frame = next(it)
            # the oldest queued frame is at most queue_size (+1 in flight) behind the camera: old ones were dropped
            assert frame.index >= produced - queue_size - 1
            frames.append(frame)
        assert src.dropped > 0
    indices = [f.index for f in frames]
    assert all(b > a for a, b in zip(indices, indices[1:]))
    assert indices[-1] - indices[0] > len(indices)  # gaps where frames were dropped
    assert src.frames_total is None and not src._thread.is_alive()


def test_live_frames_are_rgb_with_wall_time():
    cam = FakeCapture(n_frames=3)
    with open_source("/dev/video0", capture_factory=Factory(cam), queue_size=8, retries=0) as src:
        frames = list(src)
    assert [f.name for f in frames] == ["frame 0", "frame 1", "frame 2"]
    assert tuple(frames[1].image[0, 0]) == (30, 20, 1)  # BGR (1, 20, 30) -> RGB
    assert frames[0].image.flags["C_CONTIGUOUS"]
    times = [f.source_time for f in frames]
    assert times[0] >= 0 and times == sorted(times)


def test_camera_stops_delivering_ends_after_retries():
    factory = Factory(FakeCapture(n_frames=5), FakeCapture(n_frames=0), FakeCapture(opened=False))
    with open_source("/dev/video0", capture_factory=factory, retries=3, retry_delay_s=0.01) as src:
        frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert src.ended_reason == "camera stopped delivering after 3 retries"
    assert len(factory.calls) == 4 and factory.calls[0] == (0, "v4l2")  # /dev/videoN opens by index


def test_camera_reconnects_and_keeps_counting():
    factory = Factory(FakeCapture(n_frames=3), FakeCapture(opened=False), FakeCapture(n_frames=2))
    with open_source("v4l2:///dev/video1", capture_factory=factory, retries=2, retry_delay_s=0.01) as src:
        frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert [blue(f) for f in frames] == [0, 1, 2, 0, 1]  # the reopened camera starts again
    assert src.ended_reason == "camera stopped delivering after 2 retries"


@pytest.mark.parametrize("uri", ["0", "/dev/video0", "v4l2:///dev/video0"])
def test_camera_that_cannot_open(uri):
    factory = Factory(FakeCapture(opened=False))
    with pytest.raises(SourceError, match=r"^cannot open camera /dev/video0$"):
        open_source(uri, capture_factory=factory)


def test_real_opencv_missing_camera():
    pytest.importorskip("cv2")
    device = "/dev/video97"
    if Path(device).exists():
        pytest.skip(f"{device} exists")
    with pytest.raises(SourceError, match="cannot open camera /dev/video97"):
        open_source(device)


def test_capture_thread_exception_reaches_consumer():
    cam = FakeCapture(error=RuntimeError("driver exploded"))
    with open_source("/dev/video0", capture_factory=Factory(cam)) as src:
        with pytest.raises(SourceError, match="capture failed: RuntimeError: driver exploded"):
            next(iter(src))
        assert list(src) == []


def test_csi_pipeline_string():
    pipeline = csi_pipeline(0)
    assert pipeline.startswith("nvarguscamerasrc sensor-id=0 ! ")
    for part in (
        "video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1",
        "! nvvidconv",
        "video/x-raw,width=1280,height=720,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1",
    ):
        assert part in pipeline
    assert "framerate=30000/1001" in csi_pipeline(1, 1920, 1080, 29.97)
    assert "sensor-id=1" in csi_pipeline(1)

    factory = Factory(FakeCapture(n_frames=1))
    with open_source("csi://1", width=640, height=480, fps=60, capture_factory=factory, retries=0) as src:
        assert src.kind == "csi" and src.is_live
        assert len(list(src)) == 1
    assert factory.calls == [(csi_pipeline(1, 640, 480, 60), "gstreamer")]
    with pytest.raises(SourceError, match="csi://x"):
        open_source("csi://x", capture_factory=factory)
    with pytest.raises(SourceError, match=r"cannot open camera csi://0"):
        open_source("csi://0", capture_factory=Factory(FakeCapture(opened=False)))


def test_rtsp_uses_ffmpeg_and_redacts_password(monkeypatch):
    monkeypatch.setattr(sources, "opencv_has_gstreamer", lambda: False)
    uri = "rtsp://admin:secret@10.0.0.5:554/stream1"
    factory = Factory(FakeCapture(n_frames=2))
    with open_source(uri, capture_factory=factory, retries=0) as src:
        assert src.is_live and src.kind == "rtsp"
        assert "secret" not in src.describe() and "10.0.0.5:554" in src.describe()
        assert len(list(src)) == 2
    assert factory.calls == [(uri, "ffmpeg")]
    assert src.ended_reason == "stream stopped delivering after 0 retries"
    with pytest.raises(SourceError) as info:
        open_source(uri, capture_factory=Factory(FakeCapture(opened=False)))
    assert "secret" not in str(info.value) and "cannot open stream" in str(info.value)


def test_rtsp_prefers_gstreamer_then_falls_back_to_ffmpeg(monkeypatch):
    monkeypatch.setattr(sources, "opencv_has_gstreamer", lambda: True)
    uri = "rtsp://10.0.0.5:554/stream1"
    factory = Factory(FakeCapture(opened=False), FakeCapture(n_frames=1))
    with open_source(uri, capture_factory=factory, retries=0) as src:
        assert src.backend == "ffmpeg" and len(list(src)) == 1
    assert factory.calls == [(sources.rtsp_pipeline(uri), "gstreamer"), (uri, "ffmpeg")]
    assert factory.calls[0][0].startswith(f"rtspsrc location={uri} ")


# ----------------------------------------------------------------------------------------------------------------
# errors and shutdown


def test_bad_inputs(tmp_path):
    with pytest.raises(SourceError, match="input not found: .*nope.png"):
        open_source(str(tmp_path / "nope.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match="no images in folder .*empty"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(SourceError, match=r"unsupported file type \.csv: .*data\.csv"):
        open_source(str(tmp_path / "data.csv"))
    with pytest.raises(SourceError, match="unsupported input URI"):
        open_source("ftp://example.com/x.png")
    for exc in (SourceError("x"),):
        assert "\n" not in str(exc)


def test_close_stops_thread_early(tmp_path):
    for i in range(30):
        write_png(tmp_path / f"{i:02d}.png")
    src = open_source(str(tmp_path), queue_size=2)
    it = iter(src)
    assert next(it).index == 0 and next(it).index == 1
    assert src._thread.is_alive()  # blocked on the full queue
    started = time.monotonic()
    src.close()
    assert time.monotonic() - started < 1.0
    assert not src._thread.is_alive()
    assert list(src) == []

    cam = FakeCapture(period=0.001)
    with open_source("/dev/video0", capture_factory=Factory(cam)) as live:
        next(iter(live))
    assert not live._thread.is_alive() and cam.released

    cam = FakeCapture()
    live = open_source("/dev/video0", capture_factory=Factory(cam))
    live.close()  # never started: the capture is still released
    assert cam.released and live._thread is None


def test_no_torch_import():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import edgeexit.runtime.sources as s\n"
        "assert 'cv2' not in sys.modules, 'cv2 imported eagerly'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"



"""Faults and hostile inputs of the runtime commands (issue 11), on the runtime-only install: every CLI call runs in
a fresh interpreter where torch cannot be imported, with the demo bundle shipped in the package. Each case checks
the exit code, the one line on stderr, and that no input or earlier output changed."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "edgeexit" / "assets" / "demo" / "bundle"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NO_TORCH = "import sys; sys.modules['torch'] = None\nfrom edgeexit.cli import main\nsys.argv[0] = 'edgeexit'\nmain()\n"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = ""
    return env


def cli_cmd(*args) -> List[str]:
    return [sys.executable, "-c", NO_TORCH, *map(str, args)]


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=_env(), timeout=timeout)


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exit code 2 and exactly one stderr line, an edgeexit error."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("edgeexit: error: "), proc.stderr
    return lines[0]


def digest(root: Path) -> dict:
    """Every file under ``root`` (or ``root`` itself) -> sha256: what 'unchanged' is checked against."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def picture(path: Path, seed: int = 0, size=(32, 32), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


@pytest.fixture()
def bundle(tmp_path) -> Path:
    """A private copy of the demo bundle (the tests must not be able to harm the shipped one)."""
    return Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle"))


@pytest.fixture()
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            picture(root / name / f"{i}.png", seed=10 * c + i)
    return root


def json_lines(text: str) -> List[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------------------------------------
# outputs never clobber inputs


def test_save_into_the_source_folder_is_refused(bundle, photos):
    before = digest(photos)
    line = one_error(cli("run", bundle, photos, "--save", photos))
    assert "--save" in line and "input folder" in line
    line = one_error(cli("run", bundle, photos, "--save", photos / "cat" / "annotated"))
    assert "--save" in line
    assert digest(photos) == before


def test_out_naming_the_input_or_the_bundle_is_refused(bundle, photos):
    image = photos / "cat" / "0.png"
    before, manifest = digest(photos), digest(bundle)
    assert "--out" in one_error(cli("run", bundle, image, "--out", image))
    assert "--out" in one_error(cli("run", bundle, photos, "--out", bundle / "manifest.json"))
    assert "--out" in one_error(cli("run", bundle, photos, "--out", photos / "decisions.jsonl"))
    assert digest(photos) == before and digest(bundle) == manifest


def test_out_is_appended_and_a_second_writer_is_refused(bundle, photos, tmp_path):
    out = tmp_path / "decisions.jsonl"
    first = cli("run", bundle, photos, "--out", out, "--quiet")
    assert first.returncode == 0, first.stderr
    earlier = out.read_bytes()
    assert len(json_lines(earlier.decode())) == 4
    with open(out, "a") as holder:  # another run holds the lock
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        line = one_error(cli("run", bundle, photos, "--out", out))
        assert "another process" in line
    assert out.read_bytes() == earlier
    with open(out, "ab") as fh:  # a killed writer left half a line
        fh.write(b'{"frame": 9, "na')
    second = cli("run", bundle, photos, "--out", out, "--quiet")
    assert second.returncode == 0, second.stderr
    text = out.read_bytes()
    assert text.startswith(earlier + b'{"frame": 9, "na\n')  # nothing earlier lost; new lines start whole
    assert len(json_lines(text[len(earlier):].decode().split("\n", 1)[1])) == 4


def test_out_naming_a_file_that_is_not_json_lines_is_refused(bundle, photos, tmp_path):
    other = picture(tmp_path / "holiday.png")
    before = digest(other)
    assert "not a JSON lines file" in one_error(cli("run", bundle, photos, "--out", other))
    assert digest(other) == before


def test_save_writes_new_files_only(bundle, photos, tmp_path):
    save = tmp_path / "annotated"
    (save / "cat").mkdir(parents=True)
    mine = picture(save / "cat" / "0.png", seed=99)
    before = digest(mine)
    proc = cli("run", bundle, photos, "--save", save, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert digest(mine) == before
    assert (save / "cat" / "0-1.png").is_file() and (save / "dog" / "0.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# folder scans, unknown class folders, file names


def test_symlink_cycles_are_followed_once_and_each_file_counted_once(tmp_path):
    from edgeexit.runtime.sources import open_source

    root = tmp_path / "loop"
    (root / "cat").mkdir(parents=True)
    picture(root / "cat" / "a.png")
    picture(root / "cat" / "b.png", seed=1)
    os.symlink(root, root / "cat" / "up")  # two links back to the parent: a naive walk never ends
    os.symlink(root / "cat", root / "cat" / "again")
    os.symlink(root / "cat" / "a.png", root / "cat" / "c.png")  # the same real file twice
    source = open_source(str(root), classes=CLASSES)
    assert [Path(p).name for p in source.files] == ["a.png", "b.png"]
    with source:
        assert len(list(source)) == 2


def test_class_folders_the_model_does_not_know_are_reported_and_skipped(bundle, photos):
    (photos / "unicorn").mkdir()
    picture(photos / "unicorn" / "u.png")
    proc = cli("run", bundle, photos, "--quiet")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "unicorn (1 images)" in warnings[0] and "skipped" in warnings[0]
    assert {rec["name"].split("/")[0] for rec in json_lines(proc.stdout)} == {"cat", "dog"}
    assert "/4)" in proc.stderr  # accuracy over the 4 known images
    assert re.search(r"skipped \(unreadable\)\s*│\s*1\s*│", proc.stderr), proc.stderr  # the unicorn image


def test_file_name_that_is_not_utf8_does_not_abort_an_out_run(bundle, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    picture(Path(os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9.png"))))
    picture(folder / "plain.png", seed=1)
    out = tmp_path / "decisions.jsonl"
    proc = cli("run", bundle, folder, "--out", out)
    assert proc.returncode == 0, proc.stderr
    names = sorted(rec["name"] for rec in json_lines(out.read_text(encoding="utf-8")))
    assert names == ["caf\\xe9.png", "plain.png"]


# ---------------------------------------------------------------------------------------------------------------
# video


class _CorruptMiddle:
    """A fake capture of ``count`` frames whose frames in ``bad`` cannot be decoded."""

    def __init__(self, count: int, bad: set, report_count: bool = True):
        self.count, self.bad, self.report_count, self.pos = count, bad, report_count, 0

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self):
        if self.pos >= self.count:
            return False, None
        self.pos += 1
        if self.pos - 1 in self.bad:
            return False, None
        return True, np.full((24, 32, 3), self.pos % 255, np.uint8)

    def get(self, prop: int) -> float:
        return {7: float(self.count) if self.report_count else 0.0, 5: 25.0}.get(prop, 0.0)

    def release(self) -> None:
        pass


@pytest.mark.parametrize("report_count", [True, False])
def test_video_skips_undecodable_frames_and_reaches_the_real_end(tmp_path, report_count):
    from edgeexit.runtime.sources import open_source

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not decoded by the fake")
    bad = set(range(55, 64)) | {120}
    source = open_source(str(clip), capture_factory=lambda *_: _CorruptMiddle(200, bad, report_count))
    with source:
        frames = list(source)
    assert len(frames) == 200
    assert [f.index for f in frames if f.error] == sorted(bad)
    assert source.lost == 10 and "10 undecodable frames skipped" in source.ended_reason


def test_video_run_summary_counts_lost_frames(tmp_path):
    from edgeexit.runtime.commands import RunOptions, run_command

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    out, err = _Text(), _Text()
    code = run_command(RunOptions(str(DEMO_BUNDLE), str(clip), quiet=True, batch=4), stdout=out, stderr=err,
                       capture_factory=lambda *_: _CorruptMiddle(40, {5, 6, 30}))
    assert code == 0
    assert len(json_lines(out.text)) == 37
    assert "3 undecodable frames skipped" in err.text
    assert sum("skipped frame" in line for line in err.text.splitlines()) == 3


class _Text:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return False


def test_opencv_and_ffmpeg_lines_are_silenced(bundle, tmp_path):
    pytest.importorskip("cv2")
    clip = tmp_path / "broken.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))  # "moov atom not found"
    line = one_error(cli("run", bundle, clip))
    assert "broken.mp4" in line and "moov atom not found" in line  # FFmpeg's reason, in edgeexit's one line
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert "empty file" in one_error(cli("run", bundle, empty))


# ---------------------------------------------------------------------------------------------------------------
# bounds and pixel limits


@pytest.mark.parametrize("args, option", [
    (("--batch", "0"), "--batch"), (("--max-frames", "-1"), "--max-frames"), (("--threads", "0"), "--threads"),
    (("--batch", "1000000"), "--batch"), (("--threads", "100000"), "--threads"), (("--max-pixels", "0"), "--max-pixels"),
])
def test_bad_numbers_are_one_line_exit_2(bundle, photos, args, option):
    assert option in one_error(cli("run", bundle, photos, *args))


def test_warmup_uses_the_batch_the_frames_fill(bundle, photos):
    from edgeexit.runtime.guards import warmup_batch
    from edgeexit.runtime.sources import open_source

    with open_source(str(photos), classes=CLASSES) as source:
        assert warmup_batch(4096, source) == 4
    with open_source(str(photos), loop=True) as source:
        assert warmup_batch(64, source) == 64
    proc = cli("run", bundle, photos, "--batch", "4096", "--quiet")
    assert proc.returncode == 0 and len(json_lines(proc.stdout)) == 4


def test_images_above_the_pixel_limit_are_skipped_and_counted(bundle, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("RGB", (9000, 6000)).save(folder / "huge.png")  # 54 MP: a few KB on disk, 162 MB decoded
    Image.new("RGB", (9000, 6000), (200, 10, 10)).save(folder / "huge.jpg", quality=30)
    picture(folder / "small.png")
    proc = cli("run", bundle, folder)
    assert proc.returncode == 0, proc.stderr
    assert sorted(rec["name"] for rec in json_lines(proc.stdout)) == ["huge.jpg", "small.png"]  # JPEG: draft
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "huge.png" in warnings[0] and "limit 50 MP" in warnings[0]
    assert "Traceback" not in proc.stderr
    proc = cli("run", bundle, folder, "--max-pixels", "2000")
    assert proc.returncode == 0 and len(json_lines(proc.stdout)) == 1  # only the 32x32 image fits


def test_pillow_bomb_limit_is_a_skipped_image_not_a_traceback(tmp_path):
    from edgeexit.imageio import ImageTooLarge, load_image

    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(path)  # 200 MP, above Pillow's own hard limit
    with pytest.raises(ImageTooLarge, match="too large"):
        load_image(path)


# ---------------------------------------------------------------------------------------------------------------
# image decoding


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    from edgeexit.imageio import load_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = load_image(tmp_path / "g16.png")
    assert image.shape == (64, 64, 3) and image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    assert abs(int(image[32, 0, 0]) - 128) <= 2  # not clipped to white
    assert load_image(tmp_path / "g16.png", channels=1).shape == (64, 64, 1)


def test_exif_orientation_is_applied(tmp_path):
    from edgeexit.imageio import load_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "rotated.jpg")
    assert image.shape == (40, 20, 3)
    assert image[:15].mean() > 200 and image[25:].mean() < 50  # the white half is on top once upright


@pytest.mark.parametrize("mode", ["P", "PT", "LA", "CMYK", "RGBA", "L", "I;16"])
def test_every_common_mode_decodes_to_rgb(tmp_path, mode):
    from edgeexit.imageio import load_image

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :, 0] = 200
    rgb[:, :, 1] = 40
    base = Image.fromarray(rgb)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    if mode == "PT":  # palette with a transparent index: composited on white, no Pillow warning
        img = base.convert("P")
        img.info["transparency"] = int(np.asarray(img)[0, 0])
        img.save(tmp_path / "x.png", transparency=int(np.asarray(img)[0, 0]))
        expected = (255, 255, 255)
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, np.uint8)]))
        img.save(tmp_path / "x.png")
        expected = (200, 40, 0)
    elif mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 257 * 90, np.uint16))
        img.save(tmp_path / "x.png")
        expected = (90, 90, 90)
    else:
        img = base.convert(mode)
        img.save(tmp_path / f"x{suffix}", **({"quality": 100} if suffix == ".jpg" else {}))
        back = np.asarray(img.convert("RGB"))[0, 0]
        expected = tuple(int(v) for v in back)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(tmp_path / f"x{suffix}")
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert np.abs(image[4, 4].astype(int) - np.array(expected)).max() <= 3


# ---------------------------------------------------------------------------------------------------------------
# manifest JSON


@pytest.mark.parametrize("text, words", [
    ("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
])
def test_manifest_with_nan_or_infinity_is_refused(bundle, photos, text, words):
    manifest = bundle / "manifest.json"
    data = json.loads(manifest.read_text())
    data["input"]["mean"][0] = "@constant@"
    manifest.write_text(json.dumps(data, indent=2).replace('"@constant@"', text))
    line = one_error(cli("run", bundle, photos))
    assert "manifest.json" in line and words in line


def test_deeply_nested_manifest_is_one_line(bundle, photos):
    (bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    line = one_error(cli("run", bundle, photos))
    assert "nested" in line
    from edgeexit.runtime.guards import json_depth, loads_strict

    assert json_depth('{"a": "[[[[", "b": [[1]]}') == 3
    assert loads_strict('{"x": [1, {"y": "]"}]}') == {"x": [1, {"y": "]"}]}


# ---------------------------------------------------------------------------------------------------------------
# signals


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} within {timeout} s: {seen[-500:]}")


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM,) * 6, (signal.SIGINT,) * 3])
def test_summary_is_printed_once_whatever_signals_arrive(bundle, photos, tmp_path, signals):
    out = tmp_path / "decisions.jsonl"
    proc = subprocess.Popen(cli_cmd("run", bundle, photos, "--loop", "--out", out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while (not out.exists() or out.stat().st_size < 2000) and time.monotonic() < deadline:
            time.sleep(0.05)
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.01)  # well within 100 ms of each other
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stdout.count("edgeexit run:") == 1 and "interrupted" in stdout, stdout + stderr
    assert "Traceback" not in stderr
    lines = out.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line whole


def test_sigint_while_a_stream_never_answers_acts_within_a_second(bundle):
    pytest.importorskip("cv2")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted: list = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    proc = subprocess.Popen(cli_cmd("run", bundle, f"rtsp://127.0.0.1:{port}/live"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not accepted and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert accepted, proc.stderr.read() if proc.poll() is not None else "no connection"
        time.sleep(0.3)  # now inside OpenCV's open, waiting for an answer that never comes
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - start
    finally:
        proc.kill()
        server.close()
    assert took < 1.5, took
    assert proc.returncode == 130
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["edgeexit: error: interrupted"], stderr


def test_blocking_open_is_interruptible_and_times_out():
    from edgeexit.runtime.sources import SourceError, call_interruptibly

    released: list = []
    gate = threading.Event()

    def blocking():
        gate.wait(5)
        return "capture"

    with pytest.raises(SourceError, match="no answer within 0.2 s"):
        call_interruptibly(blocking, 0.2, "stream rtsp://x", dispose=released.append)
    gate.set()
    time.sleep(0.2)
    assert released == ["capture"]  # a late capture is released, not leaked
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        call_interruptibly(lambda: time.sleep(5), 30, "stream rtsp://y")
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------------------------------------------------------
# warnings and the export's directory swap (torch-free parts)


def test_python_warnings_are_one_line_each(tmp_path):
    code = ("import sys, warnings; sys.modules['torch'] = None\n"
            "import edgeexit.runtime.doctor as doc\n"
            "real = doc.collect\n"
            "def noisy():\n"
            "    warnings.warn('first part\\nsecond part', RuntimeWarning)\n"
            "    return real()\n"
            "doc.collect = noisy\n"
            "from edgeexit.cli import main\n"
            "sys.argv = ['edgeexit', 'doctor', '--json']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["edgeexit: warning: first part second part"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_force_swap_keeps_a_complete_directory_and_stale_temps_go(tmp_path):
    from edgeexit.export.replace import commit_dir, exchange, remove_stale

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    new = tmp_path / ".bundle.tmp-1-aa"
    new.mkdir()
    (new / "manifest.json").write_text("new")
    commit_dir(new, out)
    assert (out / "manifest.json").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    if sys.platform.startswith("linux"):
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir(), b.mkdir()
        (a / "x").write_text("a")
        if exchange(a, b):
            assert (b / "x").read_text() == "a" and not (a / "x").exists()

    dead = _dead_pid()
    stale = tmp_path / f".bundle.tmp-{dead}-ab12"
    stale.mkdir()
    live = tmp_path / f".bundle.tmp-{os.getpid()}-cd34"
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-ef56"
    other.mkdir()
    assert remove_stale(out) == [stale]
    assert live.exists() and other.exists() and (out / "manifest.json").read_text() == "new"
    old_time = time.time() - 7200
    os.utime(live, (old_time, old_time))
    assert remove_stale(out) == [live]  # older than an hour: stale whoever made it


def test_a_bundle_set_aside_by_a_killed_force_is_put_back(tmp_path):
    from edgeexit.export.replace import remove_stale

    aside = tmp_path / f".bundle.old-{_dead_pid()}-0a0b"
    aside.mkdir()
    (aside / "manifest.json").write_text("old")
    remove_stale(tmp_path / "bundle")
    assert (tmp_path / "bundle" / "manifest.json").read_text() == "old" and not aside.exists()


def test_sigterm_as_interrupt_raises_keyboard_interrupt():
    from edgeexit.runtime.guards import SigtermAsInterrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with SigtermAsInterrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before


def test_output_guard_ignores_cameras_and_urls(tmp_path):
    from edgeexit.runtime.guards import check_output_paths

    check_output_paths({"--out": tmp_path / "x.jsonl", "--save": tmp_path / "s"}, ("0", "rtsp://h/x", "/dev/video0"))
    with pytest.raises(ValueError, match="--save"):
        check_output_paths({"--save": tmp_path}, (f"file://{tmp_path}",))


def test_refused_stream_is_named_in_one_line(bundle):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.close()  # nothing listens there now
    line = one_error(cli("run", bundle, f"rtsp://user:secret@127.0.0.1:{port}/live"))
    assert "connection refused" in line and "secret" not in line


def test_save_into_the_folder_of_a_video_keeps_the_video(bundle, tmp_path):
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path / "clips"
    folder.mkdir()
    clip = folder / "clip.mp4"  # the name the annotated video would take
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (32, 32))
    if not writer.isOpened():
        pytest.skip("no mp4v encoder in this OpenCV")
    for k in range(6):
        writer.write(np.full((32, 32, 3), 40 * k, np.uint8))
    writer.release()
    before = digest(clip)
    proc = cli("run", bundle, clip, "--save", folder, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert digest(clip) == before
    assert sorted(p.name for p in folder.iterdir()) == ["clip-1.mp4", "clip.mp4"]

"""`edgeexit serve`: the inference callable against the local runtime, then a real Triton server (PyTriton) on
127.0.0.1 with free ports, fed by several client threads.

The server runs on the system's Python (PyTriton's stub links its libpython), in a venv that
``edgeexit.serve.launch.serve_python`` builds once per checkout under ~/.cache/edgeexit (about half a minute);
those tests skip only where the machine has no system Python 3.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeexit.imageio import load_image
from edgeexit.runtime.backends import open_backend
from edgeexit.runtime.bundle import load_bundle
from edgeexit.runtime.chain import StageRunner
from edgeexit.serve.model import ExitCounters, ServeModel, response_rows

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "edgeexit" / "assets" / "demo"
BUNDLE = DEMO / "bundle"
FLOAT_FIELDS = ("confidence", "gate_score")
EXACT_FIELDS = ("class_id", "label", "exit", "macs", "failed")


def demo_frames() -> list:
    return [load_image(p) for p in sorted((DEMO / "samples").rglob("*.png"))]


def png_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG")
    return buf.getvalue()


def local_decisions(frames: list, full: bool) -> list:
    """The local runtime's decisions, one frame per batch (what a camera running `edgeexit run` gets)."""
    bundle = load_bundle(BUNDLE)
    with open_backend(bundle, "onnxruntime", max_batch=1) as backend:
        runner = StageRunner(bundle, backend, full=full)
        return [runner.run_batch(runner.prepare([f]))[0].to_dict() for f in frames]


def assert_same_decision(got: dict, want: dict, where: str) -> None:
    for key in EXACT_FIELDS:
        assert got[key] == want[key], f"{where}: {key} {got[key]!r} != {want[key]!r}"
    for key in FLOAT_FIELDS:
        if want[key] is None:
            assert got[key] is None, f"{where}: {key} {got[key]!r} != None"
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-5), f"{where}: {key}"


@pytest.fixture(scope="module")
def frames() -> list:
    return demo_frames()


@pytest.fixture(scope="module")
def expected(frames) -> dict:
    return {"bundle": local_decisions(frames, full=False), "bundle_full": local_decisions(frames, full=True)}


# --- the inference callable, in this process -------------------------------------------------------------------


def test_callable_batches_requests_and_answers_bad_ones_in_band(frames, expected):
    bundle = load_bundle(BUNDLE)
    with open_backend(bundle, "onnxruntime", max_batch=32) as backend:
        runner = StageRunner(bundle, backend)
        counters = ExitCounters(runner.num_exits, reference_macs=40813184)
        model = ServeModel(runner, counters)
        image = np.empty((2, 1), dtype=np.object_)
        image[0, 0], image[1, 0] = png_bytes(frames[2]), png_bytes(frames[3])
        garbage = np.array([[b"not an image"]], dtype=np.object_)
        requests = [
            {"frame": np.stack(frames[0:2])},                       # two raw frames in one request
            {"image": garbage},                                     # undecodable
            {"image": image},                                       # two PNGs
            {},                                                     # no input
            {"frame": np.zeros((1, 0, 5, 3), dtype=np.uint8)},      # empty frame
            {"frame": np.stack(frames[4:5])},
        ]
        responses = [response_rows(r) for r in model(requests)]
    assert [len(r) for r in responses] == [2, 1, 2, 1, 1, 1]
    good = responses[0] + responses[2] + responses[5]
    for i, (got, want) in enumerate(zip(good, [expected["bundle"][k] for k in (0, 1, 2, 3, 4)])):
        assert_same_decision(got, want, f"frame {i}")
    assert "cannot decode image" in responses[1][0]["failed"] and responses[1][0]["class_id"] == -1
    assert "exactly one of the inputs" in responses[3][0]["failed"]
    assert "H, W > 0" in responses[4][0]["failed"] and responses[4][0]["exit"] == -1
    snap = counters.snapshot()
    assert (snap["requests"], snap["bad_requests"], snap["frames"], snap["batches"]) == (6, 3, 5, 1)
    assert sum(snap["exits"]) == 5
    mean_macs = np.mean([expected["bundle"][k]["macs"] for k in range(5)])
    assert snap["mean_cost"] == pytest.approx(mean_macs / 40813184, abs=1e-6)


def test_model_names_follow_the_bundle():
    from edgeexit.serve.server import model_name

    assert model_name("runs/my bundle/") == "my_bundle"
    assert model_name(str(BUNDLE)) == "bundle"
    assert model_name(str(BUNDLE), "cams-v2.1") == "cams-v2.1"


def test_a_python_other_than_the_stubs_is_refused_in_one_line(tmp_path, monkeypatch):
    from edgeexit.serve import server

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tmp_path / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.write_bytes(b"\x7fELF")
    monkeypatch.setattr(server, "_stub_libpython", lambda _stub: tmp_path / "libpython-elsewhere.so.1.0")
    with pytest.raises(server.ServeError, match="venv of the system's Python") as info:
        server.check_python(tmp_path)
    assert "\n" not in str(info.value)
    import sysconfig

    own = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("INSTSONAME")
    if own.exists():
        monkeypatch.setattr(server, "_stub_libpython", lambda _stub: own)
        server.check_python(tmp_path)  # the stub loads this interpreter's own libpython: accepted


def test_serve_errors_are_one_line(monkeypatch):
    r = subprocess.run([sys.executable, "-m", "edgeexit.cli", "serve", str(BUNDLE), "--http-port", "8000",
                        "--grpc-port", "8000"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "must differ" in r.stderr
    from edgeexit.serve import server

    monkeypatch.setitem(sys.modules, "pytriton", None)  # as if the serve extra were not installed
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    with pytest.raises(server.ServeError, match=r"pip install 'edgeexit\[serve\]'"):
        server.serve_command(str(BUNDLE))


def test_a_port_in_use_is_named_before_triton_starts():
    import socket

    from edgeexit.serve.server import ServeError, check_ports_free

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"127.0.0.1:{port} \\(--grpc-port\\)"):
            check_ports_free("127.0.0.1", {"--http-port": 0, "--grpc-port": port})


# --- a real server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def serve_python():
    from edgeexit.serve.launch import LaunchError, serve_python, system_python

    if system_python() is None:
        pytest.skip("no system Python 3 (/usr/bin/python3.11 or /usr/bin/python3): PyTriton's stub needs one")
    try:
        return serve_python()
    except LaunchError as exc:
        pytest.fail(f"cannot build the serve venv: {exc}")


@pytest.fixture(scope="module")
def server(serve_python, tmp_path_factory):
    from edgeexit.serve.launch import start_server

    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = start_server(serve_python, BUNDLE, log, ["--max-batch", "16", "--queue-delay-us", "2000",
                                                   "--instances", "2", "--stats-interval", "1"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log_text()[-3000:]
    assert "edgeexit serve: stopped" in srv.log_text()


def get(url: str) -> tuple:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def stream(server, model: str, frames: list, indices: list, encoded: bool, out: dict, errors: list) -> None:
    """One camera: frames one request each, raw or PNG-encoded; answers into out[index]."""
    from edgeexit.serve.client import ServeClient

    try:
        with ServeClient(server.url, model) as client:
            for k in indices:
                rows = client.classify_images([png_bytes(frames[k])]) if encoded else client.classify_frames([frames[k]])
                out[k] = rows[0]
    except Exception as exc:  # noqa: BLE001 (reported by the test)
        errors.append(f"{model} {indices[:3]}: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bundle", "bundle_full"])
def test_many_clients_get_the_local_runtimes_decisions(server, frames, expected, model):
    threads, out, errors = [], {}, []
    for t in range(8):  # 8 cameras, half sending PNG bytes, half raw frames
        indices = list(range(t, len(frames), 8))
        threads.append(threading.Thread(target=stream, args=(server, model, frames, indices, t % 2 == 0, out, errors)))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert sorted(out) == list(range(len(frames)))  # every request answered
    for k, want in enumerate(expected[model]):
        assert_same_decision(out[k], want, f"{model} frame {k}")
    if model == "bundle":
        assert len({row["exit"] for row in out.values()}) > 1  # the adaptive model really exits early on some


@pytest.mark.slow
def test_bad_requests_fail_alone_while_other_cameras_are_served(server, frames, expected):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from edgeexit.serve.client import ServeClient

    out, errors, bad = {}, [], {}
    good = [threading.Thread(target=stream, args=(server, "bundle", frames, list(range(t, len(frames), 4)),
                                                  t % 2 == 1, out, errors)) for t in range(4)]

    def send_bad() -> None:
        with ServeClient(server.url, "bundle") as client:
            for round_ in range(5):
                bad.setdefault("undecodable", []).append(client.classify_images([b"\x89PNG broken"])[0])
                for label, array in (("float32", np.zeros((1, 32, 32, 3), np.float32)),
                                     ("channels", np.zeros((1, 32, 32, 5), np.uint8)),
                                     ("rank", np.zeros((1, 32, 32), np.uint8))):
                    tensor = http.InferInput("frame", list(array.shape), "FP32" if array.dtype == np.float32 else "UINT8")
                    tensor.set_data_from_numpy(array)
                    try:
                        client.client.infer("bundle", [tensor])
                        bad.setdefault(label, []).append("answered")
                    except InferenceServerException as exc:
                        bad.setdefault(label, []).append(str(exc))

    threads = good + [threading.Thread(target=send_bad) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert sorted(out) == list(range(len(frames)))
    for k, want in enumerate(expected["bundle"]):
        assert_same_decision(out[k], want, f"frame {k}")
    assert len(bad["undecodable"]) == 10
    assert all(row["class_id"] == -1 and "cannot decode image" in row["failed"] for row in bad["undecodable"])
    assert all("data-type is 'FP32'" in e and "UINT8" in e for e in bad["float32"]), bad["float32"][:1]
    assert all("unexpected shape" in e for e in bad["channels"] + bad["rank"]), sorted(set(bad["channels"] + bad["rank"]))


@pytest.mark.slow
def test_health_metrics_and_edgeexit_counters(server, frames):
    from edgeexit.serve.client import ServeClient

    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/bundle/ready", "/v2/models/bundle_full/ready"):
        assert get(f"http://{server.url}{path}")[0] == 200, path
    assert get(f"http://{server.url}/v2/models/no_such_model/ready")[0] != 200
    with ServeClient(server.url, "bundle") as client:
        client.classify_frames(frames[:3])
    status, text = get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert status == 200
    success = re.search(r'nv_inference_request_success\{model="bundle",version="1"\} (\d+)', text)
    assert success and int(success.group(1)) >= 1, text[:500]
    deadline = time.monotonic() + 30  # the counters are logged every second (--stats-interval 1)
    stats = []
    while time.monotonic() < deadline and not stats:
        stats = [json.loads(line) for line in server.log_text().splitlines()
                 if line.startswith('{"edgeexit_serve_stats": "bundle"') and '"frames": 0' not in line]
        time.sleep(0.5)
    assert stats, server.log_text()[-2000:]
    last = stats[-1]
    assert len(last["exits"]) == 7 and sum(last["exits"]) == last["frames"] - last["failed"]
    assert 0 < last["mean_cost"] <= 1


@pytest.mark.slow
def test_sigterm_answers_requests_in_flight_then_stops(serve_python, tmp_path, frames, expected):
    """Requests held in Triton's queue (an 8 s batching delay) when SIGTERM arrives are still answered."""
    from edgeexit.serve.launch import start_server

    srv = start_server(serve_python, BUNDLE, tmp_path / "server.log",
                       ["--max-batch", "16", "--queue-delay-us", "8000000", "--drain-timeout", "20"])
    try:
        srv.wait_ready()
        out, errors = {}, []
        threads = [threading.Thread(target=stream, args=(srv, "bundle", frames, [k], False, out, errors))
                   for k in range(4)]
        for th in threads:
            th.start()
        deadline, pending = time.monotonic() + 30, 0
        while time.monotonic() < deadline and pending < 4:
            text = get(f"http://127.0.0.1:{srv.metrics_port}/metrics")[1]
            found = re.search(r'nv_inference_pending_request_count\{model="bundle",version="1"\} (\d+)', text)
            pending = int(found.group(1)) if found else 0
            time.sleep(0.05)
        assert pending == 4, "the 4 requests never waited in Triton's queue"
        srv.terminate()
        for th in threads:
            th.join(timeout=60)
        code = srv.process.wait(timeout=60)
    finally:
        srv.stop()
    assert not errors, errors
    assert sorted(out) == [0, 1, 2, 3]
    for k in range(4):
        assert_same_decision(out[k], expected["bundle"][k], f"frame {k}")
    assert code == 0 and "edgeexit serve: stopped" in srv.log_text()

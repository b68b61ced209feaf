"""``edgeexit serve``: a bundle as two Triton Inference Server models, through PyTriton (torch-free).

``<name>`` runs the bundle's exit policy (early exit with compaction inside every batch) and ``<name>_full`` the
plain network (every segment, the last head), for comparisons. Triton's dynamic batcher groups the requests of
all clients (``max_batch``, ``queue_delay_us``); each model has ``instances`` instances, each with a runner and
backend of its own. Triton serves HTTP/REST and gRPC (KServe v2 protocol: ``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/<name>/ready``, ``/v2/models/<name>/infer``) and Prometheus metrics
(``/metrics`` on the metrics port). edgeexit's own counters per model (exits taken, mean cost, bad requests, how
many requests a batch grouped) are logged as one JSON line every ``stats_interval`` seconds and at the end:
PyTriton runs the callable in this process, outside Triton's Python backend, so it cannot add Triton metrics.

SIGTERM or SIGINT stops the server: Triton stops taking new requests, answers those in flight (waiting up to
``drain_timeout`` seconds), then the models are unloaded; the return code is 0.

PyTriton's Python-backend stub is a binary linked against a shared ``libpython3.X.so``: the Python that runs this
must be that library's interpreter (e.g. Debian's ``/usr/bin/python3.11``, in a venv). :func:`check_python`
says so in one line instead of letting the model fail to load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .model import FRAME_INPUT, IMAGE_INPUT, OUTPUTS, ExitCounters, ServeModel
from ..errors import EdgeexitError


class ServeError(EdgeexitError, RuntimeError):
    """An expected problem (missing extra, wrong Python, bad option): one line for the user."""


def _import_pytriton() -> Any:
    try:
        import pytriton.triton  # noqa: PLC0415
    except ImportError:
        raise ServeError("`edgeexit serve` needs the serve extra: pip install 'edgeexit[serve]' (PyTriton; "
                         "in a venv of the system's Python, see the README)") from None
    return pytriton


def model_name(bundle_path: str, name: Optional[str] = None) -> str:
    """The Triton model name: ``name``, else the bundle directory's name, with characters Triton does not allow
    in model names (anything but letters, digits, ``.``, ``_``, ``-``) replaced by ``_``."""
    raw = name if name else Path(bundle_path).resolve().name
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", raw)
    if not clean or clean.strip(".") == "":
        raise ServeError(f"cannot make a Triton model name from {raw!r}; pass --name")
    return clean


def _stub_libpython(stub: Path) -> Optional[Path]:
    """The libpython that the dynamic loader gives PyTriton's stub, by ``ldd`` (None where that cannot be told)."""
    ldd = shutil.which("ldd")
    if ldd is None or not stub.is_file():
        return None
    try:
        out = subprocess.run([ldd, str(stub)], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"libpython\S*\s+=>\s+(\S+)", out)
    return Path(match.group(1)) if match and match.group(1) != "not" else None


def check_python(pytriton_root: Path) -> None:
    """Raise ServeError unless this interpreter is the one PyTriton's Python-backend stub will load.

    The stub for Python X.Y links ``libpythonX.Y.so.1.0`` from the loader's search path (the system's). A Python
    built separately (pyenv, a source build) has its own libpython; the stub then runs the system's copy against
    this interpreter's standard library, and the model fails to load (e.g. ``'_thread.RLock' object has no
    attribute '_recursion_count'`` with 3.11.7 over 3.11.2).
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pytriton_root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"PyTriton has no Python-backend stub for Python {version} ({stub} is missing)")
    loaded = _stub_libpython(stub)
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if loaded is None or not libdir or not soname:
        return
    own = Path(libdir) / soname
    if not own.exists() or os.path.realpath(own) != os.path.realpath(loaded):
        raise ServeError(
            f"this Python ({sys.version.split()[0]}, {sys.executable}) is not the one PyTriton's Python backend "
            f"loads ({loaded}); run serve from a venv of the system's Python, e.g. /usr/bin/python{version} -m venv "
            f"serve-venv && serve-venv/bin/pip install 'edgeexit[serve]'")


def check_options(minimums: Dict[str, Tuple[int, int]], ports: Dict[str, int]) -> None:
    """ValueError for an option below its minimum (``{option: (value, minimum)}``), a port outside 1-65535 or two
    equal ports."""
    for option, (value, low) in minimums.items():
        if value < low:
            raise ValueError(f"{option} must be >= {low}, got {value}")
    for option, port in ports.items():
        if not 0 < port < 65536:
            raise ValueError(f"{option} must be a port number (1-65535), got {port}")
    if len(set(ports.values())) != len(ports):
        raise ValueError(f"{', '.join(ports)} must differ")


def check_ports_free(host: str, ports: Dict[str, int]) -> None:
    """Raise ServeError naming the first port something else listens on (Triton would only time out)."""
    import socket  # noqa: PLC0415

    for option, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ServeError(f"cannot listen on {host}:{port} ({option}): {exc.strerror or exc}") from None


class StatsLogger:
    """Logs every model's ExitCounters as one JSON line per model, every ``interval`` seconds (a daemon thread;
    none when ``interval`` <= 0) and once more, marked final, on ``stop()``."""

    def __init__(self, counters: Dict[str, ExitCounters], interval: float, emit: Callable[[str], None]):
        self.counters, self.interval, self.emit = counters, float(interval), emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeexit-serve-stats", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def log(self, final: bool = False) -> None:
        for name, counters in self.counters.items():
            self.emit(json.dumps({"edgeexit_serve_stats": name, "final": final, "time": round(time.time(), 3),
                                  **counters.snapshot()}))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.log(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.log()


def load_models(bundle_path: str, base: str, instances: int, backends: List[Any], *, gate: Optional[str],
                backend: str, providers: Optional[str], threads: Optional[int], max_batch: int
                ) -> Tuple[Dict[str, List[ServeModel]], Dict[str, ExitCounters]]:
    """``instances`` warmed-up ServeModels for ``base`` (adaptive) and ``base_full`` (plain network), each with a
    backend of its own (appended to ``backends`` as it is opened, for the caller to close), and one ExitCounters
    per model whose reference cost is the plain network's MACs."""
    from ..runtime.backends import open_backend  # noqa: PLC0415
    from ..runtime.bundle import load_bundle  # noqa: PLC0415
    from ..runtime.chain import StageRunner  # noqa: PLC0415

    bundle = load_bundle(bundle_path)
    models: Dict[str, List[ServeModel]] = {}
    counters: Dict[str, ExitCounters] = {}
    reference_macs = None
    for full in (False, True):
        key = f"{base}_full" if full else base
        models[key] = []
        for _ in range(instances):
            engines = open_backend(bundle, backend, providers=providers, threads=threads, max_batch=max_batch)
            backends.append(engines)
            runner = StageRunner(bundle, engines, gate=gate, full=full)
            model = ServeModel(runner, counters.setdefault(key, ExitCounters(runner.num_exits)))
            warm = runner.run_batch(runner.prepare([np.zeros((64, 64, model.channels), dtype=np.uint8)]))
            if full:  # a plain-network decision's MACs are the reference of mean_cost
                reference_macs = int(warm[0].to_dict()["macs"])
            models[key].append(model)
    for c in counters.values():
        c.reference_macs = reference_macs
    return models, counters


def serve_command(
    bundle_path: str,
    *,
    name: Optional[str] = None,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    max_batch: int = 32,
    queue_delay_us: int = 1000,
    instances: int = 1,
    gate: Optional[str] = None,
    backend: str = "auto",
    providers: Optional[str] = None,
    threads: Optional[int] = None,
    stats_interval: float = 60.0,
    drain_timeout: int = 30,
    stderr: Any = None,
) -> int:
    """Load the bundle, start Triton with ``<name>`` and ``<name>_full``, serve until SIGTERM/SIGINT. Returns 0.

    Expected problems raise ServeError, BundleError, BackendError or ValueError (one line each for the CLI)."""
    stderr = stderr if stderr is not None else sys.stderr

    def info(message: str) -> None:
        print(message, file=stderr, flush=True)

    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    check_options({"--max-batch": (max_batch, 1), "--instances": (instances, 1),
                   "--queue-delay-us": (queue_delay_us, 0), "--drain-timeout": (drain_timeout, 0)}, ports)
    pytriton = _import_pytriton()
    check_python(Path(pytriton.__file__).parent)
    check_ports_free(host, ports)
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: PLC0415
    from pytriton.triton import Triton, TritonConfig  # noqa: PLC0415

    base = model_name(bundle_path, name)
    backends: List[Any] = []
    try:
        models, counters = load_models(bundle_path, base, instances, backends, gate=gate, backend=backend,
                                       providers=providers, threads=threads, max_batch=max_batch)
        channels = models[base][0].channels
        info(f"edgeexit serve: bundle {bundle_path}: models {base!r} (adaptive) and {base}_full (plain network), "
             f"{instances} instance(s) each, max batch {max_batch}, queue delay {queue_delay_us} us; "
             f"{backends[0].describe()}")
        config = TritonConfig(http_address=host, grpc_address=host, metrics_address=host, http_port=http_port,
                              grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_secs=drain_timeout,
                              allow_metrics=True, allow_cpu_metrics=True, log_verbose=0)
        inputs = [Tensor(name=IMAGE_INPUT, dtype=np.bytes_, shape=(1,), optional=True),
                  Tensor(name=FRAME_INPUT, dtype=np.uint8, shape=(-1, -1, channels), optional=True)]
        outputs = [Tensor(name=n, dtype=(np.bytes_ if dt is np.object_ else dt), shape=(1,)) for n, dt in OUTPUTS]
        stats = StatsLogger(counters, stats_interval, info)
        stats.start()
        previous = _on_sigterm_interrupt()
        try:
            with Triton(config=config) as triton:
                for key, callables in models.items():
                    triton.bind(model_name=key, infer_func=list(callables), inputs=inputs, outputs=outputs,
                                config=ModelConfig(max_batch_size=max_batch,
                                                   batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)),
                                strict=False)
                info(f"edgeexit serve: listening on {host}: HTTP {http_port}, gRPC {grpc_port}, metrics "
                     f"{metrics_port} (/metrics); SIGTERM or Ctrl-C drains and stops")
                triton.serve()  # returns after SIGINT/SIGTERM (KeyboardInterrupt), once Triton has drained
        except KeyboardInterrupt:  # a signal during start-up or binding
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            stats.stop()
        info("edgeexit serve: stopped")
        return 0
    finally:
        for engines in backends:
            engines.close()


def _on_sigterm_interrupt() -> Any:
    """SIGTERM behaves as Ctrl-C: PyTriton's serve loop then stops Triton, which drains in-flight requests."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, on_term)

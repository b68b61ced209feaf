"""Start ``edgeexit serve`` as a child process from any Python: find or build the venv it needs, pick free ports,
wait until Triton is ready, stop it with SIGTERM. Used by the tests and ``benchmarks/serve.py``.

PyTriton's Python-backend stub links the system's ``libpython3.X.so``, so the server must run on the system's own
Python (Debian's ``/usr/bin/python3.11`` here), not on a separately built one (pyenv, conda). :func:`serve_python`
returns an interpreter that can run the server: ``$EDGEEXIT_SERVE_PYTHON`` when set, else a venv of the system
Python with this checkout installed editable with the serve extra, built once under
``~/.cache/edgeexit/`` (or ``$EDGEEXIT_SERVE_VENV``) and reused while this checkout's pyproject.toml is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, List, Optional, Sequence
from ..errors import EdgeexitError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHONS = ("/usr/bin/python3.11", "/usr/bin/python3")
READY_MARK = ".edgeexit-serve-ready"


class LaunchError(EdgeexitError, RuntimeError):
    """The server's environment could not be built or the server did not come up (the message says why)."""


def system_python() -> Optional[Path]:
    """The operating system's own Python 3 (the one whose libpython PyTriton's stub loads), or None."""
    for candidate in SYSTEM_PYTHONS:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def venv_dir(python: Path, root: Path = PROJECT_ROOT) -> Path:
    """Where the serve venv of this checkout lives: one per (checkout, pyproject.toml, interpreter)."""
    if os.environ.get("EDGEEXIT_SERVE_VENV"):
        return Path(os.environ["EDGEEXIT_SERVE_VENV"])
    key = hashlib.sha256(f"{root.resolve()}\n{python}\n".encode() + (root / "pyproject.toml").read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeexit"
    return cache / f"serve-venv-{key.hexdigest()[:12]}"


def _run(cmd: Sequence[str], timeout: float, log: IO[str]) -> None:
    print(f"edgeexit: $ {' '.join(map(str, cmd))}", file=log, flush=True)
    try:
        done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"timed out after {timeout:.0f} s: {' '.join(map(str, cmd))}") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise LaunchError(f"failed ({done.returncode}): {' '.join(map(str, cmd))}: {tail}")


def build_venv(python: Path, target: Path, root: Path = PROJECT_ROOT, log: IO[str] = sys.stderr,
               timeout: float = 1200.0) -> Path:
    """``python -m venv`` + ``pip install -e 'root[serve]'`` into ``target`` (built beside it, then renamed, so an
    interrupted build never looks finished). Returns the venv's interpreter."""
    building = target.with_name(f"{target.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    try:
        _run([python, "-m", "venv", building], 300, log)
        env_python = building / "bin" / "python"
        _run([env_python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{root}[serve]"],
             timeout, log)
        (building / READY_MARK).write_text(f"{python}\n{root}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target / "bin" / "python"


def serve_python(root: Path = PROJECT_ROOT, log: IO[str] = sys.stderr) -> Path:
    """An interpreter that can run ``edgeexit serve`` for this checkout (see the module docstring). Raises
    LaunchError when there is no system Python or the venv cannot be built."""
    if os.environ.get("EDGEEXIT_SERVE_PYTHON"):
        return Path(os.environ["EDGEEXIT_SERVE_PYTHON"])
    python = system_python()
    if python is None:
        raise LaunchError(f"no system Python found ({', '.join(SYSTEM_PYTHONS)})")
    target = venv_dir(python, root)
    if (target / READY_MARK).is_file() and (target / "bin" / "python").exists():
        return target / "bin" / "python"
    t0 = time.monotonic()
    env_python = build_venv(python, target, root, log)
    print(f"edgeexit: built the serve venv {target} in {time.monotonic() - t0:.0f} s", file=log, flush=True)
    return env_python


def free_ports(count: int) -> List[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_status(url: str, timeout: float = 2.0) -> Optional[int]:
    """The HTTP status of GET url, or None when nothing answers."""
    try:
        with closing(urllib.request.urlopen(url, timeout=timeout)) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


@dataclass
class ServerProcess:
    """A running ``edgeexit serve`` child on 127.0.0.1; its stdout and stderr go to ``log_path``."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    model: str
    log_path: Path
    _log: IO[str] = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Poll Triton's readiness endpoints (server, then both models) until they answer 200."""
        deadline = time.monotonic() + timeout
        urls = [f"http://{self.url}/v2/health/ready", f"http://{self.url}/v2/models/{self.model}/ready",
                f"http://{self.url}/v2/models/{self.model}_full/ready"]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(f"edgeexit serve exited with {self.process.returncode}: "
                                  f"{' | '.join(self.log_text().strip().splitlines()[-5:])}")
            if all(http_status(u) == 200 for u in urls):
                return
            time.sleep(0.5)
        self.stop()
        raise LaunchError(f"edgeexit serve not ready after {timeout:.0f} s: "
                          f"{' | '.join(self.log_text().strip().splitlines()[-5:])}")

    def terminate(self) -> None:
        """Send SIGTERM (the server drains in-flight requests, then stops)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 90.0) -> Optional[int]:
        """SIGTERM, wait up to ``timeout`` seconds, then kill. Returns the exit code."""
        self.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(python: Path, bundle: Path, log_path: Path, args: Sequence[str] = (), model: Optional[str] = None,
                 root: Path = PROJECT_ROOT) -> ServerProcess:
    """Start ``python -m edgeexit.cli serve BUNDLE`` on 127.0.0.1 with free ports and this checkout first on the
    path; returns at once (call ``wait_ready``). ``model``: the model name the server will use (for readiness)."""
    http_port, grpc_port, metrics_port = free_ports(3)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    log = open(log_path, "w")  # noqa: SIM115 (closed by ServerProcess.stop)
    cmd = [str(python), "-m", "edgeexit.cli", "serve", str(bundle), "--host", "127.0.0.1",
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), *args]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    from .server import model_name  # noqa: PLC0415

    return ServerProcess(process, http_port, grpc_port, metrics_port, model or model_name(str(bundle)), log_path, log)

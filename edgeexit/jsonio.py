"""Files written whole or not at all, and strict JSON (numpy only; torch-free): the one home for both.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temporary file beside the target, fsynced, then renamed
  over it (readers see the old file or the new one, never half of one); the new file gets the mode an ordinary
  new file would (or the old file's).
- :func:`plain`: a copy that strict JSON can hold: numpy scalars and arrays become Python numbers and lists, tuples
  lists, paths strings, and non-finite floats ``null`` (reports: "no value").
- :func:`write_json`: ``plain(data)`` as indented strict JSON, atomically.

Bundle manifests keep their own encoding of infinite thresholds (``runtime.bundle.json_ready``: "inf" / "-inf",
which ``ExitPolicy.from_dict`` reads back) and write through :func:`atomic_write_text` too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["atomic_write_bytes", "atomic_write_text", "plain", "write_json"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode an ordinary new file gets (mkstemp makes 0600): the existing file's, else 0666 minus the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write_bytes(path: Union[str, Path], data: Union[bytes, Callable[[Any], None]]) -> None:
    """Write ``data`` (bytes, or a callable taking the open binary file) to a temporary file beside ``path``,
    fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def plain(value: Any, digits: Optional[int] = None) -> Any:
    """A strict-JSON copy of ``value`` (module docstring); numpy is handled without importing it. ``digits``:
    floats rounded to that many significant digits (drops float noise, keeps tiny values)."""
    if isinstance(value, dict):
        return {str(k): plain(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, digits) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):  # numpy scalar or array
        return plain(value.tolist(), digits)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return value if digits is None else float(f"{value:.{digits}g}")
    return value


def write_json(path: Union[str, Path], data: Any, digits: Optional[int] = None) -> None:
    """``plain(data, digits)`` as indented strict JSON, written atomically."""
    atomic_write_text(path, json.dumps(plain(data, digits), indent=2, allow_nan=False) + "\n")

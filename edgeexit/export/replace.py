"""Putting a finished bundle directory in place (torch-free, so engine builds on a device can use it too).

- ``commit_dir(tmp, out)``: a new target is one rename; an existing one is swapped with ``renameat2(RENAME_EXCHANGE)``
  (Linux, via ctypes), so at every instant a complete bundle is at ``out``; the old one is then deleted. Where the
  exchange is not available: old -> ``.<name>.old-<pid>-<hex>``, new -> ``out``, delete old (a kill between the two
  renames leaves the old bundle aside; ``remove_stale`` puts it back).
- ``temp_dir_for(out)``: the ``.<name>.tmp-<pid>-<hex>`` sibling an export writes into.
- ``remove_stale(out)``: deletes temporary and old siblings left by killed exports (their pid is dead, or older
  than an hour), and restores an old bundle when nothing is at ``out``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Optional

__all__ = ["commit_dir", "temp_dir_for", "remove_stale", "exchange"]

STALE_AFTER_S = 3600.0
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def temp_dir_for(out: Path, kind: str = "tmp") -> Path:
    """A fresh sibling name of ``out`` that carries this process id (so a later export can tell it is stale)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _renameat2() -> Optional[ctypes._CFuncPtr]:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (``renameat2(RENAME_EXCHANGE)``). False when the system or the file
    system cannot (not Linux, old glibc or kernel, a file system without it); OSError for real failures."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory ``tmp`` at ``out`` (replacing what is there: the caller checked it may), so
    that a complete directory is at ``out`` at every instant where the system can swap atomically."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if exchange(tmp, out):  # out is the new bundle; tmp now holds the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_dir_for(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale(out: Path, now: Optional[float] = None) -> list[Path]:
    """Delete ``.<out name>.tmp-*`` / ``.old-*`` siblings of ``out`` whose process is gone or that are older than
    an hour; when ``out`` is missing, the newest stale ``.old`` directory (a bundle set aside by a killed
    ``--force``) is renamed back to ``out`` first. Returns the paths removed."""
    now = time.time() if now is None else now
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    stale = []
    for path in siblings:
        match = _SIBLING.match(path.name)
        if not match or match.group("name") != out.name or not path.is_dir() or path.is_symlink():
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        if not _pid_alive(int(match.group("pid"))) or age > STALE_AFTER_S:
            stale.append((match.group("kind"), path.stat().st_mtime, path))
    olds = sorted((p for kind, _t, p in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not (out.exists() or out.is_symlink()):
        os.rename(olds[-1], out)
    removed = []
    for _kind, _t, path in stale:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed

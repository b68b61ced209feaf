"""Guards of the runtime commands (torch-free): argument bounds, outputs that must not clobber inputs, strict JSON,
and signal handling that never loses the summary.

Each guard raises ValueError with a one-line message (the CLI prints it as ``edgeexit: error: ...``, exit code 2),
so ``run`` and ``profile`` call them in one line each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Union

__all__ = [
    "MAX_BATCH",
    "MAX_JSON_DEPTH",
    "max_threads",
    "check_bounds",
    "warmup_batch",
    "check_output_paths",
    "report_unknown_folders",
    "loads_strict",
    "InterruptGuard",
    "SigtermAsInterrupt",
]

MAX_BATCH = 4096  # frames per batch: well above any camera batch, below what exhausts memory in the warm-up
MAX_THREADS = 256
MAX_JSON_DEPTH = 64  # a manifest nests about 6 deep; deeper is corruption or an attack on the parser

PathLike = Union[str, os.PathLike]


def max_threads() -> int:
    """The most intra-op threads a session may ask for: 4 per CPU, at most 256 (more only adds contention)."""
    return min(MAX_THREADS, 4 * (os.cpu_count() or 1))


def check_bounds(batch: Optional[int] = None, threads: Optional[int] = None) -> None:
    """``--batch`` in [1, MAX_BATCH] and ``--threads`` in [1, max_threads()] (None: not given)."""
    if batch is not None and not 1 <= int(batch) <= MAX_BATCH:
        raise ValueError(f"--batch must be between 1 and {MAX_BATCH}, got {batch}")
    if threads is not None and not 1 <= int(threads) <= max_threads():
        raise ValueError(f"--threads must be between 1 and {max_threads()} (4 per CPU, at most {MAX_THREADS}), "
                         f"got {threads}")


def warmup_batch(batch: int, source: Any) -> int:
    """The batch the run really uses: ``min(batch, frames)`` when the source knows its frame count, so a large
    ``--batch`` on a few images never allocates (or warms up) batches it cannot fill."""
    total = getattr(source, "frames_total", None)
    return max(1, min(int(batch), int(total))) if total else max(1, int(batch))


# ----------------------------------------------------------------------------------------------------------------
# outputs never clobber inputs


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.fsdecode(os.path.expanduser(os.fspath(path)))))


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output_paths(outputs: Dict[str, Optional[PathLike]], inputs: Iterable[Optional[PathLike]]) -> None:
    """Refuse an output (``{"--out": path, "--save": path}``) that is, or lies inside, one of ``inputs`` (the
    source file or folder, the bundle directory), after resolving symlinks. (``--save`` naming the folder that
    holds a single video or image is allowed: FrameSaver writes new files only.) Inputs that are not local paths
    (cameras, URLs) are ignored."""
    roots = []
    for item in inputs:
        item = str(item)[len("file://"):] if str(item).startswith("file://") else item
        if item is None or "://" in str(item) or str(item).isdigit() or str(item).startswith("/dev/"):
            continue
        if os.path.exists(os.fspath(item)):
            roots.append((Path(item), _real(item)))
    for option, value in outputs.items():
        if value is None or str(value) == "-":
            continue
        target = _real(value)
        for given, root in roots:
            if _is_within(target, root):
                what = "folder" if root.is_dir() else "file"
                raise ValueError(f"{option} {value} would write into the input {what} {given}: choose a path "
                                 "outside the source and the bundle")


def report_unknown_folders(source: Any, stats: Any, warn: Callable[[str], None]) -> None:
    """One warning line for sub-folders of a labelled folder that are no class of the model: their images were
    left out, and are counted as skipped (``evaluate`` refuses such a folder; ``run`` goes on with the rest).
    When no sub-folder is a class, the run has no labels, and the line says so."""
    unknown = dict(getattr(source, "unknown_folders", None) or {})
    if not unknown:
        return
    names = ", ".join(f"{name} ({count} images)" for name, count in sorted(unknown.items())[:8])
    names += ", ..." if len(unknown) > 8 else ""
    if getattr(source, "labelled", False):
        stats.add_skipped(sum(unknown.values()))
        warn(f"edgeexit: warning: skipped class folders the model does not know: {names}")
    else:
        warn(f"edgeexit: warning: no sub-folder of {getattr(source, 'display', '')} is a class of the model "
             f"({names}): running without labels (no accuracy)")


# ----------------------------------------------------------------------------------------------------------------
# strict JSON


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON (write a number, or a string such as \"inf\")")


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_strict(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` of standard JSON only: NaN, Infinity and -Infinity are rejected (ValueError naming them),
    and so is nesting deeper than ``max_depth`` (ValueError), before the recursive parser could overflow."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"nested {depth} levels deep (at most {max_depth})")
    return json.loads(text, parse_constant=_no_constant)


# ----------------------------------------------------------------------------------------------------------------
# signals


class InterruptGuard:
    """SIGINT and SIGTERM -> one KeyboardInterrupt, then ignored until ``release()``.

    The first signal raises KeyboardInterrupt in the main thread and, in the same handler, sets both signals to
    SIG_IGN, so a second Ctrl-C or a SIGTERM a few milliseconds later cannot interrupt the clean-up or the summary.
    (SIG_IGN, not a Python handler: Python resets its own handlers to the default while the interpreter exits, and
    a late SIGTERM would then kill the process after the summary, with the wrong exit code.) ``release()``
    restores the previous handlers when no signal came; after one, the process is on its way out (the run
    returns 130) and signals stay ignored. Outside the main thread it does nothing (Python delivers signals to
    the main thread only)."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Dict[int, Any] = {}
        self._armed = threading.current_thread() is threading.main_thread()

    def install(self) -> "InterruptGuard":
        if self._armed:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._first)
        return self

    def _first(self, _signum: int, _frame: Any) -> None:
        self.interrupted = True
        self.hold()
        raise KeyboardInterrupt

    def hold(self) -> None:
        """From now on signals are ignored (called by the first signal, and before the clean-up and summary)."""
        if self._armed:
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)

    def release(self) -> None:
        if self._armed and not self.interrupted:
            previous, self._previous = self._previous, {}
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> "InterruptGuard":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.release()


class SigtermAsInterrupt:
    """Context manager: inside it SIGTERM raises KeyboardInterrupt, so ``finally`` blocks clean up (e.g. an
    export's temporary directory) as they do on Ctrl-C."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._armed = threading.current_thread() is threading.main_thread()

    def _raise(self, _signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> "SigtermAsInterrupt":
        if self._armed:
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._armed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

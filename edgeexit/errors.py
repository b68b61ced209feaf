"""The one error base of edgeexit (torch-free).

Every error the user can cause (a bad bundle, checkpoint, option, image, camera, backend) is an
:class:`EdgeexitError` subclass whose message is one line naming the file or value; the CLI prints it as
``edgeexit: error: ...`` and exits with code 2. Subclasses keep a builtin base too (``ValueError``,
``RuntimeError``...) so callers that catch those keep working.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["EdgeexitError", "one_line"]


def one_line(text: object, limit: Optional[int] = 500) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space; above ``limit`` chars (None:
    no limit) the middle is cut, ``head ... tail``: a message names the file first and ends with the cause (a
    log's last line), and both matter."""
    flat = " ".join(str(text).split())
    if limit is None or len(flat) <= limit:
        return flat
    keep = max(limit - 5, 2)
    return f"{flat[: keep - keep // 2]} ... {flat[len(flat) - keep // 2:]}"


class EdgeexitError(Exception):
    """Base of every expected error; the message is one line."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))

"""The one error base of edgeexit (torch-free).

Every error the user can cause (a bad bundle, checkpoint, option, image, camera, backend) is an
:class:`EdgeexitError` subclass whose message is one line naming the file or value; the CLI prints it as
``edgeexit: error: ...`` and exits with code 2. Subclasses keep a builtin base too (``ValueError``,
``RuntimeError``...) so callers that catch those keep working.
"""

from __future__ import annotations

__all__ = ["EdgeexitError", "one_line"]


def one_line(text: object, limit: int = 500) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space, at most ``limit`` chars."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class EdgeexitError(Exception):
    """Base of every expected error; the message is one line."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))

"""The one error type of embedd, and the wire codes of protocol v1.

Every failure a client can cause is raised as :class:`EmbeddError` with a code
from :class:`Code` and one sentence naming the culprit. The server turns it into
an error frame in exactly one place; anything else that escapes a handler is a
bug and goes out as ``internal``.
"""

from __future__ import annotations

import enum

__all__ = ["Code", "EmbeddError", "Misuse", "StartupError"]


class Code(str, enum.Enum):
    """The error codes of ``docs/protocol.md``; the value is what goes on the wire."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    UNSUPPORTED = "unsupported"
    DECODE_ERROR = "decode_error"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class EmbeddError(Exception):
    """A contract error: a wire code plus one human-readable sentence."""

    __slots__ = ("code", "message")

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = Code(code)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}

    def __reduce__(self):  # survives pickling across decode worker processes
        return (EmbeddError, (self.code, self.message))

    def __repr__(self) -> str:
        return f"EmbeddError({self.code.value!r}, {self.message!r})"


class Misuse(RuntimeError):
    """embedd's own code used one of its components wrongly: a bug, never a client's doing.

    Raised instead of ``assert`` (which ``python -O`` removes); the message says
    what was expected, so that the bug is fixed where the message points.
    """


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the operator."""

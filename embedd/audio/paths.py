"""Which files the daemon may decode, and the one-line reasons its errors give.

A client names the file, so the path is hostile until resolved: symlinks are
followed before the root check, and a missing file outside every root reads as
``forbidden`` so that nobody can probe what exists elsewhere on the machine.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import av

from embedd.errors import Code, EmbeddError

__all__ = ["reason", "resolve_allowed_path"]


def _outside(text: str, roots: Sequence[Path]) -> str:
    """The ``forbidden`` sentence: which directories the daemon may read, and how to add one."""
    where = ", ".join(str(r) for r in roots) or "none"
    return (
        f"The path '{text}' lies outside the directories the daemon may read ({where}); "
        "add one with --allowed-roots or EMBEDD_ALLOWED_ROOTS."
    )


def resolve_allowed_path(path: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    """Resolve ``path`` (symlinks included) and insist it is a regular file under a root.

    Symlinks are resolved before the check so that a link inside a music
    folder cannot point the daemon at ``/etc/shadow``. A missing path outside
    every root is ``forbidden`` rather than ``not_found``, so that clients
    cannot probe which files exist elsewhere on the machine.
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text or "\x00" in text:
        raise EmbeddError(Code.BAD_REQUEST, f"The path {path!r} is not a valid file path.")
    if not os.path.isabs(text):
        raise EmbeddError(Code.BAD_REQUEST, f"The path '{text}' must be absolute.")
    resolved_roots = [Path(os.path.realpath(r)) for r in roots]

    def inside(p: Path) -> bool:
        return any(p == r or p.is_relative_to(r) for r in resolved_roots)

    try:
        real = Path(text).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        if inside(Path(os.path.realpath(text))):
            raise EmbeddError(Code.NOT_FOUND, f"The file '{text}' does not exist.") from None
        raise EmbeddError(Code.FORBIDDEN, _outside(text, resolved_roots)) from None
    except PermissionError:
        raise EmbeddError(Code.FORBIDDEN, f"The daemon has no permission to read '{text}'.") from None
    except (OSError, RuntimeError) as e:  # symlink loop, name too long, I/O error
        raise EmbeddError(Code.NOT_FOUND, f"The path '{text}' cannot be resolved ({reason(e)}).") from None
    if not inside(real):
        raise EmbeddError(Code.FORBIDDEN, _outside(text, resolved_roots))
    try:
        st = real.stat()
    except OSError as e:
        raise EmbeddError(Code.NOT_FOUND, f"The file '{text}' cannot be read ({reason(e)}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise EmbeddError(Code.BAD_REQUEST, f"The path '{text}' is a directory, not an audio file.")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the decoder forever
        raise EmbeddError(Code.BAD_REQUEST, f"The path '{text}' is not a regular file.")
    return real


def reason(e: BaseException | None) -> str:
    """An error's first line, short enough to end the one sentence a client reads."""
    if e is None:
        return "unknown error"
    if isinstance(e, av.FFmpegError) and getattr(e, "strerror", None):
        return str(e.strerror)
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]

"""Advisory lock files: how a daemon claims a socket path or a data directory.

``flock`` is released by the kernel when the process dies, however it dies, so a
stale lock file never blocks a restart; a second daemon finds the lock held and
refuses to start with one clear line.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from embedd.errors import StartupError

__all__ = ["take_lock"]


def take_lock(path: Path, busy_message: str) -> int:
    """Hold an exclusive lock on ``path`` (created if missing); StartupError(busy_message) if taken.

    Returns the descriptor; closing it releases the lock.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot create the lock file {str(path)!r}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(busy_message) from None
        raise StartupError(f"cannot lock {str(path)!r}: {exc.strerror}") from None
    return fd

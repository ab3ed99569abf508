"""The two small pieces of systemd's protocol embedd speaks.

``sd_notify`` is one datagram to ``$NOTIFY_SOCKET``; socket activation is the
``LISTEN_FDS``/``LISTEN_PID`` pair naming inherited descriptors from fd 3 on.
Both are a few lines of stdlib, so embedd carries them itself instead of
depending on libsystemd bindings (systemd-python needs libsystemd headers to
build, and the pure-Python sd_notify packages on PyPI are unmaintained).
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier", "inherited_sockets", "watchdog_interval_s"]

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends state lines to systemd; a no-op when not run under a notify unit."""

    __slots__ = ("_address", "_socket")

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        if not address:
            return
        # An address starting with '@' is in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. ``notify(READY=1, STATUS="serving")``; False if it could not be sent."""
        if self._socket is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError:
            return False  # systemd gone or socket full: never fatal for the daemon
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_s() -> float | None:
    """Half of WATCHDOG_USEC in seconds (systemd's advice), when the watchdog is on for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def inherited_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (empty when there are none).

    The variables are removed so that child processes (decoder workers) do not
    think the sockets are theirs.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if not pid or not count or pid != str(os.getpid()):
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets

"""Sites: where the daemon listens, all behind one small interface.

A site is the aiohttp notion: something the server opens, starts, stops and
closes without caring what it is. Three kinds exist:

* :class:`UnixSite` — a socket path we bind ourselves, guard with a lock file
  and remove at the end;
* :class:`InheritedSite` — a listening socket systemd passed us (socket
  activation); systemd owns the file, we never remove it;
* :class:`HttpListener` — the ``--http`` listener (:class:`embedd.http.site.HttpSite`,
  which lives below the server's layer and so cannot subclass :class:`Site`)
  behind the same interface.

Both socket sites speak the msgpack protocol through
:class:`~embedd.server.connection.Connection`; the HTTP site serves the same
op table through aiohttp. A path-bound Unix socket — the daemon's own or an
HTTP ``unix:`` one — is claimed the same way, by :func:`claim_socket_path`:
the lock file decides a race between two daemons starting at once, the
connect probe covers a process that holds the path without our lock file, and
a stale socket file (nobody listening) is removed.

The lifecycle (:class:`embedd.server.core.Server` calls it in this order):
``open`` binds, before anything heavy starts, so a taken address stops the
daemon with one line; ``start`` serves once the service is up; ``stop`` stops
accepting at once and returns the drain of the site's own in-flight work when
it has one (HTTP; socket connections are drained by the server); ``close``
releases everything and is safe to call more than once, or after a failed
``open``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from embedd.address import HttpAddress
from embedd.errors import Misuse, StartupError
from embedd.http.context import HttpContext
from embedd.lockfile import take_lock

if TYPE_CHECKING:
    from embedd.http.site import HttpSite

__all__ = ["HttpListener", "InheritedSite", "Site", "UnixSite", "claim_socket_path"]

log = logging.getLogger("embedd.server")  # the name the journal showed before the split

#: The listen backlog of every site.
BACKLOG = 512


class Site(abc.ABC):
    """One place the daemon listens. The server treats every site alike."""

    #: Named in the server's ``embedd serving on ...`` line; a site that logs its own line says False.
    in_ready_line: ClassVar[bool] = True

    @abc.abstractmethod
    def open(self) -> None:
        """Bind (StartupError with one line when that fails); nothing is served yet."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Serve: the service is up."""

    @abc.abstractmethod
    def stop(self) -> asyncio.Future | None:
        """Stop accepting now; the drain of this site's own in-flight work, if it has one."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the socket and whatever guards it (idempotent; fine after a failed ``open``)."""


# ---------------------------------------------------------------------------
# Claiming a socket path: one lock, one stale-socket probe.
# ---------------------------------------------------------------------------


def claim_socket_path(path: Path) -> int:
    """Lock ``path`` for this daemon and clear a stale socket file there; returns the lock's descriptor.

    StartupError when another embedd daemon holds the lock, when something
    other than a socket sits at ``path``, or when a process listens there.
    Closing the descriptor releases the claim.
    """
    # The lock decides races between two daemons starting at once; the connect
    # probe covers a daemon that holds the path without our lock file.
    fd = take_lock(path.with_name(path.name + ".lock"), f"another embedd daemon is already serving on {str(path)!r}")
    try:
        _clear_stale(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{str(path)!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise StartupError(f"another process is already listening on {str(path)!r}")


# ---------------------------------------------------------------------------
# The msgpack socket sites
# ---------------------------------------------------------------------------


class _SocketSite(Site):
    """A Unix stream socket served by ``connection_factory`` (one protocol per client)."""

    def __init__(self, connection_factory: Callable[[], asyncio.Protocol]) -> None:
        self._connection_factory = connection_factory
        self._sock: socket.socket | None = None
        self._listener: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._sock is None:
            raise Misuse(f"{self} was started before it was opened")
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_unix_server(self._connection_factory, sock=self._sock, backlog=BACKLOG)

    def stop(self) -> None:
        # The connections stay: the server drains them with the rest of the daemon's work.
        if self._listener is not None:
            self._listener.close()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()  # closes the listening socket too
        elif self._sock is not None:
            self._sock.close()  # opened, never served: start-up failed later on
        self._sock = None


class UnixSite(_SocketSite):
    """A socket file we create, guard with a lock file, and remove at the end."""

    def __init__(self, path: Path, mode: int, connection_factory: Callable[[], asyncio.Protocol]) -> None:
        super().__init__(connection_factory)
        self.path = path
        self.mode = mode
        self._lock_fd: int | None = None
        self._bound = False

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the socket directory {str(self.path.parent)!r}: {exc.strerror}") from None
        self._lock_fd = claim_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            self._bound = True
            os.chmod(self.path, self.mode)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {str(self.path)!r}: {exc.strerror}") from None
        self._sock = sock

    def close(self) -> None:
        super().close()
        # Only the daemon that bound the path may remove it: a second daemon that
        # refused to start must leave the first one's socket alone.
        if self._bound:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._bound = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class InheritedSite(_SocketSite):
    """A listening socket passed by systemd; systemd owns the file, we never remove it."""

    def __init__(self, sock: socket.socket, connection_factory: Callable[[], asyncio.Protocol]) -> None:
        super().__init__(connection_factory)
        self.sock = sock

    def __str__(self) -> str:
        try:
            return f"{self.sock.getsockname()} (socket activation)"
        except OSError:
            return "inherited socket"

    def open(self) -> None:
        if self.sock.family != socket.AF_UNIX or self.sock.type != socket.SOCK_STREAM:
            raise StartupError("the socket passed by systemd is not a Unix stream socket")
        self._sock = self.sock


# ---------------------------------------------------------------------------
# The HTTP site
# ---------------------------------------------------------------------------


class HttpListener(Site):
    """The ``--http`` listener as a site: :class:`~embedd.http.site.HttpSite` (aiohttp) behind :class:`Site`.

    A ``unix:`` address is claimed like the daemon's own socket path (lock file,
    stale-socket probe) before HttpSite binds it; aiohttp is imported only here,
    when HTTP is on.
    """

    in_ready_line = False  # HttpSite logs its own line, with its URL

    def __init__(self, address: HttpAddress, ctx: HttpContext) -> None:
        self.address = address
        self.ctx = ctx
        self._http: HttpSite | None = None
        self._lock_fd: int | None = None

    def __str__(self) -> str:
        return self._http.url if self._http is not None and self._http.url else str(self.address)

    def open(self) -> None:
        from embedd.http.site import HttpSite  # aiohttp only when HTTP is on

        if self.address.path is not None:
            path = Path(self.address.path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"cannot listen for HTTP on {self.address}: {exc.strerror or exc}") from None
            self._lock_fd = claim_socket_path(path)
        self._http = HttpSite(self.address, self.ctx)
        self._http.open()

    async def start(self) -> None:
        if self._http is None:
            raise Misuse(f"the HTTP site {self} was started before it was opened")
        await self._http.start()

    def stop(self) -> asyncio.Future | None:
        # HTTP stops accepting now and drains its in-flight requests alongside the socket's.
        if self._http is None:
            return None
        return asyncio.get_running_loop().create_task(self._http.stop())

    def close(self) -> None:
        if self._http is not None:
            self._http.close()  # removes a unix: socket file...
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # ...before the claim on its path is released
            self._lock_fd = None

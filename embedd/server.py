"""The socket server: listening, connections, and the daemon's lifecycle.

Start-up → serve → shutdown lives in :class:`Server` (the uvicorn shape): a
signal only sets a flag, and the shutdown coroutine does the real work in a
fixed order under one deadline — stop accepting, let in-flight requests finish,
cancel what is left, stop the service (checkpoint the batch job, unload the
models), remove the socket.

Where we listen is a *site* (the aiohttp shape): a socket path we bind
ourselves, or a socket systemd passed us. The server never cares which. With
``--http`` an :class:`~embedd.http.site.HttpSite` serves the same op table
over HTTP on this loop; it binds with the others and stops with them.

Each connection is an ``asyncio.Protocol``: bytes in, frames out of the
:class:`~embedd.protocol.FrameDecoder`, one task per request (cheap ops are
answered inline), responses written as they complete, in any order. A client
that stops reading gets no more of its requests read; a client that goes away
has its pending work cancelled.

Long because: the socket server: framing, connections, limits and shutdown in one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedd.errors import Code, EmbeddError, StartupError
from embedd.http.context import HttpContext
from embedd.lockfile import take_lock
from embedd.metrics import Metrics
from embedd.ops import build_handlers
from embedd.protocol import (
    FrameDecoder,
    Handler,
    decode_body,
    encode_frame,
    error_response,
    parse_request,
    request_id,
    success_response,
)
from embedd.service import Service
from embedd.settings import Settings
from embedd.systemd import Notifier, inherited_sockets, watchdog_interval_s

if TYPE_CHECKING:
    from embedd.http.site import HttpSite

__all__ = ["Server", "StartupError"]

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 2.0


# ---------------------------------------------------------------------------
# Sites: where we listen.
# ---------------------------------------------------------------------------


class UnixSite:
    """A socket file we create, guard with a lock file, and remove at the end."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self._lock_fd: int | None = None
        self._bound = False

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> socket.socket:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the socket directory {str(self.path.parent)!r}: {exc.strerror}") from None
        self._take_lock()
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            self._bound = True
            os.chmod(self.path, self.mode)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {str(self.path)!r}: {exc.strerror}") from None
        return sock

    def _take_lock(self) -> None:
        # The lock decides races between two daemons starting at once; the connect
        # probe below covers a daemon that holds the path without our lock file.
        self._lock_fd = take_lock(
            self.path.with_name(self.path.name + ".lock"),
            f"another embedd daemon is already serving on {str(self.path)!r}",
        )

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{str(self.path)!r} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise StartupError(f"another process is already listening on {str(self.path)!r}")

    def close(self) -> None:
        # Only the daemon that bound the path may remove it: a second daemon that
        # refused to start must leave the first one's socket alone.
        if self._bound:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._bound = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class InheritedSite:
    """A listening socket passed by systemd; systemd owns the file, we never remove it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __str__(self) -> str:
        try:
            return f"{self.sock.getsockname()} (socket activation)"
        except OSError:
            return "inherited socket"

    def open(self) -> socket.socket:
        if self.sock.family != socket.AF_UNIX or self.sock.type != socket.SOCK_STREAM:
            raise StartupError("the socket passed by systemd is not a Unix stream socket")
        return self.sock

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One client. Frames in, responses out as each request completes.

    At most ``max_inflight_per_connection`` requests of one client run at once:
    further frames wait in the decoder's buffer, and the socket is not read
    while that limit is reached or while the client is not reading its answers.
    """

    __slots__ = (
        "_decoder",
        "_eof",
        "_handlers",
        "_loop",
        "_max_inflight",
        "_read_paused",
        "_server",
        "_writable",
        "last_activity",
        "tasks",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self._handlers = server.handlers
        self._decoder = FrameDecoder(server.settings.max_frame)
        self._max_inflight = server.settings.max_inflight_per_connection
        self.tasks: set[asyncio.Task] = set()
        self.transport: asyncio.Transport | None = None
        self._read_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self.last_activity = self._loop.time()

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self._server.connections) >= self._server.settings.max_connections:
            self._send(
                error_response(
                    None,
                    EmbeddError(
                        Code.OVERLOADED,
                        f"the daemon already has {self._server.settings.max_connections} connections; retry later",
                    ),
                )
            )
            transport.close()
            return
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for task in self.tasks:
            task.cancel()  # the client is gone: its queued work is dropped
        self._writable.set()  # release streams waiting to write; they find the transport gone
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        self._decoder.feed(data)
        self._drain()

    def eof_received(self) -> bool:
        self._eof = True
        self._drain()
        return self._finish_if_done()

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading its requests,
        # and let streams wait instead of piling up frames.
        self._writable.clear()
        self._update_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        self._update_reading()

    # -- requests ------------------------------------------------------------
    def _drain(self) -> None:
        """Start buffered requests while the in-flight limit allows."""
        try:
            while len(self.tasks) < self._max_inflight:
                if self.transport is None or self.transport.is_closing():
                    return
                body = self._decoder.next_body()
                if body is None:
                    break
                self._handle(body)
        except EmbeddError as exc:  # a bad length prefix
            self._fatal(exc)
            return
        self._update_reading()

    def _finish_if_done(self) -> bool:
        """After EOF: close once everything is answered. Returns True to keep the write side open."""
        if self.tasks or self.transport is None:
            return True
        if self._decoder.incomplete():
            self._fatal(
                EmbeddError(Code.BAD_FRAME, f"connection closed in the middle of a frame ({self._decoder.pending} bytes)")
            )
            return False
        if self._decoder.pending:  # complete frames still waiting for a slot
            return True
        self.transport.close()
        return False

    def _handle(self, body: bytes) -> None:
        try:
            message = decode_body(body)
        except EmbeddError as exc:
            self._fatal(exc)
            return
        rid = request_id(message)
        try:
            request = parse_request(message)
        except EmbeddError as exc:
            self._server.metrics.rejected(message.get("op"), exc.code.value)
            self._send(error_response(rid, exc))
            return
        handler: Handler = self._handlers[request.op]
        if handler.inline:
            try:
                result = handler.fn(request.args)
            except EmbeddError as exc:
                self._send(error_response(rid, exc))
            except Exception as exc:
                self._send(error_response(rid, _internal(request.op, exc)))
            else:
                self._send(success_response(rid, result))
            return
        task = self._loop.create_task(self._run(rid, request.op, handler, request.args))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _run(self, rid: Any, op: str, handler: Handler, args: Any) -> None:
        try:
            if handler.streaming:
                async for result, more in handler.fn(args):
                    await self._writable.wait()  # a reader that stopped reading gets the latest, not a backlog
                    self._send(success_response(rid, result, more=more))
            else:
                self._send(success_response(rid, await handler.fn(args)))
        except EmbeddError as exc:
            self._send(error_response(rid, exc))
        except asyncio.CancelledError:
            # Client gone (nothing to send) or daemon shutting down (say so).
            self._send(error_response(rid, EmbeddError(Code.CANCELLED, f"{op} was cancelled: the daemon is shutting down")))
            raise
        except Exception as exc:
            self._send(error_response(rid, _internal(op, exc)))

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._drain()
        if self._eof:
            self._finish_if_done()

    # -- plumbing --------------------------------------------------------------
    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        should_pause = not self._writable.is_set() or len(self.tasks) >= self._max_inflight
        if should_pause and not self._read_paused:
            transport.pause_reading()
            self._read_paused = True
        elif not should_pause and self._read_paused:
            transport.resume_reading()
            self._read_paused = False

    def _send(self, message: dict[str, Any]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            frame = encode_frame(message)
        except Exception as exc:  # an unpackable result is a bug; the client still gets an answer
            frame = encode_frame(error_response(message.get("id"), _internal("response encoding", exc)))
        transport.write(frame)

    def _fatal(self, exc: EmbeddError) -> None:
        """A framing violation: one error frame with id nil, then close."""
        self._send(error_response(None, exc))
        if self.transport is not None:
            self.transport.close()

    def close_idle(self) -> None:
        # abort, not close: a client that stopped reading would keep its unsent
        # answers (and this connection) alive forever waiting for a flush.
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return not self.tasks


def _internal(what: str, exc: BaseException) -> EmbeddError:
    log.error("internal error in %s", what, exc_info=exc)
    return EmbeddError(Code.INTERNAL, f"{what} failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class Server:
    """Owns the listeners, the connections and the order of start-up and shutdown."""

    def __init__(self, settings: Settings, service: Service | None = None) -> None:
        self.settings = settings
        self.service = service or Service(settings)
        # One bound on the work admitted, for the socket and HTTP alike (embedd.admission).
        self.admission = self.service.admission
        self.ops: dict[str, Handler] = self.admission.wrap(build_handlers(self.service))  # what each op does
        self.metrics = Metrics(self.service)
        self.handlers: dict[str, Handler] = self.metrics.instrument(self.ops)  # what clients reach: counted
        self._http: HttpSite | None = None
        self.connections: set[Connection] = set()
        self.notifier = Notifier()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._sites: list[UnixSite | InheritedSite] = []
        self._listeners: list[asyncio.AbstractServer] = []
        self._should_exit = asyncio.Event()
        self._force_exit = False
        self._background: list[asyncio.Task] = []

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        try:
            await self.startup()
        except BaseException:
            await self._close_sites()
            raise
        try:
            await self._should_exit.wait()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        inherited = inherited_sockets()
        self._sites = [InheritedSite(s) for s in inherited] or [UnixSite(self.settings.socket, self.settings.socket_mode)]
        socks = [site.open() for site in self._sites]  # fails before we start anything heavy
        if (address := self.settings.http_address) is not None:
            from embedd.http.site import HttpSite  # aiohttp only when HTTP is on

            ctx = HttpContext(self.settings, self.service, self.handlers, self.ops, self.metrics, self.admission)
            self._http = HttpSite(address, ctx)
            self._http.open()
        await self.service.start()
        for sock in socks:
            listener = await self.loop.create_unix_server(lambda: Connection(self), sock=sock, backlog=512)
            self._listeners.append(listener)
        if self._http is not None:
            await self._http.start()
        where = ", ".join(map(str, self._sites))
        log.info("embedd serving on %s (pid %d)", where, os.getpid())
        self.notifier.notify(READY=1, STATUS=self.service.status_line())
        self._background.append(self.loop.create_task(self._housekeeping()))
        if (interval := watchdog_interval_s()) is not None:
            self._background.append(self.loop.create_task(self._watchdog(interval)))

    def request_exit(self, force: bool = False) -> None:
        if self._should_exit.is_set() or force:
            self._force_exit = True
        self._should_exit.set()

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_exit)

    async def shutdown(self) -> None:
        deadline = self.loop.time() + self.settings.shutdown_timeout_s
        self.notifier.notify(STOPPING=1, STATUS="shutting down")
        log.info("shutting down")
        for listener in self._listeners:
            listener.close()
        # HTTP stops accepting now and drains its in-flight requests alongside the socket's.
        http_stopped = self.loop.create_task(self._http.stop()) if self._http is not None else None
        for task in self._background:
            task.cancel()
        await self.service.quiesce()  # the batch job stops taking tracks and checkpoints

        # In-flight requests get the grace period, then are cancelled (and told so).
        pending = {t for conn in self.connections for t in conn.tasks}
        if pending and not self._force_exit:
            await asyncio.wait(pending, timeout=max(0.0, deadline - self.loop.time() - 2.0))
        for conn in list(self.connections):
            for task in conn.tasks:
                task.cancel()
        pending = {t for conn in self.connections for t in conn.tasks}
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()  # flush the last answers...
        await asyncio.sleep(0.2)
        for conn in list(self.connections):
            conn.close_idle()  # ...but never wait on a client that does not read them

        if http_stopped is not None:
            await asyncio.wait({http_stopped}, timeout=max(0.1, deadline - self.loop.time() - 1.0))
        await self.service.stop(timeout=max(0.5, deadline - self.loop.time()))
        await self._close_sites()
        self.notifier.notify(STATUS="stopped")
        self.notifier.close()
        log.info("stopped")

    async def _close_sites(self) -> None:
        for listener in self._listeners:
            listener.close()
        for site in self._sites:
            site.close()
        if self._http is not None:
            self._http.close()

    async def _housekeeping(self) -> None:
        """Close idle connections; keep systemd's STATUS line current."""
        last_status = ""
        period = min(STATUS_INTERVAL_S, self.settings.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for conn in list(self.connections):
                if conn.idle and now - conn.last_activity > self.settings.idle_timeout_s:
                    log.debug("closing an idle connection")
                    conn.close_idle()
            line = self.service.status_line()
            if line != last_status:
                self.notifier.notify(STATUS=line)
                last_status = line

    async def _watchdog(self, interval: float) -> None:
        # Sent from the event loop: if the loop is blocked, systemd notices and restarts us.
        while True:
            self.notifier.notify(WATCHDOG=1)
            await asyncio.sleep(interval)

"""The daemon's lifecycle: start-up → serve → shutdown, and the op table every site serves.

:class:`Server` has the uvicorn shape: a signal only sets a flag, and the
shutdown coroutine does the real work in a fixed order under one deadline —
stop accepting, let in-flight requests finish, cancel what is left, stop the
service (checkpoint the batch job, unload the models), remove the sockets.

Where we listen is a list of sites (:mod:`embedd.server.sites`): the socket
path we bind or the sockets systemd passed us, and with ``--http`` the HTTP
listener. The server opens, starts, stops and closes them alike; the
connections of the msgpack sites (:mod:`embedd.server.connection`) are its
own, because their draining is part of the shutdown order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from embedd import allocator
from embedd.http.context import HttpContext
from embedd.metrics import Metrics
from embedd.ops import build_handlers
from embedd.protocol import Handler
from embedd.server.connection import Connection
from embedd.server.sites import HttpListener, InheritedSite, Site, UnixSite
from embedd.service import Service
from embedd.settings import Settings
from embedd.systemd import Notifier, inherited_sockets, watchdog_interval_s

__all__ = ["Server"]

log = logging.getLogger("embedd.server")  # the name the journal showed before the split

STATUS_INTERVAL_S = 2.0


class Server:
    """Owns the sites, the connections and the order of start-up and shutdown."""

    def __init__(self, settings: Settings, service: Service | None = None) -> None:
        self.settings = settings
        self.service = service or Service(settings)
        # One bound on the work admitted, for the socket and HTTP alike (embedd.admission).
        self.admission = self.service.admission
        self.ops: dict[str, Handler] = self.admission.wrap(build_handlers(self.service))  # what each op does
        self.metrics = Metrics(self.service)
        self.handlers: dict[str, Handler] = self.metrics.instrument(self.ops)  # what clients reach: counted
        self.connections: set[Connection] = set()
        self.notifier = Notifier()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._sites: list[Site] = []
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

    def _new_sites(self) -> list[Site]:
        """The socket sites (systemd's, else our own path), then HTTP when an address is set."""

        def new_connection() -> Connection:
            return Connection(self)

        inherited = inherited_sockets()
        sites: list[Site] = [InheritedSite(s, new_connection) for s in inherited] or [
            UnixSite(self.settings.socket, self.settings.socket_mode, new_connection)
        ]
        if (address := self.settings.http_address) is not None:
            ctx = HttpContext(self.settings, self.service, self.handlers, self.ops, self.metrics, self.admission)
            sites.append(HttpListener(address, ctx))
        return sites

    async def startup(self) -> None:
        self._sites = self._new_sites()
        for site in self._sites:
            site.open()  # fails before we start anything heavy
        await self.service.start()
        for site in self._sites:
            await site.start()
        where = ", ".join(str(site) for site in self._sites if site.in_ready_line)
        log.info("embedd serving on %s (pid %d, memory allocator: %s)", where, os.getpid(), allocator.running())
        allocator.log_choice(self.settings.allocator)
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
        # Every site stops accepting now; one with its own in-flight work (HTTP) drains it alongside the socket's.
        draining = {drain for site in self._sites if (drain := site.stop()) is not None}
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

        if draining:
            await asyncio.wait(draining, timeout=max(0.1, deadline - self.loop.time() - 1.0))
        await self.service.stop(timeout=max(0.5, deadline - self.loop.time()))
        await self._close_sites()
        self.notifier.notify(STATUS="stopped")
        self.notifier.close()
        log.info("stopped")

    async def _close_sites(self) -> None:
        for site in self._sites:
            site.close()

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

"""The HTTP listener: an aiohttp application on the daemon's own event loop.

:class:`HttpSite` is a site like the socket's (``embedd/server/sites.py``): ``open``
binds the listening socket before anything heavy starts, so a port in use
stops the daemon at once with one line; ``start`` serves once the service is
up; ``stop`` stops accepting, gives requests in flight the grace the server
passes, cancels open streams, and removes a ``unix:`` socket file.

Three middlewares wrap every route: the error boundary, which turns a
contract error, aiohttp's own 404/405/413 and anything unexpected into the one
JSON error shape of :mod:`embedd.http.responses`; the token check (every
route but ``/healthz`` when a token is set); and the in-flight limit
(``max_connections`` requests at once, like the socket's connections), which
bounds the request bodies held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import stat

from aiohttp import web

from embedd.errors import Code, EmbeddError, Misuse, StartupError
from embedd.http import health, legacy, similarity, v1
from embedd.address import HttpAddress
from embedd.http.context import HttpContext
from embedd.http.responses import error_response

__all__ = ["HttpSite"]

log = logging.getLogger(__name__)

#: Routes answered without a token: liveness probes carry no secrets.
OPEN_ROUTES = frozenset({"/healthz"})


class HttpSite:
    """One HTTP listener (TCP or ``unix:``) serving the routes of :mod:`embedd.http` over ``ctx``."""

    def __init__(self, address: HttpAddress, ctx: HttpContext) -> None:
        self.address = address
        self.ctx = ctx
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._bound_path: str | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Bind the listening socket (StartupError with one line when that fails)."""
        a = self.address
        try:
            if a.path is not None:
                self._sock = self._bind_unix(a.path)
                self.url = f"http+unix://{a.path}"
            else:
                family = socket.AF_INET6 if a.host and ":" in a.host else socket.AF_INET
                infos = socket.getaddrinfo(a.host, a.port, family if a.host != "localhost" else 0, socket.SOCK_STREAM)
                family, _, _, _, sockaddr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(sockaddr)
                    sock.listen(512)
                except OSError:
                    sock.close()
                    raise
                self._sock = sock
                host, port = sock.getsockname()[:2]
                self.url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {a}: {exc.strerror or exc}") from None

    def _bind_unix(self, path: str) -> socket.socket:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise StartupError(f"{path!r} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale: nobody listens there
            else:
                raise StartupError(f"another process is already listening on {path!r}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            self._bound_path = path
            os.chmod(path, self.ctx.settings.socket_mode)
            sock.listen(512)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        app = self._application()
        grace = max(0.5, self.ctx.settings.shutdown_timeout_s - 3.0)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=grace)
        await self._runner.setup()
        if self._sock is None:
            raise Misuse("HttpSite.start() before bind(): bind the listening socket first")
        await web.SockSite(self._runner, self._sock, backlog=512).start()
        log.info("embedd HTTP on %s%s", self.url, " (token required)" if self.ctx.settings.http_token else "")

    async def stop(self) -> None:
        """Stop accepting; in-flight requests get the grace period; streams are cancelled."""
        self.ctx.stopping = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._bound_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._bound_path)
            self._bound_path = None

    # -- the application -------------------------------------------------------------
    def _application(self) -> web.Application:
        ctx = self.ctx
        app = web.Application(
            middlewares=[
                _error_boundary(ctx.settings.http_max_body),
                _token_check(ctx.settings.http_token.get_secret_value() if ctx.settings.http_token else None),
                _in_flight_limit(ctx.settings.max_connections),
            ],
            client_max_size=ctx.settings.http_max_body,
        )
        for module in (health, legacy, similarity, v1):
            app.add_routes(module.routes(ctx))

        async def cancel_streams(_: web.Application) -> None:
            for task in list(ctx.streams):
                task.cancel()

        app.on_shutdown.append(cancel_streams)
        return app


def _token_check(token: str | None):
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if expected is not None and request.path not in OPEN_ROUTES:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                reason = "a wrong token" if given else "no token"
                return error_response(
                    EmbeddError(
                        Code.FORBIDDEN,
                        f"this route requires 'Authorization: Bearer <token>' (see --http-token); the request has {reason}",
                    ),
                    http_status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return check


def _in_flight_limit(limit: int):
    """At most ``limit`` requests in progress (bodies buffered, streams open); more answer overloaded."""
    in_flight = 0

    @web.middleware
    async def bounded(request: web.Request, handler) -> web.StreamResponse:
        nonlocal in_flight
        if in_flight >= limit:
            raise EmbeddError(
                Code.OVERLOADED, f"the daemon already has {limit} HTTP requests in progress (max_connections); retry later"
            )
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    return bounded


def _error_boundary(max_body: int):
    @web.middleware
    async def boundary(request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except EmbeddError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            return _http_error(request, exc, max_body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("internal error in %s %s", request.method, request.path, exc_info=exc)
            return error_response(
                EmbeddError(Code.INTERNAL, f"{request.method} {request.path} failed: {type(exc).__name__}: {exc}")
            )

    return boundary


def _http_error(request: web.Request, exc: web.HTTPException, max_body: int) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method, body too large) in the JSON shape."""
    if exc.status == 404:
        if request.path.startswith("/v1/"):
            error = EmbeddError(Code.UNKNOWN_OP, f"there is no op {request.path[4:][:80]!r}")
        else:
            error = EmbeddError(Code.NOT_FOUND, f"there is no route {request.path[:120]!r}")
    elif exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        error = EmbeddError(Code.BAD_REQUEST, f"{request.path} does not take {request.method} (it takes {allowed})")
    elif exc.status == 413:
        error = EmbeddError(
            Code.TOO_LARGE, f"the request body is larger than {max_body} bytes (http_max_body)"
        )
    elif exc.status < 400:
        return exc  # a redirect or the like: aiohttp's own answer
    else:
        error = EmbeddError(Code.BAD_REQUEST if exc.status < 500 else Code.INTERNAL, exc.reason or str(exc))
    return error_response(error, http_status=exc.status)


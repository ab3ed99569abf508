"""One client of the msgpack socket: framing, pipelining and backpressure.

A :class:`Connection` is an ``asyncio.Protocol``: bytes in, frames out of the
:class:`~embedd.protocol.FrameDecoder`, one task per request (cheap ops are
answered inline), responses written as they complete, in any order.

Backpressure is the reason this is its own module. Two bounds stop the socket
being read (``transport.pause_reading``) until they clear
(``transport.resume_reading``): ``max_inflight_per_connection`` requests of
this client in progress (further frames wait in the decoder's buffer), and the
transport's write buffer above its high-water mark (``pause_writing`` from the
transport: the client is not reading its answers; a streaming op then waits
rather than piling up frames). A client that goes away has its pending work
cancelled.

What it needs of the server (:class:`embedd.server.core.Server`): ``loop``,
``settings``, ``handlers`` (the counted op table), ``metrics`` and the
``connections`` set it joins and leaves.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from embedd.errors import Code, EmbeddError
from embedd.ops import parse_request
from embedd.protocol import (
    FrameDecoder,
    Handler,
    decode_body,
    encode_frame,
    error_response,
    request_id,
    success_response,
)

if TYPE_CHECKING:
    from embedd.server.core import Server

__all__ = ["Connection"]

log = logging.getLogger("embedd.server")  # the name the journal showed before the split


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

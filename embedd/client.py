"""An asyncio client of protocol v1, for the CLI, the tests and the benchmarks.

One connection, any number of concurrent calls: each request gets an integer
id and a reply queue; a reader task routes every response frame to its queue,
so calls may complete in any order and streaming ops simply receive several
frames.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, AsyncIterator

import msgpack

from embedd.errors import Code, EmbeddError
from embedd.protocol import HEADER, encode_frame

__all__ = ["Client", "ConnectionClosed", "Unreachable"]


class Unreachable(EmbeddError):
    """The daemon's socket could not be reached at all (no file, nobody listening, no permission)."""


class ConnectionClosed(EmbeddError):
    """The daemon closed the connection before answering."""

    def __init__(self, message: str = "the daemon closed the connection") -> None:
        super().__init__(Code.UNAVAILABLE, message)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue] = {}
        self._closed: EmbeddError | None = None
        self.unsolicited: list[dict] = []  # frames with id nil (bad_frame, overloaded at connect)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | Path, *, timeout: float = 10.0) -> Client:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=2**26), timeout)
        except FileNotFoundError:
            raise Unreachable(Code.UNAVAILABLE, f"no embedd socket at {str(path)!r}; is the daemon running?") from None
        except ConnectionRefusedError:
            raise Unreachable(Code.UNAVAILABLE, f"nothing is listening on {str(path)!r}; is the daemon running?") from None
        except PermissionError:
            raise Unreachable(Code.FORBIDDEN, f"no permission to connect to {str(path)!r}") from None
        except asyncio.TimeoutError:
            raise Unreachable(Code.UNAVAILABLE, f"connecting to {str(path)!r} timed out") from None
        return cls(reader, writer)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def _read_loop(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                (length,) = HEADER.unpack(header)
                body = await self._reader.readexactly(length)
                message = msgpack.unpackb(body, raw=False)
                queue = self._pending.get(message.get("id"))
                if queue is None:
                    self.unsolicited.append(message)
                    if message.get("ok") is False and message["error"]["code"] in ("bad_frame", "overloaded"):
                        self._fail_all(EmbeddError(Code(message["error"]["code"]), message["error"]["message"]))
                    continue
                queue.put_nowait(message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._fail_all(ConnectionClosed())

    def _fail_all(self, error: EmbeddError) -> None:
        self._closed = error
        for queue in self._pending.values():
            queue.put_nowait(error)

    def _send(self, op: str, args: dict[str, Any]) -> tuple[int, asyncio.Queue]:
        if self._closed is not None:
            raise self._closed
        rid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = queue
        self._writer.write(encode_frame({"id": rid, "op": op, **args}))
        return rid, queue

    @staticmethod
    def _unwrap(message: dict | EmbeddError) -> dict:
        if isinstance(message, EmbeddError):
            raise message
        if not message.get("ok"):
            error = message["error"]
            raise EmbeddError(Code(error["code"]), error["message"])
        return message

    async def call(self, op: str, **args: Any) -> dict:
        """Send one request and return its result map; raises EmbeddError on an error response."""
        rid, queue = self._send(op, args)
        try:
            await self._writer.drain()
            return self._unwrap(await queue.get())["result"]
        finally:
            self._pending.pop(rid, None)

    async def stream(self, op: str, **args: Any) -> AsyncIterator[dict]:
        """Yield every result frame of a streaming op until the one without ``more``."""
        rid, queue = self._send(op, args)
        try:
            await self._writer.drain()
            while True:
                message = self._unwrap(await queue.get())
                yield message["result"]
                if not message.get("more"):
                    return
        finally:
            self._pending.pop(rid, None)

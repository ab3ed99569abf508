"""The server's parts at the unit level, in-process: no daemon.

Connection backpressure, driven through a transport double (the shape of
uvicorn's protocol tests): a fake transport records ``pause_reading`` /
``resume_reading`` and the frames written, and keeps a write buffer with
asyncio's flow control (over the high-water mark it calls the protocol's
``pause_writing``; flushed to the low-water mark, ``resume_writing``).
Handlers wait on events the test sets, so every step is driven by the loop,
never by a sleep or a clock. And the sites: an HTTP ``unix:`` path is claimed
like the daemon's own socket path.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from embedd.address import HttpAddress
from embedd.errors import StartupError
from embedd.protocol import Handler
from embedd.server.connection import Connection
from embedd.server.sites import HttpListener


def frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class FakeTransport(asyncio.Transport):
    """Records reading pauses and writes; a write buffer with asyncio's high/low-water flow control."""

    def __init__(self, protocol: asyncio.Protocol, *, high_water: int = 1 << 20, low_water: int = 0) -> None:
        super().__init__()
        self.protocol = protocol
        self.high_water = high_water
        self.low_water = low_water
        self.calls: list[str] = []  # pause_reading / resume_reading, in order
        self.responses: list[dict[str, Any]] = []  # every frame written, decoded
        self.buffered = 0  # bytes written and not yet read by the client
        self.closing = False
        self._writing_paused = False
        self._wrote = asyncio.Event()

    # -- what Connection calls ----------------------------------------------------------
    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def is_reading(self) -> bool:
        return self.calls[-1:] != ["pause_reading"]

    def write(self, data: bytes) -> None:
        (length,) = struct.unpack(">I", data[:4])
        assert len(data) == 4 + length, "one frame per write"
        self.responses.append(msgpack.unpackb(data[4:], raw=False))
        self.buffered += len(data)
        self._wrote.set()
        if self.buffered > self.high_water and not self._writing_paused:
            self._writing_paused = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    # -- what the test does -------------------------------------------------------------
    def flush(self) -> None:
        """The client reads everything written so far."""
        self.buffered = 0
        if self._writing_paused and self.buffered <= self.low_water:
            self._writing_paused = False
            self.protocol.resume_writing()

    async def written(self, n: int) -> list[dict[str, Any]]:
        """Wait (on the loop) until ``n`` frames have been written."""
        while len(self.responses) < n:
            self._wrote.clear()
            await self._wrote.wait()
        return self.responses


class Gated:
    """An op whose every call waits for the test to release it."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def __call__(self, args: Any) -> dict[str, Any]:
        gate = asyncio.Event()
        self.started.put_nowait(gate)
        await gate.wait()
        return {"done": True}


def connect(handlers: dict[str, Handler], *, max_inflight: int, **transport: int) -> tuple[Connection, FakeTransport]:
    settings = SimpleNamespace(max_frame=1 << 20, max_inflight_per_connection=max_inflight, max_connections=16)
    server = SimpleNamespace(
        loop=asyncio.get_running_loop(), settings=settings, handlers=handlers, connections=set(), metrics=None
    )
    conn = Connection(server)  # type: ignore[arg-type]
    t = FakeTransport(conn, **transport)
    conn.connection_made(t)
    assert conn in server.connections
    return conn, t


async def test_reading_pauses_at_the_in_flight_bound_and_resumes_as_requests_finish():
    op = Gated()
    conn, t = connect({"status": Handler(op)}, max_inflight=2)
    conn.data_received(b"".join(frame({"id": i, "op": "status"}) for i in range(5)))

    # Two requests run; the other three wait in the decoder, and the socket is not read.
    assert len(conn.tasks) == 2
    assert t.calls == ["pause_reading"]
    gates = [await op.started.get(), await op.started.get()]

    # One finishes: its answer goes out and the next buffered request takes its slot;
    # the bound is still reached, so reading stays paused (no resume/pause flapping).
    gates[0].set()
    gates.append(await op.started.get())
    assert [r["id"] for r in t.responses] == [0]
    assert len(conn.tasks) == 2 and t.calls == ["pause_reading"]

    gates[1].set()
    gates.append(await op.started.get())
    gates[2].set()
    gates.append(await op.started.get())
    assert op.started.empty() and len(conn.tasks) == 2 and t.calls == ["pause_reading"]

    # The decoder is empty now: the first slot to free up resumes reading.
    last = next(iter(conn.tasks))
    gates[3].set()
    await t.written(4)
    gates[4].set()
    await asyncio.wait({last})  # its done callback (the connection's) has run by now
    assert t.calls == ["pause_reading", "resume_reading"]
    assert sorted(r["id"] for r in await t.written(5)) == [0, 1, 2, 3, 4]
    assert all(r["ok"] and r["result"] == {"done": True} for r in t.responses)
    assert not conn.tasks


async def test_reading_pauses_while_the_client_does_not_read_its_answers():
    # Inline ops: answered within data_received. The third answer passes the high-water mark.
    ping = Handler(lambda args: {"protocol": 1}, inline=True)
    one = len(frame({"id": 0, "ok": True, "result": {"protocol": 1}}))
    conn, t = connect({"ping": ping}, max_inflight=8, high_water=2 * one + 1)

    conn.data_received(frame({"id": 0, "op": "ping"}) + frame({"id": 1, "op": "ping"}))
    assert t.calls == [] and t.buffered == 2 * one

    conn.data_received(frame({"id": 2, "op": "ping"}) + frame({"id": 3, "op": "ping"}))
    assert t.calls == ["pause_reading"]  # once, though two answers went past the mark
    assert [r["id"] for r in t.responses] == [0, 1, 2, 3]

    t.flush()  # the client reads: below the low-water mark
    assert t.calls == ["pause_reading", "resume_reading"]


async def test_reading_resumes_only_when_both_bounds_have_cleared():
    op = Gated()
    conn, t = connect({"status": Handler(op)}, max_inflight=1, high_water=8)
    conn.data_received(frame({"id": 7, "op": "status"}))
    assert t.calls == ["pause_reading"]  # the in-flight bound

    task = next(iter(conn.tasks))
    (await op.started.get()).set()
    await asyncio.wait({task})
    # The slot is free, but the answer sits unread in the write buffer: still paused.
    assert not conn.tasks and t.buffered > t.high_water
    assert t.calls == ["pause_reading"]

    t.flush()
    assert t.calls == ["pause_reading", "resume_reading"]
    assert [r["id"] for r in t.responses] == [7]


async def test_a_stream_waits_for_the_client_to_read_instead_of_piling_up_frames():
    produced: asyncio.Queue[int] = asyncio.Queue()

    async def stream(args: Any) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        for i in range(3):
            produced.put_nowait(i)
            yield {"n": i, "pad": "x" * 64}, i < 2

    conn, t = connect({"status": Handler(stream, streaming=True)}, max_inflight=2, high_water=32)
    conn.data_received(frame({"id": 1, "op": "status"}))
    assert t.calls == []  # one request in flight, under the bound of two
    task = next(iter(conn.tasks))

    # Each item overfills the write buffer: reading pauses, and the next item is
    # produced but waits, unwritten, until the client reads.
    assert await produced.get() == 0
    assert await produced.get() == 1
    assert [r["result"]["n"] for r in t.responses] == [0]
    assert t.calls == ["pause_reading"]

    t.flush()
    assert t.calls == ["pause_reading", "resume_reading"]
    assert await produced.get() == 2
    assert [r["result"]["n"] for r in t.responses] == [0, 1]
    assert t.calls == ["pause_reading", "resume_reading", "pause_reading"]

    t.flush()
    await asyncio.wait({task})
    assert [(r["result"]["n"], r["more"]) for r in t.responses] == [(0, True), (1, True), (2, False)]
    assert t.calls == ["pause_reading", "resume_reading"] * 2 + ["pause_reading"]  # the last answer is unread

    t.flush()
    assert t.calls == ["pause_reading", "resume_reading"] * 3


# -- sites: an HTTP unix: path is claimed like the daemon's own socket ------------------


def test_http_unix_path_is_claimed_with_the_lock_and_the_stale_probe(sock_dir):
    path = sock_dir / "http.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file nobody listens on: a crashed daemon's
    stale.close()
    ctx = SimpleNamespace(settings=SimpleNamespace(socket_mode=0o600))

    first = HttpListener(HttpAddress(path=str(path)), ctx)  # type: ignore[arg-type]
    first.open()  # the stale file is replaced
    try:
        assert path.is_socket() and (sock_dir / "http.sock.lock").exists()
        second = HttpListener(HttpAddress(path=str(path)), ctx)  # type: ignore[arg-type]
        with pytest.raises(StartupError, match="another embedd daemon is already serving on"):
            second.open()
        second.close()
        assert path.is_socket(), "a refused site leaves the first one's socket alone"
    finally:
        first.close()
    assert not path.exists()
    third = HttpListener(HttpAddress(path=str(path)), ctx)  # type: ignore[arg-type]
    third.open()  # the claim was released with the socket
    third.close()

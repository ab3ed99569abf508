"""Protocol throughput: pings per second over one pipelined connection and over 64.

Starts a real daemon (``python -m embedd serve``) on a temporary socket, and —
in the same run, for a ratio that survives a noisy machine — a minimal uvloop
msgpack responder that does nothing but answer ``{"ok": true}``: the floor any
framing server on this box can reach. The load generator is a raw uvloop
protocol that sends prepared frames and counts response headers, so the client
costs as little as possible.

    .venv/bin/python bench/protocol_bench.py [--seconds 3] [--window 512]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemon import Daemon  # noqa: E402

PING = msgpack.packb({"op": "ping", "id": 1})
PING_FRAME = struct.pack(">I", len(PING)) + PING


class Pinger(asyncio.Protocol):
    """Keeps ``window`` pings in flight and counts the answers."""

    def __init__(self, window: int, done: asyncio.Future, deadline: float) -> None:
        self.window = window
        self.done = done
        self.deadline = deadline
        self.buffer = bytearray()
        self.answered = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(PING_FRAME * self.window)

    def data_received(self, data):
        buf = self.buffer
        buf += data
        offset = 0
        count = 0
        while len(buf) - offset >= 4:
            (n,) = struct.unpack_from(">I", buf, offset)
            if len(buf) - offset - 4 < n:
                break
            offset += 4 + n
            count += 1
        del buf[:offset]
        self.answered += count
        if time.perf_counter() < self.deadline:
            self.transport.write(PING_FRAME * count)
        elif not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(None)


async def measure(path: str, connections: int, window: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    deadline = time.perf_counter() + seconds
    pingers, transports = [], []
    started = time.perf_counter()
    for _ in range(connections):
        done = loop.create_future()
        transport, pinger = await loop.create_unix_connection(lambda d=done: Pinger(window, d, deadline), path)
        pingers.append((pinger, done))
        transports.append(transport)
    await asyncio.gather(*(done for _, done in pingers))
    elapsed = time.perf_counter() - started
    for t in transports:
        t.close()
    return sum(p.answered for p, _ in pingers) / elapsed


MINIMAL_RESPONDER = r'''
import asyncio, struct, sys, msgpack, uvloop
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.b = bytearray()
    def data_received(self, d):
        b = self.b; b += d; o = 0; out = []
        while len(b) - o >= 4:
            (n,) = struct.unpack_from(">I", b, o)
            if len(b) - o - 4 < n: break
            m = msgpack.unpackb(bytes(b[o + 4:o + 4 + n])); o += 4 + n
            r = msgpack.packb({"id": m.get("id"), "ok": True, "result": {}})
            out.append(struct.pack(">I", len(r)) + r)
        del b[:o]
        self.t.write(b"".join(out))
async def main():
    s = await asyncio.get_running_loop().create_unix_server(P, sys.argv[1])
    print("ready", flush=True)
    await s.serve_forever()
uvloop.run(main())
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=512, help="pings in flight per connection")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="edb-", dir="/tmp"))
    daemon = Daemon(root).start()
    minimal_path = str(root / "minimal.sock")
    minimal = subprocess.Popen([sys.executable, "-c", MINIMAL_RESPONDER, minimal_path], stdout=subprocess.PIPE)
    minimal.stdout.readline()
    try:
        results = {}
        for name, path in (("embedd", str(daemon.socket)), ("minimal responder", minimal_path)):
            one = uvloop.run(measure(path, 1, args.window, args.seconds))
            many = uvloop.run(measure(path, args.connections, max(8, args.window // 8), args.seconds))
            results[name] = (one, many)
        print(f"machine: {os.cpu_count()} cores; {args.seconds:.0f} s per measurement; window {args.window}")
        print(f"{'server':<20}{'1 conn pipelined':>20}{f'{args.connections} conns':>16}")
        for name, (one, many) in results.items():
            print(f"{name:<20}{one:>16,.0f} /s{many:>12,.0f} /s")
        e, m = results["embedd"], results["minimal responder"]
        print(f"embedd / minimal: {e[0] / m[0]:.2f} (1 conn), {e[1] / m[1]:.2f} ({args.connections} conns)")
        print(f"target: >= 50,000 pipelined pings/s on one connection -> {'met' if e[0] >= 50_000 else 'NOT met'}")
    finally:
        daemon.stop()
        minimal.terminate()
        minimal.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

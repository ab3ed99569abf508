"""HTTP against the socket: requests per second and p99 latency of cheap ops, in one run.

Starts one real daemon (``python -m embedd serve --http 127.0.0.1:PORT``, no
models needed) and drives the same ops both ways, alternating socket and HTTP
phases so that a noisy neighbour hurts both alike:

* socket: ``--clients`` connections, each sending one request and waiting for
  its answer (no pipelining: what a request/response client does);
* HTTP: the same number of keep-alive HTTP/1.1 connections, each one request
  at a time, ``POST /v1/<op>``; plus ``GET /healthz``, which runs no op.

Both sides use the same minimal client (raw asyncio streams, prepared
request bytes, just enough parsing to find the end of the answer), on one
uvloop in this process: on a 2-core box it competes with the daemon for CPU,
so the numbers are a floor; the ratio is the point.

    .venv/bin/python bench/http_bench.py [--seconds 2] [--clients 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemon import Daemon  # noqa: E402
from tests.http_fixtures import free_port, wait_http  # noqa: E402

OPS = ["ping", "batch_progress"]


async def socket_phase(path: Path, op: str, clients: int, seconds: float) -> list[float]:
    frame = msgpack.packb({"op": op})
    frame = struct.pack(">I", len(frame)) + frame
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def one_client() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                writer.write(frame)
                (n,) = struct.unpack(">I", await reader.readexactly(4))
                body = msgpack.unpackb(await reader.readexactly(n))
                latencies.append(time.perf_counter() - start)
                assert body["ok"], body
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


async def http_phase(port: int, method: str, path: str, clients: int, seconds: float) -> list[float]:
    """Keep-alive HTTP/1.1 over raw asyncio streams: the same minimal client as the socket side."""
    body = b"{}" if method == "POST" else b""
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/json\r\n\r\n"
    ).encode() + body
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head[:40]
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


def metrics_overhead(n: int = 200_000) -> tuple[float, float]:
    """Microseconds per request that counting adds: embedd's Metrics, and prometheus_client's locked metrics."""
    import types

    from prometheus_client import CollectorRegistry, Counter, Histogram

    from embedd.metrics import DURATION_BUCKETS, Metrics
    from embedd.protocol import Handler

    def ping(_):
        return {}

    counted = Metrics(types.SimpleNamespace()).instrument({"ping": Handler(ping, inline=True)})["ping"].fn
    registry = CollectorRegistry()
    requests = Counter("r", "", ["op", "code"], registry=registry).labels("ping", "ok")
    duration = Histogram("d", "", ["op"], buckets=DURATION_BUCKETS, registry=registry).labels("ping")

    def locked(args):
        start = time.perf_counter()
        result = ping(args)
        requests.inc()
        duration.observe(time.perf_counter() - start)
        return result

    def per_call(fn) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn(None)
        return (time.perf_counter() - start) / n * 1e6

    bare = per_call(ping)
    return per_call(counted) - bare, per_call(locked) - bare


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ehb-", dir="/tmp"))
    port = free_port()
    daemon = Daemon(root, args=["--http", f"127.0.0.1:{port}"])
    daemon.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz")
        cases = [(f"socket {op}", "socket", op) for op in OPS]
        cases += [(f"HTTP POST /v1/{op}", "http", op) for op in OPS]
        cases.append(("HTTP GET /healthz", "healthz", None))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
        for _ in range(args.rounds):
            for name, kind, op in cases:
                if kind == "socket":
                    lat = await socket_phase(daemon.socket, op, args.clients, args.seconds)
                elif kind == "http":
                    lat = await http_phase(port, "POST", f"/v1/{op}", args.clients, args.seconds)
                else:
                    lat = await http_phase(port, "GET", "/healthz", args.clients, args.seconds)
                results[name].append((len(lat) / args.seconds, p99(lat)))
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.clients} clients, one request at a time each; median of {args.rounds} rounds of {args.seconds:g} s")
    print(f"{'':26} {'requests/s':>12} {'p99 ms':>8}")
    summary = {}
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        tail = statistics.median(t for _, t in runs)
        summary[name] = (rate, tail)
        print(f"{name:26} {rate:12,.0f} {tail * 1000:8.2f}")
    ours, locked = metrics_overhead()
    print(f"counting one request for /metrics: {ours:.2f} us (prometheus_client's locked Counter+Histogram: {locked:.2f} us)")
    for op in OPS:
        s_rate, s_tail = summary[f"socket {op}"]
        h_rate, h_tail = summary[f"HTTP POST /v1/{op}"]
        print(f"ratio HTTP/socket, {op}: throughput {h_rate / s_rate:.2f}, p99 {h_tail / s_tail:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections per phase")
    parser.add_argument("--rounds", type=int, default=3, help="socket/HTTP alternations")
    uvloop.run(main(parser.parse_args()))

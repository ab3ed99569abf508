"""The socket server through the real socket of a real daemon process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import msgpack
import pytest

from embedd.client import Client
from tests.daemon import Daemon, frame, is_closed, read_frame, send_frame


# -- framing errors: one error frame with id nil, then the connection closes ------------


def _expect_bad_frame(daemon: Daemon, raw: bytes, *, half_close: bool = False) -> dict:
    with daemon.connect() as s:
        s.sendall(raw)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        response = read_frame(s)
        assert is_closed(s), "the daemon must close the connection after bad_frame"
    assert response["ok"] is False and response["id"] is None
    assert response["error"]["code"] == "bad_frame"
    assert response["error"]["message"]
    return response


def test_zero_length_frame(shared_daemon):
    _expect_bad_frame(shared_daemon, struct.pack(">I", 0))


def test_oversize_length_is_rejected_before_the_body_arrives(shared_daemon):
    # 4 GiB - 1 announced, no body sent: the answer must come at once, with no allocation.
    response = _expect_bad_frame(shared_daemon, struct.pack(">I", 0xFFFFFFFF))
    assert "65536" in response["error"]["message"]


def test_length_just_over_max_frame(shared_daemon):
    _expect_bad_frame(shared_daemon, struct.pack(">I", 65537) + b"\x80" * 16)


def test_length_at_max_frame_is_accepted(shared_daemon):
    body = msgpack.packb({"op": "ping", "id": 1, "pad": "x" * (65536 - 30)})
    body = msgpack.packb({"op": "ping", "id": 1, "pad": "x" * (65536 - 30 - (len(body) - 65536))})
    assert len(body) == 65536
    with shared_daemon.connect() as s:
        s.sendall(struct.pack(">I", len(body)) + body)
        response = read_frame(s)
    assert response["error"]["code"] == "bad_request"  # framing fine; 'pad' is an unknown argument
    assert "pad" in response["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # the one byte msgpack never uses
        b"\x92\x01",  # array of 2 with one element: cut short
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb("ping"),
        msgpack.packb({"op": "ping"}) + b"\x00",  # trailing bytes
        msgpack.packb({1: "ping"}),  # non-string key
        b"\x81\xa2op\xa4\xff\xfe\xfd\xfc",  # invalid UTF-8 in a string
    ],
    ids=["reserved-byte", "truncated-array", "array", "string", "trailing", "int-key", "bad-utf8"],
)
def test_body_that_is_not_one_map(shared_daemon, body):
    _expect_bad_frame(shared_daemon, struct.pack(">I", len(body)) + body)


def test_eof_in_the_middle_of_a_frame(shared_daemon):
    body = msgpack.packb({"op": "ping"})
    _expect_bad_frame(shared_daemon, struct.pack(">I", len(body)) + body[:2], half_close=True)


def test_eof_in_the_middle_of_a_header(shared_daemon):
    _expect_bad_frame(shared_daemon, b"\x00\x00", half_close=True)


def test_half_closed_client_still_gets_its_answers(shared_daemon):
    # socat-style: send the request, close the write side, read the response.
    with shared_daemon.connect() as s:
        s.sendall(frame({"id": 7, "op": "status"}) + frame({"id": 8, "op": "ping"}))
        s.shutdown(socket.SHUT_WR)
        got = {read_frame(s)["id"], read_frame(s)["id"]}
        assert got == {7, 8}
        assert is_closed(s)


# -- request errors keep the connection open ------------------------------------------------


def test_unknown_op_and_unknown_key(shared_daemon):
    with shared_daemon.connect() as s:
        send_frame(s, {"id": "a", "op": "frobnicate"})
        r = read_frame(s)
        assert r == {"id": "a", "ok": False, "error": {"code": "unknown_op", "message": r["error"]["message"]}}
        assert "frobnicate" in r["error"]["message"]
        send_frame(s, {"id": "b", "op": "ping", "colour": "red"})
        r = read_frame(s)
        assert r["id"] == "b" and r["error"]["code"] == "bad_request" and "colour" in r["error"]["message"]
        send_frame(s, {"id": 3, "op": "search", "model": "muq", "text": "x", "limit": 1001})
        r = read_frame(s)
        assert r["error"]["code"] == "bad_request" and "limit" in r["error"]["message"]
        send_frame(s, {"id": 4})
        r = read_frame(s)
        assert r["id"] == 4 and r["error"]["code"] == "bad_request" and "op" in r["error"]["message"]
        send_frame(s, {"id": 5, "op": "ping"})  # still serving this connection
        r = read_frame(s)
        assert r["id"] == 5 and r["ok"] is True and r["result"]["protocol"] == 1


def test_ping_shape(shared_daemon):
    r = shared_daemon.call("ping")
    assert r["ok"] is True and r["id"] is None
    assert r["result"]["protocol"] == 1
    assert isinstance(r["result"]["version"], str)
    assert r["result"]["uptime_s"] >= 0


def test_status_shape(shared_daemon):
    r = shared_daemon.call("status")["result"]
    assert {"version", "device", "models", "batch", "queue", "executor", "milvus", "legacy_collections"} <= set(r)
    assert r["device"] == "cpu"
    assert set(r["models"]) == {"muq", "mert", "latent"}
    for name, m in r["models"].items():
        assert set(m) == {"loaded", "state", "running", "pinned", "idle_s", "dim", "collection", "text", "error", "compile"}
        assert m["loaded"] is False and m["idle_s"] is None and m["error"] is None and m["compile"] is None
        assert m["state"] == "unloaded" and m["running"] == [] and m["pinned"] is False
    lanes = r["executor"]["lanes"]
    assert set(lanes) == {"interactive", "batch"}
    for lane in lanes.values():
        assert lane["depth"] == 0 and lane["oldest_wait_s"] is None and lane["pass"] is None
    assert lanes["batch"]["nice"] == 10 and lanes["batch"]["pass_budget_s"] == 1.0 and lanes["interactive"]["nice"] == 0
    assert r["models"]["muq"]["text"] is True and r["models"]["mert"]["text"] is False
    assert r["models"]["mert"]["collection"] == "mert_embedding"
    assert r["queue"] == {"interactive": 0, "batch": 0}
    assert set(r["milvus"]) == {"uri", "ok"}
    assert r["legacy_collections"] == []


def test_unload_with_nothing_loaded(shared_daemon):
    assert shared_daemon.call("unload")["result"] == {"unloaded": [], "kept": {}}
    assert shared_daemon.call("unload", model="mert")["result"] == {"unloaded": [], "kept": {}}
    r = shared_daemon.call("unload", model="nope")
    assert r["error"]["code"] == "bad_request"


# -- concurrency ------------------------------------------------------------------------


def test_pipelined_requests_complete_out_of_order(shared_daemon):
    # status runs as a task; ping is answered inline, so the later request is answered first.
    with shared_daemon.connect() as s:
        s.sendall(b"".join(frame({"id": i, "op": op}) for i, op in enumerate(["status", "ping"] * 50)))
        order = [read_frame(s)["id"] for _ in range(100)]
    assert sorted(order) == list(range(100))
    assert order != sorted(order)
    assert order.index(1) < order.index(0)


def test_many_pipelined_requests_all_answered_by_id(shared_daemon):
    with shared_daemon.connect() as s:
        s.sendall(b"".join(frame({"id": f"r{i}", "op": "ping"}) for i in range(2000)))
        ids = {read_frame(s)["id"] for _ in range(2000)}
    assert ids == {f"r{i}" for i in range(2000)}


async def test_200_concurrent_connections(shared_daemon):
    clients = await asyncio.gather(*(Client.connect(shared_daemon.socket) for _ in range(200)))
    try:
        results = await asyncio.gather(*(c.call("ping") for c in clients))
        assert len(results) == 200 and all(r["protocol"] == 1 for r in results)
        statuses = await asyncio.gather(*(c.call("status") for c in clients))
        assert all(s["device"] == "cpu" for s in statuses)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_stalled_half_frame_client_does_not_delay_others(shared_daemon):
    """Two clients stall mid-frame and never finish it (they stay open): others are answered meanwhile,
    so the daemon does not wait for a frame's rest (a server that did would not answer these pings)."""
    body = msgpack.packb({"op": "ping"})
    with shared_daemon.connect() as stalled:
        stalled.sendall(struct.pack(">I", len(body)) + body[:1])  # and then nothing
        stalled_header = shared_daemon.connect()
        stalled_header.sendall(b"\x00")
        try:
            for _ in range(20):
                assert shared_daemon.call("ping", timeout=30)["ok"]
        finally:
            stalled_header.close()


def test_client_that_never_reads_does_not_block_others(shared_daemon):
    # A client floods requests and never reads: the daemon stops reading it, others carry on.
    flooder = shared_daemon.connect()
    flooder.setblocking(False)
    payload = b"".join(frame({"op": "status"}) for _ in range(2000))
    sent = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            sent += flooder.send(payload)
        except BlockingIOError:
            time.sleep(0.01)
    try:  # the daemon stopped reading the flooder: a server blocked on it would not answer this
        assert shared_daemon.call("ping", timeout=30)["ok"]
    finally:
        flooder.close()


def test_connection_limit_answers_overloaded(sock_dir):
    with Daemon(sock_dir, args=["--max-connections", "3"]) as d:
        held = [d.connect() for _ in range(3)]
        for s in held:
            send_frame(s, {"op": "ping"})
            assert read_frame(s)["ok"]
        extra = d.connect()
        r = read_frame(extra)
        assert r["id"] is None and r["error"]["code"] == "overloaded"
        assert is_closed(extra)
        held.pop().close()
        deadline = time.monotonic() + 5  # until the daemon has seen the close: then a slot is free again
        while not (r := d.call("ping"))["ok"]:
            assert r["error"]["code"] == "overloaded" and time.monotonic() < deadline, r
            time.sleep(0.01)
        for s in held:
            s.close()


def test_idle_connection_is_closed(sock_dir):
    with Daemon(sock_dir, args=["--idle-timeout-s", "0.5"]) as d:
        s = d.connect()
        s.sendall(b"\x00\x00")  # half a header, then silence
        assert is_closed(s, timeout=5.0)
        assert d.call("ping")["ok"]


# -- lifecycle --------------------------------------------------------------------------


def test_sigterm_removes_socket_and_exits_zero(sock_dir):
    d = Daemon(sock_dir).start()
    held = d.connect()  # an open idle connection must not hold up shutdown
    assert d.stop(signal.SIGTERM, timeout=60) == 0  # (an idle connection holding it up would time this out)
    assert not d.socket.exists()
    held.close()


def test_sigint_also_shuts_down_cleanly(sock_dir):
    d = Daemon(sock_dir).start()
    assert d.stop(signal.SIGINT) == 0
    assert not d.socket.exists()


def test_second_daemon_refuses_to_start(daemon, sock_dir):
    second = subprocess.run(
        [sys.executable, "-m", "embedd", "serve", "--socket", str(daemon.socket), "--data-dir", str(sock_dir / "d2")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EMBEDD_DEVICE": "cpu"},
    )
    assert second.returncode == 1
    assert "already" in second.stderr and str(daemon.socket) in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert daemon.call("ping")["ok"], "the first daemon's socket must survive"


def test_stale_socket_file_is_replaced(sock_dir):
    path = sock_dir / "embedd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    assert path.exists()
    with Daemon(sock_dir, socket_path=path) as d:
        assert d.call("ping")["ok"]


def test_regular_file_at_socket_path_is_not_replaced(sock_dir):
    path = sock_dir / "embedd.sock"
    path.write_text("precious")
    r = subprocess.run(
        [sys.executable, "-m", "embedd", "serve", "--socket", str(path), "--data-dir", str(sock_dir / "d")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "EMBEDD_DEVICE": "cpu"},
    )
    assert r.returncode == 1 and "not a socket" in r.stderr
    assert path.read_text() == "precious"


def test_socket_mode_and_parent_directory(sock_dir):
    path = sock_dir / "nested" / "dir" / "e.sock"
    with Daemon(sock_dir, socket_path=path, args=["--socket-mode", "0600"]) as d:
        assert (path.stat().st_mode & 0o777) == 0o600
        assert d.call("ping")["ok"]


def test_default_socket_mode_is_0660(daemon):
    assert (daemon.socket.stat().st_mode & 0o777) == 0o660


def test_socket_activation_with_passed_fd(sock_dir):
    path = sock_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    d = Daemon(sock_dir, socket_path=path)
    # LISTEN_PID must be the daemon's own pid: the shell sets it to $$ and execs in place,
    # moving our listening socket to fd 3 as systemd would.
    script = f'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&{fd}'
    cmd = ["/bin/bash", "-c", script, "bash", *d.command()]
    d.start(command=cmd, pass_fds=(fd,))
    try:
        assert d.call("ping")["ok"]
        assert d.stop() == 0
        assert path.exists(), "systemd owns an activated socket; the daemon must not remove it"
    finally:
        listener.close()


def test_sd_notify_messages(sock_dir):
    notify_path = sock_dir / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(10)
    d = Daemon(sock_dir, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
    d.start()
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(receiver.recv(4096).decode())
        assert d.stop() == 0
        receiver.settimeout(0.5)
        while True:
            try:
                messages.append(receiver.recv(4096).decode())
            except socket.timeout:
                break
    finally:
        receiver.close()
    text = "\n".join(messages)
    assert "READY=1" in text
    assert "STATUS=serving" in text
    assert sum("WATCHDOG=1" in m for m in messages) >= 3
    assert "STOPPING=1" in text
    ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m)
    stopping_at = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert ready_at < stopping_at


def test_invalid_setting_fails_with_one_line(sock_dir):
    r = subprocess.run(
        [sys.executable, "-m", "embedd", "serve", "--socket", str(sock_dir / "s"), "--idle-unload-s", "soon"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "idle-unload-s" in lines[0] and "Traceback" not in r.stderr


async def test_client_disconnect_mid_request_costs_nothing(shared_daemon):
    # Many clients send requests and vanish before reading; the daemon keeps serving.
    for _ in range(50):
        s = shared_daemon.connect()
        s.sendall(frame({"op": "status"}) + frame({"op": "unload"}))
        s.close()
    client = await Client.connect(shared_daemon.socket)
    try:
        assert (await client.call("ping"))["protocol"] == 1
    finally:
        await client.close()


def test_two_daemons_may_not_share_a_data_directory(daemon, sock_dir):
    other = subprocess.run(
        [sys.executable, "-m", "embedd", "serve", "--socket", str(sock_dir / "other.sock"),
         "--data-dir", str(daemon.data_dir)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "EMBEDD_DEVICE": "cpu"},
    )
    assert other.returncode == 1
    assert "data directory" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert not (sock_dir / "other.sock").exists(), "the refused daemon must clean up its socket"
    assert daemon.call("ping")["ok"]


def test_in_flight_limit_per_connection_protects_other_clients(sock_dir):
    """A client that pipelines thousands of requests and never reads gets at most its share."""
    with Daemon(sock_dir, args=["--max-inflight-per-connection", "8"]) as d:
        # Warm: Milvus opened and the legacy listing cached, so a status makes no store call
        # for the next 5 s; what is measured is the connection limit, not Milvus's start.
        assert d.call("status")["result"]["milvus"]["ok"] is True
        flooder = d.connect()
        flooder.sendall(b"".join(frame({"id": i, "op": "status"}) for i in range(5000)))
        try:
            assert read_frame(flooder)["ok"]  # the flood is being served
            for _ in range(5):
                r = d.call("status", timeout=30)
                assert r["ok"] and r["result"]["milvus"]["ok"] is True
        finally:
            flooder.close()
        # and a client that does read gets every answer, a few at a time
        with d.connect() as s:
            s.sendall(b"".join(frame({"id": i, "op": "status"}) for i in range(300)))
            assert {read_frame(s)["id"] for _ in range(300)} == set(range(300))

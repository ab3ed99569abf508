"""Run a real embedd daemon process for tests, and talk raw frames to it."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import msgpack

from embedd.ops.op import DRIFT

REPO = Path(__file__).resolve().parent.parent


def short_tmpdir(prefix: str = "ed-") -> Path:
    """A short directory: Unix socket paths must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Daemon:
    """``python -m embedd serve`` in a subprocess, with its own socket and data dir."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        socket_path: Path | None = None,
    ) -> None:
        self.root = root or short_tmpdir()
        self.socket = socket_path or self.root / "embedd.sock"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "daemon.log"
        self.args = list(args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "embedd", "serve",
            "--socket", str(self.socket),
            "--data-dir", str(self.data_dir),
            *self.args,
        ]

    def environment(self) -> dict[str, str]:
        # (TORCHINDUCTOR_: an in-process service of an earlier test may have pointed the compile cache at its own
        # directory; a daemon keeps its compile cache in its own data directory)
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("EMBEDD_", "NAVIDROME_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "TORCHINDUCTOR_"))
        }  # fmt: skip
        env.setdefault("EMBEDD_DEVICE", "cpu")
        # Compiling is minutes of a 2-core box's CPU per model: only tests/test_compile.py asks for it.
        env.setdefault("EMBEDD_COMPILE", "off")
        env.update(self.env)
        return env

    def start(self, wait: bool = True, **popen: Any) -> Daemon:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            popen.pop("command", None) or self.command(),
            env=self.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=popen.pop("cwd", REPO),
            **popen,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2.0)
                    s.connect(str(self.socket))
                    send_frame(s, {"op": "ping"})
                    if read_frame(s).get("ok"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._check_answers_matched_their_structs()
        return self.proc.returncode

    def _check_answers_matched_their_structs(self) -> None:
        """Every answer this daemon gave matched its op's response Struct (embedd.ops.op.Result.of logs a drift)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return
        drifted = [line for line in text.splitlines() if DRIFT in line]
        assert not drifted, "an answer did not match its response Struct:\n" + "\n".join(drifted[:5])

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(str(self.socket))
        return s

    def call(self, op: str, *, timeout: float = 120, **args: Any) -> dict:
        """One request on a fresh connection; returns the whole response map."""
        with self.connect(timeout=timeout) as s:
            send_frame(s, {"op": op, **args})
            return read_frame(s)


def frame(message: Any) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def send_frame(sock: socket.socket, message: Any) -> None:
    sock.sendall(frame(message))


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise EOFError(f"connection closed after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)


def read_frame(sock: socket.socket) -> dict:
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    return msgpack.unpackb(recv_exactly(sock, length), raw=False)


def is_closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False

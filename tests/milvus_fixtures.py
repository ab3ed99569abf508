"""A real Milvus standalone server for the tests, started from the PyPI ``milvus`` package.

The package (``milvus==2.3.5``) ships the real ``milvus`` binary, compressed, plus a
``milvus-server`` wrapper. We do not use the wrapper as-is, for three reasons the
tests care about:

- it picks its listen ports by probing upward from fixed defaults and silently
  moves on when one is taken, so the proxy port it was asked for is not
  guaranteed; and its embedded etcd always listens on 2379/2380, so two servers
  on one machine (another helper's test run) collide;
- its stop() kills the server one second after SIGTERM, which is not what a
  "Milvus was stopped and came back" test wants;
- it checks ports with a bind without ``SO_REUSEADDR``, so restarting on the same
  port fails while old connections sit in TIME_WAIT.

So :class:`MilvusServer` reuses the package only to extract the binary (once per
machine, into a cache directory, under a file lock) and to render the config
template, pins every port (all ephemeral ports chosen up front, the embedded etcd
through its own config file), runs ``milvus run standalone`` itself in its own
process group, waits for ``/healthz`` and a successful client round trip, and can
stop (SIGTERM, then SIGKILL after a grace period), kill (SIGKILL, a crash) and
start again on the same ports and data, so a restarted server is the same server
to its clients.

A server that cannot start raises :class:`MilvusServerError` carrying the tail of
its logs: the tests that need it fail loudly instead of skipping.

Usage in a test module (tests/conftest.py re-exports the session fixture)::

    def test_x(milvus_server): ...  # milvus_server.uri == "http://127.0.0.1:PORT"

All tests share one server per test session (a module singleton). A test that stops or kills it must start it again before it returns
(or use its own ``MilvusServer`` on its own ``tmp_path``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["MilvusServer", "MilvusServerError", "milvus_server", "shared_milvus_server"]

# The config template's port keys (all of them; every one is pinned).
_PORT_KEYS = (
    "etcd_port",
    "root_coord_port",
    "proxy_port",
    "proxy_internal_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)

_BIN_CACHE = Path(os.environ.get("EMBEDD_MILVUS_BIN_CACHE", Path(tempfile.gettempdir()) / "embedd-milvus-bin"))


class MilvusServerError(RuntimeError):
    """The test Milvus server could not be started (the message holds its log tail)."""


def _free_ports(n: int) -> list[int]:
    """Distinct ports the kernel considers free right now (held open together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _milvus_binary() -> Path:
    """Extract the packaged binary once per machine; concurrent test runs wait on a lock."""
    import milvus  # the PyPI ``milvus`` package; imported lazily so importing this module is cheap

    _BIN_CACHE.mkdir(parents=True, exist_ok=True)
    with open(_BIN_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        milvus._initialize_data_files(str(_BIN_CACHE))  # md5-checked, a no-op when already extracted
    return _BIN_CACHE / "bin" / "milvus"


class MilvusServer:
    """One real Milvus standalone process on pinned localhost ports over a data directory."""

    def __init__(self, base_dir: Path, *, startup_timeout_s: float = 150.0) -> None:
        self.base_dir = Path(base_dir)
        self.startup_timeout_s = startup_timeout_s
        ports = _free_ports(len(_PORT_KEYS) + 2)
        self.ports: dict[str, int] = dict(zip(_PORT_KEYS, ports))
        self.metrics_port = ports[-2]
        self.etcd_peer_port = ports[-1]
        self._proc: subprocess.Popen[bytes] | None = None
        self._configured = False
        self.last_start_s: float | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.ports["proxy_port"]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle -------------------------------------------------------------------------

    def _configure(self) -> None:
        from milvus import MilvusServerConfig

        cfg = MilvusServerConfig(data_dir=str(self.base_dir))
        cfg.resolve_storage()
        for key, port in self.ports.items():
            cfg.set(key, port)
        text = cfg.template_text
        for placeholder, key in cfg.config_key_maps.items():
            text = text.replace(placeholder, cfg.get_value_text(cfg.configurable_items[key][1]))
        etcd_cfg = self.base_dir / "configs" / "embed-etcd.yaml"
        etcd_cfg.parent.mkdir(parents=True, exist_ok=True)
        client = f"http://127.0.0.1:{self.ports['etcd_port']}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        etcd_cfg.write_text(
            "name: default\n"
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n"
        )
        # The template has no etcd.config.path key; the embedded etcd reads it when present.
        marker = "etcd:\n  endpoints:"
        if marker not in text:
            raise MilvusServerError("the milvus package's config template changed: no 'etcd: endpoints:' block")
        text = text.replace(marker, f"etcd:\n  config:\n    path: {etcd_cfg}\n  endpoints:", 1)
        (self.base_dir / "configs" / "milvus.yaml").write_text(text)
        glog = Path(cfg.glog_conf_file)
        (self.base_dir / "configs" / "glog.conf").write_bytes(glog.read_bytes())
        self._configured = True

    def start(self) -> float:
        """Start (or restart) the server and wait until it answers; returns the seconds it took."""
        if self.running:
            return 0.0
        t0 = time.monotonic()
        exe = _milvus_binary()
        if not self._configured:
            self._configure()
        logs = self.base_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.metrics_port),
            MILVUS_RUN_DIR=str(self.base_dir / "run"),
            LD_LIBRARY_PATH=f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        )
        with open(logs / "milvus-stdout.log", "ab") as out, open(logs / "milvus-stderr.log", "ab") as err:
            self._proc = subprocess.Popen(
                [str(exe), "run", "standalone"],
                cwd=self.base_dir,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: our signals reach only it
            )
        try:
            self._wait_ready(t0 + self.startup_timeout_s)
        except BaseException:
            self.kill()
            raise
        self.last_start_s = time.monotonic() - t0
        return self.last_start_s

    def _wait_ready(self, deadline: float) -> None:
        from pymilvus import MilvusClient

        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        healthy = False
        while time.monotonic() < deadline:
            if not self.running:
                raise MilvusServerError(
                    f"Milvus server exited with code {self._proc.returncode if self._proc else '?'} "
                    f"while starting:\n{self.log_tail()}"
                )
            if not healthy:
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        healthy = b"OK" in resp.read()
                except (urllib.error.URLError, OSError):
                    pass
            if healthy:
                try:  # /healthz can say OK a moment before the proxy serves requests
                    client = MilvusClient(uri=self.uri, timeout=5)
                    try:
                        client.list_collections()
                    finally:
                        client.close()
                    return
                except Exception:
                    pass
            time.sleep(0.25)
        raise MilvusServerError(
            f"Milvus server did not become ready within {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the server the way an operator does (SIGTERM), killing it after ``grace_s``.

        Milvus 2.3.5 standalone often does not finish a graceful stop within a
        minute once clients have connected, so the grace period is short: to its
        clients this is "Milvus went away", which is what the tests exercise.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc = None

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL to its process group), as in a crash."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> float:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name in ("milvus-stderr.log", "milvus-stdout.log"):
            path = self.base_dir / "logs" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no logs under {self.base_dir / 'logs'})"

    def __enter__(self) -> MilvusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SHARED: MilvusServer | None = None


def shared_milvus_server(base_dir: Path) -> MilvusServer:
    """The one server of this test session (started on first use, stopped at exit)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = MilvusServer(base_dir)
        atexit.register(_SHARED.stop)
    if not _SHARED.running:
        _SHARED.start()
    return _SHARED


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    """A running real Milvus server, shared by the whole session; a start failure fails the test."""
    server = shared_milvus_server(tmp_path_factory.mktemp("milvus-server"))
    yield server
    server.stop()

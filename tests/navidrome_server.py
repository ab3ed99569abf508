"""A real Navidrome server for tests: the stock release built from its Go module, a
tagged music folder it scans itself, its native and Subsonic APIs.

``scripts/build-navidrome`` builds and caches the binary (outside the repository),
``scripts/build-plugin`` packages embedd's plugin; both are run from here so a
fresh clone needs nothing but Go, a C compiler and the module proxy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import av
import numpy as np

from tests.audio_fixtures import distinct_signal

REPO = Path(__file__).resolve().parent.parent

__all__ = [
    "NavidromeServer",
    "TaggedTrack",
    "build_navidrome",
    "build_plugin",
    "free_port",
    "write_tagged_library",
]


class BuildError(RuntimeError):
    """A build script failed; the message carries its output."""


def _run_script(name: str, timeout_s: float) -> Path:
    script = REPO / "scripts" / name
    proc = subprocess.run([str(script)], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise BuildError(f"scripts/{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def build_navidrome(timeout_s: float = 1800) -> Path:
    """The cached Navidrome binary, built on first use (minutes on two cores)."""
    return _run_script("build-navidrome", timeout_s)


def build_plugin(timeout_s: float = 600) -> Path:
    """embedd.ndp, freshly built from plugins/navidrome."""
    return _run_script("build-plugin", timeout_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class TaggedTrack:
    path: Path
    title: str
    artist: str
    album: str
    track_number: int
    mbid: str


def _flac_with_tags(samples: np.ndarray, rate: int, tags: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as c:
        c.metadata.update(tags)
        stream = c.add_stream("flac", rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32), format="fltp", layout="stereo")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format, layout="stereo", rate=rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return buf.getvalue()


def write_tagged_library(music: Path, layout: dict[str, dict[str, list[str]]], *, duration_s: float = 2.0) -> list[TaggedTrack]:
    """FLAC files with title/artist/album/track/MusicBrainz tags, each with audio of its own.

    ``layout`` maps artist → album → track titles; files go to
    ``music/<artist>/<album>/<nn> - <title>.flac`` as a tagger would put them.
    """
    tracks = []
    index = 0
    for artist, albums in layout.items():
        for album, titles in albums.items():
            for number, title in enumerate(titles, 1):
                mbid = f"{index:08x}-0000-4000-8000-{index:012x}"
                path = music / artist / album / f"{number:02d} - {title}.flac"
                path.parent.mkdir(parents=True, exist_ok=True)
                tags = {
                    "title": title, "artist": artist, "albumartist": artist, "album": album,
                    "tracknumber": str(number), "musicbrainz_trackid": mbid,
                }  # fmt: skip
                path.write_bytes(_flac_with_tags(distinct_signal(index, duration_s=duration_s), 44_100, tags))
                tracks.append(TaggedTrack(path, title, artist, album, number, mbid))
                index += 1
    return tracks


class NavidromeError(AssertionError):
    """Navidrome answered a Subsonic error or an unexpected HTTP status."""


class NavidromeServer:
    """``navidrome`` in a subprocess with its own data folder, music folder and plugins folder."""

    def __init__(self, binary: Path, root: Path, music: Path, *, env: dict[str, str] | None = None) -> None:
        self.binary = binary
        self.root = root
        self.music = music
        self.data = root / "data"
        self.plugins = root / "plugins"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "navidrome.log"
        self.extra_env = dict(env or {})
        self.user = "admin"
        self.password = secrets.token_hex(8)
        self.token: str | None = None  # native API (JWT)
        self.proc: subprocess.Popen | None = None
        self.data.mkdir(parents=True, exist_ok=True)
        self.plugins.mkdir(parents=True, exist_ok=True)

    @property
    def db_path(self) -> Path:
        return self.data / "navidrome.db"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ND_")}
        env.update({
            "ND_DATAFOLDER": str(self.data),
            "ND_MUSICFOLDER": str(self.music),
            "ND_ADDRESS": "127.0.0.1",
            "ND_PORT": str(self.port),
            "ND_LOGLEVEL": "debug",
            "ND_PLUGINS_ENABLED": "true",
            "ND_PLUGINS_FOLDER": str(self.plugins),
            "ND_ENABLEINSIGHTSCOLLECTOR": "false",
            "ND_LASTFM_ENABLED": "false",
            "ND_DEEZER_ENABLED": "false",
            "ND_LISTENBRAINZ_ENABLED": "false",
            "ND_SPOTIFY_ID": "",
            "ND_SCANNER_SCANONSTARTUP": "true",
        })  # fmt: skip
        env.update(self.extra_env)
        return env

    def install_plugin(self, ndp: Path, plugin_id: str = "embedd") -> None:
        """What the docs tell an operator: copy the package into the plugins folder."""
        shutil.copyfile(ndp, self.plugins / f"{plugin_id}.ndp")

    def start(self, timeout_s: float = 120) -> NavidromeServer:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary)], env=self.environment(), cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"navidrome exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"navidrome not answering after {timeout_s} s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 20) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    # --- native API ---------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, timeout_s: float = 60) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("X-ND-Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def create_admin(self) -> None:
        """The first user, through the endpoint the web UI's sign-up page uses."""
        status, body = self._request("POST", "/auth/createAdmin", {"username": self.user, "password": self.password})
        if status != 200 or not isinstance(body, dict) or "token" not in body:
            raise NavidromeError(f"createAdmin answered {status}: {body}\n{self.log()}")
        self.token = body["token"]

    def plugins_list(self) -> list[dict]:
        status, body = self._request("GET", "/api/plugin")
        if status != 200:
            raise NavidromeError(f"GET /api/plugin answered {status}: {body}")
        return body

    def update_plugin(self, plugin_id: str, **fields: Any) -> dict:
        """PUT /api/plugin/<id>, as the plugin page does (config is a JSON string)."""
        if "config" in fields and not isinstance(fields["config"], str):
            fields["config"] = json.dumps(fields["config"])
        status, body = self._request("PUT", f"/api/plugin/{plugin_id}", fields)
        if status != 200:
            raise NavidromeError(f"PUT /api/plugin/{plugin_id} answered {status}: {body}\n{self.log()}")
        return body

    # --- Subsonic API -------------------------------------------------------------

    def subsonic_url(self, method: str, **params: Any) -> str:
        salt = secrets.token_hex(6)
        auth = {
            "u": self.user, "s": salt, "t": hashlib.md5((self.password + salt).encode()).hexdigest(),
            "v": "1.16.1", "c": "embedd-tests", "f": "json",
        }  # fmt: skip
        return f"{self.base}/rest/{method}?" + urllib.parse.urlencode({**auth, **params})

    def subsonic_raw(self, method: str, timeout_s: float = 60, **params: Any) -> tuple[int, dict | None]:
        try:
            with urllib.request.urlopen(self.subsonic_url(method, **params), timeout=timeout_s) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        return status, (json.loads(raw)["subsonic-response"] if raw else None)

    def subsonic(self, method: str, timeout_s: float = 60, **params: Any) -> dict:
        status, body = self.subsonic_raw(method, timeout_s, **params)
        if status != 200 or body is None or body.get("status") != "ok":
            raise NavidromeError(f"{method} answered HTTP {status}: {body}\n{self.log()}")
        return body

    def wait_scanned(self, tracks: int, timeout_s: float = 120) -> None:
        """Until the scan at start-up has finished with every track in the database."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.subsonic("getScanStatus")["scanStatus"]
            if not status.get("scanning") and status.get("count", 0) >= tracks:
                return
            if time.monotonic() > deadline:
                raise NavidromeError(f"scan not finished after {timeout_s} s: {status}\n{self.log()}")
            time.sleep(0.2)

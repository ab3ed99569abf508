"""A music library for batch-job tests: generated audio, broken files, a Navidrome DB, a daemon.

``Library`` writes short tone files in several formats (each track a different
pitch, so vectors differ), broken files among them, and the matching
``media_file`` rows in a Navidrome-schema database (either path layout). Many
rows may share one file (``rows_per_file``): a big library costs no audio.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterable

from tests.audio_fixtures import encode, make_broken_fixtures, tone
from tests.daemon import Daemon
from tests.navidrome_fixtures import FixtureTrack, NavidromeDB

__all__ = ["BatchDaemon", "Library", "collection_counts", "stored_ids"]

# (extension, container, codec, rate, channels, extra options)
_FORMATS = [
    ("flac", "flac", "flac", 44_100, 2, {}),
    ("mp3", "mp3", "libmp3lame", 44_100, 2, {}),
    ("wav", "wav", "pcm_s16le", 22_050, 1, {}),
    ("ogg", "ogg", "libopus", 48_000, 2, {}),
    ("m4a", "ipod", "aac", 44_100, 2, {}),
]
_FINAL = {"completed", "completed_with_errors", "failed", "cancelled"}


def write_audio(path: Path, index: int, duration_s: float = 1.5) -> Path:
    ext, container, codec, rate, channels, options = _FORMATS[index % len(_FORMATS)]
    path = path.with_suffix("." + ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode(
        tone(rate, channels, duration_s, freq=220.0 + 37.0 * index), rate, container_format=container, codec=codec,
        options=options,
    )  # fmt: skip
    path.write_bytes(data)
    return path


class Library:
    """Audio files under ``root/music`` and a Navidrome DB at ``root/navidrome.db`` describing them."""

    def __init__(self, root: Path, layout: str = "relative", *, navidrome_root: str | None = None) -> None:
        self.root = Path(root)
        self.music = self.root / "music"
        self.music.mkdir(parents=True, exist_ok=True)
        # Navidrome's own view of the music folder; the daemon sees self.music (NAVIDROME_MUSIC_ROOT).
        self.navidrome_root = navidrome_root or str(self.music)
        self.db = NavidromeDB(self.root / "navidrome.db", layout, libraries={1: self.navidrome_root})  # type: ignore[arg-type]
        self.tracks: dict[str, FixtureTrack] = {}
        self._n = 0

    def _row(self, rel: str, real: Path, **overrides: Any) -> FixtureTrack:
        st = real.stat() if real.exists() else None
        self._n += 1
        return self.db.make_track(
            rel,
            title=overrides.pop("title", f"Song {self._n}"),
            artist=overrides.pop("artist", f"Artist {self._n % 5}"),
            size=st.st_size if st else 1234,
            mtime=st.st_mtime if st else 1_700_000_000.0,
            **overrides,
        )

    def add_good(self, n: int, *, rows_per_file: int = 1, duration_s: float = 1.5) -> list[FixtureTrack]:
        """``n`` rows over ``ceil(n / rows_per_file)`` real audio files."""
        rows = []
        files = (n + rows_per_file - 1) // rows_per_file
        for f in range(files):
            index = self._n + f
            real = write_audio(self.music / f"Artist {index % 5}" / f"{index:05d} track", index, duration_s)
            for r in range(min(rows_per_file, n - f * rows_per_file)):
                rel = os.path.relpath(real, self.music)
                if r:
                    # another row for the same file: Navidrome would never do it, but ids must differ
                    link = real.with_name(f"{real.stem}.{r}{real.suffix}")
                    if not link.exists():
                        os.link(real, link)
                    rel = os.path.relpath(link, self.music)
                rows.append(self._row(rel, real))
        return self._insert(rows)

    def add_broken(self) -> list[FixtureTrack]:
        """Broken files (each must fail) plus a row whose file does not exist."""
        broken = make_broken_fixtures(self.music / "broken")
        rows = [self._row(os.path.relpath(p, self.music), p) for name, p in sorted(broken.items()) if name != "truncated.flac"]
        rows.append(self._row("broken/vanished.flac", self.music / "broken" / "vanished.flac"))
        return self._insert(rows)

    def change(self, t: FixtureTrack, pitch: int = 100) -> FixtureTrack:
        """Rewrite a track's file with other audio (same format); Navidrome's rescan updates size and mtime."""
        real = self.path_of(t)
        fmt = [f[0] for f in _FORMATS].index(real.suffix.lstrip("."))
        write_audio(real.with_suffix(""), fmt + len(_FORMATS) * pitch, duration_s=2.0)
        st = real.stat()
        changed = self.db.change_track(t, size=st.st_size, mtime=st.st_mtime + 1.0)
        self.tracks[changed.track_id] = changed
        return changed

    def delete(self, t: FixtureTrack) -> None:
        self.db.delete_track(t)
        self.tracks.pop(t.track_id, None)

    def path_of(self, t: FixtureTrack) -> Path:
        stored = t.stored_path
        if os.path.isabs(stored):
            return self.music / os.path.relpath(stored, self.navidrome_root)
        return self.music / stored

    def _insert(self, rows: list[FixtureTrack]) -> list[FixtureTrack]:
        self.db.insert(rows)
        for r in rows:
            self.tracks[r.track_id] = r
        return rows

    def daemon_args(self) -> list[str]:
        args = ["--navidrome-db", self.db.path]
        if self.navidrome_root != str(self.music):
            args += ["--music-root", str(self.music)]
        return args


class BatchDaemon(Daemon):
    """A daemon over a :class:`Library` with the tiny models, plus batch helpers."""

    def __init__(self, root: Path, library: Library, models: dict[str, str], *, extra: Iterable[str] = (), milvus_uri: str | None = None) -> None:
        args = [
            "--muq-model", models["muq"], "--mert-model", models["mert"], "--latent-model", models["latent"],
            "--decode-workers", "2", *library.daemon_args(), *extra,
        ]  # fmt: skip
        if milvus_uri:
            args += ["--milvus-uri", milvus_uri]
        Path(root).mkdir(parents=True, exist_ok=True)
        super().__init__(Path(root), args=args)
        self.library = library

    def ok(self, op: str, **args: Any) -> dict:
        r = self.call(op, **args)
        assert r.get("ok"), f"{op} failed: {r.get('error')}\n{self.log()}"
        return r["result"]

    def progress(self) -> dict:
        return self.ok("batch_progress")

    def wait_for(self, predicate, timeout: float = 180.0, poll: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout
        p = self.progress()
        while not predicate(p):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last progress {p}\n{self.log()}")
            time.sleep(poll)
            p = self.progress()
        return p

    def wait_final(self, timeout: float = 300.0) -> dict:
        return self.wait_for(lambda p: p["status"] in _FINAL, timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def _with_store(uri: str, dims: dict[str, int], fn, timeout_s: float = 90.0):
    """Run ``fn(store)`` on a fresh store; a server just restarted may need a while to answer."""
    from embedd.errors import Code, EmbeddError
    from embedd.models import CATALOG
    from embedd.store import VectorStore

    deadline = time.monotonic() + timeout_s
    while True:
        store = VectorStore(uri, timeout_s=30.0)
        try:
            for model, dim in dims.items():
                store.ensure(model, CATALOG[model].collection, dim)
            return fn(store)
        except EmbeddError as exc:
            if exc.code is not Code.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
        finally:
            store.close()


def collection_counts(uri: str, dims: dict[str, int]) -> dict[str, int]:
    """Rows per model in the live collections (read with the daemon stopped, for Milvus Lite)."""
    return _with_store(uri, dims, lambda store: {m: store.count(m) for m in dims})


def stored_ids(uri: str, dims: dict[str, int]) -> dict[str, list[str]]:
    """Every stored track id per model, duplicates kept (a duplicate would show twice)."""
    return _with_store(uri, dims, lambda store: {m: [fp.track_id for fp in store.fingerprints(m)] for m in dims})


def fingerprints(uri: str, dims: dict[str, int]) -> dict[str, dict[str, tuple[int, float]]]:
    return _with_store(
        uri, dims, lambda store: {m: {fp.track_id: (fp.file_size, fp.file_mtime) for fp in store.fingerprints(m)} for m in dims}
    )

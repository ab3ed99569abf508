"""The incremental job's plan: what the library has against what Milvus stores.

``clear_existing: false`` first copies the stored fingerprints (track_id,
size, mtime, path) of each model into a scratch SQLite file
(``DATA_DIR/batch-scan.sqlite3``, so a huge library never sits in memory),
marks those the library still has, moves the vectors of files that are still
there under a new id (Navidrome changed the id: re-keyed, not re-embedded),
deletes the vectors of the rest that belong to this shard, and the run then
embeds only tracks whose fingerprint is missing or differs from the library's.
The scan is kept for the job's life, so a resumed job works from the same plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading

from embedd.batch.job import Job
from embedd.batch.progress import Progress
from embedd.batch.retry import RetryingStore
from embedd.batch.state import JobStore
from embedd.library import NavidromeLibrary, Shard, Track
from embedd.store import Move, VectorStore

__all__ = ["MTIME_TOLERANCE_S", "SCAN_FILE", "ScanIndex", "incremental_scan", "scoped_scan", "up_to_date"]

log = logging.getLogger(__name__)

SCAN_FILE = "batch-scan.sqlite3"
#: Tracks whose vectors one store call re-keys (per model).
REKEY_BATCH = 32
MTIME_TOLERANCE_S = 1e-3


class ScanIndex:
    """Stored fingerprints of every model and the library's tracks, spilled to a scratch SQLite file.

    Incremental runs must compare the whole library with the whole collection
    without holding either in memory; SQLite does the set operations on disk:
    which stored vectors are up to date, which belong to tracks that left, and
    which of those are the same file under a new id (re-keyed, not re-embedded).
    Any thread may call it (one lock). The file is scratch: a file of another
    layout (an older embedd's) is simply started afresh.
    """

    VERSION = 2

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        if self._conn.execute("PRAGMA user_version").fetchone()[0] != self.VERSION:
            for table in ("meta", "fp", "lib", "rekeyed"):
                self._conn.execute(f"DROP TABLE IF EXISTS {table}")
            self._conn.execute(f"PRAGMA user_version = {self.VERSION}")
        self._conn.execute("CREATE TABLE IF NOT EXISTS meta (job_id TEXT NOT NULL, complete INTEGER NOT NULL)")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS fp (model TEXT NOT NULL, track_id TEXT NOT NULL, size INTEGER NOT NULL,"
            " mtime REAL NOT NULL, path TEXT NOT NULL DEFAULT '', seen INTEGER NOT NULL DEFAULT 0,"
            " PRIMARY KEY (model, track_id)) WITHOUT ROWID"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS fp_track ON fp (track_id)")
        # This shard's library tracks, for finding a stored file under its new id.
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS lib (track_id TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL,"
            " mtime REAL NOT NULL, title TEXT NOT NULL, artist TEXT NOT NULL, album TEXT NOT NULL) WITHOUT ROWID"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS lib_path ON lib (path)")
        # New ids whose vectors this job moved from an old id (kept across a resumed job's rescans).
        self._conn.execute("CREATE TABLE IF NOT EXISTS rekeyed (track_id TEXT PRIMARY KEY) WITHOUT ROWID")

    def state(self) -> tuple[str | None, bool]:
        with self._lock:
            row = self._conn.execute("SELECT job_id, complete FROM meta").fetchone()
        return (row[0], bool(row[1])) if row else (None, False)

    def reset(self, job_id: str) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute("SELECT job_id FROM meta").fetchone()
            if row is None or row[0] != job_id:
                self._conn.execute("DELETE FROM rekeyed")
            for table in ("fp", "lib", "meta"):
                self._conn.execute(f"DELETE FROM {table}")
            self._conn.execute("INSERT INTO meta (job_id, complete) VALUES (?, 0)", (job_id,))
            self._conn.execute("COMMIT")

    def add(self, model: str, rows: list[tuple[str, int, float, str]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "INSERT OR REPLACE INTO fp (model, track_id, size, mtime, path) VALUES (?, ?, ?, ?, ?)",
                ((model, t, s, m, p) for t, s, m, p in rows),
            )
            self._conn.execute("COMMIT")

    def add_library(self, tracks: list[Track]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "INSERT OR REPLACE INTO lib (track_id, path, size, mtime, title, artist, album) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((t.track_id, t.path, t.file_size, t.file_mtime or 0.0, t.title, t.artist, t.album) for t in tracks),
            )
            self._conn.execute("COMMIT")

    def mark_seen(self, ids: list[str]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                self._conn.execute(
                    f"UPDATE fp SET seen = 1 WHERE track_id IN ({','.join('?' * len(chunk))})", chunk
                )
            self._conn.execute("COMMIT")

    def moves(self, model: str, limit: int) -> list[Move]:
        """Stored vectors of ``model`` whose id left the library while their file is there under a new id.

        Same path, size and mtime (within ``MTIME_TOLERANCE_S``), and the new id has
        no vector of its own yet. Each old and each new id appears at most once.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT f.track_id, l.track_id, l.path, l.title, l.artist, l.album, l.size, l.mtime"
                " FROM fp f JOIN lib l ON l.path = f.path AND l.size = f.size AND abs(l.mtime - f.mtime) <= ?"
                " WHERE f.model = ? AND f.seen = 0 AND f.path != ''"
                " AND NOT EXISTS (SELECT 1 FROM fp g WHERE g.model = f.model AND g.track_id = l.track_id)"
                " ORDER BY l.track_id, f.track_id LIMIT ?",
                (MTIME_TOLERANCE_S, model, limit),
            ).fetchall()
        olds: set[str] = set()
        news: set[str] = set()
        out = []
        for old, new, path, title, artist, album, size, mtime in rows:
            if old in olds or new in news:
                continue  # the next round sees what is left of this pair's rivals
            olds.add(old)
            news.add(new)
            out.append(Move(old, new, path, title, artist, album, int(size), float(mtime)))
        return out

    def moved(self, model: str, moves: list[Move], done: set[str]) -> None:
        """Record a round of moves: ``done`` holds the new ids whose vector was moved; the rest had none left."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            for mv in moves:
                self._conn.execute("DELETE FROM fp WHERE model = ? AND track_id = ?", (model, mv.old_id))
                if mv.new_id in done:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO fp (model, track_id, size, mtime, path, seen) VALUES (?, ?, ?, ?, ?, 1)",
                        (model, mv.new_id, mv.file_size, mv.file_mtime, mv.path),
                    )
                    self._conn.execute("INSERT OR IGNORE INTO rekeyed (track_id) VALUES (?)", (mv.new_id,))
            self._conn.execute("COMMIT")

    def rekeyed_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM rekeyed").fetchone()[0])

    def unseen(self, after: str, limit: int) -> list[tuple[str, str]]:
        """(track_id, model) pairs the library no longer has, in track_id order after ``after``."""
        with self._lock:
            return self._conn.execute(
                "SELECT track_id, model FROM fp WHERE seen = 0 AND track_id > ? ORDER BY track_id LIMIT ?",
                (after, limit),
            ).fetchall()

    def lookup(self, ids: list[str]) -> dict[tuple[str, str], tuple[int, float]]:
        out: dict[tuple[str, str], tuple[int, float]] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for model, tid, size, mtime in self._conn.execute(
                    f"SELECT model, track_id, size, mtime FROM fp WHERE track_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    out[(model, tid)] = (int(size), float(mtime))
        return out

    def lookup_paths(self, model: str, ids: list[str]) -> dict[str, tuple[int, float, str]]:
        """track_id -> the stored (size, mtime, path) of ``model`` for those of ``ids`` stored."""
        out: dict[str, tuple[int, float, str]] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for tid, size, mtime, path in self._conn.execute(
                    f"SELECT track_id, size, mtime, path FROM fp WHERE model = ? AND track_id IN ({','.join('?' * len(chunk))})",
                    (model, *chunk),
                ):
                    out[tid] = (int(size), float(mtime), str(path))
        return out

    def forget(self, model: str, ids: list[str]) -> None:
        """Stored rows that were deleted: no longer in the plan."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("DELETE FROM fp WHERE model = ? AND track_id = ?", ((model, t) for t in ids))
            self._conn.execute("COMMIT")

    def mark_complete(self) -> None:
        with self._lock:
            self._conn.execute("UPDATE meta SET complete = 1")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @staticmethod
    def remove(path: str) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)


Fingerprints = dict[tuple[str, str], tuple[int, float]]


def up_to_date(fps: Fingerprints, model: str, track: Track) -> bool:
    """Whether the stored vector of ``model`` was computed from this very file (same size and mtime)."""
    fp = fps.get((model, track.track_id))
    if fp is None:
        return False
    size, mtime = fp
    return size == track.file_size and abs(mtime - (track.file_mtime or 0.0)) <= MTIME_TOLERANCE_S


async def incremental_scan(
    scan: ScanIndex,
    job: Job,
    shard: Shard | None,
    *,
    store: RetryingStore,
    library: NavidromeLibrary,
    progress: Progress,
) -> None:
    """Fill ``scan`` for ``job`` (unless a resumed job's scan is complete): re-key, then drop stale vectors."""
    job_id, complete = await asyncio.to_thread(scan.state)
    if job_id == job.job_id and complete:
        progress.rekeyed = await asyncio.to_thread(scan.rekeyed_count)
        return
    await asyncio.to_thread(scan.reset, job.job_id)
    for model in job.models:

        def copy(vs: VectorStore, m: str = model) -> int:
            n, page = 0, []
            for fp in vs.fingerprints(m):
                page.append((fp.track_id, fp.file_size, fp.file_mtime, fp.path))
                if len(page) >= 1000:
                    scan.add(m, page)
                    n, page = n + len(page), []
            scan.add(m, page)
            return n + len(page)

        await store(copy, f"read {model}'s stored fingerprints")
    ids: list[str] = []
    mine: list[Track] = []
    # The whole library, not just this shard: a vector is only stale (or re-keyable)
    # when its id is nowhere in the library. Rows Navidrome marked missing still count
    # as in the library: a share that was unmounted during its scan must not cost
    # every vector (they are not embedded either).
    async for track in library.iter_tracks(None, include_missing=True):
        ids.append(track.track_id)
        if shard is None or shard.contains(track.track_id):
            mine.append(track)
        if len(ids) >= 1000:
            await asyncio.to_thread(scan.mark_seen, ids)
            await asyncio.to_thread(scan.add_library, mine)
            ids, mine = [], []
    await asyncio.to_thread(scan.mark_seen, ids)
    await asyncio.to_thread(scan.add_library, mine)
    await _rekey(scan, job, store=store, progress=progress)
    after, removed = "", 0
    while True:
        pairs = await asyncio.to_thread(scan.unseen, after, 1000)
        if not pairs:
            break
        after = pairs[-1][0]
        by_model: dict[str, list[str]] = {}
        for tid, model in pairs:
            if shard is None or shard.contains(tid):
                by_model.setdefault(model, []).append(tid)
        for model, stale in by_model.items():
            await store(lambda s, m=model, i=stale: s.delete(m, i), f"delete stale {model} vectors")
            removed += len(stale)
    if removed:
        log.info("batch job %s removed %d vectors of tracks no longer in the library", job.job_id, removed)
    await asyncio.to_thread(scan.mark_complete)


async def scoped_scan(
    scan: ScanIndex,
    job: Job,
    *,
    jobs: JobStore,
    store: RetryingStore,
    library: NavidromeLibrary,
    progress: Progress,
) -> None:
    """:func:`incremental_scan` for an automatic job: only the tracks of its scope (what the watcher saw change).

    Of the scope, the stored fingerprints and the present library rows are read
    by id. A present track whose file is the stored one (same size and mtime, or
    a row written by ``embed_file`` with ``store``, which knows the size but not
    always the mtime) keeps its vector; when its path or fingerprint differs the
    row is rewritten in place (no model runs). Vectors of scope ids the library
    no longer has, or that Navidrome marked missing, are re-keyed to a new id of
    the same file or deleted.
    """
    job_id, complete = await asyncio.to_thread(scan.state)
    if job_id == job.job_id and complete:
        progress.rekeyed = await asyncio.to_thread(scan.rekeyed_count)
        return
    await asyncio.to_thread(scan.reset, job.job_id)
    ids: list[str] = []
    while page := await asyncio.to_thread(jobs.scope_page, job.job_id, ids[-1] if ids else "", 1000):
        ids.extend(page)
    for model in job.models:
        fps = await store(lambda s, m=model: s.fingerprints_of(m, ids), f"read {model}'s stored fingerprints")
        await asyncio.to_thread(scan.add, model, [(f.track_id, f.file_size, f.file_mtime, f.path) for f in fps])
    present = await library.tracks_by_ids(ids)
    if len(present) != job.total_tracks:  # the scope's removed tracks are no work for the pipeline
        progress.job = await asyncio.to_thread(jobs.set_total, job.job_id, len(present))
        progress.bump()
    await asyncio.to_thread(scan.mark_seen, [t.track_id for t in present])
    await asyncio.to_thread(scan.add_library, present)
    by_id = {t.track_id: t for t in present}
    for model in job.models:
        stored = await asyncio.to_thread(scan.lookup_paths, model, list(by_id))
        refresh = [
            Move(tid, tid, t.path, t.title, t.artist, t.album, t.file_size, t.file_mtime or 0.0)
            for tid, (size, mtime, path) in stored.items()
            if (t := by_id[tid]).file_size == size
            and (mtime == 0.0 or abs(mtime - (t.file_mtime or 0.0)) <= MTIME_TOLERANCE_S)
            and (path != t.path or mtime != (t.file_mtime or 0.0))
        ]
        for start in range(0, len(refresh), REKEY_BATCH):
            moves = refresh[start : start + REKEY_BATCH]
            done = await store(lambda s, m=model, mv=moves: s.rekey(m, mv), f"update {model}'s stored paths")
            await asyncio.to_thread(scan.moved, model, moves, set(done))
    await _rekey(scan, job, store=store, progress=progress)
    removed = 0
    while pairs := await asyncio.to_thread(scan.unseen, "", 1000):
        by_model: dict[str, list[str]] = {}
        for tid, model in pairs:
            by_model.setdefault(model, []).append(tid)
        for model, stale in by_model.items():
            await store(lambda s, m=model, i=stale: s.delete(m, i), f"delete {model} vectors of removed tracks")
            await asyncio.to_thread(scan.forget, model, stale)
            removed += len(stale)
    if removed:
        log.info("batch job %s removed %d vectors of tracks that left the library", job.job_id, removed)
    await asyncio.to_thread(scan.mark_complete)


async def _rekey(scan: ScanIndex, job: Job, *, store: RetryingStore, progress: Progress) -> None:
    """Move the vectors of files that are still there under a new id (Navidrome changed the id).

    No model runs: the vector moves to the new id with the new display fields,
    and the track then counts as up to date (``skipped``, and in ``rekeyed_tracks``).
    """
    progress.rekeyed = await asyncio.to_thread(scan.rekeyed_count)
    for model in job.models:
        while moves := await asyncio.to_thread(scan.moves, model, REKEY_BATCH):
            done = await store(lambda s, m=model, mv=moves: s.rekey(m, mv), f"re-key {model} vectors")
            await asyncio.to_thread(scan.moved, model, moves, set(done))
            progress.rekeyed = await asyncio.to_thread(scan.rekeyed_count)
            progress.bump()
    if progress.rekeyed:
        log.info("batch job %s re-keyed %d tracks whose ids changed, without re-embedding", job.job_id, progress.rekeyed)

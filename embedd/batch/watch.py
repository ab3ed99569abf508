"""The library watcher: Navidrome's changes reach the vectors without anyone starting a job.

Every ``watch_poll_s`` the watcher looks at Navidrome's database, read-only
(``mode=ro``: a reader sees a running Navidrome's un-checkpointed WAL), as
cheaply as it can:

1. ``stat()`` of the database and its ``-wal`` file: unchanged since the last
   poll, nothing was written and nothing is read (0 rows).
2. Otherwise the ``library`` table (one row per library): ``last_scan_at``,
   ``last_scan_started_at`` and ``full_scan_in_progress`` say whether a scan is
   running and whether one finished since the last look. Play counts and
   ratings also change the files, but not these rows: they cost one row per
   library. (Schemas before Navidrome 0.52 have no such table: there the
   largest rowid and ``updated_at``, two index look-ups, stand in for it.)
3. Only when a scan finished (and none is running) is ``media_file`` compared
   with the watcher's own snapshot (``DATA_DIR/library-watch.sqlite3``: id,
   library, path, size, ``updated_at``, ``missing`` per track), in keyset pages
   of :data:`PAGE` rows on a connection per page, like every library read. This
   is the one full read, once per finished scan rather than once per poll, and
   it finds every kind of change: rows added, changed in place (a re-tagged or
   re-encoded file, a file moved under the same id), marked missing, back from
   missing, deleted, or given new ids (Navidrome's id migrations).

What changed becomes *pending* (added, changed, removed). Once the library has
been quiet for ``watch_quiet_s`` (no scan running, none started or finished,
nothing new found), inside the ``watch_hours`` windows if any are set, and no
other job is active (a running or paused job is waited for, never overlapped),
the watcher asks the batch manager for an automatic job over exactly the
pending tracks (:meth:`~embedd.batch.manager.BatchManager.start_auto`): the
same run as a manual incremental job on the batch lane, restricted to those
ids, so vectors of unchanged files (an ``embed_file`` upload included) are
kept, re-keyed ids move without re-embedding, and removed or missing tracks
leave the collections. A job that fails gives its tracks back to pending.

One guard: when a single scan marks more than :data:`MASS_MISSING_SHARE` of the
library missing (at least :data:`MASS_MISSING_MIN` tracks), that looks like an
unmounted share, not deleted music; those vectors are kept (``held_missing``)
until Navidrome deletes the rows or the files come back.

The first poll over a new data directory only takes the snapshot: changes
before it are for ``embedd batch start``.

Long because: the watcher's poll, its snapshot of the library and the debounce, one
state machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from typing import Any, Awaitable, Callable, Protocol, Sequence

from embedd.batch.job import Job, JobStatus
from embedd.errors import Code, EmbeddError
from embedd.library import _quiescent_wal, parse_navidrome_time
from embedd.settings import parse_windows  # re-exported: the one parser of the format

__all__ = [
    "MASS_MISSING_MIN",
    "MASS_MISSING_SHARE",
    "PAGE",
    "WATCH_FILE",
    "LibraryWatcher",
    "NavidromeProbe",
    "Snapshot",
    "WatchConfig",
    "parse_windows",
]

log = logging.getLogger(__name__)

WATCH_FILE = "library-watch.sqlite3"
#: media_file rows per diff page (one short read each).
PAGE = 5000
#: A scan that marks more than this share of the library missing (and at least MASS_MISSING_MIN tracks) is held.
MASS_MISSING_SHARE = 0.10
MASS_MISSING_MIN = 20
_KINDS = ("added", "changed", "removed")

# ---------------------------------------------------------------- settings


def _in_windows(windows: Sequence[tuple[int, int]], minute: int) -> bool:
    return any((s <= minute < e) if s < e else (minute >= s or minute < e) for s, e in windows)


def next_window_start(windows: Sequence[tuple[int, int]], now: float) -> float | None:
    """When automatic jobs may next start (``now`` when inside a window; None: no windows = any time)."""
    if not windows:
        return None
    local = time.localtime(now)
    minute = local.tm_hour * 60 + local.tm_min
    if _in_windows(windows, minute):
        return now
    base = now - local.tm_sec - (now % 1)  # this minute's start
    ahead = min(((s - minute) % (24 * 60)) for s, _ in windows)
    return base + ahead * 60


@dataclasses.dataclass(frozen=True, slots=True)
class WatchConfig:
    enabled: bool = True
    poll_s: float = 60.0
    quiet_s: float = 300.0
    models: tuple[str, ...] = ()  # empty: the models that have vectors already
    hours: tuple[tuple[int, int], ...] = ()  # empty: any time

    @classmethod
    def from_settings(cls, settings: Any) -> "WatchConfig":
        return cls(
            enabled=settings.watch,
            poll_s=settings.watch_poll_s,
            quiet_s=settings.watch_quiet_s,
            models=tuple(settings.watch_models),
            hours=parse_windows(settings.watch_hours),
        )


# ---------------------------------------------------------------- Navidrome's side


@dataclasses.dataclass(frozen=True, slots=True)
class ScanState:
    token: str  # changes when a scan finished (or, on old schemas, when media_file changed)
    in_progress: bool
    last_scan_at: float | None
    rows_read: int


class NavidromeProbe:
    """Read-only looks at Navidrome's database; synchronous (call it on a thread)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = os.path.abspath(os.fspath(db_path))

    _version_conn: sqlite3.Connection | None = None

    def _data_version(self) -> int | None:
        """``PRAGMA data_version`` on a connection kept open for it: it changes with every commit by
        another connection (a stat() can miss a write within one timestamp tick after a WAL reset).
        Autocommit and never inside a read, so it holds no WAL snapshot and delays no checkpoint."""
        try:
            if self._version_conn is None:
                uri = "file:" + urllib.parse.quote(self.db_path) + "?mode=ro"
                self._version_conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0, check_same_thread=False)
            return int(self._version_conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            self.close()
            return None

    def close(self) -> None:
        conn, self._version_conn = self._version_conn, None
        if conn is not None:
            conn.close()

    def signature(self) -> tuple:
        """stat() of the database and its WAL plus data_version: equal signatures, nothing was written in between."""
        out: list[Any] = [self._data_version() if os.path.exists(self.db_path + "-wal") else None]
        for suffix in ("", "-wal"):
            try:
                st = os.stat(self.db_path + suffix)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    @contextlib.contextmanager
    def _connect(self):
        if not os.path.isfile(self.db_path):
            raise EmbeddError(Code.UNAVAILABLE, f"Navidrome database {self.db_path} does not exist.")
        uri = "file:" + urllib.parse.quote(self.db_path) + "?mode=ro"
        if _quiescent_wal(self.db_path):
            uri += "&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise EmbeddError(Code.UNAVAILABLE, f"Navidrome database {self.db_path} cannot be opened ({exc}).") from exc
        try:
            conn.execute("PRAGMA query_only = 1")
            yield conn
        except sqlite3.Error as exc:
            raise EmbeddError(Code.UNAVAILABLE, f"Navidrome database {self.db_path} could not be read ({exc}).") from exc
        finally:
            conn.close()

    @staticmethod
    def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}

    def scan_state(self) -> ScanState:
        with self._connect() as conn:
            lib = self._columns(conn, "library")
            if "last_scan_at" in lib:
                started = "last_scan_started_at" if "last_scan_started_at" in lib else "NULL"
                full = "full_scan_in_progress" if "full_scan_in_progress" in lib else "0"
                rows = conn.execute(f"SELECT id, last_scan_at, {started}, {full} FROM library ORDER BY id").fetchall()
                in_progress, last = False, None
                for _, done_at, started_at, full_scan in rows:
                    done, begun = parse_navidrome_time(done_at), parse_navidrome_time(started_at)
                    if full_scan or (begun is not None and (done is None or begun > done)):
                        in_progress = True
                    if done is not None:
                        last = max(last or done, done)
                token = json.dumps([[r[0], str(r[1])] for r in rows])
                return ScanState(token, in_progress, last, len(rows))
            # Before Navidrome 0.52: no scan bookkeeping; the newest row and the newest change (index look-ups).
            row = conn.execute("SELECT max(rowid), max(updated_at), (SELECT count(*) FROM media_file) FROM media_file").fetchone()
            return ScanState(json.dumps([str(v) for v in row]), False, None, 3)

    def page(self, after: str, limit: int) -> list[tuple[str, int, str, int, str, int]]:
        """(id, library_id, path, size, updated_at, missing) of ``limit`` rows after ``after``, by id."""
        with self._connect() as conn:
            cols = self._columns(conn, "media_file")
            lib = "library_id" if "library_id" in cols else "0"
            missing = "missing" if "missing" in cols else "0"
            return [
                (str(r[0]), int(r[1] or 0), str(r[2] or ""), int(r[3] or 0), str(r[4] or ""), int(bool(r[5])))
                for r in conn.execute(
                    f"SELECT id, {lib}, path, size, updated_at, {missing} FROM media_file WHERE id > ? ORDER BY id LIMIT ?",
                    (after, limit),
                )
            ]


# ---------------------------------------------------------------- our side


@dataclasses.dataclass(slots=True)
class DiffStats:
    added: int = 0
    changed: int = 0
    removed: int = 0
    held: int = 0
    rows_read: int = 0
    baseline: bool = False

    @property
    def any(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.held)


class Snapshot:
    """The watcher's own SQLite file: the library as last seen, what is pending, what a job took."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        c = self._conn
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute(
            "CREATE TABLE IF NOT EXISTS snap (id TEXT PRIMARY KEY, lib INTEGER NOT NULL, path TEXT NOT NULL,"
            " size INTEGER NOT NULL, updated_at TEXT NOT NULL, missing INTEGER NOT NULL) WITHOUT ROWID"
        )
        c.execute("CREATE TABLE IF NOT EXISTS pending (id TEXT PRIMARY KEY, kind TEXT NOT NULL) WITHOUT ROWID")
        c.execute(
            "CREATE TABLE IF NOT EXISTS taken (job_id TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL,"
            " PRIMARY KEY (job_id, id)) WITHOUT ROWID"
        )
        c.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID")
        # missing tracks whose vectors are kept (a mass-missing scan), until they are deleted or come back
        c.execute("CREATE TABLE IF NOT EXISTS held (id TEXT PRIMARY KEY) WITHOUT ROWID")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def held_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM held").fetchone()[0])

    def pending_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._conn.execute("SELECT kind, count(*) FROM pending GROUP BY kind").fetchall())
        return {k: int(counts.get(k, 0)) for k in _KINDS}

    def diff(self, probe: NavidromeProbe, page: int = PAGE) -> DiffStats:
        """Compare media_file with the snapshot page by page; record what changed as pending."""
        stats = DiffStats(baseline=self.meta("baseline") is None)
        newly_missing: list[str] = []
        present = 0
        after = ""
        while True:
            rows = probe.page(after, page)
            stats.rows_read += len(rows)
            last = rows[-1][0] if len(rows) == page else None
            with self._lock:
                sql = "SELECT id, lib, path, size, updated_at, missing FROM snap WHERE id > ?"
                args: tuple = (after,)
                if last is not None:
                    sql, args = sql + " AND id <= ?", (after, last)
                known = {r[0]: r for r in self._conn.execute(sql, args)}
            upserts, pend = [], []
            for row in rows:
                tid, missing = row[0], row[5]
                present += not missing
                old = known.pop(tid, None)
                if old == row:
                    continue
                upserts.append(row)
                if old is None:
                    if not missing:
                        pend.append((tid, "added"))
                elif missing and not old[5]:
                    newly_missing.append(tid)
                elif not missing:
                    pend.append((tid, "changed"))  # changed in place, or back from missing
            gone = list(known)  # in the snapshot, no longer in media_file: deleted
            pend.extend((tid, "removed") for tid in gone)
            with self._lock:
                c = self._conn
                c.execute("BEGIN IMMEDIATE")
                c.executemany("INSERT OR REPLACE INTO snap (id, lib, path, size, updated_at, missing) VALUES (?, ?, ?, ?, ?, ?)", upserts)
                c.executemany("DELETE FROM snap WHERE id = ?", ((t,) for t in gone))
                c.executemany("DELETE FROM held WHERE id = ?", [(r[0],) for r in upserts if not r[5]] + [(t,) for t in gone])
                if not stats.baseline:
                    self._add_pending(pend)
                c.execute("COMMIT")
            if not stats.baseline:
                for _, kind in pend:
                    setattr(stats, kind, getattr(stats, kind) + 1)
            if last is None:
                break
            after = last
        if stats.baseline:
            self.set_meta("baseline", str(time.time()))
        elif newly_missing:
            if len(newly_missing) >= MASS_MISSING_MIN and len(newly_missing) > MASS_MISSING_SHARE * (present + len(newly_missing)):
                stats.held = len(newly_missing)
                log.warning(
                    "library watch: %d tracks were marked missing at once (an unmounted share?); their vectors are kept "
                    "until Navidrome deletes the rows or the files come back", len(newly_missing),
                )  # fmt: skip
                with self._lock:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.executemany("INSERT OR IGNORE INTO held (id) VALUES (?)", ((t,) for t in newly_missing))
                    self._conn.execute("COMMIT")
            else:
                with self._lock:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._add_pending([(t, "removed") for t in newly_missing])
                    self._conn.execute("COMMIT")
                stats.removed += len(newly_missing)
        return stats

    def _add_pending(self, items: list[tuple[str, str]]) -> None:
        # Added then changed stays "added"; anything else: the latest word.
        self._conn.executemany(
            "INSERT INTO pending (id, kind) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET kind ="
            " CASE WHEN pending.kind = 'added' AND excluded.kind = 'changed' THEN 'added' ELSE excluded.kind END",
            items,
        )

    def take(self, job_id: str) -> list[str]:
        """Move every pending track to ``job_id``'s share; returns their ids."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT OR REPLACE INTO taken (job_id, id, kind) SELECT ?, id, kind FROM pending", (job_id,))
            c.execute("DELETE FROM pending")
            ids = [r[0] for r in c.execute("SELECT id FROM taken WHERE job_id = ? ORDER BY id", (job_id,))]
            c.execute("COMMIT")
        return ids

    def pending_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT id FROM pending ORDER BY id")]

    def taken_jobs(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT DISTINCT job_id FROM taken")]

    def settle(self, job_id: str, *, give_back: bool) -> int:
        """The job ended: forget its share, or (it failed) give its tracks back to pending."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            n = 0
            if give_back:
                rows = c.execute("SELECT id, kind FROM taken WHERE job_id = ?", (job_id,)).fetchall()
                c.executemany("INSERT OR IGNORE INTO pending (id, kind) VALUES (?, ?)", rows)
                n = len(rows)
            c.execute("DELETE FROM taken WHERE job_id = ?", (job_id,))
            c.execute("COMMIT")
        return n


# ---------------------------------------------------------------- the watcher


class BatchJobs(Protocol):
    """What the watcher needs of the batch manager."""

    @property
    def active_job(self) -> Job | None: ...

    async def start_auto(self, models: Sequence[str], scope: Sequence[str]) -> Job: ...

    async def finished_job(self, job_id: str) -> Job | None: ...


class LibraryWatcher:
    """Polls Navidrome's database, debounces its changes, starts automatic jobs; see the module docstring."""

    def __init__(
        self,
        config: WatchConfig,
        *,
        probe: NavidromeProbe,
        snapshot: Snapshot,
        jobs: BatchJobs,
        models_with_vectors: Callable[[], Awaitable[list[str]]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.probe = probe
        self.snapshot = snapshot
        self.jobs = jobs
        self.models_with_vectors = models_with_vectors
        self.clock = clock
        self._signature: tuple | None = None
        self._scan: ScanState | None = None
        self._last_activity = clock()  # quiet is counted from here: start-up, a scan, a change found
        self.last_seen_at: float | None = None  # the last poll that read the database
        self.polls = 0
        self.last_poll: dict[str, Any] = {"rows_read": 0, "duration_s": 0.0, "diff_rows_read": 0}
        self.waiting: str | None = None  # why pending work waits (None: nothing pending, or started)
        self.next_job_at: float | None = None
        self.last_job_id: str | None = None
        self.auto_jobs = 0
        self.error: str | None = None
        self._pending = snapshot.pending_counts()
        self._held = snapshot.held_count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.polled = asyncio.Event()  # set after every poll (tests and watch views wait on it)

    # ---- lifecycle
    def start(self) -> None:
        if not self.config.enabled or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="library-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.snapshot.close)
        await asyncio.to_thread(self.probe.close)

    def wake(self) -> None:
        """Poll now (a job ended, say) instead of at the next interval."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: keep watching, say it once per poll
                log.exception("library watch: the poll failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)

    # ---- one poll
    async def poll(self) -> None:
        started = time.perf_counter()
        rows, diff_rows = 0, 0
        try:
            rows, diff_rows = await self._look()
            self.error = None
        except EmbeddError as exc:
            if self.error != exc.message:
                log.warning("library watch: %s", exc.message)
            self.error = exc.message
        await self._settle_jobs()
        if self.config.enabled:
            await self._decide()
        self.polls += 1
        self.last_poll = {"rows_read": rows, "diff_rows_read": diff_rows, "duration_s": round(time.perf_counter() - started, 6)}
        event, self.polled = self.polled, asyncio.Event()
        event.set()

    async def _look(self) -> tuple[int, int]:
        """Read what changed, as little as possible; returns (rows read by the probe, rows read by a diff)."""
        signature = await asyncio.to_thread(self.probe.signature)
        if signature == self._signature and self._scan is not None:
            return 0, 0
        scan = await asyncio.to_thread(self.probe.scan_state)
        self._signature = signature
        now = self.clock()
        self.last_seen_at = now
        previous, self._scan = self._scan, scan
        if scan.in_progress or (previous is not None and previous.token != scan.token):
            self._last_activity = now
        if scan.in_progress or scan.token == self.snapshot.meta("token"):
            return scan.rows_read, 0
        stats = await asyncio.to_thread(self.snapshot.diff, self.probe)
        await asyncio.to_thread(self.snapshot.set_meta, "token", scan.token)
        self._pending = await asyncio.to_thread(self.snapshot.pending_counts)
        self._held = await asyncio.to_thread(self.snapshot.held_count)
        if stats.any:
            self._last_activity = now
            log.info("library watch: Navidrome's scan added %d, changed %d, removed %d tracks%s", stats.added,
                     stats.changed, stats.removed, f" ({stats.held} missing tracks held)" if stats.held else "")  # fmt: skip
        elif stats.baseline:
            log.info("library watch: took the library's snapshot (%d rows); changes from now on are embedded by themselves", stats.rows_read)
        return scan.rows_read, stats.rows_read

    async def _settle_jobs(self) -> None:
        """Automatic jobs that ended: forget their tracks, or give a failed job's back."""
        for job_id in await asyncio.to_thread(self.snapshot.taken_jobs):
            job = await self.jobs.finished_job(job_id)
            if job is not None and job.active:
                continue
            failed = job is None or job.status is JobStatus.FAILED
            n = await asyncio.to_thread(self.snapshot.settle, job_id, give_back=failed)
            if n:
                log.warning("library watch: automatic job %s failed; its %d tracks wait for the next one", job_id, n)
                self._pending = await asyncio.to_thread(self.snapshot.pending_counts)

    async def _decide(self) -> None:
        now = self.clock()
        self.next_job_at = None
        if not sum(self._pending.values()):
            self.waiting = None
            return
        if self._scan is not None and self._scan.in_progress:
            self.waiting = "scan_in_progress"
            return
        at = self._last_activity + self.config.quiet_s
        window = next_window_start(self.config.hours, max(now, at))
        if window is not None:
            at = max(at, window)
        self.next_job_at = at
        if now < self._last_activity + self.config.quiet_s:
            self.waiting = "quiet_period"
            return
        if window is not None and window > now:
            self.waiting = "quiet_hours"
            return
        active = self.jobs.active_job
        if active is not None:
            self.waiting = f"job_{active.status.value}"  # job_running, job_paused, job_cancelling
            self.next_job_at = None
            return
        models = list(self.config.models) or await self.models_with_vectors()
        if not models:
            self.waiting = "no_models"
            self.next_job_at = None
            return
        scope = await asyncio.to_thread(self.snapshot.pending_ids)
        try:
            job = await self.jobs.start_auto(models, scope)
        except EmbeddError as exc:
            self.waiting = "job_running" if exc.code is Code.BUSY else f"unavailable: {exc.message}"
            return
        await asyncio.to_thread(self.snapshot.take, job.job_id)
        self._pending = await asyncio.to_thread(self.snapshot.pending_counts)
        self.last_job_id, self.auto_jobs = job.job_id, self.auto_jobs + 1
        self.waiting, self.next_job_at = None, None

    # ---- views
    def view(self) -> dict[str, Any]:
        scan = self._scan
        return {
            "enabled": self.config.enabled,
            "last_seen_at": self.last_seen_at,
            "last_scan_at": scan.last_scan_at if scan else None,
            "scan_in_progress": bool(scan and scan.in_progress),
            "pending": dict(self._pending),
            "held_missing": self._held,
            "next_job_at": self.next_job_at,
            "waiting": "off" if not self.config.enabled else self.waiting,
            "last_activity_at": self._last_activity,
            "quiet_s": self.config.quiet_s,
            "poll_s": self.config.poll_s,
            "models": list(self.config.models) or None,
            "last_job_id": self.last_job_id,
            "auto_jobs": self.auto_jobs,
            "polls": self.polls,
            "last_poll": dict(self.last_poll),
            "error": self.error,
        }



async def models_with_vectors(store_io: Any, dims: Callable[[], Awaitable[dict[str, int]]]) -> list[str]:
    """The models whose collections hold vectors already (what the watcher keeps current by default)."""
    known = await dims()

    def look(store: Any) -> list[str]:
        names = set(store.milvus.names())
        out = []
        for model, dim in known.items():
            public = store_io.public_names(model)[model]
            if not any(n == public or n.startswith(public + "__") for n in names):
                continue  # never created: do not create it just to count it
            try:
                store_io.prepare(store, model, dim, any_dim=True)
                if store.count(model) > 0:
                    out.append(model)
            except EmbeddError as exc:
                log.warning("library watch: cannot count %s's vectors: %s", model, exc.message)
        return out

    return await store_io.call(look)

"""The batch job's durable state: embedd's own SQLite file in the data dir.

Navidrome's database is never written; everything a job must survive a crash
with lives here: the job (models, mode, shard, status, counters, rebuild
info) and, per (track, model), whether it was stored or failed. This module
owns the file's schema and every transaction on it (:class:`JobStore`),
including the crash-loop guard's in-flight marks; the values it reads and
writes are in :mod:`embedd.batch.job`, and the buffer that batches a run's
results into checkpoints is :mod:`embedd.batch.checkpoint`.

Exactly-once results rest on one rule: a (track, model) pair is recorded as
done only after Milvus confirmed its row, in the same transaction as the
counters that count it (:meth:`JobStore.checkpoint`). A crash therefore loses
at most the work since the last checkpoint; on resume those tracks are simply
embedded again and their upserts overwrite the rows already written, so the
collection ends with one row per (track, model) and the counters with each
track counted once (a track's outcome is recorded at most once per job).

Durability: WAL with ``synchronous=FULL``. In WAL mode ``NORMAL`` already
survives a SIGKILL (a committed transaction sits in the WAL in the OS page
cache, which outlives the process); ``FULL`` also survives power loss or a
kernel crash by fsyncing the WAL on every commit. That costs one fsync per
commit: one per checkpoint (``checkpoint_every``, 100 tracks by default),
and two per track that reaches its forward passes, for the crash-loop
guard's in-flight mark (``begin_track`` sets it, ``end_track`` clears it,
each in its own transaction) -- milliseconds against the seconds to minutes
a track takes to embed. It keeps a recorded status change (e.g. "completed"
after a rebuild's alias switch) from being rolled back by a power cut.

The API is synchronous on purpose: the file is small and local, each call is
one short transaction (well under a millisecond plus one fsync), and a plain
``sqlite3`` connection keeps the code simple. The daemon calls it off the
event loop (``asyncio.to_thread`` or its own single worker thread); one lock
serialises callers, so any thread may use the store.

Long because: one SQLite schema and the transactions on it (jobs, per-track
records, the crash-loop guard's marks, which share the per-track tables and
checkpoint's counting); splitting would scatter the schema.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from embedd.batch.job import ACTIVE_STATUSES, FINAL_STATUSES, Failure, FailurePage, Job, JobStatus, Outcome, can_become
from embedd.errors import Code, EmbeddError

__all__ = ["JobStore"]

SCHEMA_VERSION = 1
_IN_CHUNK = 500  # ids per "IN (...)" query, below every SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT    NOT NULL UNIQUE,
    models             TEXT    NOT NULL,            -- JSON array of model names
    clear_existing     INTEGER NOT NULL,
    shard              TEXT,                        -- 'i/n' or NULL
    status             TEXT    NOT NULL,
    created_at         REAL    NOT NULL,
    started_at         REAL,
    finished_at        REAL,
    updated_at         REAL    NOT NULL,
    total_tracks       INTEGER NOT NULL DEFAULT 0,
    processed_tracks   INTEGER NOT NULL DEFAULT 0,
    failed_tracks      INTEGER NOT NULL DEFAULT 0,
    skipped_tracks     INTEGER NOT NULL DEFAULT 0,
    checkpoints        INTEGER NOT NULL DEFAULT 0,
    last_checkpoint_at REAL,
    rebuild            TEXT,                        -- JSON object or NULL
    error              TEXT
);
CREATE INDEX IF NOT EXISTS job_status ON job (status);
-- (track, model) pairs whose vector Milvus confirmed
CREATE TABLE IF NOT EXISTS job_done (
    job_seq  INTEGER NOT NULL REFERENCES job (seq) ON DELETE CASCADE,
    track_id TEXT    NOT NULL,
    model    TEXT    NOT NULL,
    PRIMARY KEY (job_seq, track_id, model)
) WITHOUT ROWID;
-- (track, model) pairs that failed; the rowid keeps batch_failures in order
CREATE TABLE IF NOT EXISTS job_failure (
    id       INTEGER PRIMARY KEY,
    job_seq  INTEGER NOT NULL REFERENCES job (seq) ON DELETE CASCADE,
    track_id TEXT    NOT NULL,
    model    TEXT    NOT NULL,
    code     TEXT    NOT NULL,
    message  TEXT    NOT NULL,
    path     TEXT    NOT NULL DEFAULT '',
    at       REAL    NOT NULL,
    UNIQUE (job_seq, track_id, model)
);
CREATE INDEX IF NOT EXISTS job_failure_order ON job_failure (job_seq, id);
-- an automatic job's tracks: the ids the library watcher saw added, changed or removed
CREATE TABLE IF NOT EXISTS job_scope (
    job_seq  INTEGER NOT NULL REFERENCES job (seq) ON DELETE CASCADE,
    track_id TEXT    NOT NULL,
    PRIMARY KEY (job_seq, track_id)
) WITHOUT ROWID;
-- tracks whose forward passes are under way (running = 1), and how many unclean
-- exits each has been in flight at (the crash-loop guard; see begin_track)
CREATE TABLE IF NOT EXISTS job_inflight (
    job_seq  INTEGER NOT NULL REFERENCES job (seq) ON DELETE CASCADE,
    track_id TEXT    NOT NULL,
    path     TEXT    NOT NULL DEFAULT '',
    running  INTEGER NOT NULL DEFAULT 1,
    crashes  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_seq, track_id)
) WITHOUT ROWID;
-- a track's outcome, recorded once per job, so that counters count it once
CREATE TABLE IF NOT EXISTS job_track (
    job_seq  INTEGER NOT NULL REFERENCES job (seq) ON DELETE CASCADE,
    track_id TEXT    NOT NULL,
    outcome  TEXT    NOT NULL,
    PRIMARY KEY (job_seq, track_id)
) WITHOUT ROWID;
"""

_JOB_COLUMNS = (
    "id, models, clear_existing, shard, status, created_at, started_at, finished_at, updated_at, total_tracks, "
    "processed_tracks, failed_tracks, skipped_tracks, checkpoints, last_checkpoint_at, rebuild, error, trigger, scoped"
)
#: Columns added within schema 1 (older files get them at open, with these definitions).
_ADDED_JOB_COLUMNS = {"trigger": "TEXT NOT NULL DEFAULT 'manual'", "scoped": "INTEGER NOT NULL DEFAULT 0"}


def _job_from_row(row: Sequence[Any]) -> Job:
    (jid, models, clear, shard, status, created, started, finished, updated, total, processed, failed, skipped,
     checkpoints, last_cp, rebuild, error, trigger, scoped) = row  # fmt: skip
    return Job(
        job_id=jid,
        models=tuple(json.loads(models)),
        clear_existing=bool(clear),
        shard=shard,
        status=JobStatus(status),
        created_at=created,
        started_at=started,
        finished_at=finished,
        updated_at=updated,
        total_tracks=total,
        processed_tracks=processed,
        failed_tracks=failed,
        skipped_tracks=skipped,
        checkpoints=checkpoints,
        last_checkpoint_at=last_cp,
        rebuild=json.loads(rebuild) if rebuild is not None else None,
        error=error,
        trigger=trigger,
        scoped=bool(scoped),
    )


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class JobStore:
    """Jobs and their per-track records in one SQLite file.

    ``keep_jobs`` old job rows are kept for history; per-track records are
    kept only for the newest job (``batch_failures`` is about the latest job,
    and resume only ever needs the active one).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        keep_jobs: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = os.path.abspath(os.fspath(path))
        self._keep_jobs = max(1, keep_jobs)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            raise EmbeddError(Code.UNAVAILABLE, f"the batch state file {self.path} cannot be opened ({exc}).") from exc
        try:
            self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
            self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise EmbeddError(
                    Code.UNAVAILABLE,
                    f"the batch state file {self.path} was written by a newer embedd (schema {version}, this one knows {SCHEMA_VERSION}).",
                )
            with self._transaction():
                for stmt in _statements(_SCHEMA):
                    self._conn.execute(stmt)
                have = {r[1] for r in self._conn.execute("PRAGMA table_info(job)")}
                for column, definition in _ADDED_JOB_COLUMNS.items():
                    if column not in have:
                        self._conn.execute(f"ALTER TABLE job ADD COLUMN {column} {definition}")
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise EmbeddError(Code.UNAVAILABLE, f"the batch state file {self.path} is not a usable SQLite database ({exc}).") from exc
        except BaseException:
            self._conn.close()
            raise

    # ---- plumbing

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _transaction(self) -> "JobStore._Tx":
        return JobStore._Tx(self._conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _seq(self, job_id: str) -> int:
        row = self._conn.execute("SELECT seq FROM job WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise EmbeddError(Code.NOT_FOUND, f"batch job {job_id!r} does not exist.")
        return row[0]

    def _get(self, job_id: str) -> Job:
        row = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM job WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise EmbeddError(Code.NOT_FOUND, f"batch job {job_id!r} does not exist.")
        return _job_from_row(row)

    # ---- jobs

    def create_job(
        self,
        *,
        models: Sequence[str],
        clear_existing: bool = False,
        shard: str | None = None,
        total_tracks: int = 0,
        rebuild: Mapping[str, Any] | None = None,
        job_id: str | None = None,
        trigger: str = "manual",
        scope: Sequence[str] | None = None,
    ) -> Job:
        """Record a new job as ``running``; ``busy`` while another job is active.

        The check and the insert are one transaction, so two racing
        ``batch_start`` calls cannot both win. Per-track records of older jobs
        are dropped here: only the latest job's failures are ever listed.
        ``scope`` (an automatic job's): the only tracks the job looks at.
        """
        if not models:
            raise EmbeddError(Code.BAD_REQUEST, "argument 'models' must name at least one model.")
        now = self._clock()
        jid = job_id or secrets.token_hex(8)
        with self._lock, self._transaction() as c:
            active = c.execute(
                f"SELECT id, status FROM job WHERE status IN ({','.join('?' * len(ACTIVE_STATUSES))}) ORDER BY seq DESC LIMIT 1",
                tuple(s.value for s in ACTIVE_STATUSES),
            ).fetchone()
            if active is not None:
                raise EmbeddError(Code.BUSY, f"batch job {active[0]} is {active[1]}; cancel it or wait for it to finish.")
            c.execute("DELETE FROM job_done")
            c.execute("DELETE FROM job_failure")
            c.execute("DELETE FROM job_track")
            c.execute("DELETE FROM job_scope")
            c.execute(
                "DELETE FROM job WHERE seq NOT IN (SELECT seq FROM job ORDER BY seq DESC LIMIT ?)", (self._keep_jobs - 1,)
            )
            c.execute(
                "INSERT INTO job (id, models, clear_existing, shard, status, created_at, started_at, updated_at, total_tracks,"
                " rebuild, trigger, scoped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (jid, json.dumps(list(models)), int(clear_existing), shard, JobStatus.RUNNING.value, now, now, now,
                 int(total_tracks), json.dumps(dict(rebuild)) if rebuild is not None else None, trigger,
                 int(scope is not None)),  # fmt: skip
            )
            if scope is not None:
                seq = self._seq(jid)
                c.executemany(
                    "INSERT OR IGNORE INTO job_scope (job_seq, track_id) VALUES (?, ?)", ((seq, t) for t in scope)
                )
            return self._get(jid)

    def scope_page(self, job_id: str, after: str = "", limit: int = 500) -> list[str]:
        """A scoped job's track ids after ``after``, in id order (empty for an unscoped job)."""
        with self._lock:
            seq = self._seq(job_id)
            return [
                r[0]
                for r in self._conn.execute(
                    "SELECT track_id FROM job_scope WHERE job_seq = ? AND track_id > ? ORDER BY track_id LIMIT ?",
                    (seq, after, limit),
                )
            ]

    def get_job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM job WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row is not None else None

    def latest_job(self) -> Job | None:
        """The newest job, whatever its status (the progress map shows it); None: idle."""
        with self._lock:
            row = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM job ORDER BY seq DESC LIMIT 1").fetchone()
        return _job_from_row(row) if row is not None else None

    def resumable_job(self) -> Job | None:
        """The job a restarted daemon must pick up: running, paused or cancelling.

        ``running`` was interrupted (crash, SIGKILL, reboot): resume it.
        ``paused`` was paused by the operator: keep it paused until
        ``batch_resume``. ``cancelling`` was interrupted mid-cancel: finish the
        cancel (drop a rebuild's new collections) and mark it ``cancelled``.
        """
        job = self.latest_job()
        return job if job is not None and job.active else None

    def set_status(self, job_id: str, status: JobStatus | str, *, error: str | None = None) -> Job:
        """Move a job to ``status``; the same status again is a no-op.

        A move the state machine forbids (e.g. resuming a finished job) is
        ``not_found`` with a sentence saying why: for the wire that is "there
        is no job to pause/resume/cancel".
        """
        status = JobStatus(status)
        if status is JobStatus.IDLE:
            raise EmbeddError(Code.INTERNAL, "a batch job cannot be set to 'idle'; idle means that no job exists.")
        now = self._clock()
        with self._lock, self._transaction() as c:
            job = self._get(job_id)
            if job.status is status:
                if error is not None:
                    c.execute("UPDATE job SET error = ?, updated_at = ? WHERE id = ?", (error, now, job_id))
                    return self._get(job_id)
                return job
            if not can_become(job.status, status):
                raise EmbeddError(Code.NOT_FOUND, f"batch job {job_id} is {job.status.value} and cannot become {status.value}.")
            finished = now if status in FINAL_STATUSES else None
            c.execute(
                "UPDATE job SET status = ?, updated_at = ?, finished_at = coalesce(?, finished_at), error = coalesce(?, error)"
                " WHERE id = ?",
                (status.value, now, finished, error, job_id),
            )
            return self._get(job_id)

    def set_total(self, job_id: str, total_tracks: int) -> Job:
        """The job's track count once known (a count of the library may follow the start)."""
        with self._lock, self._transaction() as c:
            self._seq(job_id)
            c.execute("UPDATE job SET total_tracks = ?, updated_at = ? WHERE id = ?", (int(total_tracks), self._clock(), job_id))
            return self._get(job_id)

    def set_rebuild(self, job_id: str, rebuild: Mapping[str, Any] | None) -> Job:
        """A rebuild's bookkeeping (e.g. old and new collection per model), JSON-serialisable."""
        with self._lock, self._transaction() as c:
            self._seq(job_id)
            c.execute(
                "UPDATE job SET rebuild = ?, updated_at = ? WHERE id = ?",
                (json.dumps(dict(rebuild)) if rebuild is not None else None, self._clock(), job_id),
            )
            return self._get(job_id)

    # ---- per-track records

    def checkpoint(
        self,
        job_id: str,
        *,
        done: Iterable[tuple[str, str]] = (),
        failures: Iterable[Failure] = (),
        finished: Iterable[tuple[str, Outcome | str]] = (),
    ) -> Job:
        """Record confirmed work in one transaction and count it.

        ``done``: (track_id, model) pairs whose rows Milvus has confirmed.
        ``failures``: failed (track, model) pairs. ``finished``: (track_id,
        outcome) for tracks with nothing left to do in this job; each track's
        outcome is counted the first time only, so a replay after a crash can
        never count a track twice. A pair already settled keeps its first record.
        """
        done = list(done)
        failures = list(failures)
        first: dict[str, Outcome] = {}
        for t, o in finished:  # within one call too, a track's first outcome is the one that counts
            first.setdefault(t, Outcome(o))
        finished = list(first.items())
        now = self._clock()
        with self._lock, self._transaction() as c:
            seq = self._seq(job_id)
            c.executemany("INSERT OR IGNORE INTO job_done (job_seq, track_id, model) VALUES (?, ?, ?)", ((seq, t, m) for t, m in done))
            c.executemany(
                "INSERT OR IGNORE INTO job_failure (job_seq, track_id, model, code, message, path, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((seq, f.track_id, f.model, str(f.code), f.message, f.path, now) for f in failures),
            )
            added = {o: 0 for o in Outcome}
            for outcome in Outcome:
                rows = [(seq, t, outcome.value) for t, o in finished if o is outcome]
                if rows:
                    before = c.total_changes
                    c.executemany("INSERT OR IGNORE INTO job_track (job_seq, track_id, outcome) VALUES (?, ?, ?)", rows)
                    added[outcome] = c.total_changes - before
            c.execute(
                "UPDATE job SET processed_tracks = processed_tracks + ?, failed_tracks = failed_tracks + ?,"
                " skipped_tracks = skipped_tracks + ?, checkpoints = checkpoints + 1, last_checkpoint_at = ?, updated_at = ?"
                " WHERE seq = ?",
                (added[Outcome.PROCESSED], added[Outcome.FAILED], added[Outcome.SKIPPED], now, now, seq),
            )
            return self._get(job_id)

    # ---- the crash-loop guard
    #
    # A track that makes the daemon die (the kernel's OOM killer, a crash in native
    # code) would, after systemd's restart, be resumed and kill it again, for ever.
    # So a track is marked before its forward passes start and unmarked when they
    # end; at start-up the marks left behind count as one unclean exit each. A
    # track that was in flight at one unclean exit is retried alone (the pipeline
    # runs it with nothing else in flight, so a second death is its own); at two it
    # is recorded as failed and skipped.

    def begin_track(self, job_id: str, track_id: str, path: str) -> None:
        """Mark a track's forward passes as started (durable before they start)."""
        with self._lock, self._transaction() as c:
            c.execute(
                "INSERT INTO job_inflight (job_seq, track_id, path, running) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (job_seq, track_id) DO UPDATE SET running = 1",
                (self._seq(job_id), track_id, path),
            )

    def end_track(self, job_id: str, track_id: str) -> None:
        """The track's forward passes ended (with vectors or an error): it did not kill the daemon."""
        with self._lock, self._transaction() as c:
            c.execute("DELETE FROM job_inflight WHERE job_seq = ? AND track_id = ?", (self._seq(job_id), track_id))

    def stand_down(self, job_id: str) -> None:
        """A clean shutdown: what was in flight was stopped, not crashed on."""
        with self._lock, self._transaction() as c:
            seq = self._seq(job_id)
            c.execute("DELETE FROM job_inflight WHERE job_seq = ? AND crashes = 0", (seq,))
            c.execute("UPDATE job_inflight SET running = 0 WHERE job_seq = ?", (seq,))

    def recover_in_flight(self, job_id: str, *, max_crashes: int = 2) -> tuple[set[str], list[Failure]]:
        """At start-up: count the unclean exit against what was in flight.

        Returns the suspects (in flight at one unclean exit: to be retried alone)
        and the failures recorded for tracks in flight at ``max_crashes``, which
        are settled as failed here, in the same way as any other failure.
        """
        job = self.get_job(job_id)
        if job is None:
            return set(), []
        with self._lock, self._transaction() as c:
            seq = self._seq(job_id)
            c.execute("UPDATE job_inflight SET crashes = crashes + 1, running = 0 WHERE job_seq = ? AND running = 1", (seq,))
            rows = c.execute("SELECT track_id, path, crashes FROM job_inflight WHERE job_seq = ?", (seq,)).fetchall()
            done = {
                (t, m)
                for t, m in c.execute("SELECT track_id, model FROM job_done WHERE job_seq = ?", (seq,))
            } if any(n >= max_crashes for _, _, n in rows) else set()
            given_up = [(t, path, n) for t, path, n in rows if n >= max_crashes]
            c.executemany("DELETE FROM job_inflight WHERE job_seq = ? AND track_id = ?", ((seq, t) for t, _, _ in given_up))
        failures = [
            Failure(
                track_id=t,
                model=m,
                code=Code.INTERNAL.value,
                message=f"The daemon stopped {n} times while embedding '{path}' (out of memory or a crash in a "
                "model); the track is skipped so that the job can finish.",
                path=path,
            )
            for t, path, n in given_up
            for m in job.models
            if (t, m) not in done
        ]
        if given_up:
            self.checkpoint(job_id, failures=failures, finished=[(t, Outcome.FAILED) for t, _, _ in given_up])
        suspects = {t for t, _, n in rows if 0 < n < max_crashes}
        return suspects, failures

    def settled(self, job_id: str, track_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """For the resume path: the models already done or failed, per track.

        Ask with one page of track ids at a time; tracks with nothing settled
        are absent from the answer.
        """
        ids = list(dict.fromkeys(track_ids))
        out: dict[str, set[str]] = {}
        with self._lock:
            seq = self._seq(job_id)
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                for table in ("job_done", "job_failure"):
                    for t, m in self._conn.execute(
                        f"SELECT track_id, model FROM {table} WHERE job_seq = ? AND track_id IN ({marks})", (seq, *chunk)
                    ):
                        out.setdefault(t, set()).add(m)
        return {t: frozenset(ms) for t, ms in out.items()}

    def finished_tracks(self, job_id: str, track_ids: Sequence[str]) -> set[str]:
        """Which of these tracks already have their outcome recorded in the job."""
        ids = list(dict.fromkeys(track_ids))
        out: set[str] = set()
        with self._lock:
            seq = self._seq(job_id)
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                out.update(
                    r[0]
                    for r in self._conn.execute(
                        f"SELECT track_id FROM job_track WHERE job_seq = ? AND track_id IN ({marks})", (seq, *chunk)
                    )
                )
        return out

    def is_done(self, job_id: str, track_id: str, model: str) -> bool:
        """Whether Milvus confirmed this pair's row in this job."""
        with self._lock:
            seq = self._seq(job_id)
            return (
                self._conn.execute(
                    "SELECT 1 FROM job_done WHERE job_seq = ? AND track_id = ? AND model = ?", (seq, track_id, model)
                ).fetchone()
                is not None
            )

    def done_count(self, job_id: str, model: str | None = None) -> int:
        """Pairs recorded as stored, for one model or all."""
        with self._lock:
            seq = self._seq(job_id)
            if model is None:
                return self._conn.execute("SELECT count(*) FROM job_done WHERE job_seq = ?", (seq,)).fetchone()[0]
            return self._conn.execute(
                "SELECT count(*) FROM job_done WHERE job_seq = ? AND model = ?", (seq, model)
            ).fetchone()[0]

    def failure_page(
        self, job_id: str, limit: int = 100, offset: int = 0, pending: Sequence[Failure] = ()
    ) -> FailurePage:
        """One page of the job's failures: those recorded, then ``pending`` ones not recorded yet.

        ``pending`` are a running job's failures that wait for its next checkpoint
        (:meth:`~embedd.batch.checkpoint.Checkpointer.failure_page`); a (track, model) pair already recorded
        (a resumed job's track failing again) is not counted twice.
        """
        if limit < 0:
            raise EmbeddError(Code.BAD_REQUEST, f"argument 'limit' must not be negative, got {limit}.")
        if offset < 0:
            raise EmbeddError(Code.BAD_REQUEST, f"argument 'offset' must not be negative, got {offset}.")
        with self._lock:
            seq = self._seq(job_id)
            total, tracks = self._conn.execute(
                "SELECT count(*), count(DISTINCT track_id) FROM job_failure WHERE job_seq = ?", (seq,)
            ).fetchone()
            rows = self._conn.execute(
                "SELECT track_id, model, code, message, path FROM job_failure WHERE job_seq = ? ORDER BY id LIMIT ? OFFSET ?",
                (seq, limit, offset),
            ).fetchall()
            recorded: set[tuple[str, str]] = set()
            ids = sorted({f.track_id for f in pending})
            for chunk in _chunks(ids):
                recorded.update(
                    self._conn.execute(
                        f"SELECT track_id, model FROM job_failure WHERE job_seq = ? AND track_id IN ({','.join('?' * len(chunk))})",
                        (seq, *chunk),
                    ).fetchall()
                )
        extra: dict[tuple[str, str], Failure] = {}
        for f in pending:
            if (f.track_id, f.model) not in recorded:
                extra.setdefault((f.track_id, f.model), f)
        more = list(extra.values())
        recorded_tracks = {t for t, _ in recorded}
        page = [Failure(*r) for r in rows]
        start = max(0, offset - total)
        page += more[start : start + max(0, limit - len(page))]
        return FailurePage(
            total=total + len(more),
            tracks=tracks + len({f.track_id for f in more} - recorded_tracks),
            failures=page,
        )


def _statements(script: str) -> list[str]:
    """Split the schema script into statements (executescript would commit our transaction)."""
    out, buf = [], ""
    for line in script.splitlines():
        stripped = line.split("--", 1)[0]
        buf += stripped + "\n"
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    return out

"""The batch job: Navidrome's library → decode → models → Milvus, bounded, resumable, observable.

Shape of one pass (``_Run._pass``)::

    producer ──work_q──▶ W track workers ──write_q──▶ writer ──▶ checkpoint buffer ──▶ JobStore
    (library pages,       decode (decode_sem)           batched upserts          (every N tracks,
     skip decisions)      embed every model (embed_sem)  via store_io             after Milvus said yes)

* Every stage boundary is bounded: ``work_q`` holds one item per worker,
  ``write_q`` one write batch; a slow stage stops the ones before it, so memory
  holds at most ``W`` decoded tracks and a page of library rows, whatever the
  library's size.
* Decoding runs in the decoder's worker processes; ``decode_sem`` lets
  ``decode_workers + DECODE_PREFETCH`` decodes be under way so the pool never
  idles while results wait for the executor.
* Embedding: a track decoded once feeds every model of the pass. Each
  (track, model) is one job on the executor's BATCH lane, and ``embed_sem``
  holds ``settings.batch_queue`` permits, so the lane never overflows (an
  ``overloaded`` answer anyway is backpressure, retried, never a failure) while
  several tracks per model wait there for the executor to coalesce into one
  forward batch. The interactive lane overtakes all of it by construction.
* The writer upserts up to ``WRITE_BATCH`` tracks per model per call on the
  store thread; only after Milvus acknowledged them are the tracks put in the
  checkpoint buffer, which is written to the state DB every
  ``settings.checkpoint_every`` tracks (and at every pause, cancel, end and
  shutdown). A crash loses at most the unflushed tail, which the resumed job
  embeds again; upserts by primary key make the replay exact.

Modes. ``clear_existing: false`` first copies the stored fingerprints
(track_id, size, mtime) of each model into a scratch SQLite file
(``DATA_DIR/batch-scan.sqlite3``, so a huge library never sits in memory),
marks those the library (this shard) still has, deletes the vectors of the
rest that belong to this shard, and then embeds only tracks whose fingerprint
is missing or differs from the library's. The scan is kept for the job's life,
so a resumed job works from the same plan. ``clear_existing: true`` writes into
rebuild collections tagged with the job id (``VectorStore.begin_rebuild``) and
switches the aliases only at completion; cancel aborts them, a failure leaves
them for the next committed rebuild to clean up; search answers from the old
set throughout.

Milvus unreachable: the writer (and the set-up) retries with exponential
backoff (0.5 s doubling to 10 s) for up to ``settings.milvus_retry_s``. The job
status stays ``running`` meanwhile (``paused`` is reserved for the operator's
pause, which needs a ``batch_resume``; an outage needs nothing), the STATUS line
says "waiting for Milvus", and the rate decays towards zero. After the limit the
job is ``failed`` with the store's message; its checkpoint is kept, and since
everything it wrote is up to date, a new incremental ``batch_start`` goes on
from there.

``batch_one_model_at_a_time``: one pass per model, unloading each model after
its pass; each pass decodes every track again (decode work × number of models).
A track's outcome (processed/failed/skipped) is counted in the last pass, so
the counters move only then, while ``progress_percent`` counts all passes.

Progress rate and ETA come from a sliding window over the last
``RATE_WINDOW_S`` seconds of tracks that needed work (processed or failed), not
from the job's start, so a slow start or a run of skipped tracks does not skew
them. The ETA assumes every remaining track needs work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import sqlite3
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterable, TypeVar

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.executor import Lane
from embedd.library import Shard, Track, parse_shard
from embedd.models import CATALOG
from embedd.protocol import Handler
from embedd.store import RebuildHandle, TrackRow, VectorStore

from embedd.batch.state import FINAL_STATUSES, Failure, Job, JobStatus, JobStore, Outcome

__all__ = ["BatchManager"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Decodes under way beyond one per decoder worker: the next track is ready when a worker frees.
DECODE_PREFETCH = 2
#: Tracks per upsert call per model.
WRITE_BATCH = 32
#: A partial write batch is written after this long without new results.
WRITE_LINGER_S = 0.25
#: Library rows read per page.
PAGE = 200
#: The window of the recent-rate estimate.
RATE_WINDOW_S = 30.0
#: Backoff while Milvus is unreachable.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
SCAN_FILE = "batch-scan.sqlite3"
MTIME_TOLERANCE_S = 1e-3


class _JobFailed(Exception):
    """The job cannot go on (Milvus gone past the retry limit, no library): it ends ``failed``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------- the incremental scan


class _ScanIndex:
    """Stored fingerprints of every model, spilled to a scratch SQLite file.

    Incremental runs must compare the whole library with the whole collection
    without holding either in memory; SQLite does the set operations on disk.
    Any thread may call it (one lock).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS meta (job_id TEXT NOT NULL, complete INTEGER NOT NULL)")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS fp (model TEXT NOT NULL, track_id TEXT NOT NULL, size INTEGER NOT NULL,"
            " mtime REAL NOT NULL, seen INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (model, track_id)) WITHOUT ROWID"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS fp_track ON fp (track_id)")

    def state(self) -> tuple[str | None, bool]:
        with self._lock:
            row = self._conn.execute("SELECT job_id, complete FROM meta").fetchone()
        return (row[0], bool(row[1])) if row else (None, False)

    def reset(self, job_id: str) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("DELETE FROM fp")
            self._conn.execute("DELETE FROM meta")
            self._conn.execute("INSERT INTO meta (job_id, complete) VALUES (?, 0)", (job_id,))
            self._conn.execute("COMMIT")

    def add(self, model: str, rows: list[tuple[str, int, float]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "INSERT OR REPLACE INTO fp (model, track_id, size, mtime) VALUES (?, ?, ?, ?)",
                ((model, t, s, m) for t, s, m in rows),
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


# ---------------------------------------------------------------- live progress


@dataclasses.dataclass(slots=True)
class _Item:
    track: Track
    models: tuple[str, ...]  # what this pass must embed
    prior_failed: bool  # an earlier pass (or run) failed a model of this track
    prior_done: bool  # an earlier pass (or run) stored a model of this track


@dataclasses.dataclass(slots=True)
class _Result:
    item: _Item
    duration_s: float
    vectors: dict[str, np.ndarray]
    failures: list[Failure]


class _Live:
    """What progress shows beyond the durable counters: the run's pending tail and its pace."""

    def __init__(self) -> None:
        self.pending = {o: 0 for o in Outcome}  # outcomes buffered, not yet checkpointed
        self.current_track: str | None = None
        self.pass_index = 0
        self.passes = 1
        self.pass_seen = 0  # tracks this pass has dealt with (for multi-pass percent)
        self.waiting: str | None = None  # why the job is stalled (Milvus), for the STATUS line
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._worked = 0

    def worked(self, n: int = 1) -> None:
        self._worked += n
        now = time.monotonic()
        self._window.append((now, self._worked))
        while len(self._window) > 2 and now - self._window[1][0] > RATE_WINDOW_S:
            self._window.popleft()

    def rate(self) -> float | None:
        if len(self._window) < 2:
            return None
        (t0, n0), (t1, n1) = self._window[0], self._window[-1]
        now = time.monotonic()
        span = max(now - t0, t1 - t0)
        if span <= 0:
            return None
        return (n1 - n0) / span

    def reset_rate(self) -> None:
        self._window.clear()


# ---------------------------------------------------------------- one run of a job


class _Run:
    """One execution of a job, from (re)start until it completes, pauses, is cancelled or stopped."""

    def __init__(self, manager: BatchManager, job: Job) -> None:
        self.m = manager
        self.service = manager.service
        self.settings = manager.service.settings
        self.job = job
        self.stop_taking = asyncio.Event()
        self.reason: str | None = None  # "pause" | "quiesce" | "cancel"
        self.handles: dict[str, RebuildHandle] = {}
        self.shard: Shard | None = parse_shard(job.shard) if job.shard else None
        self.scan: _ScanIndex | None = None
        self.body: asyncio.Task | None = None
        self.task: asyncio.Task | None = None
        # the checkpoint buffer
        self._done: list[tuple[str, str]] = []
        self._failures: list[Failure] = []
        self._finished: list[tuple[str, Outcome]] = []
        self._unflushed_tracks = 0

    # ---- control (event loop)
    def request(self, reason: str) -> None:
        # cancel > pause > quiesce: a shutdown during a pause leaves the job paused.
        rank = {None: 0, "quiesce": 1, "pause": 2, "cancel": 3}
        if rank[reason] > rank[self.reason]:
            self.reason = reason
        self.stop_taking.set()
        if reason == "cancel" and self.body is not None:
            self.body.cancel()  # takes effect at once: queued executor jobs are withdrawn

    def abandon(self) -> None:
        """Shutdown grace is over: drop what is in flight (it is redone after the restart)."""
        if self.body is not None:
            self.body.cancel()

    # ---- the whole run
    async def main(self) -> None:
        job_id = self.job.job_id
        final: tuple[JobStatus, str | None] | None = None
        try:
            self.body = asyncio.create_task(self._body(), name=f"batch-{job_id}")
            try:
                await asyncio.wait({self.body})
            except asyncio.CancelledError:
                self.body.cancel()
                with contextlib.suppress(BaseException):
                    await self.body
                raise
            if not self.body.cancelled():
                exc = self.body.exception()
                if exc is not None:
                    raise exc
            elif self.reason not in ("cancel", "quiesce", "pause"):
                raise EmbeddError(Code.INTERNAL, "the batch job's pipeline was cancelled unexpectedly.")
            await self._flush()
            if self.reason == "cancel":
                await self.m._abort_rebuilds(self.job, self.handles)
                final = (JobStatus.CANCELLED, None)
            elif self.reason == "pause":
                await self._unload(self.job.models)
                final = (JobStatus.PAUSED, None)
            elif self.reason == "quiesce":
                final = None  # stays running: the next start resumes it
            else:
                await self._commit_rebuilds()
                job = self.m._job or self.job
                failed = job.failed_tracks > 0
                final = (JobStatus.COMPLETED_WITH_ERRORS if failed else JobStatus.COMPLETED, None)
        except _JobFailed as exc:
            final = (JobStatus.FAILED, exc.message)
        except EmbeddError as exc:
            final = (JobStatus.FAILED, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch job %s failed", job_id)
            final = (JobStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await self._flush()
            if self.scan is not None:
                scan = self.scan
                self.scan = None
                await asyncio.to_thread(scan.close)
                if final is not None and final[0] in FINAL_STATUSES:
                    await asyncio.to_thread(_ScanIndex.remove, scan.path)
            self.m._live.current_track = None
            self.m._live.waiting = None
        if final is not None:
            status, error = final
            if status is JobStatus.FAILED:
                log.error("batch job %s failed: %s", job_id, error)
            else:
                log.info("batch job %s is %s", job_id, status.value)
            await self.m._set_status(job_id, status, error=error)

    async def _commit_rebuilds(self) -> None:
        """Switch each rebuilt collection in, losing nothing.

        A track that failed this time keeps its old vector (copied across before
        the switch). A model whose rebuild produced no vector at all — the music
        mount was gone, the model could not load — is not switched in: the job
        fails and the old set stays live.
        """
        if not self.handles:
            return
        jobs = self.m._jobs
        job_id = self.job.job_id
        for model in self.handles:
            if self.job.total_tracks and not await asyncio.to_thread(jobs.done_count, job_id, model):
                raise _JobFailed(
                    f"the rebuild of {model} stored no vector at all, so it was not switched in; "
                    "the old vectors stay live (see batch_failures)"
                )
        failed: dict[str, list[str]] = {}
        offset = 0
        while True:
            _, page = await asyncio.to_thread(jobs.failures, job_id, 1000, offset)
            if not page:
                break
            offset += len(page)
            for failure in page:
                failed.setdefault(failure.model, []).append(failure.track_id)
        for model, handle in self.handles.items():
            if failed.get(model):
                kept = await self._store(
                    lambda s, h=handle, ids=failed[model]: s.carry_over(h, ids), f"keep {model}'s old vectors"
                )
                log.info("batch job %s: %d failed tracks keep their old %s vectors", job_id, kept, model)
            # Always commit: it is idempotent, and after a crash between the alias switch
            # and the clean-up it is what drops the old collections.
            await self._store(lambda s, h=handle: s.commit_rebuild(h), "switch the rebuilt collection")

    async def _body(self) -> None:
        await self._prepare()
        groups = [(m,) for m in self.job.models] if self.settings.batch_one_model_at_a_time else [self.job.models]
        live = self.m._live
        live.passes = len(groups)
        for index, group in enumerate(groups):
            if self.stop_taking.is_set():
                return
            live.pass_index, live.pass_seen = index, 0
            await self._pass(group, final=index == len(groups) - 1)
            await self._flush()
            if len(groups) > 1 and not self.stop_taking.is_set():
                await self._unload(group)

    # ---- set-up
    async def _prepare(self) -> None:
        service = self.service
        service.require_library()
        # Any executor round trip means the models' dims are known (described at executor start).
        await service.executor.call(Lane.CONTROL, lambda registry: None)
        dims = {m: service.model_dim(m) for m in self.job.models}
        for model in self.job.models:
            await self._store(
                lambda s, m=model: service.prepare_store(s, m, dims[m], any_dim=self.job.clear_existing),
                f"prepare {model}'s collection",
            )
        if self.job.clear_existing:
            for model in self.job.models:
                handle = await self._store(
                    lambda s, m=model: s.begin_rebuild(m, self.job.job_id, dims[m]), f"open {model}'s rebuild"
                )
                self.handles[model] = handle
            info = {m: {"public": h.public, "physical": h.physical, "dim": h.dim} for m, h in self.handles.items()}
            if dict(self.job.rebuild or {}) != info:
                self.m._job = self.job = await asyncio.to_thread(self.m._jobs.set_rebuild, self.job.job_id, info)
        else:
            await self._incremental_scan()

    async def _incremental_scan(self) -> None:
        path = str(self.settings.data_dir / SCAN_FILE)
        scan = self.scan = await asyncio.to_thread(_ScanIndex, path)
        job_id, complete = await asyncio.to_thread(scan.state)
        if job_id == self.job.job_id and complete:
            return
        await asyncio.to_thread(scan.reset, self.job.job_id)
        for model in self.job.models:

            def copy(store: VectorStore, m: str = model) -> int:
                n, page = 0, []
                for fp in store.fingerprints(m):
                    page.append((fp.track_id, fp.file_size, fp.file_mtime))
                    if len(page) >= 1000:
                        scan.add(m, page)
                        n, page = n + len(page), []
                scan.add(m, page)
                return n + len(page)

            await self._store(copy, f"read {model}'s stored fingerprints")
        library = self.service.require_library()
        page: list[str] = []
        # Rows Navidrome marked missing still count as in the library: a share that was
        # unmounted during its scan must not cost every vector (they are not embedded either).
        async for track in library.iter_tracks(self.shard, include_missing=True):
            page.append(track.track_id)
            if len(page) >= 1000:
                await asyncio.to_thread(scan.mark_seen, page)
                page = []
        await asyncio.to_thread(scan.mark_seen, page)
        after, removed = "", 0
        while True:
            pairs = await asyncio.to_thread(scan.unseen, after, 1000)
            if not pairs:
                break
            after = pairs[-1][0]
            by_model: dict[str, list[str]] = {}
            for tid, model in pairs:
                if self.shard is None or self.shard.contains(tid):
                    by_model.setdefault(model, []).append(tid)
            for model, ids in by_model.items():
                await self._store(lambda s, m=model, i=ids: s.delete(m, i), f"delete stale {model} vectors")
                removed += len(ids)
        if removed:
            log.info("batch job %s removed %d vectors of tracks no longer in the library", self.job.job_id, removed)
        await asyncio.to_thread(scan.mark_complete)

    # ---- one pass over the library
    async def _pass(self, group: tuple[str, ...], *, final: bool) -> None:
        s = self.settings
        decoder = self.service.decoder
        assert decoder is not None, "batch job before the service started"
        # Enough tracks for every decode slot plus enough decoded ones to keep each
        # model's share of the batch lane full; each holds at most one decoded track.
        workers = s.decode_workers + DECODE_PREFETCH + math.ceil(s.batch_queue / len(group))
        decode_sem = asyncio.Semaphore(s.decode_workers + DECODE_PREFETCH)
        embed_sem = asyncio.Semaphore(s.batch_queue)
        work_q: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=workers)
        write_q: asyncio.Queue[_Result | None] = asyncio.Queue(maxsize=WRITE_BATCH)

        async def producer() -> None:
            page: list[Track] = []
            async for track in self.service.require_library().iter_tracks(self.shard):
                if self.stop_taking.is_set():
                    break
                page.append(track)
                if len(page) >= PAGE:
                    await self._feed(page, group, final, work_q)
                    page = []
            if page and not self.stop_taking.is_set():
                await self._feed(page, group, final, work_q)
            # Not in a finally: on cancellation the workers are gone and a full queue would block forever.
            for _ in range(workers):
                await work_q.put(None)

        async def worker() -> None:
            while (item := await work_q.get()) is not None:
                result = await self._process(item, decoder, decode_sem, embed_sem)
                if result is not None:
                    await write_q.put(result)

        async def workers_then_close() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(workers):
                    tg.create_task(worker())
            await write_q.put(None)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(producer())
            tg.create_task(workers_then_close())
            tg.create_task(self._writer(write_q, final))

    async def _feed(self, page: list[Track], group: tuple[str, ...], final: bool, work_q: asyncio.Queue) -> None:
        """Decide what each track of a page needs; queue the work, settle the rest."""
        jobs = self.m._jobs
        ids = [t.track_id for t in page]
        job_id = self.job.job_id

        def look() -> tuple[set[str], dict[str, frozenset[str]], dict[str, set[str]], dict]:
            finished = jobs.finished_tracks(job_id, ids)
            settled = jobs.settled(job_id, ids)
            done = {
                t: {m for m in models if jobs.is_done(job_id, t, m)}
                for t, models in settled.items()
                if t not in finished
            }
            fps = self.scan.lookup(ids) if self.scan is not None else {}
            return finished, settled, done, fps

        finished, settled, done, fps = await asyncio.to_thread(look)
        live = self.m._live
        for track in page:
            tid = track.track_id
            if tid in finished:
                live.pass_seen += 1
                continue
            already = settled.get(tid, frozenset())
            was_done = done.get(tid, set())
            need = tuple(m for m in group if m not in already and not self._up_to_date(fps, m, track))
            if need:
                if self.stop_taking.is_set():
                    break  # pause/shutdown: the rest of the page waits for the next run
                await work_q.put(_Item(track, need, prior_failed=bool(already - was_done), prior_done=bool(was_done)))
                continue
            live.pass_seen += 1
            if final:
                outcome = Outcome.FAILED if already - was_done else Outcome.PROCESSED if was_done else Outcome.SKIPPED
                await self._settle(tid, outcome)
        self.m._bump()

    def _up_to_date(self, fps: dict, model: str, track: Track) -> bool:
        if self.job.clear_existing:
            return False
        fp = fps.get((model, track.track_id))
        if fp is None:
            return False
        size, mtime = fp
        return size == track.file_size and abs(mtime - (track.file_mtime or 0.0)) <= MTIME_TOLERANCE_S

    async def _process(
        self, item: _Item, decoder: Any, decode_sem: asyncio.Semaphore, embed_sem: asyncio.Semaphore
    ) -> _Result | None:
        track = item.track
        targets = {(CATALOG[m].sample_rate, CATALOG[m].channels) for m in item.models}
        try:
            async with decode_sem:
                self.m._live.current_track = track.display_name
                audio = await decoder.decode_path(track.path, targets)
        except EmbeddError as exc:
            if exc.code is Code.CANCELLED:
                return None  # shutdown: the track is redone after the restart
            return _Result(item, 0.0, {}, [Failure.from_error(track.track_id, m, track.path, exc) for m in item.models])

        async def one(model: str) -> np.ndarray:
            info = CATALOG[model]
            wave = audio.waveform(info.sample_rate, info.channels)
            while True:
                async with embed_sem:
                    try:
                        return (await self.service.executor.embed_audio(Lane.BATCH, model, wave)).vector
                    except EmbeddError as exc:
                        if exc.code is not Code.OVERLOADED:
                            raise
                await asyncio.sleep(0.05)  # the lane is full: backpressure, not a failure

        outcomes = await asyncio.gather(*(one(m) for m in item.models), return_exceptions=True)
        vectors: dict[str, np.ndarray] = {}
        failures: list[Failure] = []
        for model, out in zip(item.models, outcomes, strict=True):
            if isinstance(out, EmbeddError):
                if out.code is Code.CANCELLED:
                    return None
                failures.append(Failure.from_error(track.track_id, model, track.path, out))
            elif isinstance(out, BaseException):
                raise out
            else:
                vectors[model] = out
        return _Result(item, audio.duration_s, vectors, failures)

    async def _writer(self, write_q: asyncio.Queue, final: bool) -> None:
        batch: list[_Result] = []
        # One getter task lives across timeouts: cancelling a Queue.get() on timeout can lose an item.
        getter: asyncio.Task | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(write_q.get())
                done, _ = await asyncio.wait({getter}, timeout=WRITE_LINGER_S if batch else None)
                item: _Result | None | bool = False
                if done:
                    item, getter = getter.result(), None
                if item is None:
                    await self._write(batch, final)
                    return
                if item is not False:
                    batch.append(item)
                if batch and (item is False or len(batch) >= WRITE_BATCH):
                    await self._write(batch, final)
                    batch = []
        finally:
            if getter is not None:
                getter.cancel()

    async def _write(self, batch: list[_Result], final: bool) -> None:
        if not batch:
            return
        s = self.settings
        now = time.time()
        rows: dict[str, list[TrackRow]] = {}
        for r in batch:
            t = r.item.track
            for model, vec in r.vectors.items():
                rows.setdefault(model, []).append(
                    TrackRow(
                        track_id=t.track_id,
                        vector=vec,
                        path=t.path,
                        title=t.title,
                        artist=t.artist,
                        album=t.album,
                        duration_s=r.duration_s,
                        model_id=s.model_source(model),
                        file_size=t.file_size,
                        file_mtime=t.file_mtime or 0.0,
                        embedded_at=now,
                    )
                )
        rejected: dict[tuple[str, str], EmbeddError] = {}
        t0 = time.perf_counter()
        for model, model_rows in rows.items():
            target = self.handles.get(model)
            try:
                await self._store(lambda st, m=model, rs=model_rows: st.upsert(m, rs, target=target), f"store {model} vectors")
            except _JobFailed:
                raise
            except EmbeddError:
                # One bad row (a vector Milvus refuses) must not sink its neighbours: find it.
                for row in model_rows:
                    try:
                        await self._store(lambda st, m=model, r=row: st.upsert(m, [r], target=target), f"store {model} vectors")
                    except EmbeddError as exc:
                        rejected[(row.track_id, model)] = exc
        log.debug("batch job wrote %d tracks in %.3f s", len(batch), time.perf_counter() - t0)
        due = False
        for r in batch:
            t = r.item.track
            failures = list(r.failures)
            done_models = []
            for model in r.vectors:
                exc = rejected.get((t.track_id, model))
                if exc is None:
                    done_models.append(model)
                else:
                    failures.append(Failure.from_error(t.track_id, model, t.path, exc))
            self._done.extend((t.track_id, m) for m in done_models)
            self._failures.extend(failures)
            self.m._live.pass_seen += 1
            self.m._live.worked()
            if final:
                failed = bool(failures) or r.item.prior_failed
                await self._settle(t.track_id, Outcome.FAILED if failed else Outcome.PROCESSED, flush=False)
            else:
                self._unflushed_tracks += 1
            due = due or self._unflushed_tracks >= s.checkpoint_every
        if due:
            await self._flush()
        self.m._bump()

    async def _settle(self, track_id: str, outcome: Outcome, *, flush: bool = True) -> None:
        self._finished.append((track_id, outcome))
        self.m._live.pending[outcome] += 1
        self._unflushed_tracks += 1
        if flush and self._unflushed_tracks >= self.settings.checkpoint_every:
            await self._flush()

    async def _flush(self) -> None:
        """Record the buffered, Milvus-confirmed results in the state DB (one transaction)."""
        if not (self._done or self._failures or self._finished):
            return
        done, failures, finished = self._done, self._failures, self._finished
        self._done, self._failures, self._finished = [], [], []
        self._unflushed_tracks = 0
        try:
            job = await asyncio.to_thread(
                self.m._jobs.checkpoint, self.job.job_id, done=done, failures=failures, finished=finished
            )
        except BaseException:
            self._done[:0], self._failures[:0], self._finished[:0] = done, failures, finished
            raise
        live = self.m._live
        for _, outcome in finished:
            live.pending[outcome] -= 1
        self.m._job = self.job = job
        self.m._bump()

    # ---- helpers
    async def _store(self, fn: Callable[[VectorStore], T], what: str) -> T:
        return await self.m._store_retry(fn, what)

    async def _unload(self, models: Iterable[str]) -> None:
        for model in models:
            try:
                await self.service.executor.unload(model)
            except EmbeddError as exc:
                log.warning("could not unload %s: %s", model, exc.message)


# ---------------------------------------------------------------- the manager


class BatchManager:
    """The daemon's batch job: at most one active job, its progress and its ops."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._jobs: JobStore | None = None
        self._job: Job | None = None  # the latest job as last written
        self._run: _Run | None = None
        self._live = _Live()
        self._version = 0
        self._changed: asyncio.Event | None = None
        self._op_lock: asyncio.Lock | None = None
        self._startup_error: str | None = None
        self._background: set[asyncio.Task] = set()

    # ---- lifecycle
    async def start_up(self) -> None:
        """Open the state file and pick up an interrupted job (running resumes, cancelling finishes)."""
        self._changed = asyncio.Event()
        self._op_lock = asyncio.Lock()
        try:
            self._jobs = await asyncio.to_thread(JobStore, self.service.settings.state_db)
            self._job = await asyncio.to_thread(self._jobs.latest_job)
        except EmbeddError as exc:
            self._startup_error = exc.message
            log.error("batch jobs are unavailable: %s", exc.message)
            return
        job = self._job
        if job is None or not job.active:
            return
        if job.status is JobStatus.RUNNING:
            log.info("resuming interrupted batch job %s (%d of %d tracks settled)", job.job_id, job.settled_tracks, job.total_tracks)
            self._launch(job)
        elif job.status is JobStatus.CANCELLING:
            self._spawn(self._finish_cancel(job))
        else:
            log.info("batch job %s is paused; batch_resume continues it", job.job_id)

    async def quiesce(self) -> None:
        """Shutdown: stop taking tracks, let in-flight ones land for a while, checkpoint; stay resumable."""
        run = self._run
        if run is not None and run.task is not None:
            run.request("quiesce")
            grace = max(0.5, self.service.settings.shutdown_timeout_s / 2)
            done, _ = await asyncio.wait({run.task}, timeout=grace)
            if not done:
                log.info("batch job %s: abandoning in-flight tracks at shutdown", run.job.job_id)
                run.abandon()
                await asyncio.wait({run.task}, timeout=2.0)
        for task in list(self._background):
            task.cancel()

    # ---- views
    def progress(self) -> dict[str, Any]:
        job = self._job
        if job is None:
            return {
                "job_id": None, "status": JobStatus.IDLE.value, "models": [], "total_tracks": 0,
                "processed_tracks": 0, "failed_tracks": 0, "skipped_tracks": 0, "current_track": None,
                "progress_percent": 0.0, "started_at": None, "estimated_completion": None, "rate_tracks_per_s": None,
            }  # fmt: skip
        live = self._live
        running = job.status is JobStatus.RUNNING and self._run is not None
        processed = job.processed_tracks + (live.pending[Outcome.PROCESSED] if running else 0)
        failed = job.failed_tracks + (live.pending[Outcome.FAILED] if running else 0)
        skipped = job.skipped_tracks + (live.pending[Outcome.SKIPPED] if running else 0)
        settled = processed + failed + skipped
        total = job.total_tracks
        if job.status in (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS):
            percent = 100.0
        elif total <= 0:
            percent = 0.0
        elif running and live.passes > 1:
            percent = 100.0 * (live.pass_index * total + min(live.pass_seen, total)) / (live.passes * total)
        else:
            percent = 100.0 * settled / total
        rate = live.rate() if running else None
        eta = None
        if running and rate and rate > 0:
            remaining = max(0, total - settled)
            if live.passes > 1:
                remaining = max(0, (live.passes - live.pass_index) * total - live.pass_seen)
            eta = time.time() + remaining / rate
        return {
            "job_id": job.job_id,
            "status": job.status.value,
            "models": list(job.models),
            "total_tracks": total,
            "processed_tracks": processed,
            "failed_tracks": failed,
            "skipped_tracks": skipped,
            "current_track": live.current_track if running else None,
            "progress_percent": round(min(100.0, percent), 3),
            "started_at": job.started_at,
            "estimated_completion": eta,
            "rate_tracks_per_s": round(rate, 4) if rate is not None else None,
        }

    def status_line(self) -> str:
        p = self.progress()
        if p["job_id"] is None:
            return "idle"
        line = f"{p['status']} {p['processed_tracks'] + p['failed_tracks'] + p['skipped_tracks']}/{p['total_tracks']} {p['progress_percent']:.1f}%"
        if p["rate_tracks_per_s"]:
            line += f" {p['rate_tracks_per_s']:.1f} tracks/s"
        if p["estimated_completion"]:
            line += f" ETA {_duration(p['estimated_completion'] - time.time())}"
        if p["failed_tracks"]:
            line += f" ({p['failed_tracks']} failed)"
        if self._live.waiting and p["status"] == JobStatus.RUNNING.value:
            line += f"; {self._live.waiting}"
        return line

    def handlers(self) -> dict[str, Any]:

        return {
            "batch_start": Handler(self._op_start),
            "batch_progress": Handler(lambda _args: self.progress(), inline=True),
            "batch_watch": Handler(self._op_watch, streaming=True),
            "batch_cancel": Handler(self._op_cancel),
            "batch_pause": Handler(self._op_pause),
            "batch_resume": Handler(self._op_resume),
            "batch_failures": Handler(self._op_failures),
        }

    # ---- ops
    def _require_jobs(self) -> JobStore:
        if self._jobs is None:
            raise EmbeddError(
                Code.UNAVAILABLE, self._startup_error or "batch jobs are unavailable: the daemon is starting or stopping."
            )
        return self._jobs

    async def _op_start(self, args: Any) -> dict[str, Any]:
        assert self._op_lock is not None
        async with self._op_lock:
            jobs = self._require_jobs()
            library = self.service.require_library()
            shard = parse_shard(args.shard) if args.shard is not None else None
            if args.clear_existing and shard is not None and shard.count > 1:
                # A rebuild switches the whole collection at once; one shard's switch
                # would hide (and drop) every other shard's vectors.
                raise EmbeddError(
                    Code.BAD_REQUEST,
                    "batch_start: 'clear_existing' cannot be combined with 'shard'; "
                    "run a rebuild on one daemon, or shard an incremental run",
                )
            current = self._job
            if current is not None and current.active:
                raise EmbeddError(Code.BUSY, f"batch job {current.job_id} is {current.status.value}; cancel it or wait for it to finish.")
            total = await library.count(shard)
            job = await asyncio.to_thread(
                jobs.create_job,
                models=list(args.models),
                clear_existing=args.clear_existing,
                shard=str(shard) if shard is not None else None,
                total_tracks=total,
            )
            self._job = job
            self._live = _Live()
            log.info(
                "batch job %s started: %d tracks, models %s%s%s", job.job_id, total, ",".join(job.models),
                ", clear_existing" if job.clear_existing else "", f", shard {job.shard}" if job.shard else "",
            )  # fmt: skip
            self._launch(job)
            self._bump()
            return {"job_id": job.job_id, "total_tracks": total}

    async def _op_watch(self, args: Any) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        assert self._changed is not None
        interval = args.interval_s
        last = self.progress()
        seen = self._version
        more = last["job_id"] is not None and last["status"] not in _FINAL_WIRE
        yield last, more
        sent_at = time.monotonic()
        while more:
            while self._version == seen:
                await self._changed.wait()
            wait = interval - (time.monotonic() - sent_at)
            if wait > 0:
                await asyncio.sleep(wait)
            seen = self._version
            now = self.progress()
            more = now["status"] not in _FINAL_WIRE
            if now != last or not more:
                yield now, more
                sent_at = time.monotonic()
                last = now

    async def _op_cancel(self, _args: Any) -> dict[str, Any]:
        assert self._op_lock is not None
        async with self._op_lock:
            jobs = self._require_jobs()
            job = self._job
            if job is None or job.status not in (JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLING):
                raise EmbeddError(Code.NOT_FOUND, "there is no running or paused batch job to cancel.")
            if job.status is not JobStatus.CANCELLING:
                self._job = await asyncio.to_thread(jobs.set_status, job.job_id, JobStatus.CANCELLING)
                self._bump()
            run = self._run
            if run is not None and run.job.job_id == job.job_id:
                run.request("cancel")
            elif job.status is not JobStatus.CANCELLING:
                self._spawn(self._finish_cancel(self._job))
            return {"status": JobStatus.CANCELLING.value}

    async def _op_pause(self, _args: Any) -> dict[str, Any]:
        assert self._op_lock is not None
        async with self._op_lock:
            jobs = self._require_jobs()
            job = self._job
            if job is None or job.status not in (JobStatus.RUNNING, JobStatus.PAUSED):
                raise EmbeddError(Code.NOT_FOUND, "there is no running batch job to pause.")
            task = None
            if job.status is JobStatus.RUNNING:
                run = self._run
                if run is not None and run.task is not None and not run.task.done():
                    run.request("pause")  # the run finishes its in-flight tracks and records PAUSED
                    task = run.task
                else:  # no run is active: record the pause ourselves
                    self._job = await asyncio.to_thread(jobs.set_status, job.job_id, JobStatus.PAUSED)
                    self._bump()
        # Wait outside the lock, so that a cancel can overtake a pause that is draining.
        if task is not None:
            await asyncio.wait({task})
        return self.progress()

    async def _op_resume(self, _args: Any) -> dict[str, Any]:
        assert self._op_lock is not None
        async with self._op_lock:
            jobs = self._require_jobs()
            job = self._job
            if job is None or job.status not in (JobStatus.RUNNING, JobStatus.PAUSED):
                raise EmbeddError(Code.NOT_FOUND, "there is no paused batch job to resume.")
            if job.status is JobStatus.PAUSED:
                job = self._job = await asyncio.to_thread(jobs.set_status, job.job_id, JobStatus.RUNNING)
                self._live.reset_rate()
                self._launch(job)
                self._bump()
            elif self._run is None:
                self._launch(job)
            return self.progress()

    async def _op_failures(self, args: Any) -> dict[str, Any]:
        jobs = self._require_jobs()
        job = self._job
        if job is None:
            return {"total": 0, "failures": []}
        total, failures = await asyncio.to_thread(jobs.failures, job.job_id, args.limit, args.offset)
        return {"total": total, "failures": [f.to_wire() for f in failures]}

    # ---- internals
    def _launch(self, job: Job) -> None:
        run = _Run(self, job)
        self._run = run

        async def drive() -> None:
            try:
                await run.main()
            finally:
                if self._run is run:
                    self._run = None
                self._bump()

        run.task = asyncio.get_running_loop().create_task(drive(), name=f"batch-job-{job.job_id}")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_cancel(self, job: Job) -> None:
        """Cancel a job that has no run (paused, or interrupted mid-cancel): drop its rebuild."""
        try:
            if job.status is not JobStatus.CANCELLING:
                job = await asyncio.to_thread(self._require_jobs().set_status, job.job_id, JobStatus.CANCELLING)
            await self._abort_rebuilds(job, {})
        finally:
            await self._set_status(job.job_id, JobStatus.CANCELLED)

    async def _abort_rebuilds(self, job: Job, handles: dict[str, RebuildHandle]) -> None:
        """Drop the rebuild collections of a cancelled job; the live ones are untouched."""
        known = dict(handles)
        for model, info in dict(job.rebuild or {}).items():
            if model not in known:
                known[model] = RebuildHandle(
                    model=model, public=info["public"], physical=info["physical"], tag=job.job_id,
                    dim=int(info["dim"]), resumed=True, committed=False,
                )  # fmt: skip
        for handle in known.values():
            try:
                await self._store_retry(lambda s, h=handle: s.abort_rebuild(h), f"drop {handle.physical}")
            except (_JobFailed, EmbeddError) as exc:
                msg = exc.message
                log.warning("cancelled job %s: rebuild collection %s left for a later rebuild to drop (%s)", job.job_id, handle.physical, msg)

    async def _set_status(self, job_id: str, status: JobStatus, *, error: str | None = None) -> None:
        jobs = self._jobs
        if jobs is None:
            return
        try:
            self._job = await asyncio.to_thread(jobs.set_status, job_id, status, error=error)
        except EmbeddError as exc:
            log.error("batch job %s: cannot record status %s: %s", job_id, status.value, exc.message)
        self._bump()

    async def _store_retry(self, fn: Callable[[VectorStore], T], what: str) -> T:
        """Run ``fn`` on the store thread; while Milvus is unreachable, retry with backoff, then fail the job."""
        limit = self.service.settings.milvus_retry_s
        started = time.monotonic()
        delay = BACKOFF_FIRST_S
        while True:
            try:
                result = await self.service.store_io(fn)
            except EmbeddError as exc:
                if exc.code is not Code.UNAVAILABLE:
                    raise
                if await self.service.store_io(lambda s: s.ping()):
                    raise  # Milvus answers: the refusal is about the data (e.g. a collection of another dim)
                waited = time.monotonic() - started
                if waited >= limit:
                    self._live.waiting = None
                    raise _JobFailed(f"gave up after {waited:.0f} s trying to {what}: {exc.message}") from exc
                if self._live.waiting is None:
                    log.warning("batch job waits for Milvus: %s", exc.message)
                self._live.waiting = f"waiting for Milvus ({waited:.0f} s)"
                self._bump()
                await asyncio.sleep(min(delay, max(0.05, limit - waited)))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if self._live.waiting is not None:
                log.info("Milvus is back; the batch job goes on")
                self._live.waiting = None
                self._bump()
            return result

    def _bump(self) -> None:
        self._version += 1
        if self._changed is not None:
            event, self._changed = self._changed, asyncio.Event()
            event.set()


_FINAL_WIRE = frozenset(s.value for s in FINAL_STATUSES) | {JobStatus.IDLE.value}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

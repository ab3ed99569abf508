"""One run of a batch job: from (re)start until it completes, pauses, is cancelled or stopped.

Shape of one pass (``Run._pass``)::

    producer ──work_q──▶ W track workers ──write_q──▶ writer ──▶ Checkpointer ──▶ JobStore
    (library pages,       decode (decode_sem)           batched upserts          (every N tracks,
     skip decisions)      embed every model (embed_sem)  on the store thread      after Milvus said yes)

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
  store thread; only after Milvus acknowledged them are the tracks given to the
  :class:`~embedd.batch.checkpoint.Checkpointer`, which writes them to the state DB
  every ``settings.checkpoint_every`` tracks (and at every pause, cancel, end
  and shutdown). A crash loses at most the unflushed tail, which the resumed
  job embeds again; upserts by primary key make the replay exact.

Modes. ``clear_existing: false`` works from the incremental scan
(:mod:`embedd.batch.scan`). ``clear_existing: true`` writes into rebuild
collections tagged with the job id (``VectorStore.begin_rebuild``) and switches
the aliases only at completion; cancel aborts them, a failure leaves them for
the next committed rebuild to clean up; search answers from the old set
throughout.

On a Ray cluster (``ray_address``) a track's decode and model work happen on
a model worker instead (:mod:`embedd.cluster`): the same items, results and
writer; only ``_process`` differs.

``batch_one_model_at_a_time``: one pass per model, unloading each model after
its pass; each pass decodes every track again (decode work × number of models).
A track's outcome (processed/failed/skipped) is counted in the last pass, so
the counters move only then, while ``progress_percent`` counts all passes.

Long because: the pipeline's stages share one run's stop state (``reason``,
``stop_taking``) and its checkpointer; split, each would reach back into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
from typing import AsyncIterator, Iterable

import numpy as np

from embedd.audio import AudioDecoder, DecodedAudio
from embedd.batch.checkpoint import Checkpointer
from embedd.batch.ending import abort_rebuilds, adopt_public_names, commit_rebuilds, record_status
from embedd.batch.gate import IsolationGate
from embedd.batch.job import FINAL_STATUSES, Failure, Job, JobStatus, Outcome
from embedd.batch.progress import Progress
from embedd.batch.retry import JobFailed, RetryingStore
from embedd.batch.scan import SCAN_FILE, Fingerprints, ScanIndex, incremental_scan, scoped_scan, up_to_date
from embedd.batch.state import JobStore
from embedd.batch.writer import WRITE_BATCH, Item, Result, Writer
from embedd.cluster.client import ClusterFallback, RayCluster
from embedd.embedding import decode_targets, embed_decoded
from embedd.errors import Code, EmbeddError
from embedd.executor import Executor, Lane
from embedd.library import NavidromeLibrary, Shard, Track, parse_shard, require_library
from embedd.models.base import AudioEmbedding
from embedd.settings import Settings
from embedd.store import RebuildHandle
from embedd.store.io import StoreIO

__all__ = ["Collaborators", "Run", "StopReason"]

log = logging.getLogger(__name__)

#: Decodes under way beyond one per decoder worker: the next track is ready when a worker frees.
DECODE_PREFETCH = 2
#: Library rows read per page.
PAGE = 200


class StopReason(enum.IntEnum):
    """Why a run stops taking tracks; a stronger reason overrides a weaker one."""

    QUIESCE = 1  # shutdown: stays running, the next start resumes it
    PAUSE = 2  # the operator's pause: a shutdown during it leaves the job paused
    CANCEL = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Collaborators:
    """What a run works with; the manager builds it once the service has started."""

    settings: Settings
    jobs: JobStore
    progress: Progress
    store_io: StoreIO
    store: RetryingStore
    executor: Executor
    decoder: AudioDecoder
    library: NavidromeLibrary | None
    cluster: RayCluster | None = None  # model work on a Ray cluster (``ray_address``), else the executor


class Run:
    """One execution of a job, from (re)start until it completes, pauses, is cancelled or stopped."""

    def __init__(self, c: Collaborators, job: Job, suspects: set[str] | None = None) -> None:
        self.c = c
        self.settings = c.settings
        self.jobs = c.jobs
        self.progress = c.progress
        self.store = c.store
        self.suspects = set(suspects or ())  # tracks in flight at the last unclean exit: run alone
        self.gate = IsolationGate()
        self.job = job
        self.stop_taking = asyncio.Event()
        self.reason: StopReason | None = None
        self.handles: dict[str, RebuildHandle] = {}
        self.shard: Shard | None = parse_shard(job.shard) if job.shard else None
        self.scan: ScanIndex | None = None
        self.checkpoints = Checkpointer(c.jobs, job.job_id, every=c.settings.checkpoint_every)
        self.body: asyncio.Task | None = None
        self.task: asyncio.Task | None = None
        c.progress.pending = self.checkpoints.pending_outcomes

    # ---- control (event loop)
    def request(self, reason: StopReason) -> None:
        if self.reason is None or reason > self.reason:
            self.reason = reason
        self.stop_taking.set()
        if reason in (StopReason.PAUSE, StopReason.CANCEL):
            # Within one forward pass: the model work and the decodes queued for this job
            # are withdrawn now and the call in flight stops at its next pass boundary. On
            # pause, tracks already embedded are still written; the rest are embedded
            # again at resume.
            self.c.executor.withdraw(Lane.BATCH)
            self.c.decoder.withdraw("batch")
            if self.c.cluster is not None:
                self.c.cluster.withdraw()
        if reason is StopReason.CANCEL and self.body is not None:
            self.body.cancel()  # and the pipeline's queued decodes go with its tasks

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
            elif self.reason is None:
                raise EmbeddError(Code.INTERNAL, "the batch job's pipeline was cancelled unexpectedly.")
            await self._flush()
            if self.reason is StopReason.CANCEL:
                await abort_rebuilds(self.store, self.job, self.handles)
                final = (JobStatus.CANCELLED, None)
            elif self.reason is StopReason.PAUSE:
                await self._unload(self.job.models)
                final = (JobStatus.PAUSED, None)
            elif self.reason is StopReason.QUIESCE:
                final = None  # stays running: the next start resumes it
            else:
                await commit_rebuilds(self.store, self.jobs, self.job, self.handles)
                if not self.job.scoped:  # a scoped job says nothing about the rest of the library
                    await adopt_public_names(self.store, self.job, self.shard)
                job = self.progress.job or self.job
                failed = job.failed_tracks > 0
                final = (JobStatus.COMPLETED_WITH_ERRORS if failed else JobStatus.COMPLETED, None)
        except JobFailed as exc:
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
                    await asyncio.to_thread(ScanIndex.remove, scan.path)
            if self.c.cluster is not None:
                await self.c.cluster.close()
            self.progress.current_track = None
            self.progress.wait("milvus", None)
        if final is not None:
            status, error = final
            if status is JobStatus.FAILED:
                log.error("batch job %s failed: %s", job_id, error)
            else:
                log.info("batch job %s is %s", job_id, status.value)
            await record_status(self.jobs, self.progress, job_id, status, error=error)

    async def _body(self) -> None:
        await self._prepare()
        groups = [(m,) for m in self.job.models] if self.settings.batch_one_model_at_a_time else [self.job.models]
        live = self.progress
        live.passes = len(groups)
        for index, group in enumerate(groups):
            if self.stop_taking.is_set():
                return
            live.pass_index, live.pass_seen = index, 0
            with self.c.executor.pinned(group):  # never idle-unloaded while this pass uses them
                await self._pass(group, final=index == len(groups) - 1)
            await self._flush()
            if len(groups) > 1 and not self.stop_taking.is_set():
                await self._unload(group)

    # ---- set-up
    async def _prepare(self) -> None:
        c = self.c
        require_library(c.library)
        if c.cluster is not None:
            await c.cluster.open()  # connects in the background: tracks wait for its workers
        # Any executor round trip means the models' dims are known (described at executor start).
        await c.executor.call(Lane.CONTROL, lambda registry: None)
        dims = {m: c.executor.model_dim(m) for m in self.job.models}
        for model in self.job.models:
            await self.store(
                lambda s, m=model: c.store_io.prepare(s, m, dims[m], any_dim=self.job.clear_existing),
                f"prepare {model}'s collection",
            )
        if self.job.clear_existing:
            for model in self.job.models:
                handle = await self.store(
                    lambda s, m=model: s.begin_rebuild(m, self.job.job_id, dims[m]), f"open {model}'s rebuild"
                )
                self.handles[model] = handle
            info = {m: {"public": h.public, "physical": h.physical, "dim": h.dim} for m, h in self.handles.items()}
            if dict(self.job.rebuild or {}) != info:
                self.progress.job = self.job = await asyncio.to_thread(self.jobs.set_rebuild, self.job.job_id, info)
        else:
            self.scan = await asyncio.to_thread(ScanIndex, str(self.settings.data_dir / SCAN_FILE))
            if self.job.scoped:  # an automatic job: what the library watcher saw change
                await scoped_scan(
                    self.scan, self.job, jobs=self.jobs, store=self.store, library=require_library(c.library),
                    progress=self.progress,
                )  # fmt: skip
            else:
                await incremental_scan(
                    self.scan, self.job, self.shard, store=self.store, library=require_library(c.library),
                    progress=self.progress,
                )  # fmt: skip

    async def _pass(self, group: tuple[str, ...], *, final: bool) -> None:
        s = self.settings
        decoder = self.c.decoder
        # Enough tracks for every decode slot plus enough decoded ones to keep each
        # model's share of the batch lane full; each holds at most one decoded track.
        workers = s.decode_workers + DECODE_PREFETCH + math.ceil(s.batch_queue / len(group))
        if self.c.cluster is not None:  # every worker's share in flight, and a file read ahead for each
            workers = max(workers, self.c.cluster.capacity + len(self.c.cluster.workers))
        decode_sem = asyncio.Semaphore(s.decode_workers + DECODE_PREFETCH)
        embed_sem = asyncio.Semaphore(s.batch_queue)
        work_q: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=workers)
        write_q: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=WRITE_BATCH)

        async def producer() -> None:
            page: list[Track] = []
            async for track in self._tracks():
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
            tg.create_task(Writer(self.store, self.settings, self.handles, self.checkpoints, self.progress, self._flush).run(write_q, final))

    async def _tracks(self) -> AsyncIterator[Track]:
        """The job's tracks in id order: the library (this shard), or a scoped job's present tracks."""
        library = require_library(self.c.library)
        if not self.job.scoped:
            async for track in library.iter_tracks(self.shard):
                yield track
            return
        after = ""
        while ids := await asyncio.to_thread(self.jobs.scope_page, self.job.job_id, after, PAGE):
            after = ids[-1]
            for track in await library.tracks_by_ids(ids):
                yield track

    async def _feed(self, page: list[Track], group: tuple[str, ...], final: bool, work_q: asyncio.Queue[Item | None]) -> None:
        """Decide what each track of a page needs; queue the work, settle the rest."""
        jobs = self.jobs
        ids = [t.track_id for t in page]
        job_id = self.job.job_id

        def look() -> tuple[set[str], dict[str, frozenset[str]], dict[str, set[str]], Fingerprints]:
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
        live = self.progress
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
                await work_q.put(Item(track, need, prior_failed=bool(already - was_done), prior_done=bool(was_done)))
                continue
            live.pass_seen += 1
            if final:
                outcome = Outcome.FAILED if already - was_done else Outcome.PROCESSED if was_done else Outcome.SKIPPED
                await self._settle(tid, outcome)
        self.progress.bump()

    def _up_to_date(self, fps: Fingerprints, model: str, track: Track) -> bool:
        return not self.job.clear_existing and up_to_date(fps, model, track)

    async def _process(
        self, item: Item, decoder: AudioDecoder, decode_sem: asyncio.Semaphore, embed_sem: asyncio.Semaphore
    ) -> Result | None:
        track = item.track
        if self.reason is StopReason.PAUSE:
            return None  # paused: not started, embedded at resume
        if self.c.cluster is not None:
            try:
                return await self._on_cluster(item, self.c.cluster)
            except ClusterFallback:
                pass  # ray_fallback = local: the cluster is gone, embed it here
        targets = decode_targets(item.models)
        try:
            async with decode_sem:
                if self.reason is StopReason.PAUSE:
                    return None  # paused while waiting for a decode slot
                self.progress.current_track = track.display_name
                audio = await decoder.decode_path(track.path, targets, lane="batch")
        except EmbeddError as exc:
            if exc.code is Code.CANCELLED:
                return None  # shutdown: the track is redone after the restart
            return Result(item, 0.0, {}, [Failure.from_error(track.track_id, m, track.path, exc) for m in item.models])

        jobs, job_id = self.jobs, self.job.job_id
        async with self.gate.hold(alone=track.track_id in self.suspects):
            # Durable before any forward pass: if this track takes the daemon down,
            # the next start-up knows (the crash-loop guard).
            await asyncio.to_thread(jobs.begin_track, job_id, track.track_id, track.path)
            try:
                return await self._embed(item, audio, embed_sem)  # releases the audio
            finally:
                await asyncio.shield(asyncio.to_thread(jobs.end_track, job_id, track.track_id))

    async def _on_cluster(self, item: Item, cluster: RayCluster) -> Result | None:
        """The track's model work on a Ray worker: decoded and embedded there, written here as any other."""
        track = item.track
        self.progress.current_track = track.display_name
        try:
            out = await cluster.embed_track(track.track_id, track.path, track.display_name, item.models)
        except EmbeddError as exc:
            if exc.code is Code.CANCELLED:
                return None  # paused or cancelled: embedded again at resume
            raise
        failures = [Failure.from_error(track.track_id, m, track.path, e) for m, e in out.errors.items()]
        return Result(item, out.seconds, out.vectors, failures)

    async def _embed(self, item: Item, audio: DecodedAudio, embed_sem: asyncio.Semaphore) -> Result | None:
        track = item.track

        async def embed(model: str, wave: np.ndarray, seconds: float) -> AudioEmbedding:
            while True:
                async with embed_sem:
                    if self.reason is StopReason.PAUSE:  # checked holding the permit a withdrawn job released
                        raise EmbeddError(Code.CANCELLED, "the batch job paused")
                    try:
                        return await self.c.executor.embed_audio(Lane.BATCH, model, wave, seconds)
                    except EmbeddError as exc:
                        if exc.code is not Code.OVERLOADED:
                            raise
                await asyncio.sleep(0.05)  # the lane is full: backpressure, not a failure

        outcomes = await embed_decoded(audio, item.models, embed, return_exceptions=True)
        vectors: dict[str, np.ndarray] = {}
        failures: list[Failure] = []
        for model, out in outcomes.items():
            if isinstance(out, EmbeddError):
                if out.code is Code.CANCELLED:
                    return None
                failures.append(Failure.from_error(track.track_id, model, track.path, out))
            elif isinstance(out, BaseException):
                raise out
            else:
                vectors[model] = out.vector
        return Result(item, audio.duration_s, vectors, failures)

    async def _settle(self, track_id: str, outcome: Outcome) -> None:
        if self.checkpoints.add(track_id, outcome):
            await self._flush()

    async def _flush(self) -> None:
        """Record the buffered, Milvus-confirmed results in the state DB (one transaction)."""
        job, written = await asyncio.to_thread(self.checkpoints.flush_for_view)
        if job is None:
            return
        self.progress.job = self.job = job
        self.checkpoints.published(written)  # same loop turn: these tracks move from pending to the job
        self.progress.bump()

    # ---- helpers
    async def _unload(self, models: Iterable[str]) -> None:
        for model in models:
            try:
                await self.c.executor.unload(model)
            except EmbeddError as exc:
                log.warning("could not unload %s: %s", model, exc.message)

"""The daemon's batch job: at most one active job, its lifecycle and its ops.

The manager does what the ``batch_*`` ops ask (:mod:`embedd.ops.batch` is
their wire face), starts a :class:`~embedd.batch.run.Run`
for the active job (at ``batch_start``, ``batch_resume``, or at start-up for a
job a crash or a shutdown interrupted), and hands the progress view its job.
What a run does lives in :mod:`embedd.batch.run`; the plan of an incremental
job in :mod:`embedd.batch.scan`; what progress shows in :mod:`embedd.batch.progress`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable, Coroutine, Sequence

from embedd.audio import AudioDecoder
from embedd.batch.job import Job, JobStatus
from embedd.batch.progress import Progress
from embedd.batch.retry import RetryingStore
from embedd.batch.run import Collaborators, Run, StopReason, abort_rebuilds, record_status
from embedd.batch.state import JobStore
from embedd.cluster.client import RayCluster
from embedd.errors import Code, EmbeddError, Misuse
from embedd.executor import Executor
from embedd.library import NavidromeLibrary, parse_shard, require_library
from embedd.settings import Settings
from embedd.store.io import StoreIO

__all__ = ["BatchManager"]

log = logging.getLogger(__name__)


class BatchManager:
    """The daemon's batch job: at most one active job, its progress and its ops."""

    def __init__(
        self, settings: Settings, *, store_io: StoreIO, executor: Executor, library: NavidromeLibrary | None,
        cluster: RayCluster | None = None,
    ) -> None:
        self.settings = settings
        self.store_io = store_io
        self.executor = executor
        self.library = library
        self.progress = Progress()
        self.cluster = cluster
        if cluster is not None:
            self.progress.cluster_view = cluster.view
            cluster.on_waiting = self._cluster_waiting
        self.store = RetryingStore(store_io, self.progress, retry_s=settings.milvus_retry_s)
        self._jobs: JobStore | None = None
        self._collaborators: Collaborators | None = None
        self._run: Run | None = None
        self._op_lock = asyncio.Lock()
        self._startup_error: str | None = None
        self._background: set[asyncio.Task] = set()
        #: The library watcher's view (:mod:`embedd.batch.watch`), shown by ``batch_progress``; None: no watcher.
        self.watch_view: Callable[[], dict[str, Any]] | None = None

    # ---- lifecycle
    def _cluster_waiting(self, why: str | None) -> None:
        self.progress.wait("ray", why)

    async def start_up(self, decoder: AudioDecoder) -> None:
        """Open the state file and pick up an interrupted job (running resumes, cancelling finishes)."""
        try:
            self._jobs = await asyncio.to_thread(JobStore, self.settings.state_db)
            self.progress.job = await asyncio.to_thread(self._jobs.latest_job)
        except EmbeddError as exc:
            self._startup_error = exc.message
            log.error("batch jobs are unavailable: %s", exc.message)
            return
        self._collaborators = Collaborators(
            settings=self.settings, jobs=self._jobs, progress=self.progress, store_io=self.store_io,
            store=self.store, executor=self.executor, decoder=decoder, library=self.library, cluster=self.cluster,
        )  # fmt: skip
        job = self.progress.job
        if job is None or not job.active:
            return
        if job.status is JobStatus.RUNNING:
            suspects, given_up = await asyncio.to_thread(self._jobs.recover_in_flight, job.job_id)
            for failure in given_up:
                log.error("batch job %s: %s", job.job_id, failure.message)
            if suspects:
                log.warning("batch job %s: %d track(s) were in flight when the daemon died; retrying each alone",
                            job.job_id, len(suspects))
            self.progress.job = job = (await asyncio.to_thread(self._jobs.get_job, job.job_id)) or job
            log.info("resuming interrupted batch job %s (%d of %d tracks settled)", job.job_id, job.settled_tracks, job.total_tracks)
            self._launch(job, suspects)
        elif job.status is JobStatus.CANCELLING:
            self._spawn(self._finish_cancel(job))
        else:
            log.info("batch job %s is paused; batch_resume continues it", job.job_id)

    async def quiesce(self) -> None:
        """Shutdown: stop taking tracks, let in-flight ones land for a while, checkpoint; stay resumable."""
        run = self._run
        if run is not None and run.task is not None:
            run.request(StopReason.QUIESCE)
            grace = max(0.5, self.settings.shutdown_timeout_s / 2)
            done, _ = await asyncio.wait({run.task}, timeout=grace)
            if not done:
                log.info("batch job %s: abandoning in-flight tracks at shutdown", run.job.job_id)
                run.abandon()
                await asyncio.wait({run.task}, timeout=2.0)
            if self._jobs is not None:  # what was in flight was stopped by us, not crashed on
                try:
                    await asyncio.to_thread(self._jobs.stand_down, run.job.job_id)
                except EmbeddError as exc:
                    log.warning("batch job %s: could not record the clean stop: %s", run.job.job_id, exc.message)
        for task in list(self._background):
            task.cancel()

    # ---- views
    def progress_view(self) -> dict[str, Any]:
        return self.progress.view()

    def status_line(self) -> str:
        return self.progress.status_line()

    def progress_with_watch(self) -> dict[str, Any]:
        """The progress view with the library watcher's (what ``batch_progress`` answers)."""
        view = self.progress.view()
        if self.watch_view is not None:
            view["library_watch"] = self.watch_view()
        return view

    @property
    def active_job(self) -> Job | None:
        """The running, paused or cancelling job, if any (an automatic job waits for it)."""
        job = self.progress.job
        return job if job is not None and job.active else None

    async def start_auto(self, models: Sequence[str], scope: Sequence[str]) -> Job:
        """Start an automatic job over ``scope`` (the library watcher's); ``busy`` while a job is active.

        The same run as ``batch_start`` without ``clear_existing``: batch lane, the
        same settings, pause and cancel; only the tracks of ``scope`` are looked at.
        """
        async with self._op_lock:
            jobs = self._require_jobs()
            current = self.progress.job
            if current is not None and current.active:
                raise EmbeddError(Code.BUSY, f"batch job {current.job_id} is {current.status.value}.")
            job = await asyncio.to_thread(
                jobs.create_job, models=list(models), total_tracks=len(scope), trigger="auto", scope=list(scope)
            )
            self.progress.job = job
            self.progress.new_run()
            log.info("automatic batch job %s started: %d changed tracks, models %s", job.job_id, len(scope), ",".join(job.models))
            self._launch(job)
            self.progress.bump()
            return job

    async def finished_job(self, job_id: str) -> Job | None:
        """A job's row as last written (the watcher asks how its job ended)."""
        if self._jobs is None:
            return None
        current = self.progress.job
        if current is not None and current.job_id == job_id:
            return current
        return await asyncio.to_thread(self._jobs.get_job, job_id)

    # ---- ops
    def _require_jobs(self) -> JobStore:
        if self._jobs is None:
            raise EmbeddError(
                Code.UNAVAILABLE, self._startup_error or "batch jobs are unavailable: the daemon is starting or stopping."
            )
        return self._jobs

    async def start_job(self, models: Sequence[str], *, clear_existing: bool = False, shard: str | None = None) -> dict[str, Any]:
        """``batch_start``: a new job over the library (or one shard of it); ``busy`` while one is active."""
        async with self._op_lock:
            jobs = self._require_jobs()
            library = require_library(self.library)
            shard = parse_shard(shard) if shard is not None else None
            if clear_existing and shard is not None and shard.count > 1:
                # A rebuild switches the whole collection at once; one shard's switch
                # would hide (and drop) every other shard's vectors.
                raise EmbeddError(
                    Code.BAD_REQUEST,
                    "batch_start: 'clear_existing' cannot be combined with 'shard'; "
                    "run a rebuild on one daemon, or shard an incremental run",
                )
            current = self.progress.job
            if current is not None and current.active:
                raise EmbeddError(Code.BUSY, f"batch job {current.job_id} is {current.status.value}; cancel it or wait for it to finish.")
            total = await library.count(shard)
            job = await asyncio.to_thread(
                jobs.create_job,
                models=list(models),
                clear_existing=clear_existing,
                shard=str(shard) if shard is not None else None,
                total_tracks=total,
            )
            self.progress.job = job
            self.progress.new_run()
            log.info(
                "batch job %s started: %d tracks, models %s%s%s", job.job_id, total, ",".join(job.models),
                ", clear_existing" if job.clear_existing else "", f", shard {job.shard}" if job.shard else "",
            )  # fmt: skip
            self._launch(job)
            self.progress.bump()
            return {"job_id": job.job_id, "total_tracks": total}

    def watch(self, interval_s: float) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        """``batch_watch``: the progress view at every change, at most every ``interval_s``."""
        return self.progress.watch(interval_s)

    async def cancel(self) -> dict[str, Any]:
        """``batch_cancel``: the running or paused job stops; its rebuild is dropped."""
        async with self._op_lock:
            jobs = self._require_jobs()
            job = self.progress.job
            if job is None or job.status not in (JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLING):
                raise EmbeddError(Code.NOT_FOUND, "there is no running or paused batch job to cancel.")
            if job.status is not JobStatus.CANCELLING:
                self.progress.job = await asyncio.to_thread(jobs.set_status, job.job_id, JobStatus.CANCELLING)
                self.progress.bump()
            run = self._run
            if run is not None and run.job.job_id == job.job_id:
                run.request(StopReason.CANCEL)
            elif job.status is not JobStatus.CANCELLING:
                self._spawn(self._finish_cancel(self.progress.job))
            return {"status": JobStatus.CANCELLING.value}

    async def pause(self) -> dict[str, Any]:
        """``batch_pause``: the running job finishes its tracks in flight and waits; answers once it has."""
        async with self._op_lock:
            jobs = self._require_jobs()
            job = self.progress.job
            if job is None or job.status not in (JobStatus.RUNNING, JobStatus.PAUSED):
                raise EmbeddError(Code.NOT_FOUND, "there is no running batch job to pause.")
            task = None
            if job.status is JobStatus.RUNNING:
                run = self._run
                if run is not None and run.task is not None and not run.task.done():
                    run.request(StopReason.PAUSE)  # the run finishes its in-flight tracks and records PAUSED
                    task = run.task
                else:  # no run is active: record the pause ourselves
                    self.progress.job = await asyncio.to_thread(jobs.set_status, job.job_id, JobStatus.PAUSED)
                    self.progress.bump()
        # Wait outside the lock, so that a cancel can overtake a pause that is draining.
        if task is not None:
            await asyncio.wait({task})
        return self.progress.view()

    async def resume(self) -> dict[str, Any]:
        """``batch_resume``: the paused job goes on."""
        async with self._op_lock:
            jobs = self._require_jobs()
            job = self.progress.job
            if job is None or job.status not in (JobStatus.RUNNING, JobStatus.PAUSED):
                raise EmbeddError(Code.NOT_FOUND, "there is no paused batch job to resume.")
            if job.status is JobStatus.PAUSED:
                job = self.progress.job = await asyncio.to_thread(jobs.set_status, job.job_id, JobStatus.RUNNING)
                self.progress.reset_rate()
                self._launch(job)
                self.progress.bump()
            elif self._run is None:
                self._launch(job)
            return self.progress.view()

    async def failures(self, limit: int, offset: int) -> dict[str, Any]:
        """``batch_failures``: one page of the latest job's failed (track, model) pairs."""
        jobs = self._require_jobs()
        job = self.progress.job
        if job is None:
            return {"total": 0, "tracks": 0, "failures": []}
        run = self._run
        if run is not None and run.job.job_id == job.job_id:  # with those waiting for the next checkpoint
            page = await asyncio.to_thread(run.checkpoints.failure_page, limit, offset)
        else:
            page = await asyncio.to_thread(jobs.failure_page, job.job_id, limit, offset)
        return page.to_wire()

    # ---- internals
    def _launch(self, job: Job, suspects: set[str] | None = None) -> None:
        if self._collaborators is None:
            raise Misuse("a batch job launched before start-up: BatchManager.start() comes first")
        run = Run(self._collaborators, job, suspects)
        self._run = run
        self.progress.running = True

        async def drive() -> None:
            try:
                await run.main()
            finally:
                if self._run is run:
                    self._run = None
                    self.progress.running = False
                self.progress.bump()

        run.task = asyncio.get_running_loop().create_task(drive(), name=f"batch-job-{job.job_id}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_cancel(self, job: Job) -> None:
        """Cancel a job that has no run (paused, or interrupted mid-cancel): drop its rebuild."""
        try:
            if job.status is not JobStatus.CANCELLING:
                job = await asyncio.to_thread(self._require_jobs().set_status, job.job_id, JobStatus.CANCELLING)
            await abort_rebuilds(self.store, job, {})
        finally:
            await record_status(self._require_jobs(), self.progress, job.job_id, JobStatus.CANCELLED)


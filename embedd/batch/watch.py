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

This module owns the poll and the decisions (the debounce, the quiet hours,
when to start a job, settling the jobs that ended), with an injectable clock;
Navidrome's side is :mod:`embedd.batch.watch_probe` (the reads) and the
watcher's own state is :mod:`embedd.batch.watch_snapshot` (the snapshot, the
diff, pending and taken tracks). Their public names are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

from embedd.batch.job import Job, JobStatus
from embedd.batch.watch_probe import NavidromeProbe, ScanState
from embedd.batch.watch_snapshot import MASS_MISSING_MIN, MASS_MISSING_SHARE, PAGE, WATCH_FILE, Snapshot
from embedd.errors import Code, EmbeddError
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

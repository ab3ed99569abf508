"""What ``batch_progress``, ``batch_watch`` and the STATUS line show of the job.

The durable counters come from the job as last written (:class:`Job`); on top
of them a running job shows its checkpoint buffer's pending tail, the track in
hand, a recent rate and why it is stalled. Every change bumps a version and
wakes the watchers, so ``batch_watch`` waits on an event, never on a timer.

Progress rate and ETA come from a sliding window over the last
``RATE_WINDOW_S`` seconds of tracks that needed work (processed or failed), not
from the job's start, so a slow start or a run of skipped tracks does not skew
them. The window opens when the run starts (or resumes), with nothing done:
tracks finish in bursts (one forward pass covers several), so two finishing
together measure nothing, while the time since the run began does. The ETA
assumes every remaining track needs work.

Outcomes buffered for the next checkpoint count for as long as the run is under
way, whatever the status says: a cancel or pause that is flushing its last
tracks shows the same counts as the moment before, not the last checkpoint's.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, AsyncIterator, Callable, Mapping

from embedd.batch.job import FINAL_STATUSES, Job, JobStatus, Outcome

__all__ = ["Progress", "RATE_WINDOW_S"]

#: The window of the recent-rate estimate.
RATE_WINDOW_S = 30.0

_FINAL_WIRE = frozenset(s.value for s in FINAL_STATUSES) | {JobStatus.IDLE.value}
_NO_PENDING: Mapping[Outcome, int] = {o: 0 for o in Outcome}


class Progress:
    """The job as last written plus the live state of its run; the watchers' wake-up."""

    def __init__(self) -> None:
        self.job: Job | None = None  # the latest job as last written
        self.running = False  # a run of ``job`` is under way
        self._version = 0
        self._changed = asyncio.Event()
        #: The Ray cluster's view (state, model workers) when jobs run on one (``ray_address``).
        self.cluster_view: Callable[[], dict[str, Any]] | None = None
        self.new_run()

    def new_run(self) -> None:
        """A new job (or a fresh start): forget the previous one's live state."""
        self.pending: Mapping[Outcome, int] = _NO_PENDING  # outcomes buffered, not yet checkpointed
        self.current_track: str | None = None
        self.pass_index = 0
        self.passes = 1
        self.pass_seen = 0  # tracks this pass has dealt with (for multi-pass percent)
        self._waiting: dict[str, str] = {}  # why the job is stalled, per source ("milvus", "ray")
        self.rekeyed = 0  # tracks whose vectors moved to a new id in this job (no model run)
        self._worked = 0
        self._window: collections.deque[tuple[float, int]] = collections.deque([(time.monotonic(), 0)])

    # ---- the run reports
    @property
    def waiting(self) -> str | None:
        """Why the job is stalled now (each source's reason), or None."""
        return "; ".join(self._waiting.values()) or None

    def waiting_for(self, source: str) -> bool:
        return source in self._waiting

    def wait(self, source: str, why: str | None) -> None:
        """``source`` (Milvus, the Ray cluster) stalls the job for ``why``, or no longer (None); one owner each."""
        if why is None:
            if self._waiting.pop(source, None) is None:
                return
        else:
            self._waiting[source] = why
        self.bump()

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
        """The run resumes: measure from now (the paused time is no part of the rate)."""
        self._window.clear()
        self._window.append((time.monotonic(), self._worked))

    def bump(self) -> None:
        """Something changed: wake every watcher."""
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # ---- the views
    def view(self) -> dict[str, Any]:
        job = self.job
        if job is None:
            return {
                "job_id": None, "status": JobStatus.IDLE.value, "models": [], "total_tracks": 0,
                "processed_tracks": 0, "failed_tracks": 0, "skipped_tracks": 0, "current_track": None,
                "progress_percent": 0.0, "started_at": None, "estimated_completion": None, "rate_tracks_per_s": None,
                "rekeyed_tracks": 0, "trigger": None, "waiting": None, "cluster": self._cluster(),
            }  # fmt: skip
        running = job.status is JobStatus.RUNNING and self.running
        pending = self.pending if self.running else _NO_PENDING
        processed = job.processed_tracks + pending[Outcome.PROCESSED]
        failed = job.failed_tracks + pending[Outcome.FAILED]
        skipped = job.skipped_tracks + pending[Outcome.SKIPPED]
        settled = processed + failed + skipped
        total = job.total_tracks
        if job.status in (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS):
            percent = 100.0
        elif total <= 0:
            percent = 0.0
        elif running and self.passes > 1:
            percent = 100.0 * (self.pass_index * total + min(self.pass_seen, total)) / (self.passes * total)
        else:
            percent = 100.0 * settled / total
        rate = self.rate() if running else None
        eta = None
        if running and rate and rate > 0:
            remaining = max(0, total - settled)
            if self.passes > 1:
                remaining = max(0, (self.passes - self.pass_index) * total - self.pass_seen)
            eta = time.time() + remaining / rate
        return {
            "job_id": job.job_id,
            "status": job.status.value,
            "models": list(job.models),
            "total_tracks": total,
            "processed_tracks": processed,
            "failed_tracks": failed,
            "skipped_tracks": skipped,
            "current_track": self.current_track if running else None,
            "progress_percent": round(min(100.0, percent), 3),
            "started_at": job.started_at,
            "estimated_completion": eta,
            "rate_tracks_per_s": round(rate, 4) if rate is not None else None,
            "rekeyed_tracks": self.rekeyed,
            "trigger": job.trigger,  # "manual" (batch_start) or "auto" (the library watcher)
            "waiting": self.waiting if running else None,  # why a running job is stalled (Milvus unreachable)
            "cluster": self._cluster(),  # the Ray cluster and its model workers (None: models run in the daemon)
        }

    def _cluster(self) -> dict[str, Any] | None:
        return self.cluster_view() if self.cluster_view is not None else None

    def status_line(self) -> str:
        p = self.view()
        if p["job_id"] is None:
            return "idle"
        line = f"{p['status']} {p['processed_tracks'] + p['failed_tracks'] + p['skipped_tracks']}/{p['total_tracks']} {p['progress_percent']:.1f}%"
        if p["rate_tracks_per_s"]:
            line += f" {p['rate_tracks_per_s']:.1f} tracks/s"
        if p["estimated_completion"]:
            line += f" ETA {_duration(p['estimated_completion'] - time.time())}"
        if p["failed_tracks"]:
            line += f" ({p['failed_tracks']} failed)"
        if self.waiting and p["status"] == JobStatus.RUNNING.value:
            line += f"; {self.waiting}"
        return line

    async def watch(self, interval_s: float) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        """``batch_watch``: the view now, then each change, at most one per ``interval_s``, until the job ends."""
        last = self.view()
        seen = self._version
        more = last["job_id"] is not None and last["status"] not in _FINAL_WIRE
        yield last, more
        sent_at = time.monotonic()
        while more:
            while self._version == seen:
                await self._changed.wait()
            wait = interval_s - (time.monotonic() - sent_at)
            if wait > 0:
                await asyncio.sleep(wait)
            seen = self._version
            now = self.view()
            more = now["status"] not in _FINAL_WIRE
            if now != last or not more:
                yield now, more
                sent_at = time.monotonic()
                last = now


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

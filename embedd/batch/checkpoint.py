"""The batch run's write buffer in front of :class:`~embedd.batch.state.JobStore`.

It exists so that the event loop never waits on the state file per track:
results are buffered in memory (no I/O) and written as one
:meth:`~embedd.batch.state.JobStore.checkpoint` transaction every ``every``
tracks, off the loop. It owns what is confirmed but not yet written: the
stored (track, model) pairs, the failures and the tracks' outcomes, the
count of those outcomes that progress adds to the durable counters, and the
hand-over that keeps a live view from counting a written track twice or not
at all.
"""

from __future__ import annotations

import threading
from typing import Iterable

from embedd.batch.job import Failure, FailurePage, Job, Outcome
from embedd.batch.state import JobStore

__all__ = ["Checkpointer"]


class Checkpointer:
    """Buffers confirmed per-track results and writes them every ``every`` tracks.

    The batch run calls :meth:`add` (no I/O, safe on the event loop) once a
    track's rows are confirmed by Milvus, or once it failed or was skipped;
    when :meth:`add` returns True a checkpoint is due and the caller runs
    :meth:`flush` off the loop. Pause, cancel and the job's end call
    :meth:`flush` too, so nothing confirmed is left unrecorded. A track of a
    pass that is not the job's last (``outcome=None``) records its stored
    models only; its outcome comes with the last pass.
    """

    def __init__(self, store: JobStore, job_id: str, *, every: int = 100) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.store = store
        self.job_id = job_id
        self.every = every
        self._lock = threading.Lock()
        self._done: list[tuple[str, str]] = []
        self._failures: list[Failure] = []
        self._finished: list[tuple[str, Outcome]] = []
        self._tracks = 0  # tracks added since the last flush, with or without an outcome
        # Held for a whole flush, so that failure_page never sees a failure both buffered and written.
        self._flushing = threading.Lock()
        #: Outcomes buffered and not yet written, per outcome (what progress adds to the durable counters).
        self.pending_outcomes: dict[Outcome, int] = {o: 0 for o in Outcome}

    @property
    def pending(self) -> int:
        """Tracks whose outcome waits for the next checkpoint."""
        return len(self._finished)

    def add(
        self,
        track_id: str,
        outcome: Outcome | str | None,
        *,
        done_models: Iterable[str] = (),
        failures: Iterable[Failure] = (),
    ) -> bool:
        with self._lock:
            self._done.extend((track_id, m) for m in done_models)
            self._failures.extend(failures)
            if outcome is not None:
                outcome = Outcome(outcome)
                self._finished.append((track_id, outcome))
                self.pending_outcomes[outcome] += 1
            self._tracks += 1
            return self._tracks >= self.every

    def flush(self) -> Job | None:
        """Write what is buffered (blocking); None when there was nothing. The counts leave
        ``pending_outcomes`` at once (see :meth:`flush_for_view` for a live view)."""
        job, written = self.flush_for_view()
        self.published(written)
        return job

    def flush_for_view(self) -> tuple[Job | None, list[Outcome]]:
        """Write what is buffered (blocking): the job as written and the outcomes it took from
        the buffer, which stay in ``pending_outcomes`` until :meth:`published` is given them."""
        with self._flushing:
            return self._flush()

    def failure_page(self, limit: int = 100, offset: int = 0) -> FailurePage:
        """``batch_failures`` while the job runs (blocking): the recorded failures, then the buffered ones."""
        with self._flushing:
            with self._lock:
                pending = list(self._failures)
            return self.store.failure_page(self.job_id, limit, offset, pending)

    def _flush(self) -> tuple[Job | None, list[Outcome]]:
        with self._lock:
            done, failures, finished = self._done, self._failures, self._finished
            self._done, self._failures, self._finished = [], [], []
            tracks, self._tracks = self._tracks, 0
        if not (done or failures or finished):
            return None, []
        try:
            job = self.store.checkpoint(self.job_id, done=done, failures=failures, finished=finished)
        except BaseException:
            with self._lock:  # keep them for the next try (e.g. the disk was full)
                self._done[:0], self._failures[:0], self._finished[:0] = done, failures, finished
                self._tracks += tracks
            raise
        return job, [outcome for _, outcome in finished]

    def published(self, written: Iterable[Outcome]) -> None:
        """The view took the job a flush wrote: stop counting that flush's outcomes as pending.

        The batch run calls it on the event loop in the same turn as the view takes the
        new job, so a view never counts the written tracks twice or not at all.
        """
        with self._lock:
            for outcome in written:
                self.pending_outcomes[outcome] -= 1

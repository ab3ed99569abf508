"""The batch job's vocabulary: its statuses, the moves between them, and the
values a job's records are made of.

It exists so that the code that only reads or reports a job (progress, the
library watcher, the job's ending) does not have to depend on the SQLite file
that stores it (:mod:`embedd.batch.state`): these are plain values, with no
I/O. It owns the contract's job statuses and which of them may follow which
(:func:`can_become`), a track's :class:`Outcome`, a failed (track, model)
pair (:class:`Failure`) and a page of them (:class:`FailurePage`), and the
:class:`Job` snapshot.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

from embedd.errors import EmbeddError

__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "Failure",
    "FailurePage",
    "Job",
    "JobStatus",
    "Outcome",
    "can_become",
]


class JobStatus(str, enum.Enum):
    """The contract's job statuses; ``idle`` is never stored (it means "no job")."""

    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = frozenset({JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLING})
FINAL_STATUSES = frozenset(
    {JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.FAILED, JobStatus.CANCELLED}
)

_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.RUNNING: frozenset(
        {JobStatus.PAUSED, JobStatus.CANCELLING, JobStatus.CANCELLED, JobStatus.FAILED}
        | {JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS}
    ),
    JobStatus.PAUSED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # A job may reach its end while a cancel is still on its way.
    JobStatus.CANCELLING: frozenset(
        {JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS}
    ),
}


def can_become(current: JobStatus, status: JobStatus) -> bool:
    """Whether a job that is ``current`` may move to ``status`` (a final status moves nowhere)."""
    return status in _TRANSITIONS.get(current, frozenset())


class Outcome(str, enum.Enum):
    """What became of one track in a job; each track counts in exactly one counter."""

    PROCESSED = "processed"  # every selected model's vector stored
    FAILED = "failed"  # at least one model failed (its failure is listed)
    SKIPPED = "skipped"  # nothing to do (already up to date)


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """One failed (track, model), as ``batch_failures`` lists it."""

    track_id: str
    model: str
    code: str  # a contract error code
    message: str
    path: str = ""

    @classmethod
    def from_error(cls, track_id: str, model: str, path: str, error: EmbeddError) -> "Failure":
        return cls(track_id, model, error.code.value, error.message, path)

    def to_wire(self) -> dict[str, str]:
        return {"track_id": self.track_id, "path": self.path, "model": self.model, "code": self.code, "message": self.message}


@dataclasses.dataclass(frozen=True, slots=True)
class FailurePage:
    """``batch_failures``: one page of failed (track, model) pairs, ``total`` of them over ``tracks`` tracks."""

    total: int
    tracks: int
    failures: list[Failure]

    def to_wire(self) -> dict[str, Any]:
        return {"total": self.total, "tracks": self.tracks, "failures": [f.to_wire() for f in self.failures]}


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job's row."""

    job_id: str
    models: tuple[str, ...]
    clear_existing: bool
    shard: str | None
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    total_tracks: int
    processed_tracks: int
    failed_tracks: int
    skipped_tracks: int
    checkpoints: int
    last_checkpoint_at: float | None
    rebuild: Mapping[str, Any] | None
    error: str | None
    #: "manual" (batch_start) or "auto" (the library watcher, :mod:`embedd.batch.watch`)
    trigger: str = "manual"
    #: an automatic job's tracks are its scope (:meth:`~embedd.batch.state.JobStore.scope_page`), not the whole library
    scoped: bool = False

    @property
    def settled_tracks(self) -> int:
        return self.processed_tracks + self.failed_tracks + self.skipped_tracks

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

"""The library job's ops: ``batch_start``, ``batch_progress``, ``batch_watch``, ``batch_pause``,
``batch_resume``, ``batch_cancel`` and ``batch_failures``.

One module for one use case (the job over Navidrome's library): what each op
does is :class:`embedd.batch.manager.BatchManager`'s; here is its wire face.
None of them is ever refused by admission: they are the operator's commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar

import msgspec

from embedd.models import DEFAULT_JOB_MODELS
from embedd.ops.op import Op, Result
from embedd.ops.views import ClusterStatus, LibraryWatchStatus
from embedd.protocol import Args, ModelName, NoArgs, check_models

if TYPE_CHECKING:
    from embedd.service import Service


class BatchStartArgs(Args):
    models: Annotated[list[ModelName], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_JOB_MODELS)
    )
    clear_existing: bool = False
    shard: str | None = None

    def check(self) -> None:
        check_models(self.models)


class BatchWatchArgs(Args):
    streaming: ClassVar[bool] = True
    interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=3600)] = 1.0


class BatchFailuresArgs(Args):
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class BatchStartResult(Result):
    job_id: str
    total_tracks: int


class Progress(Result):
    """A job's progress (also ``status``'s ``batch``); the idle view before any job has nulls and zeros."""

    job_id: str | None
    status: str
    models: list[str]
    total_tracks: int
    processed_tracks: int
    failed_tracks: int
    skipped_tracks: int
    current_track: str | None
    progress_percent: float
    started_at: float | None
    estimated_completion: float | None
    rate_tracks_per_s: float | None
    rekeyed_tracks: int
    trigger: str | None  # "manual" (batch_start) or "auto" (the library watcher)
    waiting: str | None  # why a running job is stalled (Milvus, the Ray cluster)
    cluster: ClusterStatus | None  # the Ray cluster and its workers (ray_address); None in process
    library_watch: LibraryWatchStatus | msgspec.UnsetType = msgspec.UNSET  # batch_progress only, with a watcher


class BatchCancelResult(Result):
    status: str


class Failure(Result):
    track_id: str
    path: str
    model: str
    code: str
    message: str


class BatchFailuresResult(Result):
    total: int  # failed (track, model) pairs
    tracks: int  # distinct tracks among them
    failures: list[Failure]


async def batch_start(service: Service, args: BatchStartArgs) -> BatchStartResult:
    """Start a job: new or changed tracks (or all, ``clear_existing``), optionally one shard."""
    started = await service.batch.start_job(args.models, clear_existing=args.clear_existing, shard=args.shard)
    return BatchStartResult.of(started)


def batch_progress(service: Service, _: NoArgs) -> Progress:
    """The latest job's progress and the library watcher, answered at once."""
    return Progress.of(service.batch.progress_with_watch())


async def batch_watch(service: Service, args: BatchWatchArgs):
    """The progress at every change (at most every ``interval_s``) until the job ends: a stream."""
    frames = service.batch.watch(args.interval_s)
    try:
        async for view, more in frames:
            yield Progress.of(view), more
    finally:
        await frames.aclose()


async def batch_pause(service: Service, _: NoArgs) -> Progress:
    """Pause the running job after its tracks in flight; answers once they are written."""
    return Progress.of(await service.batch.pause())


async def batch_resume(service: Service, _: NoArgs) -> Progress:
    """Resume the paused job."""
    return Progress.of(await service.batch.resume())


async def batch_cancel(service: Service, _: NoArgs) -> BatchCancelResult:
    """Cancel the running or paused job (a rebuild's new set is dropped, the live one kept)."""
    return BatchCancelResult.of(await service.batch.cancel())


async def batch_failures(service: Service, args: BatchFailuresArgs) -> BatchFailuresResult:
    """One page of the latest job's failed (track, model) pairs, with their contract codes."""
    return BatchFailuresResult.of(await service.batch.failures(args.limit, args.offset))


OPS = (
    Op("batch_start", BatchStartArgs, BatchStartResult, batch_start),
    Op("batch_progress", NoArgs, Progress, batch_progress, inline=True),
    Op("batch_watch", BatchWatchArgs, Progress, batch_watch, streaming=True),
    Op("batch_pause", NoArgs, Progress, batch_pause),
    Op("batch_resume", NoArgs, Progress, batch_resume),
    Op("batch_cancel", NoArgs, BatchCancelResult, batch_cancel),
    Op("batch_failures", BatchFailuresArgs, BatchFailuresResult, batch_failures),
)

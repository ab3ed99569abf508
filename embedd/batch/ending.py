"""How a batch job ends: its rebuilds switched in or dropped, public names taken over, its status recorded."""

from __future__ import annotations

import asyncio
import logging

from embedd.batch.job import Job, JobStatus
from embedd.batch.progress import Progress
from embedd.batch.retry import JobFailed, RetryingStore
from embedd.batch.state import JobStore
from embedd.errors import EmbeddError
from embedd.library import Shard
from embedd.store import RebuildHandle, VectorStore

__all__ = ["abort_rebuilds", "adopt_public_names", "commit_rebuilds", "record_status"]

log = logging.getLogger(__name__)


async def commit_rebuilds(store: RetryingStore, jobs: JobStore, job: Job, handles: dict[str, RebuildHandle]) -> None:
    """Switch each rebuilt collection in, losing nothing.

    A track that failed this time keeps its old vector (copied across before
    the switch). A model whose rebuild produced no vector at all — the music
    mount was gone, the model could not load — is not switched in: the job
    fails and the old set stays live.
    """
    if not handles:
        return
    job_id = job.job_id
    for model in handles:
        if job.total_tracks and not await asyncio.to_thread(jobs.done_count, job_id, model):
            raise JobFailed(
                f"the rebuild of {model} stored no vector at all, so it was not switched in; "
                "the old vectors stay live (see batch_failures)"
            )
    failed: dict[str, list[str]] = {}
    offset = 0
    while True:
        page = (await asyncio.to_thread(jobs.failure_page, job_id, 1000, offset)).failures
        if not page:
            break
        offset += len(page)
        for failure in page:
            failed.setdefault(failure.model, []).append(failure.track_id)
    for model, handle in handles.items():
        if failed.get(model):
            kept = await store(
                lambda s, h=handle, ids=failed[model]: s.carry_over(h, ids), f"keep {model}'s old vectors"
            )
            log.info("batch job %s: %d failed tracks keep their old %s vectors", job_id, kept, model)
        # Always commit: it is idempotent, and after a crash between the alias switch
        # and the clean-up it is what drops the old collections.
        await store(lambda s, h=handle: s.commit_rebuild(h), "switch the rebuilt collection")


async def adopt_public_names(store: RetryingStore, job: Job, shard: Shard | None) -> None:
    """An incremental job over the whole library completed: embedd's sets are complete.

    Where the original system's collection still holds a model's public name,
    embedd's set takes it over now (the old one is kept as ``<public>__legacy``).
    Not after a shard's job (the other shards may not be done) nor for a model
    with no vector stored (a music folder that was gone): the old data stays.
    A rebuild takes the names at its commit instead.
    """
    if job.clear_existing or (shard is not None and shard.count > 1):
        return

    def adopt(vs: VectorStore, model: str) -> str | None:
        if not vs.pending(model) or vs.count(model) == 0:
            return None
        return vs.adopt_public_name(model)

    for model in job.models:
        legacy = await store(lambda s, m=model: adopt(s, m), f"give {model}'s public name to embedd's set")
        if legacy is not None:
            log.warning("batch job %s: %s's public name now serves embedd's vectors; the old collection is kept as %s "
                        "(embedd drop-legacy removes it)", job.job_id, model, legacy)  # fmt: skip


async def record_status(jobs: JobStore, progress: Progress, job_id: str, status: JobStatus, *, error: str | None = None) -> None:
    """Write the job's new status (a failure to write is logged: the job's outcome stands)."""
    try:
        progress.job = await asyncio.to_thread(jobs.set_status, job_id, status, error=error)
    except EmbeddError as exc:
        log.error("batch job %s: cannot record status %s: %s", job_id, status.value, exc.message)
    progress.bump()


async def abort_rebuilds(store: RetryingStore, job: Job, handles: dict[str, RebuildHandle]) -> None:
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
            await store(lambda s, h=handle: s.abort_rebuild(h), f"drop {handle.physical}")
        except (JobFailed, EmbeddError) as exc:
            msg = exc.message
            log.warning("cancelled job %s: rebuild collection %s left for a later rebuild to drop (%s)", job.job_id, handle.physical, msg)

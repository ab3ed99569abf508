"""The batch run's writer: results to Milvus in batches, then to the checkpoint buffer.

Only after Milvus acknowledged a track's rows is the track given to the
:class:`~embedd.batch.checkpoint.Checkpointer`; one row Milvus refuses fails that
(track, model) alone, not its neighbours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable

import numpy as np

from embedd.batch.checkpoint import Checkpointer
from embedd.batch.job import Failure, Outcome
from embedd.batch.progress import Progress
from embedd.batch.retry import JobFailed, RetryingStore
from embedd.errors import EmbeddError
from embedd.library import Track
from embedd.settings import Settings
from embedd.store import RebuildHandle, TrackRow

__all__ = ["WRITE_BATCH", "Item", "Result", "Writer"]

log = logging.getLogger(__name__)

#: Tracks per upsert call per model.
WRITE_BATCH = 32
#: A partial write batch is written after this long without new results.
WRITE_LINGER_S = 0.25


@dataclasses.dataclass(slots=True)
class Item:
    track: Track
    models: tuple[str, ...]  # what this pass must embed
    prior_failed: bool  # an earlier pass (or run) failed a model of this track
    prior_done: bool  # an earlier pass (or run) stored a model of this track


@dataclasses.dataclass(slots=True)
class Result:
    item: Item
    duration_s: float
    vectors: dict[str, np.ndarray]
    failures: list[Failure]


class Writer:
    """Drains ``write_q`` for one pass; ``flush`` is the run's checkpoint write."""

    def __init__(
        self,
        store: RetryingStore,
        settings: Settings,
        handles: dict[str, RebuildHandle],
        checkpoints: Checkpointer,
        progress: Progress,
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.settings = settings
        self.handles = handles
        self.checkpoints = checkpoints
        self.progress = progress
        self._flush = flush

    async def run(self, write_q: asyncio.Queue[Result | None], final: bool) -> None:
        """Write results in batches of up to ``WRITE_BATCH`` tracks until the queue says ``None``."""
        batch: list[Result] = []
        # One getter task lives across timeouts: cancelling a Queue.get() on timeout can lose an item.
        getter: asyncio.Task | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(write_q.get())
                done, _ = await asyncio.wait({getter}, timeout=WRITE_LINGER_S if batch else None)
                item: Result | None | bool = False
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

    async def _write(self, batch: list[Result], final: bool) -> None:
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
                        model_id=s.model_id(model),
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
                await self.store(lambda st, m=model, rs=model_rows: st.upsert(m, rs, target=target), f"store {model} vectors")
            except JobFailed:
                raise
            except EmbeddError:
                # One bad row (a vector Milvus refuses) must not sink its neighbours: find it.
                for row in model_rows:
                    try:
                        await self.store(lambda st, m=model, r=row: st.upsert(m, [r], target=target), f"store {model} vectors")
                    except EmbeddError as exc:
                        rejected[(row.track_id, model)] = exc
        log.debug("batch job wrote %d tracks in %.3f s", len(batch), time.perf_counter() - t0)
        due = False
        live = self.progress
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
            live.pass_seen += 1
            live.worked()
            outcome = None
            if final:
                outcome = Outcome.FAILED if failures or r.item.prior_failed else Outcome.PROCESSED
            due = self.checkpoints.add(t.track_id, outcome, done_models=done_models, failures=failures) or due
        if due:
            await self._flush()
        live.bump()

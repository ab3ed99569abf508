"""The work submitted to the executor: jobs and passes, their order, submitting and cancelling.

A :class:`_Job` is one request's place in a lane's queue with the future its
caller awaits; a :class:`_Pass` is one forward pass a lane thread ran. Every
event of both takes its number from the one counter ``_seq``, so ``status``
can show what happened before what. :class:`Submitting` is the event loop's
side: queueing a job (or refusing it, ``overloaded``), and withdrawing work
nobody waits for any more: a cancelled request, a paused batch job. The lane
threads' side of a cancel (stopping at the next pass boundary) is in
:mod:`embedd.executor.threads`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Any, Callable, TypeVar

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.executor.lanes import Lane
from embedd.executor.registry import ModelRegistry
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding, TextEmbedding

T = TypeVar("T")

_seq = itertools.count(1)  # one order for every event of the executor: what happened before what


@dataclasses.dataclass(eq=False, slots=True)
class _Job:
    lane: Lane
    future: asyncio.Future
    fn: Callable[[ModelRegistry], Any] | None = None
    model: str | None = None  # the model this job runs (audio and text jobs)
    waveform: np.ndarray | None = None  # set for coalescable audio work
    kind: str = "call"
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    queued_seq: int = dataclasses.field(default_factory=lambda: next(_seq))
    started_seq: int | None = None
    abandoned: bool = False  # nobody waits for the answer any more


@dataclasses.dataclass(slots=True)
class _Pass:
    """One forward pass, from its start (in flight) to its end."""

    lane: str
    model: str
    items: int
    started_at: float
    started_seq: int
    ended_seq: int | None = None
    seconds: float | None = None

    def to_wire(self, now: float) -> dict[str, Any]:
        return {
            "lane": self.lane,
            "model": self.model,
            "items": self.items,
            "age_s": round(now - self.started_at, 3) if self.ended_seq is None else None,
            "seconds": round(self.seconds, 3) if self.seconds is not None else None,
            "started_seq": self.started_seq,
            "ended_seq": self.ended_seq,
        }


class Submitting:
    """The executor's submitting side (event loop): jobs in, answers out, work withdrawn.

    Mixed into :class:`~embedd.executor.core.Executor`, whose ``__init__`` makes the
    state these methods share (``_cond``, ``_queues``, ``_running``, ``stats`` ...).
    """

    async def call(self, lane: Lane, fn: Callable[[ModelRegistry], T], *, model: str | None = None) -> T:
        """Run ``fn(registry)`` on the lane's thread and return its result.

        With ``model``, the model is held (loaded, never unloaded) while ``fn`` runs.
        """
        job = _Job(lane, asyncio.get_running_loop().create_future(), fn=fn, model=model)
        return await self._submit(job)

    async def embed_audio(
        self, lane: Lane, model: str, waveform: np.ndarray, seconds: float | None = None
    ) -> AudioEmbedding:
        """Embed one track; coalesced with other queued tracks of the same model.

        ``seconds``: the track's duration, for the audio-seconds metric (a model that
        takes the file's own rate, Music2Latent, gets samples at a rate only the
        decoder knows); without it, the samples at the model's catalogue rate.
        """
        job = _Job(lane, asyncio.get_running_loop().create_future(), model=model, waveform=waveform, kind="audio")
        embedding = await self._submit(job)
        self.audio_seconds[model] += seconds if seconds is not None else waveform.shape[-1] / CATALOG[model].sample_rate
        return embedding

    async def embed_text(self, lane: Lane, model: str, text: str) -> TextEmbedding:
        job = _Job(
            lane,
            asyncio.get_running_loop().create_future(),
            fn=lambda registry: registry.get(model).embed_text(text),
            model=model,
            kind="text",
        )
        return await self._submit(job)

    async def unload(self, name: str | None = None) -> list[str]:
        def _unload(registry: ModelRegistry) -> list[str]:
            registry.forget_failures(name)
            if name is None:
                return registry.unload_all()
            return [name] if registry.unload(name) else []

        return await self.call(Lane.CONTROL, _unload)

    def withdraw(self, lane: Lane) -> int:
        """Drop the lane's work (a paused job): queued jobs answer ``cancelled`` now, the call in
        flight stops at its next pass boundary. Event loop side; returns the jobs withdrawn."""
        with self._cond:
            queued = list(self._queues[lane])
            self._queues[lane].clear()
            label = "batch" if lane is Lane.BATCH else "interactive"
            running = [job for job in self._running.get(label, []) if job.lane is lane]
            for job in queued + running:
                job.abandoned = True
            self.stats[label].dropped += len(queued)
            self._cond.notify_all()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(EmbeddError(Code.CANCELLED, "the work was withdrawn (the batch job paused)"))
        return len(queued) + len(running)

    async def _submit(self, job: _Job) -> Any:
        with self._cond:
            if self._failed:
                raise EmbeddError(Code.UNAVAILABLE, self._failed)
            if self._stopping:
                raise EmbeddError(Code.CANCELLED, "the daemon is shutting down")
            queue = self._queues[job.lane]
            limit = self._limits.get(job.lane)
            if limit is not None and len(queue) >= limit:
                self.stats["batch" if job.lane is Lane.BATCH else "interactive"].overloaded += 1
                raise EmbeddError(
                    Code.OVERLOADED,
                    f"the {job.lane.label} queue is full ({limit} waiting); retry later",
                )
            queue.append(job)
            self._cond.notify_all()
        try:
            return await job.future
        except asyncio.CancelledError:
            # Nobody waits any more: drop the job if it has not started; a running call
            # whose every job was abandoned stops at its next pass boundary.
            with self._cond:
                job.abandoned = True
                try:
                    self._queues[job.lane].remove(job)
                    self.stats["batch" if job.lane is Lane.BATCH else "interactive"].dropped += 1
                except ValueError:
                    pass
                self._cond.notify_all()
            raise

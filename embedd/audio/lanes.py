"""Which decode goes to a worker next: interactive first, batch held in the daemon until a worker is free.

A process pool takes whatever it is given into its own queue, in order, and a
job in there can no longer be overtaken, nor always withdrawn. So the decoder
gives the pool no more decodes than it has workers: the rest wait here, in
one queue per lane. When a worker frees, the oldest interactive decode goes
first, then the oldest batch one. A decode whose awaiting task is cancelled
(a batch job cancelled, a client gone) leaves its queue at once and never
reaches a worker.

Two bounds decide when a decode may start: decodes in the workers (at most
one per worker), and decodes started but not yet admitted to the budget of
decoded audio held (their results wait in /dev/shm, which is memory too).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Literal

from embedd.errors import Code, EmbeddError

__all__ = ["BATCH", "INTERACTIVE", "LANES", "DecodeLane", "DecodeLanes", "check_lane"]

DecodeLane = Literal["interactive", "batch"]
INTERACTIVE: DecodeLane = "interactive"
BATCH: DecodeLane = "batch"
LANES: tuple[DecodeLane, ...] = (INTERACTIVE, BATCH)  # in the order they are served


def check_lane(lane: Any) -> DecodeLane:
    """The lane named by ``lane`` ("interactive" or "batch", or an executor ``Lane`` of those names)."""
    name = getattr(lane, "label", lane)  # embedd.executor.Lane.BATCH -> "batch"
    if name not in LANES:
        raise ValueError(f"unknown decode lane {lane!r}; use 'interactive' or 'batch'")
    return name


class _Waiter:
    __slots__ = ("future", "queued_at")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.queued_at = time.monotonic()


class DecodeLanes:
    """The decodes waiting for a worker, per lane (event loop only).

    ``workers``: decodes running at once. ``unadmitted``: decodes started and not
    yet admitted to the held-audio budget (running, or their results waiting).
    """

    def __init__(self, workers: int, unadmitted: int) -> None:
        self.workers = max(1, int(workers))
        self.unadmitted_limit = max(self.workers, int(unadmitted))
        self._queues: dict[DecodeLane, collections.deque[_Waiter]] = {lane: collections.deque() for lane in LANES}
        self._running: dict[DecodeLane, int] = {lane: 0 for lane in LANES}
        self._unadmitted = 0
        self.withdrawn = 0  # queued decodes whose caller gave up before a worker took them

    @property
    def running(self) -> int:
        return sum(self._running.values())

    def _free(self) -> bool:
        return self.running < self.workers and self._unadmitted < self.unadmitted_limit

    async def start(self, lane: DecodeLane) -> None:
        """Wait for this decode's turn; then it counts as running (``finished``) and unadmitted (``admitted``)."""
        ahead = self._queues[INTERACTIVE] or (lane == BATCH and self._queues[BATCH])
        if self._free() and not ahead:
            self._take(lane)
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        self._queues[lane].append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Its turn came together with the cancel: hand the turn on.
                self.finished(lane)
                self.admitted()
            else:
                try:
                    self._queues[lane].remove(waiter)
                except ValueError:  # already skipped by a dispatch that saw it cancelled
                    pass
                self.withdrawn += 1
            raise

    def _take(self, lane: DecodeLane) -> None:
        self._running[lane] += 1
        self._unadmitted += 1

    def finished(self, lane: DecodeLane) -> None:
        """A worker is done with a decode of ``lane`` (result, error or cancelled before it ran)."""
        self._running[lane] = max(0, self._running[lane] - 1)
        self._dispatch()

    def admitted(self) -> None:
        """A started decode's result was admitted to the held budget, or dropped."""
        self._unadmitted = max(0, self._unadmitted - 1)
        self._dispatch()

    def _dispatch(self) -> None:
        for lane in LANES:
            queue = self._queues[lane]
            while queue and self._free():
                waiter = queue.popleft()
                if waiter.future.done():  # cancelled; its task removes nothing more
                    continue
                self._take(lane)
                waiter.future.set_result(None)

    def withdraw(self, lane: DecodeLane) -> int:
        """Answer every decode of ``lane`` still waiting for a worker ``cancelled`` (a paused job); how many."""
        queue, self._queues[lane] = self._queues[lane], collections.deque()
        n = 0
        for waiter in queue:
            if not waiter.future.done():
                waiter.future.set_exception(EmbeddError(Code.CANCELLED, "the decode was withdrawn (the batch job paused)"))
                n += 1
        self.withdrawn += n
        return n

    def view(self) -> dict[str, dict[str, Any]]:
        """Per lane: decodes waiting for a worker, the oldest one's wait, decodes in the workers now."""
        now = time.monotonic()
        view = {}
        for lane in LANES:
            waiting = [w for w in self._queues[lane] if not w.future.done()]
            view[lane] = {
                "depth": len(waiting),
                "oldest_wait_s": round(now - waiting[0].queued_at, 3) if waiting else None,
                "running": self._running[lane],
            }
        return view

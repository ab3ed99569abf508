"""The :class:`Executor` itself: the state both lane threads and the event loop share, start and stop.

Its ``__init__`` makes every piece of shared state, the one condition
(``_cond``) that guards it included; the methods that use it are mixed in
along their concerns: :class:`~embedd.executor.jobs.Submitting` (the event
loop's side: jobs in, cancelled, withdrawn),
:class:`~embedd.executor.status.StatusViews` (what status reads) and
:class:`~embedd.executor.threads.LaneThreads` (the two threads). The design
is in :mod:`embedd.executor`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from embedd.errors import Code, EmbeddError
from embedd.executor.jobs import Submitting, _Job, _Pass
from embedd.executor.lanes import Lane, LaneSettings, LaneStats
from embedd.executor.registry import ModelRegistry
from embedd.executor.status import RECENT, StatusViews
from embedd.executor.threads import LaneThreads


class Executor(StatusViews, Submitting, LaneThreads):
    """The actor: jobs in through lanes, one reply future per job, two threads doing the work."""

    def __init__(
        self,
        registry_builder: Callable[[str], ModelRegistry],
        *,
        device: str,
        queue_limits: Mapping[Lane, int],
        idle_check_s: float = 5.0,
        lanes: LaneSettings = LaneSettings(),
    ) -> None:
        self._registry_builder = registry_builder
        self._requested_device = device
        self.device = device  # "auto" until the thread has resolved it
        self._limits = dict(queue_limits)
        self._idle_check_s = idle_check_s
        self.lanes = lanes
        self._queues: dict[Lane, collections.deque[_Job]] = {lane: collections.deque() for lane in Lane}
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._registry: ModelRegistry | None = None
        self._failed: str | None = None
        self._ready = threading.Event()  # set once the registry exists (or the start failed)
        self._described = threading.Event()  # set once the thread knows every model's dims
        self._pins: collections.Counter[str] = collections.Counter()  # models of the running batch job
        self._interactive_running = 0  # jobs the interactive thread is inside (guarded by _cond)
        self._running: dict[str, list[_Job]] = {}  # lane thread -> the jobs of the call it runs
        self._in_flight: dict[str, _Pass] = {}  # lane thread -> its pass in flight
        self._yielding: set[str] = set()  # lane threads waiting at a pass boundary for interactive work
        self._recent_passes: collections.deque[_Pass] = collections.deque(maxlen=RECENT)
        self._recent_jobs: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.stats: dict[str, LaneStats] = {"interactive": LaneStats(), "batch": LaneStats()}
        self.threads_of: dict[str, int] = {}  # lane thread -> compute threads it was given
        #: Seconds of audio embedded per model (requests and batch alike), for /metrics.
        self.audio_seconds: collections.Counter[str] = collections.Counter()

    # -- lifecycle (event loop side) -----------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("Executor.start() called twice")
        for name, target in (("embedd-interactive", self._run_interactive), ("embedd-batch", self._run_batch)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is queued, let the running jobs finish (their passes stop early), unload every model."""
        if self._registry is not None:
            self._registry.interrupt.set()
        with self._cond:
            self._stopping = True
            dropped = self._take_queued()
        self._ready.set()
        for job in dropped:
            if not job.future.done():
                job.future.set_exception(EmbeddError(Code.CANCELLED, "the daemon is shutting down"))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))

    def _take_queued(self) -> list[_Job]:
        """Every queued job, the queues emptied and the threads woken; the caller holds ``_cond``."""
        jobs = [job for queue in self._queues.values() for job in queue]
        for queue in self._queues.values():
            queue.clear()
        self._cond.notify_all()
        return jobs

    # -- the registry's pins (event loop side) ----------------------------------------
    def busy_reason(self, name: str) -> str | None:
        """Why an unload of ``name`` would be refused now (for the ``unload`` op's answer)."""
        return self._registry.busy_reason(name) if self._registry is not None else None

    @contextlib.contextmanager
    def pinned(self, models: Iterable[str]) -> Iterator[None]:
        """While the body runs, ``models`` are never unloaded for idleness (a running job uses them)."""
        names = list(models)
        with self._cond:  # before the registry exists, the pins wait for it (_run_interactive)
            self._pins.update(names)
            if self._registry is not None:
                self._registry.pin(names)
        try:
            yield
        finally:
            with self._cond:
                self._pins.subtract(names)
                self._pins = +self._pins
                if self._registry is not None:
                    self._registry.unpin(names)

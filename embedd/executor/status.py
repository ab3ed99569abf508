"""What the event loop may read of the executor: queue depths, model states and dims, the lanes view.

``status`` and ``/metrics`` read these while both lane threads run: the lane
state is copied under the executor's one condition (each pass read whole),
the models' from the registry's plain-data snapshot. Kept apart from the
scheduling so what is shown, and how it is read safely, is in one place.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from embedd.executor.jobs import _seq
from embedd.executor.lanes import Lane
from embedd.executor.registry import ModelState
from embedd.models import CATALOG

#: Passes and jobs kept for ``status`` (``executor.recent``).
RECENT = 64


class StatusViews:
    """The executor's views (event loop side).

    Mixed into :class:`~embedd.executor.core.Executor`, whose ``__init__`` makes the
    state these methods read (``_cond``, ``_queues``, ``_in_flight``, ``_recent_passes`` ...).
    """

    @property
    def queue_depths(self) -> dict[str, int]:
        return {"interactive": len(self._queues[Lane.INTERACTIVE]), "batch": len(self._queues[Lane.BATCH])}

    def snapshot(self) -> dict[str, ModelState]:
        """Every model's state now, read from the registry (empty before the thread built it)."""
        registry = self._registry
        return registry.snapshot() if registry is not None else {}

    def model_dim(self, name: str) -> int:
        """The model's stored dim: from the loaded model or its config, else the catalogue's."""
        state = self.snapshot().get(name)
        return state.dim if state and state.dim else CATALOG[name].nominal_dim

    async def described(self, timeout: float = 30.0) -> None:
        """Wait (briefly, at start-up) until the thread has read every model's config."""
        if not self._described.is_set():
            await asyncio.to_thread(self._described.wait, timeout)

    def lanes_view(self) -> dict[str, Any]:
        """Per lane: queue depth, oldest wait, the pass in flight, threads and priority; recent passes."""
        now = time.monotonic()
        with self._cond:  # passes change under this lock: each is read whole
            queued = {lane: list(queue) for lane, queue in self._queues.items()}
            in_flight = {label: entry.to_wire(now) for label, entry in self._in_flight.items()}
            yielding = set(self._yielding)
            recent = [entry.to_wire(now) for entry in self._recent_passes]
            jobs = list(self._recent_jobs)
        view: dict[str, Any] = {}
        for label, lanes in (("interactive", (Lane.CONTROL, Lane.INTERACTIVE)), ("batch", (Lane.BATCH,))):
            waiting = [job for lane in lanes for job in queued[lane] if not job.abandoned]
            current = in_flight.get(label)
            view[label] = {
                "depth": len(waiting),
                "oldest_wait_s": round(now - min(j.queued_at for j in waiting), 3) if waiting else None,
                "pass": current,
                "yielding": label in yielding,  # waiting at a pass boundary for interactive work
                "threads": self.threads_of.get(label),
                "nice": self.lanes.batch_nice if label == "batch" else 0,
                "pass_budget_s": (self.lanes.pass_budget_s or None) if label == "batch" else None,
                "dropped": self.stats[label].dropped,
                "overloaded": self.stats[label].overloaded,
            }
        return {
            "lanes": view,
            "recent": {"passes": recent, "jobs": jobs},
            "seq": next(_seq),  # this view's place in the order of the events above
        }

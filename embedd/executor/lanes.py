"""What a lane is: its name, how the batch lane shares the host, its compute threads and its metrics.

A lane is one kind of waiting (:class:`Lane`); the interactive and batch threads
that take them are in :mod:`embedd.executor.threads`, their queues in the
:class:`~embedd.executor.core.Executor`. Kept apart from both so the settings,
the histograms ``/metrics`` reads and the per-thread torch thread count can be
read without the scheduling around them.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from typing import Sequence

#: Buckets of the queue-wait and pass-duration histograms, seconds.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Lane(enum.IntEnum):
    CONTROL = 0
    INTERACTIVE = 1
    BATCH = 2

    @property
    def label(self) -> str:
        return self.name.lower()


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'. Imports torch only when needed."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True, slots=True)
class LaneSettings:
    """How the batch lane shares the host (the interactive lane always gets every core at normal priority).

    ``batch_threads``: compute threads of the batch lane (0: every core the daemon may use).
    ``batch_nice``: how much lower the batch lane's CPU priority is (0: the same; Linux nice, 0-19).
    ``pass_budget_s``: the most seconds one batch forward pass should take (0: sized by memory alone).
    """

    batch_threads: int = 0
    batch_nice: int = 10
    pass_budget_s: float = 1.0


class Histogram:
    """Per-bucket counts and a sum; one writer (a lane thread), read at scrape time."""

    def __init__(self, buckets: Sequence[float] = WAIT_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


@dataclasses.dataclass(slots=True)
class LaneStats:
    """What one lane did, for ``/metrics``: written by its thread (and refusals by the loop)."""

    queue_wait: Histogram = dataclasses.field(default_factory=Histogram)
    pass_duration: dict[str, Histogram] = dataclasses.field(default_factory=dict)  # per model
    dropped: int = 0  # jobs withdrawn or stopped because nobody waited for them any more
    overloaded: int = 0  # jobs refused because the lane was full


def _set_compute_threads(wanted: int) -> int:
    """Give this thread's torch work ``wanted`` CPU threads (0: all the daemon may use); returns how many.

    torch keeps the count per calling thread once the thread has touched
    torch (it initialises a thread's count lazily from the last value set in
    any thread), so each lane thread first touches it, then sets its own.
    """
    from embedd.models.runtime import available_cores

    import torch

    cores = available_cores()
    count = cores if wanted <= 0 else max(1, min(wanted, cores))
    torch.get_num_threads()
    torch.set_num_threads(count)
    return count

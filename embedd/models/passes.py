"""Forward passes as the unit of scheduling: how big each one is, and what runs between them.

A backend turns tracks into items (clips, windows, chunks) and hands them to
:func:`embedd.models.runtime.run_batched`, which runs them in forward passes.
The pass is where the executor can act without touching model code, so
``run_batched`` asks the :class:`PassPolicy` of the lane it runs on:

- **how many items** the next pass takes (:meth:`PassPolicy.items`): at most
  the memory budget's count, and, on a lane with a *time* budget, only as many
  as fit in ``budget_s`` at the rate this model's passes were measured at on
  this device (an exponential average per model and item class). The first
  pass of a model on a lane takes one item, so a pass never covers several
  whole tracks even before the rate is known.
- **whether to go on** (:meth:`PassPolicy.before_pass`): the lane may block
  there (the batch lane waits while interactive work is queued or running: the
  batch yields at every pass boundary) or stop the call (everyone who waited
  for it has gone: a cancelled batch job frees the lane within one pass).
- **what ran** (:meth:`PassPolicy.started` / :meth:`PassPolicy.ended`): the
  pass in flight and the pass-duration histogram that ``status`` and
  ``/metrics`` show;
- **whether to stop inside a pass** (:attr:`PassPolicy.stopping`, asked
  between the pass's modules by :func:`stop_between_layers`): one item that
  costs many seconds stops within one layer when nobody waits for it.

The policy is found through a context variable the lane's thread sets
(:func:`running_on`), the same way torch finds the thread's autocast and
inference mode: the lane is a property of the thread that runs the forward,
and the backends stay unaware of it. Without a policy (tests, benches calling a
backend directly) passes are sized by memory alone and nothing runs between
them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Hashable, Iterator

from embedd.errors import Code, EmbeddError

__all__ = ["PassPolicy", "RateBook", "Stopped", "current", "running_on", "stop_between_layers"]

#: Weight of the newest pass in the per-item time estimate.
_EMA_WEIGHT = 0.3


class RateBook:
    """Seconds per item, per (model, item class), learned from the passes that ran.

    One book per lane thread (single writer). The item class is the memory
    budget's count for that item size: items of one class cost alike, and a
    class with a different count (a short track's clip) is kept apart.
    """

    def __init__(self) -> None:
        self._per_item: dict[Hashable, float] = {}

    def per_item_s(self, key: Hashable) -> float | None:
        return self._per_item.get(key)

    def record(self, key: Hashable, items: int, seconds: float) -> None:
        if items <= 0 or seconds <= 0:
            return
        sample = seconds / items
        old = self._per_item.get(key)
        self._per_item[key] = sample if old is None else old + _EMA_WEIGHT * (sample - old)


@dataclasses.dataclass(slots=True)
class PassPolicy:
    """What one lane asks of every forward pass run on its thread.

    ``budget_s``: the most seconds one pass should take (None: memory alone).
    ``before_pass(model)``: called before each pass; may block, or raise to stop.
    ``started(model, items) -> token`` and ``ended(token, seconds)``: observation.
    """

    lane: str
    budget_s: float | None
    before_pass: Callable[[str], None]
    started: Callable[[str, int], object]
    ended: Callable[[object, float], None]
    rates: RateBook = dataclasses.field(default_factory=RateBook)
    #: True when the work in flight should stop now (nobody waits for it, or shutdown); checked
    #: between the layers of a pass (:func:`stop_between_layers`), so one long item stops too.
    stopping: Callable[[], bool] | None = None

    def items(self, model: str, memory_cap: int) -> int:
        """Items in the next pass: the memory cap, cut to what fits in the time budget."""
        cap = max(1, int(memory_cap))
        if self.budget_s is None:
            return cap
        per_item = self.rates.per_item_s((model, cap))
        if per_item is None:
            return 1  # unknown rate: measure on one item first
        return max(1, min(cap, int(self.budget_s / per_item)))

    def record(self, model: str, memory_cap: int, items: int, seconds: float) -> None:
        self.rates.record((model, max(1, int(memory_cap))), items, seconds)


class Stopped(EmbeddError):
    """Raised between two layers of a forward pass whose work nobody waits for any more (``cancelled``)."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.CANCELLED, message)


_current: contextvars.ContextVar[PassPolicy | None] = contextvars.ContextVar("embedd_pass_policy", default=None)


def current() -> PassPolicy | None:
    """The policy of the lane this thread serves, if any."""
    return _current.get()


@contextlib.contextmanager
def running_on(policy: PassPolicy | None) -> Iterator[None]:
    """Run the body's forward passes under ``policy`` (set by the lane's thread)."""
    token = _current.set(policy)
    try:
        yield
    finally:
        _current.reset(token)


def _check_between_layers(module: object, args: object) -> None:
    policy = _current.get()
    if policy is not None and policy.stopping is not None and policy.stopping():
        raise Stopped(f"stopped before {type(module).__name__}: nobody waits for this pass any more")


_hooked = False


def stop_between_layers() -> None:
    """Let a lane stop a forward pass between two of its modules (idempotent, process-wide).

    One item can cost many seconds of CPU (a MERT 30 s window, a Music2Latent
    60 s chunk), more than the wait a cancel or a shutdown should have. A
    global forward pre-hook asks the lane's :attr:`PassPolicy.stopping`
    before every module runs; outside a lane (no policy) it does nothing. Its
    cost is one Python call per module call, microseconds against a pass of
    seconds.
    """
    global _hooked
    if _hooked:
        return
    import torch

    torch.nn.modules.module.register_module_forward_pre_hook(_check_between_layers)
    _hooked = True

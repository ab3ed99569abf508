"""The budget of decoded audio the daemon holds at once, shared by requests and batch jobs.

The decoder admits a result against it before handing it out; the track's
:meth:`~embedd.audio.track.DecodedAudio.release` gives its bytes back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

__all__ = ["DEFAULT_HELD_BYTES", "HeldAudioGate"]

#: Decoded audio the daemon holds at once by default.
DEFAULT_HELD_BYTES = 1 << 30


class HeldAudioGate:
    """A byte budget for decoded audio held by the daemon at once (event loop only).

    Why: every embed request and batch track holds its decoded waveforms until
    the models are done (a 30-minute track is 0.8 GB at both models' rates), and
    requests queue in the hundreds; without a gate, queued requests alone could
    exhaust the host. A track is admitted when its bytes fit, or when nothing
    else is held (so one track larger than the budget still runs, alone).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = max(1, int(limit_bytes))
        self.held = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def acquire(self, nbytes: int) -> None:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.held == 0 or self.held + nbytes <= self.limit)
            self.held += nbytes

    def releaser(self, nbytes: int, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """A once-only callable that returns ``nbytes``; safe from any thread (finalizers)."""
        done = threading.Lock()
        released = False

        def give_back() -> None:
            nonlocal released
            with done:
                if released:
                    return
                released = True
            try:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._give_back(nbytes)))
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        return give_back

    async def _give_back(self, nbytes: int) -> None:
        cond = self._condition()
        async with cond:
            self.held = max(0, self.held - nbytes)
            cond.notify_all()


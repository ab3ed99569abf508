"""Running a suspect track alone: the crash-loop guard's half in the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

__all__ = ["IsolationGate"]


class IsolationGate:
    """Ordinary tracks share the models; a suspect runs with nothing else in flight.

    A suspect is a track that was in flight when the daemon last died. Run
    alone, a second death can be blamed on it and no other track (see
    ``JobStore.recover_in_flight``).
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextlib.asynccontextmanager
    async def hold(self, *, alone: bool) -> AsyncIterator[None]:
        async with self._cond:
            if alone:
                self._waiting_exclusive += 1
                try:
                    await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                finally:
                    self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                await self._cond.wait_for(lambda: not self._exclusive and self._waiting_exclusive == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                if alone:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()

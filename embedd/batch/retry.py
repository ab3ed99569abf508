"""The batch job's calls to Milvus: an outage is waited out, up to a limit, then the job fails.

The writer (and the set-up) retries with exponential backoff (0.5 s doubling
to 10 s) for up to ``settings.milvus_retry_s``. The job status stays
``running`` meanwhile (``paused`` is reserved for the operator's pause, which
needs a ``batch_resume``; an outage needs nothing), the STATUS line says
"waiting for Milvus", and the rate decays towards zero. After the limit the
job is ``failed`` with the store's message; its checkpoint is kept, and since
everything it wrote is up to date, a new incremental ``batch_start`` goes on
from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, TypeVar

from embedd.batch.progress import Progress
from embedd.errors import Code, EmbeddError
from embedd.store import VectorStore
from embedd.store.io import StoreIO

__all__ = ["JobFailed", "RetryingStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Backoff while Milvus is unreachable.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


class JobFailed(Exception):
    """The job cannot go on (Milvus gone past the retry limit, no library): it ends ``failed``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RetryingStore:
    """:meth:`StoreIO.call` for the batch job: waits out an unreachable Milvus, says so in the progress."""

    def __init__(self, io: StoreIO, progress: Progress, *, retry_s: float) -> None:
        self.io = io
        self.progress = progress
        self.retry_s = retry_s

    async def __call__(self, fn: Callable[[VectorStore], T], what: str) -> T:
        """Run ``fn`` on the store thread; while Milvus is unreachable, retry with backoff, then fail the job."""
        limit = self.retry_s
        progress = self.progress
        started = time.monotonic()
        delay = BACKOFF_FIRST_S
        while True:
            try:
                result = await self.io.call(fn)
            except EmbeddError as exc:
                if exc.code is not Code.UNAVAILABLE:
                    raise
                if await self.io.call(lambda s: s.ping()):
                    raise  # Milvus answers: the refusal is about the data (e.g. a collection of another dim)
                waited = time.monotonic() - started
                if waited >= limit:
                    progress.wait("milvus", None)
                    raise JobFailed(f"gave up after {waited:.0f} s trying to {what}: {exc.message}") from exc
                if not progress.waiting_for("milvus"):
                    log.warning("batch job waits for Milvus: %s", exc.message)
                progress.wait("milvus", f"waiting for Milvus ({waited:.0f} s)")
                await asyncio.sleep(min(delay, max(0.05, limit - waited)))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if progress.waiting_for("milvus"):
                log.info("Milvus is back; the batch job goes on")
                progress.wait("milvus", None)
            return result

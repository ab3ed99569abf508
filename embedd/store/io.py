"""The store's own thread, seen from the event loop: :class:`StoreIO`.

Like the executor owns the GPU thread, this owns the one thread that talks to
Milvus: pymilvus clients are not shared across threads, and Milvus calls
block. Ops, the HTTP handlers and the batch job all call :meth:`StoreIO.call`;
the service only builds it and closes it. It also keeps what ``status`` asks
of Milvus cheap under load (a recent success, one shared ping, a cached list of
the original system's collections).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from embedd.errors import EmbeddError
from embedd.store.vector_store import VectorStore

__all__ = ["StoreIO"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long ``status`` waits for Milvus to answer a ping before it reports it down.
MILVUS_PING_TIMEOUT_S = 2.0
#: A successful Milvus call this recent answers ``status`` without a ping.
MILVUS_OK_FRESH_S = 5.0
#: How long ``status`` reuses the list of legacy collections (each listing costs Milvus calls).
LEGACY_FRESH_S = 5.0


class StoreIO:
    """The :class:`VectorStore` and the thread it lives on.

    ``publics``: model -> its public collection name (the catalogue's), what
    :meth:`prepare` opens and the legacy views look for.
    """

    def __init__(self, store: VectorStore, publics: Mapping[str, str]) -> None:
        self.store = store
        self.publics = dict(publics)
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedd-store")
        self._ready: set[tuple[str, int, bool]] = set()  # prepare calls done (store thread only)
        self._ok_at = float("-inf")
        self._ping: asyncio.Future[bool] | None = None
        self._legacy_seen: tuple[float, list[dict]] | None = None  # (when, status's legacy_collections)
        self._legacy_listing: asyncio.Future[list[dict]] | None = None

    async def call(self, fn: Callable[[VectorStore], T]) -> T:
        """Run ``fn(store)`` on the store's own thread."""
        result = await asyncio.get_running_loop().run_in_executor(self._thread, fn, self.store)
        self._ok_at = time.monotonic()  # any answer from Milvus says it is up
        return result

    async def read(self, fn: Callable[[VectorStore], T]) -> T:
        """Run a read-only ``fn(store)`` (search, fetch of stored vectors): never queued behind batch writes."""
        return await self.call(fn)

    def prepare(self, store: VectorStore, model: str, dim: int, *, any_dim: bool = False) -> None:
        """Make the model's collection usable for ``dim``-wide vectors (store thread; cached).

        ``any_dim``: open the live set whatever width it holds. A clear_existing job
        needs this when new weights changed the width (the old set stays live until
        the rebuild commits), and so does a search by stored track, which takes its
        query vector from that same set.
        """
        key = (model, dim, any_dim)
        if key not in self._ready:
            store.ensure(model, self.publics[model], dim, for_rebuild=any_dim)
            self._ready.add(key)

    async def close(self, timeout: float) -> None:
        """Close the connection within ``timeout``; a Milvus that will not answer is left behind."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._thread, self.store.close), timeout)
        except asyncio.TimeoutError:
            log.warning("Milvus did not answer within the shutdown deadline; leaving its connection behind")
        self._thread.shutdown(wait=False)

    # -- what status asks -----------------------------------------------------------
    async def ok(self) -> bool:
        """Whether Milvus answers: a recent successful call, else one shared ping.

        Pings queue on the store thread behind real work, so ``status`` under load
        would report a busy Milvus as down; recent success is the better witness,
        and concurrent ``status`` requests share one ping instead of queueing many.
        """
        if time.monotonic() - self._ok_at < MILVUS_OK_FRESH_S:
            return True
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._ping_milvus())
        return await asyncio.shield(self._ping)

    async def _ping_milvus(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            ok = await asyncio.wait_for(loop.run_in_executor(self._thread, self.store.ping), MILVUS_PING_TIMEOUT_S)
        except (asyncio.TimeoutError, EmbeddError):
            return False
        if ok:
            self._ok_at = time.monotonic()
        return bool(ok)

    def public_names(self, model: str | None = None) -> dict[str, str]:
        """model -> its public collection name (one model, or all)."""
        return {name: public for name, public in self.publics.items() if model is None or name == model}

    async def legacy_view(self) -> list[dict] | None:
        """The original system's collections, for ``status``; None when Milvus did not answer in time.

        Answers within the ping's 2 s even while the store thread is busy: the
        last listing (at most ``LEGACY_FRESH_S`` old) stands in meanwhile, and a
        listing that finishes late is kept for the next ``status``.
        """
        if self._legacy_seen is not None and time.monotonic() - self._legacy_seen[0] < LEGACY_FRESH_S:
            return self._legacy_seen[1]
        if self._legacy_listing is None or self._legacy_listing.done():
            self._legacy_listing = asyncio.ensure_future(self._list_legacy())
        try:
            return await asyncio.wait_for(asyncio.shield(self._legacy_listing), MILVUS_PING_TIMEOUT_S)
        except (asyncio.TimeoutError, EmbeddError):
            return self._legacy_seen[1] if self._legacy_seen is not None else None

    async def _list_legacy(self) -> list[dict]:
        publics = self.public_names()
        found = await self.call(lambda store: store.legacy_collections(publics))
        view = [c.to_wire() for c in found]
        self._legacy_seen = (time.monotonic(), view)
        return view

    async def drop_legacy(self, model: str | None, *, confirm: bool) -> dict:
        """The legacy collections moved aside (of one model or all); dropped only with ``confirm``."""
        publics = self.public_names(model)
        found = await self.call(lambda store: store.drop_legacy(publics, confirm=confirm))
        self._legacy_seen = None
        return {"collections": [c.to_wire() for c in found], "dropped": bool(confirm and found)}

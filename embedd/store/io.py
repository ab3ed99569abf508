"""The store's two threads, seen from the event loop: :class:`StoreIO`.

Like the executor owns the GPU thread, this owns the threads that talk to
Milvus: pymilvus clients are not shared across threads, and Milvus calls
block. There are two lanes, each a thread with its own connection:

* the **write lane** (:meth:`StoreIO.call`): upserts, deletes, and everything
  that opens or changes a collection (creating, migrating, aliasing, rebuilds).
  The batch job's upserts of 76,800-dim MERT vectors (about 10 MB a call)
  queue here;
* the **read lane** (:meth:`StoreIO.read`): searches, fetches of stored
  vectors, the pings and listings ``status`` asks for. A read never waits
  behind a write: its own thread and its own gRPC connection (a dedicated
  pymilvus client), against Milvus Lite (served in-process by a thread pool)
  and a server alike, both of which answer a read while an upsert is in
  progress.

Reads also go first. Milvus Lite runs inside the daemon's process, so a read
beside an upsert shares the one interpreter with it (the GIL) and takes about
twice as long. So writes are upserted a few MB at a time
(:data:`~embedd.store.rows.WRITE_BYTES`), and before each upsert a write waits
while reads are queued or running (at most :data:`READS_FIRST_MAX_S` at a
time, so that the batch job still moves under a steady stream of reads; reads
nobody waits for, ``read(..., background=True)``, do not hold writes). On a
2-core CPU, during back-to-back 32-track MERT upserts, this brings a search by
stored track on Lite from about 1 s at the median (one lane) to near its idle
time (``bench/store_reads.py``).

The read lane never opens a collection itself. :meth:`StoreIO.prepare` on the
read lane asks the write lane to open one it has not opened yet, and the
read lane's store follows what the write lane knows of each collection (its
address, layout, and whether the next read must be Strong; see
:meth:`~embedd.store.collections.Collections.hand_over`), taken after every
write call. So an alias switched by a committed rebuild, or rows deleted, are
seen by the next read exactly as they were when one thread did both.

Ops, the HTTP handlers and the batch job call these; the service only builds
it and closes it. It also keeps what ``status`` asks of Milvus cheap under
load (a recent success, one shared ping, a cached list of the original
system's collections).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.store.layout import Hit, Layout, TrackRow
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
#: Longest a write waits at one upsert boundary while reads are in progress.
READS_FIRST_MAX_S = 2.0

_tokens = itertools.count()


class _Lane:
    """One store thread and what waits for it (depth and oldest wait, for ``status``)."""

    __slots__ = ("name", "_blocked", "_lock", "_pool", "_running_since", "_running_urgent", "_waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embedd-store-{name}")
        self._lock = threading.Condition()
        self._waiting: dict[int, tuple[float, bool]] = {}  # job -> (when it was queued (monotonic), urgent)
        self._running_since: float | None = None
        self._running_urgent = False
        self._blocked = False  # the job running waits for the other lane (see StoreIO.prepare)

    def submit(self, fn: Callable[..., T], *args: Any, urgent: bool = True) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` on this lane's thread; from any thread. A cancelled future never runs.

        ``urgent``: someone waits for it (:meth:`wait_idle` waits for urgent jobs only).
        """
        token = next(_tokens)
        with self._lock:
            self._waiting[token] = (time.monotonic(), urgent)

        def job() -> T:
            with self._lock:
                self._waiting.pop(token, None)
                self._running_since = time.monotonic()
                self._running_urgent = urgent
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._running_since = None
                    self._lock.notify_all()

        try:
            future = self._pool.submit(job)
        except RuntimeError:  # the lane was shut down
            self._forget(token)
            raise
        future.add_done_callback(lambda _f: self._forget(token))  # withdrawn before it ran
        return future

    def _forget(self, token: int) -> None:
        with self._lock:
            if self._waiting.pop(token, None) is not None:
                self._lock.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Block (another thread) until no urgent job runs or waits here, or the job running waits for that thread."""

        def idle() -> bool:
            running = self._running_since is not None and self._running_urgent
            return self._blocked or not (running or any(urgent for _, urgent in self._waiting.values()))

        with self._lock:
            self._lock.wait_for(idle, timeout)

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Around a wait, on this lane's thread, for the other lane: that lane must not wait for this one meanwhile."""
        with self._lock:
            self._blocked = True
            self._lock.notify_all()
        try:
            yield
        finally:
            with self._lock:
                self._blocked = False

    async def run(self, fn: Callable[..., T], *args: Any, urgent: bool = True) -> T:
        """``fn(*args)`` on this lane's thread; cancelling the awaiting task withdraws it if it has not started."""
        return await asyncio.wrap_future(self.submit(fn, *args, urgent=urgent))

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            queued = [since for since, _ in self._waiting.values()]
            running = self._running_since
        return {
            "depth": len(queued),
            "oldest_wait_s": round(now - min(queued), 3) if queued else None,
            "running_s": round(now - running, 3) if running is not None else None,
        }

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


class StoreIO:
    """The :class:`VectorStore` of each lane and the threads they live on.

    ``publics``: model -> its public collection name (the catalogue's), what
    :meth:`prepare` opens and the legacy views look for. ``reader``: the read
    lane's store (default: a store of its own on the same URI, with a
    dedicated connection).
    """

    def __init__(self, store: VectorStore, publics: Mapping[str, str], *, reader: VectorStore | None = None) -> None:
        self.store = store
        self.reader = reader if reader is not None else VectorStore(store.uri, timeout_s=store.timeout_s, dedicated=True)
        self.publics = dict(publics)
        self._write = _Lane("write")
        self._read = _Lane("read")
        store.milvus.between_writes = self._reads_first
        self._ready: set[tuple[str, int, bool]] = set()  # prepare calls done (write lane only)
        # What the write lane knows of the collections, for the read lane to follow.
        self._sync = threading.Lock()
        self._published: dict[str, tuple[str, str, Layout]] = {}
        self._strong: set[str] = set()
        self._version = 0
        self._followed = 0  # the version the read lane's store follows (read lane only)
        self._ok_at = float("-inf")
        self._ping: asyncio.Future[bool] | None = None
        self._legacy_seen: tuple[float, list[dict]] | None = None  # (when, status's legacy_collections)
        self._legacy_listing: asyncio.Future[list[dict]] | None = None

    async def call(self, fn: Callable[[VectorStore], T]) -> T:
        """Run ``fn(store)`` on the write lane: writes, and anything that opens or changes a collection."""
        result = await self._write.run(self._writing, fn)
        self._ok_at = time.monotonic()  # any answer from Milvus says it is up
        return result

    # -- vectors in and out: the one place a request stores or reads them, each collection prepared first

    async def upsert_rows(self, rows: Mapping[str, TrackRow]) -> None:
        """Write one track's row per model (write lane), each model's collection prepared for its row first."""

        def write(store: VectorStore) -> None:
            for model, row in rows.items():
                self.prepare(store, model, int(row.vector.shape[-1]))
                store.upsert(model, [row])

        await self.call(write)

    async def stored_vectors(self, model: str, dim: int, track_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those tracks that have one (read lane; the live set, whatever its width)."""
        if not track_ids:
            return {}

        def read(store: VectorStore) -> dict[str, np.ndarray]:
            # any_dim: the same collection a search by stored track reads.
            self.prepare(store, model, dim, any_dim=True)
            return store.get_vectors(model, track_ids)

        return await self.read(read)

    async def search(
        self, model: str, dim: int, *, vector: np.ndarray | None = None, track_id: str | None = None,
        limit: int, exclude: Sequence[str] = (),
    ) -> list[Hit]:  # fmt: skip
        """The nearest stored tracks to ``vector``, or to ``track_id``'s stored vector (read lane).

        The collection is prepared for the model's own ``dim``: a query vector of
        another length is then the client's mistake (bad_request from the
        store), not a new collection. A ``track_id`` without a stored vector is
        ``not_found``.
        """

        def run(store: VectorStore) -> list[Hit]:
            self.prepare(store, model, dim, any_dim=vector is None)
            query = vector if vector is not None else store.get_vector(model, track_id or "")
            if query is None:
                raise EmbeddError(
                    Code.NOT_FOUND, f"track {track_id!r} has no stored vector in {self.publics[model]!r}"
                )
            return store.search(model, np.asarray(query, dtype=np.float32), limit, list(exclude))

        return await self.read(run)

    async def read(self, fn: Callable[[VectorStore], T], *, background: bool = False) -> T:
        """Run a read-only ``fn(store)`` (search, fetch of stored vectors) on the read lane: never queued behind writes.

        ``fn`` may call :meth:`prepare`; it must not write (the read lane's store
        follows the write lane's view of the collections and never changes them).
        ``background``: nobody waits for this read (an index being built page by
        page): writes do not wait for it between their upserts.
        """
        result = await self._read.run(self._reading, fn, urgent=not background)
        self._ok_at = time.monotonic()
        return result

    def lanes_view(self) -> dict[str, dict[str, Any]]:
        """Per lane: calls waiting (``depth``), the oldest one's wait, and the age of the call running (None: idle)."""
        return {"read": self._read.view(), "write": self._write.view()}

    def _writing(self, fn: Callable[[VectorStore], T]) -> T:
        try:
            return fn(self.store)
        finally:
            self._publish()

    def _reading(self, fn: Callable[[VectorStore], T]) -> T:
        self._follow()
        return fn(self.reader)

    def _reads_first(self) -> None:
        """Before each upsert call of a write (write lane): let queued and running reads finish first."""
        self._read.wait_idle(READS_FIRST_MAX_S)

    def _publish(self) -> None:
        """After each write call (write lane): hand what changed over to the read lane."""
        view, strong = self.store.collections.hand_over()
        with self._sync:
            if strong or view != self._published:
                self._published = view
                self._strong |= strong
                self._version += 1

    def _follow(self) -> None:
        """Before each read (read lane): take the write lane's latest view, if it changed."""
        with self._sync:
            if self._followed == self._version:
                return
            view, strong = self._published, self._strong
            self._strong = set()
            self._followed = self._version
        self.reader.collections.follow(view, strong)

    def prepare(self, store: VectorStore, model: str, dim: int, *, any_dim: bool = False) -> None:
        """Make the model's collection usable for ``dim``-wide vectors (either lane; cached).

        ``any_dim``: open the live set whatever width it holds. A clear_existing job
        needs this when new weights changed the width (the old set stays live until
        the rebuild commits), and so does a search by stored track, which takes its
        query vector from that same set.

        On the read lane, a collection the write lane has open (the batch job
        opens its models when it starts) is used as the write lane left it. One
        it has not opened yet, the write lane opens (opening may create, migrate
        or alias it): that read waits for the write lane once.
        """
        key = (model, dim, any_dim)
        if store is self.reader:
            self._follow()
            known = store.collections.models.get(model)
            if known is None or not (any_dim or known.layout.dim == dim):
                # Not open, or open at another width: what the write lane's prepare says (it may raise).
                opening = self._write.submit(self._writing, lambda s: self.prepare(s, model, dim, any_dim=any_dim))
                with self._read.blocked():
                    opening.result()
                self._follow()
            return
        if key not in self._ready:
            store.ensure(model, self.publics[model], dim, for_rebuild=any_dim)
            self._ready.add(key)

    async def close(self, timeout: float) -> None:
        """Close both connections within ``timeout``; a Milvus that will not answer is left behind."""
        closing = [
            asyncio.ensure_future(lane.run(store.close)) for lane, store in ((self._write, self.store), (self._read, self.reader))
        ]
        _, late = await asyncio.wait(closing, timeout=timeout)
        if late:
            log.warning("Milvus did not answer within the shutdown deadline; leaving its connection behind")
            for task in late:
                task.cancel()
        for task in closing:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("closing the Milvus connection failed: %s", task.exception())
        self._write.shutdown()
        self._read.shutdown()

    # -- what status asks -----------------------------------------------------------
    async def ok(self) -> bool:
        """Whether Milvus answers: a recent successful call, else one shared ping.

        Pings run on the read lane, behind reads only, but a busy Milvus may still
        answer late: recent success is the better witness, and concurrent
        ``status`` requests share one ping instead of queueing many.
        """
        if time.monotonic() - self._ok_at < MILVUS_OK_FRESH_S:
            return True
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._ping_milvus())
        return await asyncio.shield(self._ping)

    async def _ping_milvus(self) -> bool:
        try:
            ok = await asyncio.wait_for(self._read.run(self.reader.ping), MILVUS_PING_TIMEOUT_S)
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

        Answers within the ping's 2 s even while the read lane is busy: the
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
        found = await self.read(lambda store: store.legacy_collections(publics))
        view = [c.to_wire() for c in found]
        self._legacy_seen = (time.monotonic(), view)
        return view

    async def drop_legacy(self, model: str | None, *, confirm: bool) -> dict:
        """The legacy collections moved aside (of one model or all); dropped only with ``confirm``."""
        publics = self.public_names(model)
        found = await self.call(lambda store: store.drop_legacy(publics, confirm=confirm))
        self._legacy_seen = None
        return {"collections": [c.to_wire() for c in found], "dropped": bool(confirm and found)}

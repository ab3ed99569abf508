"""The recommender's in-memory vector index: every model's vectors, within one memory budget.

Why. A recommendation searches each model for the neighbours of tens of seeds.
Milvus answers that in seconds on a small CPU (Milvus Lite's only index is
FLAT; a server's HNSW still pays a gRPC round trip, a filter and a merge per
query batch); a brute-force product of the seed block with a matrix of unit
vectors answers it several times faster, exactly, with BLAS on both cores.
Its cost grows with the collection (streaming the matrix: about 0.15 s of both
cores for 50 seeds over 100,000 MuQ tracks), so a collection of
``graph_min_rows`` tracks or more also gets a navigation graph
(:mod:`embedd.store.graph`) that picks the rows worth scoring; figures in
BENCHMARKS.md. What one model's index holds: :mod:`embedd.store.model_index`.

What this module owns (:class:`VectorIndex`): which models are held within
``vector_cache_mb`` (shared by the models in the order they are first used; a
model that does not fit is not held and its searches go to Milvus as before),
building them, keeping them current, and their graphs' background builds.

Kept current by the store itself: :meth:`VectorStore.upsert` and
:meth:`VectorStore.delete` (every write of the daemon passes there: the batch
job, ``embed_file`` with ``store``, rekeys) call :meth:`VectorIndex.upserted`
and :meth:`VectorIndex.deleted` after Milvus acknowledged the write, so the
daemon's own writes are searchable at once. Writers outside the daemon (another
shard's daemon on a shared Milvus server) are caught by a rebuild every
``vector_cache_refresh_s`` (server only: a Milvus Lite file has one writer).

Built from the live collection, page by page on the store's read lane (a
Milvus query iterator; reads queued meanwhile wait for at most one page), in
the background: on first use, and at start-up for a model whose collection
holds at least :data:`WARM_ROWS` tracks. Writes during a build are logged and
replayed over it when it ends. Until a model's index is ready, and whenever its
live collection changes (a committed rebuild), searches go to Milvus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedd.errors import EmbeddError
from embedd.priority import lower_this_thread
from embedd.store.graph import GraphStopped
from embedd.store.model_index import GRAPH_MIN_ROWS, PROJECTED_DIM, ModelIndex, Overflow

if TYPE_CHECKING:
    from embedd.store.io import StoreIO
    from embedd.store.vector_store import VectorStore

__all__ = ["VectorIndex", "default_cache_bytes"]

log = logging.getLogger("embedd.store")

MiB = 1 << 20
#: At start-up, models with at least this many stored tracks are indexed in the background.
WARM_ROWS = 10_000
#: Bytes of vectors per build page (one read-lane job each).
PAGE_BYTES = 4 * MiB


def _host_ram_bytes() -> int:
    try:
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_cache_bytes() -> int:
    """The default ``vector_cache_mb``: a quarter of the host's RAM, at most 8 GiB."""
    return int(min(8 << 30, _host_ram_bytes() // 4))


@dataclasses.dataclass(slots=True)
class _Refused:
    physical: str
    rows: int


class VectorIndex:
    """The daemon's :class:`ModelIndex` per model, within one memory budget; see the module docstring.

    ``budget_bytes``: 0 disables the index (every search goes to Milvus).
    ``refresh_s``: rebuild every model's index this often, for writers outside
    this daemon (0: never; on Milvus Lite never, whatever it says).
    ``graph_min_rows``: models with this many tracks get a navigation graph
    (0: never), built on a thread of its own at ``graph_nice``.
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        refresh_s: float = 0.0,
        projected_dim: int = PROJECTED_DIM,
        warm_rows: int = WARM_ROWS,
        graph_min_rows: int = GRAPH_MIN_ROWS,
        graph_nice: int = 10,
    ) -> None:
        self.budget = int(budget_bytes)
        self.refresh_s = float(refresh_s)
        self.projected_dim = projected_dim
        self.warm_rows = warm_rows
        self.graph_min_rows = graph_min_rows
        self._graph_nice = graph_nice
        self._graph_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._graph_stop = threading.Event()
        self._lock = threading.Lock()
        self._serving: dict[str, ModelIndex] = {}
        self._building: dict[str, ModelIndex] = {}
        self._refused: dict[str, _Refused] = {}
        self._wanted: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def held_bytes(self) -> int:
        with self._lock:
            return sum(mi.nbytes for mi in (*self._serving.values(), *self._building.values()))

    def view(self) -> dict[str, dict[str, Any]]:
        """Per model: what is held (for logs and benches)."""
        with self._lock:
            out = {
                m: {
                    "rows": len(mi), "width": mi.width, "exact": mi.exact, "mib": round(mi.nbytes / MiB, 1),
                    "state": "ready", "graph": None if mi.graph is None else mi.graph.rows,
                }  # fmt: skip
                for m, mi in self._serving.items()
            }
            for m, mi in self._building.items():
                out.setdefault(m, {"rows": 0, "width": mi.width, "exact": mi.exact, "mib": 0.0})["state"] = (
                    "building" if m not in self._serving else "refreshing"
                )
            for m, r in self._refused.items():
                out.setdefault(m, {"rows": r.rows, "state": "over budget"})
            return out

    # -- the store's notifications (write lane) --------------------------------------------
    def upserted(self, model: str, physical: str, ids: Sequence[str], vectors: Sequence[Any]) -> None:
        for mi in self._targets(model, physical):
            try:
                mi.put(ids, np.asarray(vectors, dtype=np.float32))
            except (Overflow, ValueError) as exc:
                self._drop(model, mi, f"a write did not fit ({type(exc).__name__})")
            else:
                self._maybe_graph(mi)

    def deleted(self, model: str, physical: str, ids: Sequence[str]) -> None:
        for mi in self._targets(model, physical):
            mi.remove(ids)
            self._maybe_graph(mi)

    # -- graphs (their own thread) ---------------------------------------------------------
    def _maybe_graph(self, mi: ModelIndex) -> None:
        """Queue a graph build for ``mi`` when it wants one (from any thread; returns at once)."""
        if self._graph_stop.is_set() or not mi.graph_due():
            return
        with self._lock:
            if self._graph_pool is None:
                self._graph_pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="embedd-graph", initializer=lower_this_thread, initargs=(self._graph_nice,)
                )
            pool = self._graph_pool
        try:
            pool.submit(self._build_graph, mi)
        except RuntimeError:  # shut down meanwhile
            pass

    def _build_graph(self, mi: ModelIndex) -> None:
        if self._graph_stop.is_set() or not mi.graph_due():
            return  # (queued twice, or built meanwhile)
        try:
            graph = mi.build_graph(self._graph_stop)
        except GraphStopped:
            return
        except Exception as exc:  # noqa: BLE001 -- a graph is an optimisation: searches stay exact without one
            mi.graph_min_rows = 0
            log.warning("vector index: no graph for %s (%r); its searches stay exact (slower)", mi.model, exc)
            return
        if graph is not None:
            log.info(
                "vector index: %s graph over %d tracks (%d MiB) built in %.1f s",
                mi.model, graph.rows, graph.nbytes // MiB, graph.built_s,
            )  # fmt: skip

    def _targets(self, model: str, physical: str) -> list[ModelIndex]:
        with self._lock:
            return [mi for mi in (self._serving.get(model), self._building.get(model)) if mi is not None and mi.physical == physical]

    def _drop(self, model: str, mi: ModelIndex, why: str) -> None:
        with self._lock:
            if self._serving.get(model) is mi:
                del self._serving[model]
            if self._building.get(model) is mi:
                del self._building[model]
            self._refused[model] = _Refused(mi.physical, len(mi))
        log.warning("vector index: %s no longer held in memory (%s); its searches go to Milvus", model, why)

    # -- reads (read lane) -----------------------------------------------------------------
    def serving(self, model: str, physical: str) -> ModelIndex | None:
        """The ready index of ``model``'s live collection ``physical``, or None (and it is built soon)."""
        if not self.enabled:
            return None
        with self._lock:
            mi = self._serving.get(model)
            if mi is not None and mi.physical == physical and not mi.overflowed:
                return mi
            refused = self._refused.get(model)
            if refused is None or refused.physical != physical:
                self._wanted.add(model)
            return None

    # -- building (event loop) -------------------------------------------------------------
    def kick(self, store_io: StoreIO, dims: Mapping[str, int]) -> None:
        """Start background builds for the models a search wanted (from the event loop; returns at once)."""
        with self._lock:
            wanted = [m for m in self._wanted if m in dims and m not in self._building]
            self._wanted.clear()
        for m in wanted:
            self._spawn(self.build(store_io, m, dims[m]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def build(self, store_io: StoreIO, model: str, dim: int) -> ModelIndex | None:
        """Build ``model``'s index from its live collection (read lane, page by page); it then serves."""
        from embedd.store import rows

        def begin(store: VectorStore) -> tuple[Any, ModelIndex] | None:
            store_io.prepare(store, model, dim, any_dim=True)
            name, layout = store.collections.target(model, None)
            count = store.count(model)
            capacity, need = ModelIndex.capacity_for(count, layout.dim, self.projected_dim, self.graph_min_rows)
            with self._lock:
                if model in self._building:
                    return None
                others = sum(mi.nbytes for m, mi in (*self._serving.items(), *self._building.items()) if m != model)
                if others + need > self.budget:
                    self._refused[model] = _Refused(layout.physical, count)
                    self._serving.pop(model, None)
                    refused = True
                else:
                    self._refused.pop(model, None)
                    refused = False
                    mi = ModelIndex(
                        model, layout.physical, layout.dim, capacity, projected_dim=self.projected_dim, rows=count,
                        graph_min_rows=self.graph_min_rows,
                    )  # fmt: skip
                    mi.may_grow = lambda extra, m=model: self._may_grow(m, extra)
                    self._building[model] = mi  # from here on, writes are logged into it
            if refused:
                log.warning(
                    "vector index: %s (%d tracks, %d MiB) does not fit vector_cache_mb (%d MiB, %d MiB held by other "
                    "models); its searches go to Milvus", model, count, need // MiB, self.budget // MiB, others // MiB,
                )  # fmt: skip
                return None
            vf = layout.vector_field
            fields = ["track_id", vf, *(["part"] if layout.split else [])]
            page_rows = max(16, PAGE_BYTES // (layout.part_dim * 4 + 64))
            return rows.scan(store.milvus, name, fields, page_size=page_rows), mi, layout

        started = time.monotonic()
        try:
            begun = await store_io.read(begin)
        except EmbeddError as exc:
            log.warning("vector index: cannot build %s's (%s); its searches go to Milvus", model, exc.message)
            return None
        if begun is None:
            return None
        pages, mi, layout = begun
        parts: dict[str, dict[int, np.ndarray]] = {}

        def page(_store: VectorStore) -> bool:
            got = next(pages, None)
            if got is None:
                return False
            vf = layout.vector_field
            if layout.split:  # a track's parts arrive together (consecutive keys), maybe across pages
                ids, vecs = [], []
                for r in got:
                    tid = str(r["track_id"])
                    have = parts.setdefault(tid, {})
                    have[int(r["part"])] = np.asarray(r[vf], dtype=np.float32)
                    if len(have) == layout.parts:
                        full = np.concatenate([have[i] for i in range(layout.parts)])[: layout.dim]
                        ids.append(tid)
                        vecs.append(full)
                        del parts[tid]
            else:
                ids = [str(r["track_id"]) for r in got]
                vecs = [r[vf] for r in got]
            if ids:
                mi.put(ids, np.asarray(vecs, dtype=np.float32), from_build=True)
            return True

        try:
            while await store_io.read(page):
                pass
            mi.finish_build()
        except (EmbeddError, Overflow) as exc:
            with self._lock:
                if self._building.get(model) is mi:
                    del self._building[model]
            if isinstance(exc, Overflow):
                self._drop(model, mi, "it outgrew vector_cache_mb while building")
            else:
                log.warning("vector index: building %s's failed (%s); its searches go to Milvus", model, exc.message)
            return None
        except BaseException:
            with self._lock:
                if self._building.get(model) is mi:
                    del self._building[model]
            raise
        with self._lock:
            if self._building.get(model) is mi:
                del self._building[model]
                self._serving[model] = mi
        self._maybe_graph(mi)
        log.info(
            "vector index: %s ready (%d tracks, %s, %d MiB) in %.1f s",
            model, len(mi), "exact" if mi.exact else f"projected {mi.dim} -> {mi.width} dims", mi.nbytes // MiB,
            time.monotonic() - started,
        )  # fmt: skip
        return mi

    def _may_grow(self, model: str, extra: int) -> bool:
        return self.held_bytes() + extra <= self.budget

    async def run(self, store_io: StoreIO, dims: Callable[[], Any]) -> None:
        """Start-up warming and periodic refresh (a task for the daemon's life).

        ``dims``: an awaitable factory of model -> width (the executor's, once known).
        Warms the models whose collections hold at least ``warm_rows`` tracks; then,
        on a Milvus server with ``refresh_s`` > 0, rebuilds every held model that often.
        """
        if not self.enabled:
            return
        widths: Mapping[str, int] = await dims()
        if store_io.store.is_lite and _disk_bytes(store_io.store.uri) < self.warm_rows * 1024:
            return  # a small (or new) Lite file: nothing worth warming, and Lite files have one writer

        def sizes(store: VectorStore) -> dict[str, int]:
            names = store.milvus.names()
            out = {}
            for m, public in store_io.public_names().items():
                if m in widths and (public in names or store.milvus.alias_target(public, names) is not None):
                    store_io.prepare(store, m, widths[m], any_dim=True)
                    out[m] = store.count(m)
            return out

        try:
            counts = await store_io.read(sizes)
        except EmbeddError as exc:
            log.warning("vector index: cannot look at the collections at start-up (%s); built on first use", exc.message)
            counts = {}
        for m, n in counts.items():
            if n >= self.warm_rows:
                await self.build(store_io, m, widths[m])
        if self.refresh_s <= 0 or store_io.store.is_lite:
            return
        while True:
            await asyncio.sleep(self.refresh_s)
            with self._lock:
                held = [m for m in self._serving if m not in self._building]
            for m in held:
                if m in widths:
                    await self.build(store_io, m, widths[m])

    def start(self, store_io: StoreIO, dims: Callable[[], Any]) -> None:
        """Run :meth:`run` in the background (from the event loop)."""
        if self.enabled and self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self.run(store_io, dims))
            self._loop_task.add_done_callback(_log_failure)

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._graph_stop.set()
        with self._lock:
            pool, self._graph_pool = self._graph_pool, None
        if pool is not None:  # a build in progress stops within one slice
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    def wait_graphs(self, timeout: float | None = None) -> None:
        """Block until the graph builds queued so far are done (benches and tests)."""
        with self._lock:
            pool = self._graph_pool
        if pool is not None:
            pool.submit(lambda: None).result(timeout)


def _disk_bytes(path: str) -> int:
    """Bytes under a Milvus Lite path (a file, or a directory of files); 0 when absent."""
    import os

    p = os.path.expanduser(path)
    if os.path.isfile(p):
        return os.path.getsize(p)
    total = 0
    for root, _dirs, files in os.walk(p):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f)))
    return total


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("vector index: background work failed: %r", task.exception())

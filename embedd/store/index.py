"""The in-memory vector index: every stored track's vector per model, searched by matrix product.

Why. A recommendation searches each model for the neighbours of tens of seeds.
Milvus answers that in seconds on a small CPU (Milvus Lite's only index is
FLAT; a server's HNSW still pays a gRPC round trip, a filter and a merge per
query batch); a brute-force product of the seed block with a matrix of unit
vectors answers it several times faster, exactly, with BLAS on both cores
(its cost is streaming the matrix: about 0.3 s of CPU for 50 seeds over
100,000 MuQ tracks; figures in BENCHMARKS.md).

What is held, per model (:class:`ModelIndex`):

* **exact** (a model at most :data:`EXACT_MAX_DIM` wide: MuQ 1536, Music2Latent
  576): each track's vector scaled to unit length, float32. A search's scores
  are the cosines Milvus would give (to float32 rounding) and its neighbours the
  true ones: brute force, no approximation;
* **projected** (a wider model: MERT's 76,800 floats are 30 GB per 100,000
  tracks; held exactly only while the matrix stays under :data:`EXACT_MAX_CELLS`
  floats, a few hundred tracks): a fixed random sign projection to :data:`PROJECTED_DIM` dims
  (a sparse Johnson-Lindenstrauss transform: each input dim adds, with a random
  sign, into one of the output dims), scaled to unit length. Cosines in that
  space estimate the true ones (error about ``(1 - cos^2) / sqrt(1024)``); the
  neighbours and scores of a projected model are approximate (recall measured in
  ``bench/recommend.py --recall``, documented in docs/operations.md);
* a model whose matrix does not fit the memory budget (``vector_cache_mb``,
  shared by the models in the order they are first used) is not held: its
  searches go to Milvus as before.

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

Threads. Writes arrive on the store's write lane, builds and searches run on
the read lane (never on the event loop; the product releases the GIL). A write
never changes a row a search may be reading: a re-written track gets a new
row and its old row is marked dead; rows are only reclaimed by a compaction
into a new matrix (searches in flight keep the old one). So a search holds the
lock only to take a snapshot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.store.layout import check_vector

if TYPE_CHECKING:
    from embedd.store.io import StoreIO
    from embedd.store.vector_store import VectorStore

__all__ = [
    "EXACT_MAX_DIM",
    "PROJECTED_DIM",
    "ModelIndex",
    "SignProjection",
    "VectorIndex",
    "default_cache_bytes",
]

log = logging.getLogger("embedd.store")

MiB = 1 << 20
#: Models at most this wide are held exactly; wider ones are projected.
EXACT_MAX_DIM = 2048
#: The width a wider model (MERT) is projected to.
PROJECTED_DIM = 1024
#: ... unless its exact matrix is this small (floats): a small collection is searched exactly whatever its width.
EXACT_MAX_CELLS = 32 << 20
#: At start-up, models with at least this many stored tracks are indexed in the background.
WARM_ROWS = 10_000
#: Bookkeeping per row besides the vector (the id string, its dict entry, the norm).
ROW_OVERHEAD = 160
#: Scores computed at once per search chunk (queries x rows), in floats.
CHUNK_FLOATS = 8 << 20
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


class SignProjection:
    """A fixed sparse random projection ``dim -> width``: input dim i adds ``sign_i x x_i`` into output dim ``bucket_i``.

    The buckets are a random balanced partition (each output dim sums about
    ``dim / width`` inputs) and the signs are random; seeded by the model name
    and width, so every process projects alike. Inner products are preserved in
    expectation (a sparse Johnson-Lindenstrauss transform), at ``dim`` additions
    per vector and no matrix to hold.
    """

    def __init__(self, dim: int, width: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        bucket = rng.permutation(np.arange(dim) % width)
        self.dim, self.width = dim, width
        self.order = np.argsort(bucket, kind="stable")
        self.sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), dim)[self.order]
        self.starts = np.searchsorted(bucket[self.order], np.arange(width))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        return np.add.reduceat(x[:, self.order] * self.sign, self.starts, axis=1).astype(np.float32, copy=False)


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length (zero rows stay zero) and the original norms."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > 0, norms, 1.0).astype(np.float32)
    return x / safe[:, None], norms


class ModelIndex:
    """One model's vectors of one live collection (``physical``), searched by brute force."""

    def __init__(
        self, model: str, physical: str, dim: int, capacity: int, *, projected_dim: int = PROJECTED_DIM, rows: int | None = None
    ) -> None:
        """``rows``: the tracks expected (decides exact or projected; default ``capacity``)."""
        self.model, self.physical, self.dim = model, physical, dim
        self.projection = (
            SignProjection(dim, projected_dim, zlib.crc32(f"{model}:{dim}:{projected_dim}".encode()))
            if not self.held_exactly(capacity if rows is None else rows, dim, projected_dim)
            else None
        )
        self.width = projected_dim if self.projection is not None else dim
        self.exact = self.projection is None
        self._lock = threading.Lock()
        self._mat = np.zeros((max(16, capacity), self.width), dtype=np.float32)
        self._ids: list[str | None] = []
        self._pos: dict[str, int] = {}
        self._dead: set[int] = set()
        self._pending: dict[str, np.ndarray | None] | None = {}  # writes during the build (None: deleted)
        self.built_at = 0.0
        #: Called with the extra bytes a growth needs; False: the budget says no (the index is then dropped).
        self.may_grow: Callable[[int], bool] = lambda _n: True
        self.overflowed = False

    # -- size ---------------------------------------------------------------------------
    @staticmethod
    def held_exactly(rows: int, dim: int, projected_dim: int = PROJECTED_DIM) -> bool:
        """Exact up to EXACT_MAX_DIM wide, or while the exact matrix stays small; projected beyond."""
        return dim <= max(EXACT_MAX_DIM, projected_dim) or rows * dim <= EXACT_MAX_CELLS

    @staticmethod
    def capacity_for(rows: int, dim: int, projected_dim: int = PROJECTED_DIM) -> tuple[int, int]:
        """(rows allocated, bytes) for a collection of ``rows``: 10 % headroom plus up to 1024 rows (16 M floats)."""
        width = dim if ModelIndex.held_exactly(rows, dim, projected_dim) else projected_dim
        capacity = int(rows * 1.1) + max(16, min(1024, (16 << 20) // width))
        return capacity, capacity * (width * 4 + ROW_OVERHEAD)

    @property
    def nbytes(self) -> int:
        return self._mat.shape[0] * (self.width * 4 + ROW_OVERHEAD)

    def __len__(self) -> int:
        return len(self._pos)

    @property
    def building(self) -> bool:
        return self._pending is not None

    # -- the search space ---------------------------------------------------------------
    def to_space(self, vectors: np.ndarray) -> np.ndarray:
        """Full-width vectors (n x dim) as unit rows of the search space (n x width)."""
        x = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if self.projection is not None:
            x = self.projection(x)
        return _unit(x)[0]

    def query(self, vector: np.ndarray, what: str = "the query vector") -> np.ndarray:
        """A query vector checked like Milvus would (width, finite, not all zeros), in the search space."""
        vec = check_vector(self.model, vector, self.dim, what)
        if not np.any(vec):
            raise EmbeddError(Code.BAD_REQUEST, f"the query vector for model {self.model} is all zeros.")
        return self.to_space(vec)[0]

    # -- writes (write lane, build pages) -----------------------------------------------
    def put(self, ids: Sequence[str], vectors: np.ndarray | Sequence[Any], *, from_build: bool = False) -> None:
        """Add or replace tracks (full-width vectors)."""
        if not len(ids):
            return
        space = self.to_space(np.asarray(vectors, dtype=np.float32))
        with self._lock:
            if self._pending is not None and not from_build:
                for tid, row in zip(ids, space):
                    self._pending[tid] = row
                return
            self._put_locked(list(ids), space)

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            for tid in ids:
                if self._pending is not None:
                    self._pending[tid] = None
                    continue
                slot = self._pos.pop(tid, None)
                if slot is not None:
                    self._ids[slot] = None
                    self._dead.add(slot)

    def finish_build(self) -> None:
        """The scan is complete: replay the writes logged meanwhile; from now on writes apply directly."""
        with self._lock:
            pending, self._pending = self._pending or {}, None
            gone = [t for t, v in pending.items() if v is None]
            for tid in gone:
                slot = self._pos.pop(tid, None)
                if slot is not None:
                    self._ids[slot] = None
                    self._dead.add(slot)
            put = [(t, v) for t, v in pending.items() if v is not None]
            if put:
                self._put_locked([t for t, _ in put], np.stack([v for _, v in put]))
            self.built_at = time.monotonic()

    def _put_locked(self, ids: list[str], space: np.ndarray) -> None:
        # Last write of a track in the batch wins; earlier rows of a re-written track are marked dead.
        last = {tid: i for i, tid in enumerate(ids)}
        ids = list(last)
        space = space[list(last.values())]
        for tid in ids:
            old = self._pos.pop(tid, None)
            if old is not None:
                self._ids[old] = None
                self._dead.add(old)
        n = len(self._ids)
        if n + len(ids) > self._mat.shape[0]:
            self._grow_locked(len(ids))
            n = len(self._ids)
        self._mat[n : n + len(ids)] = space
        for i, tid in enumerate(ids):
            self._pos[tid] = n + i
        self._ids.extend(ids)

    def _grow_locked(self, incoming: int) -> None:
        """Compact into a new matrix (dead rows dropped), 1.5x the live rows plus what comes."""
        live = [s for s, t in enumerate(self._ids) if t is not None]
        capacity = max(16, int((len(live) + incoming) * 1.5))
        extra = (capacity - self._mat.shape[0]) * (self.width * 4 + ROW_OVERHEAD)
        if self.exact and not self.held_exactly(len(live) + incoming, self.dim, PROJECTED_DIM):
            self.overflowed = True  # a wide model outgrew exact search: rebuilt projected at the next look
        if extra > 0 and not self.may_grow(extra):
            self.overflowed = True
            # Keep serving what fits: the owner drops this index at its next look (Milvus takes over).
            capacity = self._mat.shape[0]
            if len(live) + incoming > capacity:
                raise _Overflow
        mat = np.zeros((capacity, self.width), dtype=np.float32)
        mat[: len(live)] = self._mat[live]
        ids = [self._ids[s] for s in live]
        self._mat, self._ids = mat, ids
        self._pos = {t: i for i, t in enumerate(ids) if t is not None}
        self._dead = set()

    # -- reads (read lane) --------------------------------------------------------------
    def get(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The search-space (unit) vectors of those of ``ids`` held."""
        with self._lock:
            mat, found = self._mat, [(t, self._pos[t]) for t in dict.fromkeys(ids) if t in self._pos]
        return {t: mat[s].copy() for t, s in found}

    def search(self, queries: np.ndarray, k: int, exclude: Iterable[str] = ()) -> list[list[tuple[str, float]]]:
        """Each query's ``k`` best held tracks as (track id, cosine in the search space), best first.

        ``queries``: unit rows of the search space (:meth:`query`, :meth:`get`).
        Exact top-k by brute force (ties in any order); ``exclude``d tracks and
        rows deleted meanwhile are never returned.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.width))
        nq = q.shape[0]
        if nq == 0 or k < 1:
            return [[] for _ in range(nq)]
        with self._lock:
            mat, ids, n = self._mat, self._ids, len(self._ids)
            masked = np.fromiter(
                (*self._dead, *(self._pos[t] for t in exclude if t in self._pos)), dtype=np.int64
            )
        masked.sort()
        chunk = max(4096, CHUNK_FLOATS // nq)
        best_s: list[np.ndarray] = []  # per chunk: (nq x <=k) scores and their rows
        best_i: list[np.ndarray] = []
        qt = np.ascontiguousarray(q.T)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            scores = mat[start:end] @ qt  # rows x queries: BLAS's fastest layout for a thin query block
            lo, hi = np.searchsorted(masked, [start, end])
            if hi > lo:
                scores[masked[lo:hi] - start] = -np.inf
            s_k, i_k = _top_k(scores, k)
            best_s.append(s_k)
            best_i.append(i_k + start)
        if not best_s:
            return [[] for _ in range(nq)]
        s_all = np.concatenate(best_s, axis=1)
        i_all = np.concatenate(best_i, axis=1)
        if s_all.shape[1] > k:
            part = np.argpartition(s_all, s_all.shape[1] - k, axis=1)[:, s_all.shape[1] - k :]
            s_all = np.take_along_axis(s_all, part, axis=1)
            i_all = np.take_along_axis(i_all, part, axis=1)
        order = np.argsort(-s_all, axis=1, kind="stable")
        s_all = np.take_along_axis(s_all, order, axis=1)
        i_all = np.take_along_axis(i_all, order, axis=1)
        out: list[list[tuple[str, float]]] = []
        for srow, irow in zip(s_all.tolist(), i_all.tolist()):
            hits = []
            for score, slot in zip(srow, irow):
                tid = ids[slot] if slot < len(ids) else None
                if tid is not None and score != -np.inf:
                    hits.append((tid, score))
            out.append(hits)
        return out


#: Top-k selection samples every SAMPLE_STEP-th row for a threshold, then selects among the rows above it.
SAMPLE_STEP = 16


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``scores`` (rows x queries), its ``k`` largest values and their rows (unordered), as
    (queries x k) arrays; fewer rows than k: all of them.

    Exact, and cheaper than a full partition of every column: a threshold per
    query from a strided sample (its ``2k / step + 2``-th largest, so that about
    twice k rows pass it), one comparison pass, and a partition of the few rows
    that passed; a query where fewer than k passed is partitioned in full.
    """
    rows, nq = scores.shape
    if rows <= k:
        return scores.T.copy(), np.broadcast_to(np.arange(rows), (nq, rows)).copy()
    by_query = np.ascontiguousarray(scores.T)  # queries x rows: each query's scores contiguous
    if rows < 8 * SAMPLE_STEP * k:
        part = np.argpartition(by_query, rows - k, axis=1)[:, rows - k :]
        return np.take_along_axis(by_query, part, axis=1), part
    sample = by_query[:, ::SAMPLE_STEP]
    j = min(sample.shape[1], -(-2 * k // SAMPLE_STEP) + 2)
    threshold = np.partition(sample, sample.shape[1] - j, axis=1)[:, sample.shape[1] - j]
    out_s = np.empty((nq, k), dtype=scores.dtype)
    out_i = np.empty((nq, k), dtype=np.int64)
    for qi in range(nq):
        row = by_query[qi]
        cand = np.flatnonzero(row >= threshold[qi])
        if len(cand) < k:  # (ties, or masked rows in the sample): the whole row
            cand = np.argpartition(row, rows - k)[rows - k :]
        vals = row[cand]
        pick = np.argpartition(vals, len(vals) - k)[len(vals) - k :]
        out_i[qi] = cand[pick]
        out_s[qi] = vals[pick]
    return out_s, out_i


class _Overflow(Exception):
    """A write needs more rows than the budget allows: the index is dropped."""


@dataclasses.dataclass(slots=True)
class _Refused:
    physical: str
    rows: int


class VectorIndex:
    """The daemon's :class:`ModelIndex` per model, within one memory budget; see the module docstring.

    ``budget_bytes``: 0 disables the index (every search goes to Milvus).
    ``refresh_s``: rebuild every model's index this often, for writers outside
    this daemon (0: never; on Milvus Lite never, whatever it says).
    """

    def __init__(
        self, budget_bytes: int, *, refresh_s: float = 0.0, projected_dim: int = PROJECTED_DIM, warm_rows: int = WARM_ROWS
    ) -> None:
        self.budget = int(budget_bytes)
        self.refresh_s = float(refresh_s)
        self.projected_dim = projected_dim
        self.warm_rows = warm_rows
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
                m: {"rows": len(mi), "width": mi.width, "exact": mi.exact, "mib": round(mi.nbytes / MiB, 1), "state": "ready"}
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
            except (_Overflow, ValueError) as exc:
                self._drop(model, mi, f"a write did not fit ({type(exc).__name__})")

    def deleted(self, model: str, physical: str, ids: Sequence[str]) -> None:
        for mi in self._targets(model, physical):
            mi.remove(ids)

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
            capacity, need = ModelIndex.capacity_for(count, layout.dim, self.projected_dim)
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
                        model, layout.physical, layout.dim, capacity, projected_dim=self.projected_dim, rows=count
                    )
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
        except (EmbeddError, _Overflow) as exc:
            with self._lock:
                if self._building.get(model) is mi:
                    del self._building[model]
            if isinstance(exc, _Overflow):
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

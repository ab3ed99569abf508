"""One model's vectors held in memory, searched by matrix product: :class:`ModelIndex`.

What is held (the daemon's budget and lifecycle around it: :mod:`embedd.store.index`):

* **exact** (a model at most :data:`EXACT_MAX_DIM` wide: MuQ 1536, Music2Latent
  576): each track's vector scaled to unit length, float32. A search's scores
  are the cosines Milvus would give (to float32 rounding);
* **projected** (a wider model: MERT's 76,800 floats are 30 GB per 100,000
  tracks; held exactly only while the matrix stays under :data:`EXACT_MAX_CELLS`
  floats, a few hundred tracks): a fixed random sign projection to :data:`PROJECTED_DIM` dims
  (a sparse Johnson-Lindenstrauss transform: each input dim adds, with a random
  sign, into one of the output dims), scaled to unit length. Cosines in that
  space estimate the true ones (error about ``(1 - cos^2) / sqrt(1024)``); the
  neighbours and scores of a projected model are approximate (recall measured in
  ``bench/recommend.py --recall``, documented in docs/operations.md);
* from ``graph_min_rows`` tracks on, a navigation graph over the matrix
  (:mod:`embedd.store.graph`): searches score the graph's candidates exactly
  instead of every row.

Threads. Writes arrive on the store's write lane, searches on its read lane
(never on the event loop; the product releases the GIL), graph builds on a
thread of their own. A write never changes a row a search may be reading: a
re-written track gets a new row and its old row is marked dead; rows are only
reclaimed by a compaction into a new matrix (searches in flight keep the old
one). So a search holds the lock only to take a snapshot.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.store.graph import Graph
from embedd.store.layout import check_vector

__all__ = [
    "EXACT_MAX_DIM",
    "GRAPH_MIN_ROWS",
    "GRAPH_TAIL_MIN",
    "PROJECTED_DIM",
    "ModelIndex",
    "Overflow",
    "SignProjection",
]

#: Models at most this wide are held exactly; wider ones are projected.
EXACT_MAX_DIM = 2048
#: The width a wider model (MERT) is projected to.
PROJECTED_DIM = 1024
#: ... unless its exact matrix is this small (floats): a small collection is searched exactly whatever its width.
EXACT_MAX_CELLS = 32 << 20
#: Models with at least this many tracks get a navigation graph (:mod:`embedd.store.graph`); the
#: ``vector_graph_min_rows`` setting. Below it exact search costs a few tens of milliseconds.
GRAPH_MIN_ROWS = 20_000
#: The graph is rebuilt once rows written after it (searched exactly beside it) exceed this, or a tenth of it.
GRAPH_TAIL_MIN = 2_000
#: Bookkeeping per row besides the vector (the id string, its dict entry, the norm).
ROW_OVERHEAD = 160
#: Scores computed at once per search chunk (queries x rows), in floats.
CHUNK_FLOATS = 8 << 20


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
        self,
        model: str,
        physical: str,
        dim: int,
        capacity: int,
        *,
        projected_dim: int = PROJECTED_DIM,
        rows: int | None = None,
        graph_min_rows: int = GRAPH_MIN_ROWS,
    ) -> None:
        """``rows``: the tracks expected (decides exact or projected; default ``capacity``).

        ``graph_min_rows``: from this many tracks on, searches go through a graph (0: never).
        """
        self.model, self.physical, self.dim = model, physical, dim
        self.graph_min_rows = graph_min_rows
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
        #: The navigation graph over the first ``graph.rows`` slots (None: exact search only).
        self.graph: Graph | None = None
        self._generation = 0  # bumped by every compaction: slots renumbered, a graph over the old ones is void
        self._graph_building = False

    # -- size ---------------------------------------------------------------------------
    @staticmethod
    def held_exactly(rows: int, dim: int, projected_dim: int = PROJECTED_DIM) -> bool:
        """Exact up to EXACT_MAX_DIM wide, or while the exact matrix stays small; projected beyond."""
        return dim <= max(EXACT_MAX_DIM, projected_dim) or rows * dim <= EXACT_MAX_CELLS

    @staticmethod
    def capacity_for(
        rows: int, dim: int, projected_dim: int = PROJECTED_DIM, graph_min_rows: int = GRAPH_MIN_ROWS
    ) -> tuple[int, int]:
        """(rows allocated, bytes) for a collection of ``rows``: 10 % headroom plus up to 1024 rows (16 M floats)."""
        width = dim if ModelIndex.held_exactly(rows, dim, projected_dim) else projected_dim
        capacity = int(rows * 1.1) + max(16, min(1024, (16 << 20) // width))
        return capacity, ModelIndex._bytes(capacity, width, graph_min_rows)

    @staticmethod
    def _bytes(capacity: int, width: int, graph_min_rows: int) -> int:
        graph = Graph.bytes_for(capacity, width) if graph_min_rows and capacity >= graph_min_rows else 0
        return capacity * (width * 4 + ROW_OVERHEAD) + graph

    @property
    def nbytes(self) -> int:
        """The matrix and, for a collection big enough for one, its graph (counted before it is built)."""
        return self._bytes(self._mat.shape[0], self.width, self.graph_min_rows)

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
                raise Overflow
        mat = np.zeros((capacity, self.width), dtype=np.float32)
        mat[: len(live)] = self._mat[live]
        ids = [self._ids[s] for s in live]
        self._mat, self._ids = mat, ids
        self._pos = {t: i for i, t in enumerate(ids) if t is not None}
        self._dead = set()
        self._generation += 1
        self.graph = None  # (searched exactly until the next graph: a few hundred milliseconds per request)

    # -- the graph (its own thread) -----------------------------------------------------
    def graph_due(self) -> bool:
        """Whether a (new) graph should be built: big enough, and none yet or too much written since."""
        with self._lock:
            if self._pending is not None or self._graph_building or not self.graph_min_rows:
                return False
            if len(self._pos) < self.graph_min_rows:
                return False
            graph = self.graph
            if graph is None:
                return True
            tail = len(self._ids) - graph.rows
            dead = sum(1 for slot in self._dead if slot < graph.rows)
            return tail > max(GRAPH_TAIL_MIN, graph.rows // 10) or dead > graph.rows // 10

    def build_graph(self, stop: threading.Event) -> Graph | None:
        """Build a graph over the rows written so far and serve it (None: one is already being built,
        or a compaction voided it meanwhile). Slow: call it off the store's lanes."""
        with self._lock:
            if self._graph_building:
                return None
            self._graph_building = True
            mat, rows, generation = self._mat, len(self._ids), self._generation
        try:
            graph = Graph.build(mat, rows, generation, stop)
        finally:
            with self._lock:
                self._graph_building = False
        with self._lock:
            if generation != self._generation:
                return None
            self.graph = graph
        return graph

    # -- reads (read lane) --------------------------------------------------------------
    def get(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The search-space (unit) vectors of those of ``ids`` held."""
        with self._lock:
            mat, found = self._mat, [(t, self._pos[t]) for t in dict.fromkeys(ids) if t in self._pos]
        return {t: mat[s].copy() for t, s in found}

    def search(self, queries: np.ndarray, k: int, exclude: Iterable[str] = ()) -> list[list[tuple[str, float]]]:
        """Each query's ``k`` best held tracks as (track id, cosine in the search space), best first.

        ``queries``: unit rows of the search space (:meth:`query`, :meth:`get`).
        Exact top-k by brute force (ties in any order), or, once the collection
        has a graph, the best ``k`` of the graph's candidates re-scored exactly
        plus the rows written since searched exactly (scores exact, neighbours
        approximate: :mod:`embedd.store.graph`); ``exclude``d tracks and rows
        deleted meanwhile are never returned.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.width))
        nq = q.shape[0]
        if nq == 0 or k < 1:
            return [[] for _ in range(nq)]
        with self._lock:
            mat, ids, n, graph = self._mat, self._ids, len(self._ids), self.graph
            masked = np.fromiter(
                (*self._dead, *(self._pos[t] for t in exclude if t in self._pos)), dtype=np.int64
            )
        masked.sort()
        chunk = max(4096, CHUNK_FLOATS // nq)
        best_s: list[np.ndarray] = []  # per chunk: (nq x <=k) scores and their rows
        best_i: list[np.ndarray] = []
        first_exact = 0
        if graph is not None:  # the graph's rows: its candidates (twice k, for the 8-bit ranking's misses) re-scored
            rows = graph.candidates(q, 2 * k, masked[: np.searchsorted(masked, graph.rows)])
            scores = graph.rescore(mat, q, rows)  # -inf where fewer than 2k were found
            rows = np.where(rows >= 0, rows, 0)
            best_s.append(scores)
            best_i.append(rows)
            first_exact = graph.rows
        qt = np.ascontiguousarray(q.T)
        for start in range(first_exact, n, chunk):
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


class Overflow(Exception):
    """A write needs more rows than the budget allows: the owner drops the index (Milvus takes over)."""

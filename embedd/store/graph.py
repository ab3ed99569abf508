"""A navigation graph over a big model index: which rows are worth scoring exactly.

Why. Exact search streams every held vector for every request: 50 seeds over
100,000 MuQ tracks is 15 GFLOP, about 150 ms of both cores of a 2-core AVX2
host for MuQ alone and over 300 ms for the three models, whatever the code
(the matrix product already runs at half the cores' peak). The fork's 10 s and
a person's few seconds allow that, but not the 200 ms a mix should take. An
HNSW graph (faiss, the standard library for it) finds each seed's neighbours
by visiting a few thousand rows instead of all of them: 10 to 40 ms for 50
seeds at 1536 dims (``bench/recommend.py --graph-recall``).

What is approximate. Only *which* rows are found: the graph returns each
query's best candidates by an 8-bit copy of the vectors (a quarter of the
float32 matrix's memory), and :class:`~embedd.store.model_index.ModelIndex`
re-scores every candidate exactly from its float32 matrix, so every score
returned is the exact cosine. Recall against brute force is measured in the
bench (0.99+ on clustered vectors, 0.95 on a hard 256-dim isotropic set); a
collection under ``graph_min_rows`` tracks has no graph and is searched
exactly (a few tens of milliseconds there).

What it covers. A graph is built over a snapshot of the index's first
``rows`` slots; rows written later (the tail) are searched exactly beside it,
and rows deleted or re-written later are filtered out of its answers. The
owner rebuilds it in the background when the tail or the dead rows grow past
a tenth of it (:meth:`ModelIndex.graph_due`). Slots never change content once
written (a re-written track gets a new slot), so a snapshot needs no copy.

Threads. Building is slow (about 20 s per 100,000 MuQ tracks on 2 cores) and
runs on its own thread at the batch lane's nice value, in slices of
:data:`BUILD_SLICE` rows that check a stop event; searching runs on the store's
read lane. faiss releases the GIL in both.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from embedd.errors import Misuse

__all__ = ["BUILD_SLICE", "Graph", "GraphStopped"]

#: Links per node (HNSW's M): 32 is faiss's usual choice for a few hundred dims and up.
LINKS = 32
#: Candidates examined while inserting (efConstruction).
BUILD_EF = 64
#: Candidates examined while searching, at least (efSearch): 256 gave recall 0.95 at 1536 dims on hard data.
SEARCH_EF = 256
#: Rows inserted per slice of a build (each slice checks the stop event).
BUILD_SLICE = 8192
#: Rows the 8-bit quantiser learns its per-dimension ranges from.
TRAIN_ROWS = 20_000
#: Bytes per row besides the 8-bit vector: level-0 links (2 x LINKS ids) and faiss's bookkeeping.
ROW_BYTES = 2 * LINKS * 4 + 16


class GraphStopped(Exception):
    """The build was stopped (the daemon is shutting down)."""


class Graph:
    """faiss's HNSW over rows ``[0, rows)`` of a matrix of unit vectors (inner product = cosine)."""

    def __init__(self, hnsw: object, rows: int, width: int, generation: int, built_s: float) -> None:
        self._hnsw = hnsw
        self.rows, self.width, self.generation, self.built_s = rows, width, generation, built_s

    @staticmethod
    def bytes_for(rows: int, width: int) -> int:
        """Memory a graph over ``rows`` rows of ``width`` dims holds (8-bit vectors plus links)."""
        return rows * (width + ROW_BYTES)

    @property
    def nbytes(self) -> int:
        return self.bytes_for(self.rows, self.width)

    @classmethod
    def build(cls, mat: np.ndarray, rows: int, generation: int, stop: threading.Event) -> Graph:
        """A graph over ``mat[:rows]`` (read only; the caller guarantees those rows stay as they are).

        Raises :class:`GraphStopped` when ``stop`` is set between two slices.
        """
        import faiss  # imported here: a daemon with no big collection never pays for it

        started = time.monotonic()
        width = mat.shape[1]
        hnsw = faiss.IndexHNSWSQ(width, faiss.ScalarQuantizer.QT_8bit, LINKS, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = BUILD_EF
        step = max(1, rows // TRAIN_ROWS)
        hnsw.train(np.ascontiguousarray(mat[:rows:step][:TRAIN_ROWS]))
        for start in range(0, rows, BUILD_SLICE):
            if stop.is_set():
                raise GraphStopped
            hnsw.add(np.ascontiguousarray(mat[start : min(rows, start + BUILD_SLICE)]))
        return cls(hnsw, rows, width, generation, time.monotonic() - started)

    def candidates(self, queries: np.ndarray, k: int, masked: np.ndarray) -> np.ndarray:
        """Each query's ``k`` best rows by the graph (``queries x k`` row numbers, -1 where fewer were found).

        ``masked``: rows (below :attr:`rows`) never to return: dead rows and excluded tracks.
        """
        import faiss

        k = min(k, self.rows)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(SEARCH_EF, k)
        if len(masked):
            ids = np.ascontiguousarray(masked, dtype=np.int64)
            batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            params.sel = keep = faiss.IDSelectorNot(batch)
        else:
            ids = batch = keep = None
        _scores, rows = self._hnsw.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        del ids, batch, keep  # (the selector reads them during the search: kept alive until here)
        return rows

    def rescore(self, mat: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact float32 inner products of each query with its candidate ``rows`` of ``mat`` (-inf at -1).

        faiss computes them in place from the rows' addresses; gathering the rows into a
        copy first (``mat[rows]``, 46 MB for 50 seeds x 150 candidates at 1536 dims) cost
        three times as long as the products themselves.
        """
        import faiss

        held = mat.dtype == np.float32 and mat.flags.c_contiguous and mat.shape[1:] == (self.width,)
        if not held or mat.shape[0] < self.rows:
            raise Misuse(f"rescore needs the C-contiguous float32 matrix the graph was built over, not {mat.dtype} "
                         f"{mat.shape}")  # fmt: skip
        q = np.ascontiguousarray(queries, dtype=np.float32)
        r = np.ascontiguousarray(rows, dtype=np.int64)
        shaped = q.shape[1:] == (self.width,) and r.ndim == 2 and r.shape[0] == q.shape[0]
        if not shaped or (r.size and int(r.max()) >= self.rows):
            raise Misuse(f"rescore: {r.shape} rows for {q.shape[0]} queries, all below {self.rows}")
        out = np.empty(r.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(mat), faiss.swig_ptr(r), self.width, r.shape[0],
            r.shape[1],
        )  # fmt: skip
        return out

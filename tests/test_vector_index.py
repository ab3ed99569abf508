"""The in-memory vector index (embedd.store.index): exact top-k against numpy brute force, kept current
by the store's writes, bounded memory, the projection's accuracy, and a build from a real Milvus Lite
collection through the store's read lane. Seconds, no models.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.errors import Code, EmbeddError
from embedd.store import TrackRow, VectorStore
from embedd.store.index import VectorIndex
from embedd.store.model_index import EXACT_MAX_DIM, GRAPH_TAIL_MIN, ModelIndex, SignProjection
from embedd.store.io import StoreIO


def brute(matrix: np.ndarray, ids: list[str], queries: np.ndarray, k: int, exclude=()) -> list[list[tuple[str, float]]]:
    m = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ m.T.astype(np.float64)
    out = []
    for row in sims:
        order = [i for i in np.argsort(-row, kind="stable") if ids[i] not in exclude][:k]
        out.append([(ids[i], float(row[i])) for i in order])
    return out


def ready(model: str, dim: int, ids: list[str], vectors: np.ndarray, capacity: int = 16) -> ModelIndex:
    mi = ModelIndex(model, "phys", dim, capacity)
    mi.finish_build()
    mi.put(ids, vectors)
    return mi


def same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    """Same scores in order (float32 rounding), same ids except among near-ties."""
    assert len(got) == len(want)
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=2e-5)
    for (gt, gs), (wt, ws) in zip(got, want):
        if gt != wt:
            assert abs(gs - ws) < 2e-5


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    dim=st.sampled_from([3, 8, 64]),
    nq=st.integers(1, 12),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    excl=st.integers(0, 10),
)
def test_search_is_brute_force_cosine(n, dim, nq, k, seed, excl):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    ids = [f"t{i}" for i in range(n)]
    mi = ready("latent", dim, ids, vecs)
    queries = rng.normal(size=(nq, dim)).astype(np.float32)
    exclude = set(rng.choice(ids, min(excl, n), replace=False))
    got = mi.search(mi.to_space(queries), k, exclude)
    want = brute(vecs, ids, queries, k, exclude)
    for g, w in zip(got, want):
        same_ranking(g, w)


def test_chunked_search_matches_one_block(monkeypatch):
    import embedd.store.model_index as index

    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(20_000, 32)).astype(np.float32)
    ids = [f"t{i}" for i in range(len(vecs))]
    mi = ready("latent", 32, ids, vecs)
    q = mi.to_space(rng.normal(size=(5, 32)))
    whole = mi.search(q, 50)
    monkeypatch.setattr(index, "CHUNK_FLOATS", 1)  # 4096-row chunks
    assert [[t for t, _ in hs] for hs in mi.search(q, 50)] == [[t for t, _ in hs] for hs in whole]
    for g, w in zip(whole, brute(vecs, ids, np.asarray(q), 50)):
        same_ranking(g, w)


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "del"]), st.lists(st.integers(0, 40), min_size=1, max_size=8)), max_size=40),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_kept_current_after_upserts_and_deletes(ops, seed):
    """Any sequence of writes (re-writes, deletes of absent tracks, growth and compaction) leaves exactly the last state."""
    rng = np.random.default_rng(seed)
    dim = 6
    mi = ready("latent", dim, [], np.zeros((0, dim), np.float32))
    truth: dict[str, np.ndarray] = {}
    for op, keys in ops:
        tids = [f"t{k}" for k in keys]
        if op == "put":
            vecs = rng.normal(size=(len(tids), dim)).astype(np.float32)
            mi.put(tids, vecs)
            for t, v in zip(tids, vecs):
                truth[t] = v
        else:
            mi.remove(tids)
            for t in tids:
                truth.pop(t, None)
    assert len(mi) == len(truth)
    held = mi.get(list(truth) + ["absent"])
    assert set(held) == set(truth)
    for t, v in truth.items():
        np.testing.assert_allclose(held[t], v / np.linalg.norm(v), atol=1e-6)
    if truth:
        ids = list(truth)
        q = rng.normal(size=(3, dim)).astype(np.float32)
        for g, w in zip(mi.search(mi.to_space(q), len(ids) + 5), brute(np.stack([truth[t] for t in ids]), ids, q, len(ids) + 5)):
            same_ranking(g, w)


def test_writes_during_a_build_are_replayed_over_it():
    mi = ModelIndex("latent", "phys", 4, 16)
    mi.put(["a", "b"], np.eye(4, dtype=np.float32)[:2])  # logged: the build has not finished
    mi.remove(["c"])
    mi.put(["c", "b", "d"], np.eye(4, dtype=np.float32)[[2, 3, 3]], from_build=True)  # the scan's (older) rows
    mi.finish_build()
    got = mi.get(["a", "b", "c", "d"])
    assert set(got) == {"a", "b", "d"}  # c deleted during the build; b as written during it
    np.testing.assert_array_equal(got["b"], np.eye(4, dtype=np.float32)[1])


def test_memory_is_bounded_by_the_budget():
    mi_bytes = ModelIndex.capacity_for(1000, 64)[1]
    vi = VectorIndex(mi_bytes * 3)
    mi = ModelIndex("latent", "phys", 64, 1000)
    mi.may_grow = lambda extra: vi.held_bytes() + extra <= vi.budget
    mi.finish_build()
    with vi._lock:
        vi._serving["latent"] = mi
    rng = np.random.default_rng(0)
    for start in range(0, 12_000, 500):
        vi.upserted("latent", "phys", [f"t{start + i}" for i in range(500)], rng.normal(size=(500, 64)))
        assert vi.held_bytes() <= vi.budget
    # It outgrew the budget: dropped, and its searches go to Milvus from now on.
    assert vi.serving("latent", "phys") is None and vi.held_bytes() == 0
    assert vi.view()["latent"]["state"] == "over budget"


def test_other_collections_and_disabled_index_are_ignored():
    vi = VectorIndex(0)
    assert not vi.enabled and vi.serving("muq", "x") is None
    vi = VectorIndex(1 << 30)
    mi = ready("latent", 4, ["a"], np.ones((1, 4), np.float32))
    vi._serving["latent"] = mi
    vi.upserted("latent", "a_rebuild_collection", ["b"], np.ones((1, 4)))
    vi.deleted("latent", "a_rebuild_collection", ["a"])
    assert set(mi.get(["a", "b"])) == {"a"}
    assert vi.serving("latent", "phys") is mi
    assert vi.serving("latent", "the_new_live_set") is None  # a committed rebuild: rebuilt, Milvus meanwhile


def test_query_vectors_are_checked_like_milvus_does():
    mi = ready("latent", 4, ["a"], np.ones((1, 4), np.float32))
    for bad in (np.zeros(4), np.ones(5), np.array([1.0, np.nan, 0, 0])):
        with pytest.raises(EmbeddError) as err:
            mi.query(bad)
        assert err.value.code is Code.BAD_REQUEST


def test_projection_is_fixed_and_keeps_cosines():
    """MERT-wide vectors: the same projection in every process; cosines within about (1 - c^2) / sqrt(width)."""
    dim, width = 76_800, 1024
    a, b = SignProjection(dim, width, 7), SignProjection(dim, width, 7)
    rng = np.random.default_rng(1)
    base = rng.normal(size=(1, dim)).astype(np.float32)
    x = np.concatenate([base + s * rng.normal(size=(1, dim)).astype(np.float32) for s in (0.3, 0.7, 1.0, 2.0, 5.0)])
    np.testing.assert_array_equal(a(x), b(x))
    assert ModelIndex("mert", "phys", dim, ModelIndex.capacity_for(100, dim)[0], rows=100).exact  # a few tracks: exact
    assert ModelIndex.capacity_for(100, dim)[1] < 100 << 20
    mi = ModelIndex("mert", "phys", dim, 1000)
    assert not mi.exact and mi.width == width and dim > EXACT_MAX_DIM
    true = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (base / np.linalg.norm(base)).T
    approx = mi.to_space(x) @ mi.to_space(base).T
    assert np.max(np.abs(true - approx)) < 4 * np.max(1 - true**2) / np.sqrt(width) + 1e-3


@pytest.mark.parametrize("graph_min_rows", [0, 100], ids=["exact", "graph"])
def test_built_from_milvus_lite_and_kept_current_by_the_store(tmp_path, graph_min_rows):
    """A real Lite collection: the index builds through the read lane, then the store's writes land in it.

    With a graph (a collection over ``graph_min_rows``): built after the index, on its own thread; the
    rows written after it (searched exactly beside it) and the rows deleted (filtered from its answers)
    are handled alike. 300 rows are fewer than the graph's search width, so its answers are exact here.
    """

    async def main() -> None:
        store = VectorStore(str(tmp_path / "milvus.db"))
        io = StoreIO(store, {"latent": "embedd_latent_test"})
        vi = VectorIndex(64 << 20, graph_min_rows=graph_min_rows)
        store.index = io.reader.index = vi
        rng = np.random.default_rng(5)
        vecs = rng.normal(size=(300, 576)).astype(np.float32)

        def row(i: int, v: np.ndarray) -> TrackRow:
            return TrackRow(track_id=f"t{i}", vector=v, path=f"/m/{i}.flac", title="", artist="", album="",
                            duration_s=1.0, model_id="x", file_size=1, file_mtime=1.0, embedded_at=1.0)  # fmt: skip

        def write(s: VectorStore) -> None:
            s.ensure("latent", "embedd_latent_test", 576)
            s.upsert("latent", [row(i, v) for i, v in enumerate(vecs)])

        await io.call(write)
        physical = await io.read(lambda s: (io.prepare(s, "latent", 576, any_dim=True), s.layout("latent").physical)[1])
        assert await io.read(lambda s: vi.serving("latent", physical)) is None  # not built yet: wanted
        vi.kick(io, {"latent": 576})
        for _ in range(200):
            if vi.serving("latent", physical) is not None:
                break
            await asyncio.sleep(0.05)
        mi = vi.serving("latent", physical)
        assert mi is not None and len(mi) == 300 and mi.exact
        if graph_min_rows:
            await asyncio.to_thread(vi.wait_graphs, 60)
            assert mi.graph is not None and vi.view()["latent"]["graph"] == 300
        else:
            assert mi.graph is None and vi.view()["latent"]["graph"] is None
        ids = [f"t{i}" for i in range(300)]
        q = vecs[:4]
        milvus = await io.read(lambda s: s.search_many("latent", list(q), 10))
        for g, hs in zip(mi.search(mi.to_space(q), 10), milvus):
            same_ranking(g, [(h.track_id, h.score) for h in hs])
        for g, w in zip(mi.search(mi.to_space(q), 10), brute(vecs, ids, q, 10)):
            same_ranking(g, w)
        # The daemon's own writes: seen at once.
        new = rng.normal(size=(1, 576)).astype(np.float32)
        await io.call(lambda s: s.upsert("latent", [row(999, new[0])]))
        assert mi.search(mi.to_space(new), 1)[0][0][0] == "t999"
        await io.call(lambda s: s.delete("latent", ["t999", "t0"]))
        assert "t999" not in mi.get(["t999"]) and len(mi) == 299
        assert all(t != "t0" for t, _ in mi.search(mi.to_space(vecs[:1]), 5)[0])
        await vi.stop()
        await io.close(10.0)

    asyncio.run(main())


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 30_000), nq=st.integers(1, 6), k=st.integers(1, 80), seed=st.integers(0, 2**16),
       ties=st.booleans(), masked=st.integers(0, 3000))  # fmt: skip
def test_top_k_selection_is_exact(rows, nq, k, seed, ties, masked):
    """The sampled-threshold selection returns exactly the k largest per column (ties, masked rows included)."""
    from embedd.store.model_index import _top_k

    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(rows, nq)).astype(np.float32)
    if ties:
        scores = np.round(scores, 1)
    scores[rng.choice(rows, min(masked, rows), replace=False)] = -np.inf
    got_s, got_i = _top_k(scores, k)
    kk = min(k, rows)
    assert got_s.shape == (nq, kk)
    for qi in range(nq):
        want = np.sort(scores[:, qi])[::-1][:kk]
        np.testing.assert_array_equal(np.sort(got_s[qi])[::-1], want)
        np.testing.assert_array_equal(scores[got_i[qi], qi], got_s[qi])
        assert len(set(got_i[qi].tolist())) == kk


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 40) -> np.ndarray:
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    return centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)


def test_graph_search_scores_exactly_and_finds_the_neighbours():
    """Past graph_min_rows, a search takes the graph's candidates and re-scores them exactly: every
    score returned is the true cosine, nearly all true neighbours are found, and excluded, deleted
    and later-written rows are handled as in exact search."""
    import threading

    rng = np.random.default_rng(11)
    n, dim, k = 4000, 48, 30
    vecs = clustered(rng, n, dim)
    ids = [f"t{i}" for i in range(n)]
    mi = ModelIndex("m", "phys", dim, n + 16, graph_min_rows=1000)
    mi.put(ids, vecs, from_build=True)
    mi.finish_build()
    assert mi.graph_due()
    graph = mi.build_graph(threading.Event())
    assert graph is not None and mi.graph is graph and graph.rows == n and not mi.graph_due()

    qi = rng.choice(n, 20, replace=False)
    queries = vecs[qi]
    exclude = {ids[i] for i in qi}
    got = mi.search(mi.to_space(queries), k, exclude)
    want = brute(vecs, ids, queries, k, exclude)
    recall = np.mean([len({t for t, _ in g} & {t for t, _ in w}) / k for g, w in zip(got, want)])
    assert recall >= 0.95
    truth = {t: dict(row) for t, row in zip(range(20), brute(vecs, ids, queries, n))}
    for i, row in enumerate(got):
        assert len(row) == k and not {t for t, _ in row} & exclude
        for tid, score in row:
            assert score == pytest.approx(truth[i][tid], abs=2e-5)
        assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)

    # Written after the graph: searched exactly beside it. Deleted: never returned.
    new = clustered(rng, 5, dim)
    mi.put([f"new{i}" for i in range(5)], new)
    mi.remove([ids[0]])
    hits = mi.search(mi.to_space(np.concatenate([new, vecs[:1]])), 3)
    assert [row[0][0] for row in hits[:5]] == [f"new{i}" for i in range(5)]
    assert all(t != ids[0] for t, _ in hits[5])
    assert mi.graph is graph  # a few writes: the graph stays


def test_graph_is_rebuilt_when_outgrown_and_voided_by_a_compaction():
    import threading

    rng = np.random.default_rng(3)
    dim = 16
    mi = ModelIndex("m", "phys", dim, 1000, graph_min_rows=500)
    mi.finish_build()
    mi.put([f"a{i}" for i in range(400)], rng.normal(size=(400, dim)).astype(np.float32))
    assert not mi.graph_due()  # under graph_min_rows: exact search only
    mi.put([f"b{i}" for i in range(200)], rng.normal(size=(200, dim)).astype(np.float32))
    assert mi.graph_due()
    mi.build_graph(threading.Event())
    assert mi.graph is not None and not mi.graph_due()
    mi.put([f"c{i}" for i in range(GRAPH_TAIL_MIN + 1)], rng.normal(size=(GRAPH_TAIL_MIN + 1, dim)).astype(np.float32))
    assert mi.graph is None  # this write outgrew the matrix: compacted, slots renumbered, the graph void
    assert mi.graph_due()
    mi.build_graph(threading.Event())
    rows = mi.graph.rows
    mi.remove([f"c{i}" for i in range(rows // 10 + 1)])
    assert mi.graph_due()  # a tenth of its rows deleted since


def test_a_stopped_graph_build_leaves_exact_search():
    import threading

    from embedd.store.graph import GraphStopped

    rng = np.random.default_rng(4)
    mi = ModelIndex("m", "phys", 8, 700, graph_min_rows=100)
    mi.put([f"t{i}" for i in range(600)], rng.normal(size=(600, 8)).astype(np.float32), from_build=True)
    mi.finish_build()
    stop = threading.Event()
    stop.set()
    with pytest.raises(GraphStopped):
        mi.build_graph(stop)
    assert mi.graph is None and mi.graph_due()  # exact search meanwhile; built again at the next chance


def test_graph_rescore_is_exact_and_refuses_rows_outside_its_matrix():
    """faiss reads the candidate rows by address: a row past the graph is a Misuse, never a read out of bounds."""
    import threading

    from embedd.errors import Misuse
    from embedd.store.graph import Graph

    rng = np.random.default_rng(5)
    mat = rng.normal(size=(300, 24)).astype(np.float32)
    graph = Graph.build(mat, 300, 0, threading.Event())
    q = rng.normal(size=(2, 24)).astype(np.float32)
    rows = np.array([[0, 299, -1], [5, 6, 7]], dtype=np.int64)
    got = graph.rescore(mat, q, rows)
    assert got[0, 2] == -np.inf
    want = np.einsum("qkd,qd->qk", mat[np.where(rows < 0, 0, rows)].astype(np.float64), q.astype(np.float64))
    assert np.allclose(got[rows >= 0], want[rows >= 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(Misuse):
        graph.rescore(mat, q, np.array([[0, 300, 1], [1, 2, 3]], dtype=np.int64))
    with pytest.raises(Misuse):
        graph.rescore(mat[:, :12], q, rows)

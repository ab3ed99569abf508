"""Recommendation latency: 50 seeds x 3 models over a 100,000-track collection, p50 / p95.

In-process: the ``recommend`` op's own code (:func:`embedd.recommend.recommend`)
over a real Milvus Lite file or server, with the store on its own threads as in
the daemon (``StoreIO``) and the daemon's in-memory vector index
(:mod:`embedd.store.index`, built from the collection before measuring; ``--no-index``:
every search in Milvus, as before the index); no models are loaded (track seeds
need none) and no HTTP or socket framing is counted (a few hundred
microseconds, see bench/protocol_bench.py). The collection is written once and
reused from ``--data-dir`` on later runs.

Widths: MuQ 1536 and Music2Latent 576 are the real ones; MERT's real 76,800
floats x 100,000 rows would be 30 GB in Milvus, so MERT gets ``--mert-dim``
(default 1024) here. The index holds real MERT as a 1024-dim projection, so
the stand-in's exact 1024-dim matrix costs a search exactly what real MERT's
costs; what the projection does to MERT's neighbours is measured apart
(``--recall``: per-seed recall against brute force at the real width).

``--load``: during the measurement, a batch job's load: a child process at
nice 10 (the default ``batch_nice``) keeping both cores busy with float32
matrix products (the kind of work a CPU model pass is), and 32 new tracks per
model upserted every second through the write lane (each also lands in the
index).

Vectors: ``--clusters`` Gaussian clusters (tracks of a style lie together);
seeds are random stored tracks, a fresh set per request.

    .venv/bin/python bench/recommend.py [--server] [--rows 100000] [--seeds 50] [--requests 40] [--data-dir DIR]
                                        [--no-index] [--load] [--recall] [--graph-recall] [--profile]

``--server`` runs a real Milvus 2.3.5 standalone server (the tests' own,
tests/milvus_fixtures.py) with embedd's HNSW index; without it, Milvus Lite,
whose only index is FLAT (every query scans every row).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedd.models import CATALOG  # noqa: E402
from embedd.ops import parse_request  # noqa: E402
from embedd.recommend import recommend  # noqa: E402
from embedd.store import TrackRow, VectorStore  # noqa: E402
from embedd.store.index import VectorIndex  # noqa: E402
from embedd.store.model_index import GRAPH_MIN_ROWS, PROJECTED_DIM, ModelIndex  # noqa: E402
from embedd.store.io import StoreIO  # noqa: E402

MODELS = ("muq", "mert", "latent")


def track_row(i: int, vector: np.ndarray) -> TrackRow:
    return TrackRow(track_id=f"t{i:07d}", vector=vector, path=f"/music/{i}.flac", title=f"Song {i}",
                    artist=f"Artist {i % 997}", album="", duration_s=200.0, model_id="bench", file_size=1,
                    file_mtime=1.0, embedded_at=1.0)  # fmt: skip


_LOAD = """
import os, numpy as np
os.nice(10)
a = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)
while True:
    a = np.tanh(a @ a)
"""


def generated(dims: dict[str, int], rows: int, clusters: int, model: str, start: int = 0):
    """The bench's vectors of ``model`` from row ``start`` on, in pages of 2,000: (first row, vectors).

    Deterministic (one seeded stream through the models in order, as the
    collections were written), so a later run can hold the very vectors a
    collection holds without reading them back (``--index-from-vectors``).
    """
    rng = np.random.default_rng(1)
    step = 2000
    for m in MODELS:
        centers = rng.normal(size=(clusters, dims[m])).astype(np.float32)
        for first in range(0, rows, step):
            n = min(step, rows - first)
            label = rng.integers(0, clusters, n)
            noise = rng.normal(size=(n, dims[m])).astype(np.float32)
            if m == model and first + n > start:
                yield first, centers[label] + 0.9 * noise
        if m == model:
            return


def populate(store: VectorStore, dims: dict[str, int], rows: int, clusters: int) -> None:
    for m in MODELS:
        store.ensure(m, CATALOG[m].collection, dims[m])
        have = store.count(m)
        if have >= rows:
            continue
        started = time.perf_counter()
        for first, vecs in generated(dims, rows, clusters, m, have):
            store.upsert(m, [track_row(first + i, v) for i, v in enumerate(vecs) if first + i >= have])
        print(f"  wrote {rows - have} {m} rows ({dims[m]} dims) in {time.perf_counter() - started:.0f} s", flush=True)


async def index_from_vectors(index: VectorIndex, io: StoreIO, dims: dict[str, int], args: argparse.Namespace) -> None:
    """Hold the vectors the collections were written with, without the scan that reads them back.

    For Milvus Lite, whose query iterator reads 100,000 wide rows back slowly: the
    search and the op are what is measured here (the build from a server: the
    default path, timed above in BENCHMARKS.md).
    """
    for m in MODELS:
        started = time.perf_counter()
        physical = await io.read(lambda s, m=m: (io.prepare(s, m, dims[m], any_dim=True), s.layout(m).physical)[1])
        capacity, _ = ModelIndex.capacity_for(args.rows, dims[m], graph_min_rows=index.graph_min_rows)
        mi = ModelIndex(m, physical, dims[m], capacity, rows=args.rows, graph_min_rows=index.graph_min_rows)
        for first, vecs in generated(dims, args.rows, args.clusters, m):
            mi.put([f"t{first + i:07d}" for i in range(len(vecs))], vecs, from_build=True)
        mi.finish_build()
        index._serving[m] = mi  # (what VectorIndex.build does at its end)
        index._maybe_graph(mi)
        await asyncio.to_thread(index.wait_graphs)
        print(f"  index of {m}: {len(mi)} tracks from the generated vectors, graph "
              f"{mi.graph.rows if mi.graph else None}, in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip


class _Executor:
    """What the recommender asks of the executor when every seed is a stored track."""

    def __init__(self, dims: dict[str, int]) -> None:
        self.dims = dims

    async def described(self) -> None:
        return None

    def model_dim(self, name: str) -> int:
        return self.dims[name]


async def run(args: argparse.Namespace) -> None:
    dims = {"muq": 1536, "mert": args.mert_dim, "latent": 576}
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    server = None
    if args.server:
        from tests.milvus_fixtures import MilvusServer

        server = MilvusServer(data / "server")
        server.start()
        uri, where = server.uri, f"a Milvus 2.3.5 server, data in {data / 'server'}"
    else:
        uri, where = str(data / "milvus.db"), f"Milvus Lite at {data / 'milvus.db'}"
    store = VectorStore(uri, timeout_s=600.0)
    print(f"collection: {args.rows} tracks per model, widths {dims} ({where})", flush=True)
    populate(store, dims, args.rows, args.clusters)
    io = StoreIO(store, {m: CATALOG[m].collection for m in MODELS})
    service = SimpleNamespace(executor=_Executor(dims), store_io=io, library=None)
    rng = np.random.default_rng(2)
    if not args.no_index:
        index = VectorIndex(args.cache_mb << 20, graph_min_rows=args.graph_min_rows)
        store.index = io.reader.index = index
        if args.index_from_vectors:
            await index_from_vectors(index, io, dims, args)
        for m in MODELS if not args.index_from_vectors else ():
            started = time.perf_counter()
            held = await index.build(io, m, dims[m])
            assert held is not None, index.view()
            print(f"  index of {m}: {len(held)} tracks x {held.width} dims ({'exact' if held.exact else 'projected'}), "
                  f"{held.nbytes / 2**20:.0f} MiB, built in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
            started = time.perf_counter()
            await asyncio.to_thread(index.wait_graphs)
            if held.graph is not None:
                print(f"  graph of {m}: {held.graph.rows} tracks, built in {time.perf_counter() - started:.0f} s "
                      "(on its own thread, at nice 10)", flush=True)  # fmt: skip
    if server is not None and not args.no_index and server._proc is not None:
        # The server keeps re-indexing its segments in the background (a core or more on this box); with the
        # in-memory index it only answers the final describe, so it gets the CPU the measurement leaves.
        for tid in os.listdir(f"/proc/{server._proc.pid}/task"):  # nice is per thread on Linux
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), 19)
            except OSError:
                pass
        print("  (the Milvus server's own background work runs at nice 19 while measuring)", flush=True)
    print(f"searches: {'Milvus (no index)' if args.no_index else 'the in-memory index'}; "
          f"load: {'a batch job (nice-10 CPU hog + upserts)' if args.load else 'none'}", flush=True)
    hog = writer = None
    if args.load:
        hog = subprocess.Popen([sys.executable, "-c", _LOAD])

        async def write_forever() -> None:
            wrng = np.random.default_rng(9)
            i = args.rows
            while True:
                batch = {m: [track_row(i + j, wrng.normal(size=dims[m]).astype(np.float32)) for j in range(32)] for m in MODELS}
                await io.call(lambda s: [s.upsert(m, rs) for m, rs in batch.items()])
                i += 32
                await asyncio.sleep(1.0)

        writer = asyncio.ensure_future(write_forever())
        await asyncio.sleep(2.0)

    async def one(models: list[str], seeds: int, **extra) -> float:
        ids = [f"t{i:07d}" for i in rng.choice(args.rows, seeds, replace=False)]
        message = {"op": "recommend", "seeds": [{"track_id": t, "weight": 1.0, "source": "recent"} for t in ids],
                   "models": models, "limit": args.limit, **extra}  # fmt: skip
        started = time.perf_counter()
        result = await recommend(service, parse_request(message).args)  # type: ignore[arg-type]
        took = time.perf_counter() - started
        assert len(result["tracks"]) == args.limit, result["warnings"]
        return took

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    cases = [
        (f"{args.seeds} seeds x 3 models (union)", list(MODELS), args.seeds, {}),
        (f"{args.seeds} seeds x 3 models, diversity 0.3", list(MODELS), args.seeds, {"diversity": 0.3}),
        (f"{args.seeds} seeds x muq", ["muq"], args.seeds, {}),
        ("5 seeds x 3 models", list(MODELS), 5, {}),
    ]
    if args.profile:  # where a request's time goes (the first case), then stop
        import cProfile
        import pstats

        for _ in range(3):
            await one(list(MODELS), args.seeds)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            await one(list(MODELS), args.seeds)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        cases = []
    for name, models, seeds, extra in cases:
        for _ in range(3):  # warm-up: collections loaded, caches warm
            await one(models, seeds, **extra)
        load0, cpu0 = os.getloadavg()[0], cpu_s()
        times = sorted([await one(models, seeds, **extra) for _ in range(args.requests)])
        cpu = (cpu_s() - cpu0) / args.requests * 1000
        p50 = statistics.median(times) * 1000
        p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))] * 1000
        print(f"{name:<40} limit {args.limit}: p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   ({args.requests} requests; "
              f"{cpu:.0f} ms CPU each; host load {load0:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    if writer is not None:
        writer.cancel()
    if hog is not None:
        hog.kill()
        hog.wait()
    await io.close(10.0)
    if server is not None:
        server.stop()


def recall(args: argparse.Namespace) -> None:
    """MERT's projection against brute force at the real width: per-seed recall of the neighbours, score error."""
    from embedd.recommend import neighbours

    dim, n, k = 76_800, args.recall_rows, neighbours(args.limit)
    rng = np.random.default_rng(4)
    # Tracks of a style lie together (clusters), all share a common direction (real embeddings are
    # anisotropic: random tracks are far from orthogonal), and a few dims are much larger (outlier features).
    scale = np.where(rng.random(dim) < 0.001, 20.0, 1.0).astype(np.float32)
    common = rng.normal(size=dim).astype(np.float32)
    centers = rng.normal(size=(args.clusters, dim)).astype(np.float32)
    mi = ModelIndex("mert", "bench", dim, n)
    assert not mi.exact and mi.width == PROJECTED_DIM
    exact = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 500):
        m = min(500, n - start)
        v = (common + centers[rng.integers(0, args.clusters, m)] + args.noise * rng.normal(size=(m, dim)).astype(np.float32)) * scale
        exact[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
        mi.put([f"t{start + i}" for i in range(m)], v, from_build=True)
    mi.finish_build()
    seeds = rng.choice(n, args.seeds, replace=False)
    truth = exact[seeds] @ exact.T
    held = mi.get([f"t{i}" for i in seeds])
    got = mi.search(np.stack([held[f"t{i}"] for i in seeds]), k + 1)
    recalls, errors, quality = [], [], []
    for row, s, hits in zip(truth, seeds, got):
        row[s] = -np.inf  # the seed itself
        want = np.argpartition(-row, k)[:k]
        have = [int(t[1:]) for t, _ in hits if int(t[1:]) != s][:k]
        recalls.append(len(set(want.tolist()) & set(have)) / k)
        quality.append(float(row[have].sum() / row[want].sum()))  # true cosines of those returned / of the true top k
        errors.extend(abs(score - row[int(t[1:])]) for t, score in hits if int(t[1:]) != s)
    rec = np.array(recalls)
    typical = float(np.median(truth[np.isfinite(truth)]))
    print(f"MERT projection {dim} -> {PROJECTED_DIM} dims, {n} tracks ({args.clusters} clusters, noise {args.noise}, "
          f"median cosine of two tracks {typical:.2f}), {args.seeds} seeds, k = {k}: recall@k mean {rec.mean():.3f}, "
          f"min {rec.min():.3f}; true cosine of those returned / of the true top k: mean {np.mean(quality):.4f}, "
          f"min {np.min(quality):.4f}; |score error| median {np.median(errors):.4f}, p95 {np.percentile(errors, 95):.4f}",
          flush=True)  # fmt: skip


def graph_recall(args: argparse.Namespace) -> None:
    """The navigation graph against brute force, in one run: per-seed recall@k, search time, build time.

    Two kinds of vectors at each real width: the bench's clusters (tracks of a
    style together), and a hard set (isotropic in 256 dims with a decaying
    spectrum: no clusters to lean on, the graph's worst case among plausible ones).
    """
    import threading

    from embedd.recommend import neighbours

    rng = np.random.default_rng(7)
    n, k = args.rows, neighbours(args.limit)
    for dim in (1536, 1024, 576):
        for kind in ("clustered", "hard"):
            if kind == "clustered":
                centers = rng.normal(size=(args.clusters, dim)).astype(np.float32)
                x = centers[rng.integers(0, args.clusters, n)] + 0.9 * rng.normal(size=(n, dim)).astype(np.float32)
            else:
                basis = np.linalg.qr(rng.normal(size=(dim, 256)))[0].astype(np.float32)
                spectrum = (np.arange(1, 257) ** -0.7).astype(np.float32)
                x = (rng.normal(size=(n, 256)).astype(np.float32) * spectrum) @ basis.T
                x += 0.02 * rng.normal(size=(n, dim)).astype(np.float32)
            ids = [f"t{i}" for i in range(n)]
            mi = ModelIndex("m", "bench", dim, n + 16, graph_min_rows=1)
            mi.put(ids, x, from_build=True)
            mi.finish_build()
            started = time.perf_counter()
            mi.build_graph(threading.Event())
            built = time.perf_counter() - started
            seeds = rng.choice(n, args.seeds, replace=False)
            q = mi.to_space(x[seeds])
            exclude = [ids[i] for i in seeds]

            def timed() -> tuple[float, list]:
                times = []
                for _ in range(6):
                    t0 = time.perf_counter()
                    out = mi.search(q, k, exclude)
                    times.append(time.perf_counter() - t0)
                return statistics.median(times[1:]) * 1000, out

            t_graph, got = timed()
            graph, mi.graph = mi.graph, None
            t_exact, want = timed()
            mi.graph = graph
            recall = np.mean([len({t for t, _ in g} & {t for t, _ in w}) / k for g, w in zip(got, want)])
            print(f"{dim:>5} dims, {kind:<9}: recall@{k} {recall:.3f}; {args.seeds} seeds: graph {t_graph:6.1f} ms, "
                  f"exact {t_exact:6.1f} ms ({t_exact / t_graph:.1f}x); graph built in {built:.0f} s", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--mert-dim", type=int, default=1024)
    parser.add_argument("--data-dir", default="/tmp/embedd-bench-rec")
    parser.add_argument("--fresh", action="store_true", help="delete --data-dir first")
    parser.add_argument("--server", action="store_true", help="a Milvus server (HNSW) instead of Milvus Lite (FLAT)")
    parser.add_argument("--no-index", action="store_true", help="no in-memory index: every search in Milvus")
    parser.add_argument("--cache-mb", type=int, default=4096, help="the index's memory budget (vector_cache_mb)")
    parser.add_argument("--graph-min-rows", type=int, default=GRAPH_MIN_ROWS,
                        help="vector_graph_min_rows (0: exact search only, as before the graphs)")  # fmt: skip
    parser.add_argument("--load", action="store_true", help="measure during a simulated batch job")
    parser.add_argument("--index-from-vectors", action="store_true",
                        help="hold the generated vectors instead of reading the collection back (Milvus Lite)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="profile 10 requests (cProfile, by own time) instead")
    parser.add_argument("--recall", action="store_true", help="only measure MERT's projection against brute force")
    parser.add_argument("--recall-rows", type=int, default=4000)
    parser.add_argument("--graph-recall", action="store_true",
                        help="only measure the navigation graph against exact search (--rows vectors per width)")  # fmt: skip
    parser.add_argument("--noise", type=float, default=1.0, help="--recall: within-cluster spread (1.0: clusters barely apart)")
    args = parser.parse_args()
    if args.recall:
        recall(args)
        return 0
    if args.graph_recall:
        graph_recall(args)
        return 0
    if args.fresh:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

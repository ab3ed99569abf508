"""Recommendation latency: 50 seeds x 3 models over a 100,000-track collection, p50 / p95.

In-process: the ``recommend`` op's own code (:func:`embedd.recommend.recommend`)
over a real Milvus Lite file, with the store on its own thread as in the
daemon (``StoreIO``); no models are loaded (track seeds need none) and no
HTTP or socket framing is counted (a few hundred microseconds, see
bench/protocol_bench.py). The collection is written once and reused from
``--data-dir`` on later runs.

Widths: MuQ 1536 and Music2Latent 576 are the real ones; MERT's real 76,800
floats x 100,000 rows would be 30 GB, so MERT gets ``--mert-dim`` (default
1024) here: the work per query is the same kind, only smaller.

Vectors: ``--clusters`` Gaussian clusters (tracks of a style lie together);
seeds are random stored tracks, a fresh set per request.

    .venv/bin/python bench/recommend.py [--server] [--rows 100000] [--seeds 50] [--requests 40] [--data-dir DIR]

``--server`` runs a real Milvus 2.3.5 standalone server (the tests' own,
tests/milvus_fixtures.py) with embedd's HNSW index; without it, Milvus Lite,
whose only index is FLAT (every query scans every row).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedd.models import CATALOG  # noqa: E402
from embedd.protocol import parse_request  # noqa: E402
from embedd.recommend import recommend  # noqa: E402
from embedd.store import TrackRow, VectorStore  # noqa: E402
from embedd.store.io import StoreIO  # noqa: E402

MODELS = ("muq", "mert", "latent")


def populate(store: VectorStore, dims: dict[str, int], rows: int, clusters: int) -> None:
    rng = np.random.default_rng(1)
    for m in MODELS:
        store.ensure(m, CATALOG[m].collection, dims[m])
        have = store.count(m)
        if have >= rows:
            continue
        centers = rng.normal(size=(clusters, dims[m])).astype(np.float32)
        started = time.perf_counter()
        step = 2000
        for start in range(have, rows, step):
            n = min(step, rows - start)
            vecs = centers[rng.integers(0, clusters, n)] + 0.9 * rng.normal(size=(n, dims[m])).astype(np.float32)
            store.upsert(
                m,
                [
                    TrackRow(track_id=f"t{start + i:07d}", vector=vecs[i], path=f"/music/{start + i}.flac",
                             title=f"Song {start + i}", artist=f"Artist {(start + i) % 997}", album="",
                             duration_s=200.0, model_id="bench", file_size=1, file_mtime=1.0, embedded_at=1.0)  # fmt: skip
                    for i in range(n)
                ],
            )
        print(f"  wrote {rows - have} {m} rows ({dims[m]} dims) in {time.perf_counter() - started:.0f} s", flush=True)


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

    async def one(models: list[str], seeds: int, **extra) -> float:
        ids = [f"t{i:07d}" for i in rng.choice(args.rows, seeds, replace=False)]
        message = {"op": "recommend", "seeds": [{"track_id": t, "weight": 1.0, "source": "recent"} for t in ids],
                   "models": models, "limit": args.limit, **extra}  # fmt: skip
        started = time.perf_counter()
        result = await recommend(service, parse_request(message).args)  # type: ignore[arg-type]
        took = time.perf_counter() - started
        assert len(result["tracks"]) == args.limit, result["warnings"]
        return took

    cases = [
        (f"{args.seeds} seeds x 3 models (union)", list(MODELS), args.seeds, {}),
        (f"{args.seeds} seeds x 3 models, diversity 0.3", list(MODELS), args.seeds, {"diversity": 0.3}),
        (f"{args.seeds} seeds x muq", ["muq"], args.seeds, {}),
        ("5 seeds x 3 models", list(MODELS), 5, {}),
    ]
    for name, models, seeds, extra in cases:
        for _ in range(3):  # warm-up: collections loaded, caches warm
            await one(models, seeds, **extra)
        times = sorted([await one(models, seeds, **extra) for _ in range(args.requests)])
        p50 = statistics.median(times) * 1000
        p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))] * 1000
        print(f"{name:<40} limit {args.limit}: p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   ({args.requests} requests)", flush=True)
    await io.close(10.0)
    if server is not None:
        server.stop()


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
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

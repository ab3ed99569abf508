"""Searches by stored track while the batch job upserts MERT vectors: one store lane vs a read lane.

The batch job writes each model's vectors 32 tracks per upsert; a MERT track
is 76,800 floats (300 KB), so one call is about 10 MB. Before the read lane, a
search by stored track (``search`` with ``track_id``, AudioMuse's
``similar_tracks``) queued on the store's one thread behind those upserts.

For Milvus Lite (a file; served in-process by pymilvus' milvus-lite) and a
Milvus server (``tests/milvus_fixtures``, the PyPI ``milvus`` 2.3.5 binary),
the same :class:`~embedd.store.io.StoreIO` the daemon uses, with a writer
upserting MERT tracks back to back (the worst case: a GPU host's job):

* ``idle``: reads alone;
* ``before: one lane``: reads through ``StoreIO.call`` behind 16 MB upserts
  (one per write batch), as before the read lane;
* ``one lane, a call per small upsert``: the alternative to a second
  connection — the write batch upserted ``rows.WRITE_BYTES`` at a time, each
  upsert a call of its own, so a read queued on the one lane waits for at most
  one small upsert;
* ``read lane, 16 MB upserts``: reads through ``StoreIO.read`` (own thread and
  connection), writes as before;
* ``as built``: the read lane, small upserts, and reads first between them;
* the writer alone with 16 MB and with small upserts: what the split costs.

Each read is what ``search`` by stored track does: fetch the track's MuQ vector
and search the 1536-dim collection for 10 neighbours. Printed: read latency
p50 / p95 / max, and the writer's MERT tracks per second during the phase
(reads first slows the writer while reads run: that is the point).

    python bench/store_reads.py [--backend lite|server|both] [--rows 2000] [--reads 40]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedd.store import TrackRow, VectorStore  # noqa: E402
from embedd.store import rows as row_mod  # noqa: E402
from embedd.store.io import StoreIO  # noqa: E402
from embedd.store.layout import Layout  # noqa: E402

MERT_DIM = 76_800
MUQ_DIM = 1536
WRITE_BATCH = 32  # embedd.batch.writer.WRITE_BATCH
SMALL = row_mod.WRITE_BYTES  # the upsert size as built


def _rows(n: int, dim: int, start: int, rng: np.random.Generator) -> list[TrackRow]:
    return [
        TrackRow(
            track_id=f"t{start + i}", vector=rng.standard_normal(dim).astype(np.float32), path=f"/music/{start + i}.flac",
            title=f"title {start + i}", artist="artist", album="album", duration_s=240.0, model_id="bench",
            file_size=1, file_mtime=1.0, embedded_at=1.0,
        )  # fmt: skip
        for i in range(n)
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


async def _phase(
    io: StoreIO, name: str, *, reads: int, lane: str, small: bool, write: bool, rows: int, rng, per_call: bool = False
) -> None:
    """Reads (``lane``: "read" or "call") while a writer upserts 32 MERT tracks per call, back to back.

    ``small``: upserts of ``rows.WRITE_BYTES`` with reads first between them (as built);
    else one upsert per call with no priority (as before). ``per_call``: each small
    upsert is a call of its own on the one lane (the alternative to a read lane).
    """
    row_mod.WRITE_BYTES = SMALL if small else row_mod.UPSERT_BYTES
    io.store.milvus.between_writes = io._reads_first if small else None
    batch = _rows(WRITE_BATCH, MERT_DIM, 100_000, rng)
    written = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal written
        step = row_mod.rows_per_call(Layout("", MERT_DIM, 1, MERT_DIM), SMALL) if per_call else len(batch)
        while not stop.is_set():
            for start in range(0, len(batch), step):
                part = batch[start : start + step]
                await io.call(lambda s, p=part: s.upsert("mert", p))
                written += len(part)

    def by_track(store: VectorStore, tid: str) -> int:
        io.prepare(store, "muq", MUQ_DIM, any_dim=True)
        return len(store.search("muq", store.get_vector("muq", tid), 10))

    task = asyncio.ensure_future(writer()) if write else None
    await asyncio.sleep(0.5 if task else 0)
    submit = io.read if lane == "read" else io.call
    latencies = []
    started = time.perf_counter()
    for _ in range(reads):
        tid = f"t{random.randrange(rows)}"
        t0 = time.perf_counter()
        await submit(lambda s, t=tid: by_track(s, t))
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(random.uniform(0.02, 0.1))
    elapsed = time.perf_counter() - started
    stop.set()
    if task is not None:
        await task
    rate = f"{written / elapsed:6.1f} MERT tracks/s written" if task else ""
    print(
        f"  {name:34s} read p50 {statistics.median(latencies):6.3f} s  p95 {_pct(latencies, 0.95):6.3f} s  "
        f"max {max(latencies):6.3f} s   {rate}",
        flush=True,
    )


async def _write_rate(io: StoreIO, name: str, *, small: bool, seconds: float, rng) -> None:
    """The writer alone: what smaller upserts cost the batch job."""
    row_mod.WRITE_BYTES = SMALL if small else row_mod.UPSERT_BYTES
    batch = _rows(WRITE_BATCH, MERT_DIM, 300_000, rng)
    written, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await io.call(lambda s: s.upsert("mert", batch))
        written += len(batch)
    print(f"  {name:34s} {written / (time.perf_counter() - t0):6.1f} MERT tracks/s written", flush=True)


async def _run(uri: str, label: str, args) -> None:
    rng = np.random.default_rng(0)
    io = StoreIO(VectorStore(uri, timeout_s=120), {"muq": "bench_muq", "mert": "bench_mert"})
    t0 = time.perf_counter()

    def fill(store: VectorStore) -> None:
        io.prepare(store, "muq", MUQ_DIM)
        io.prepare(store, "mert", MERT_DIM)
        for start in range(0, args.rows, 500):
            store.upsert("muq", _rows(min(500, args.rows - start), MUQ_DIM, start, rng))

    await io.call(fill)
    print(f"{label}: {args.rows} MuQ rows (filled in {time.perf_counter() - t0:.1f} s)", flush=True)
    common = dict(reads=args.reads, rows=args.rows, rng=rng)
    await _phase(io, "idle", lane="read", small=True, write=False, **common)
    await _phase(io, "before: one lane", lane="call", small=False, write=True, **common)
    await _phase(io, "one lane, a call per small upsert", lane="call", small=True, write=True, per_call=True, **common)
    await _phase(io, "read lane, 16 MB upserts", lane="read", small=False, write=True, **common)
    await _phase(io, "as built: read lane, reads first", lane="read", small=True, write=True, **common)
    await _write_rate(io, "writer alone, 16 MB upserts", small=False, seconds=args.write_seconds, rng=rng)
    await _write_rate(io, "writer alone, small upserts", small=True, seconds=args.write_seconds, rng=rng)
    await io.close(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("lite", "server", "both"), default="both")
    ap.add_argument("--rows", type=int, default=2000, help="MuQ rows searched (default 2000)")
    ap.add_argument("--reads", type=int, default=40, help="reads per phase (default 40)")
    ap.add_argument("--write-seconds", type=float, default=10.0, help="seconds of each writer-alone phase (default 10)")
    args = ap.parse_args()
    random.seed(0)
    if args.backend in ("lite", "both"):
        asyncio.run(_run(str(Path(tempfile.mkdtemp(prefix="embedd-bench-")) / "milvus.db"), "Milvus Lite", args))
    if args.backend in ("server", "both"):
        from tests.milvus_fixtures import MilvusServer

        with MilvusServer(Path(tempfile.mkdtemp(prefix="embedd-bench-srv-"))) as server:
            asyncio.run(_run(server.uri, f"Milvus server {server.uri}", args))


if __name__ == "__main__":
    main()

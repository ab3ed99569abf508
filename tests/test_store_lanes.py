"""The store's read lane: reads are answered while writes are held, go first between upserts, and follow the writes.

Every wait here is on an event the test controls (a write held inside the
write lane, a read held inside the read lane), never on a fixed sleep or a
wall-clock threshold. Milvus Lite for everything, and the server for the one
claim that depends on the backend (a read answered during a write).
"""

from __future__ import annotations

import asyncio
import threading
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedd.errors import Code, EmbeddError
from embedd.store import TrackRow, VectorStore
from embedd.store import io as store_io_module
from embedd.store import rows as store_rows
from embedd.store.io import StoreIO

pytestmark = pytest.mark.timeout(300)

DIM = 8
#: Long enough that a test passing because a wait timed out instead of being released would time out itself.
HELD_S = 60.0


def _rows(n: int, dim: int = DIM, start: int = 0, seed: int = 0) -> list[TrackRow]:
    rng = np.random.default_rng(seed)
    return [
        TrackRow(
            track_id=f"t{start + i}", vector=rng.standard_normal(dim).astype(np.float32), path=f"/m/{start + i}.flac",
            title=f"title {start + i}", artist="artist", album="album", duration_s=1.0, model_id="test",
            file_size=1, file_mtime=1.0, embedded_at=1.0,
        )  # fmt: skip
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def lite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lanes") / "milvus.db"


@pytest.fixture
def io(lite_path: Path) -> Iterator[StoreIO]:
    yield from _store_io(str(lite_path))


def _store_io(uri: str) -> Iterator[StoreIO]:
    tag = uuid.uuid4().hex[:8]
    io = StoreIO(VectorStore(uri, timeout_s=30), {"muq": f"lanes_{tag}", "mert": f"lanes_m_{tag}"})
    yield io
    asyncio.run(_drop(io, tag))


async def _drop(io: StoreIO, tag: str) -> None:
    def drop(store: VectorStore) -> None:
        client = store.milvus.client()
        for public in (f"lanes_{tag}", f"lanes_m_{tag}"):
            names = client.list_collections()
            if public not in names and client.has_collection(public):  # the alias
                client.drop_alias(public)
            for name in names:
                if name.startswith(public + "__"):
                    client.drop_collection(name)

    await io.call(drop)
    await io.close(10)


def _by_track(io: StoreIO, track_id: str, dim: int = DIM):
    """What ``search`` by stored track runs on the read lane."""

    def run(store: VectorStore):
        io.prepare(store, "muq", dim, any_dim=True)
        vector = store.get_vector("muq", track_id)
        if vector is None:
            raise EmbeddError(Code.NOT_FOUND, track_id)
        return store.search("muq", vector, 3)

    return run


async def _fill(io: StoreIO, n: int = 20) -> None:
    def fill(store: VectorStore) -> None:
        io.prepare(store, "muq", DIM)
        store.upsert("muq", _rows(n))

    await io.call(fill)


async def _hold_write(io: StoreIO) -> tuple[asyncio.Future, threading.Event]:
    """A write call held inside the write lane until the returned event is set."""
    entered, release = threading.Event(), threading.Event()

    def held(store: VectorStore) -> None:
        entered.set()
        assert release.wait(HELD_S), "the test never released the write"
        store.upsert("muq", _rows(1, start=1000))

    write = asyncio.ensure_future(io.call(held))
    assert await asyncio.to_thread(entered.wait, HELD_S)
    return write, release


@pytest.fixture(params=["lite", "server"])
def any_io(request: pytest.FixtureRequest, lite_path: Path) -> Iterator[StoreIO]:
    if request.param == "lite":
        yield from _store_io(str(lite_path))
    else:
        yield from _store_io(request.getfixturevalue("milvus_server").uri)


async def test_read_is_answered_while_a_write_is_held(any_io: StoreIO) -> None:
    io = any_io
    await _fill(io)
    write, release = await _hold_write(io)
    try:
        hits = await io.read(_by_track(io, "t3"))
        assert hits[0].track_id == "t3"
        assert not write.done()  # the write is still held: the read did not wait for it
        lanes = io.lanes_view()
        assert lanes["write"]["running_s"] is not None and lanes["read"]["depth"] == 0
        status_ok = await io.ok()  # status' ping goes on the read lane too
        assert status_ok
    finally:
        release.set()
    await write
    assert io.lanes_view()["write"] == {"depth": 0, "oldest_wait_s": None, "running_s": None}


async def test_a_write_waits_for_reads_between_its_upserts(io: StoreIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads first: a write held at an upsert boundary while a read runs; it goes on when the read ends."""
    monkeypatch.setattr(store_io_module, "READS_FIRST_MAX_S", HELD_S)
    monkeypatch.setattr(store_rows, "WRITE_BYTES", 1)  # one row per upsert call
    await _fill(io)
    read_entered, read_release = threading.Event(), threading.Event()
    gate_entered, gate_passed = threading.Event(), []
    gate = io.store.milvus.between_writes

    def counted_gate() -> None:
        gate_entered.set()
        gate()
        gate_passed.append(read_release.is_set())

    io.store.milvus.between_writes = counted_gate

    def held_read(store: VectorStore) -> int:
        read_entered.set()
        assert read_release.wait(HELD_S)
        return store.count("muq")

    read = asyncio.ensure_future(io.read(held_read))
    assert await asyncio.to_thread(read_entered.wait, HELD_S)
    write = asyncio.ensure_future(io.call(lambda s: s.upsert("muq", _rows(3, start=500))))
    assert await asyncio.to_thread(gate_entered.wait, HELD_S)
    assert gate_passed == []  # held at its first upsert while the read runs
    read_release.set()
    assert await write == 3
    await read
    assert gate_passed and all(gate_passed)  # every upsert went after the read was released
    assert await io.read(lambda s: s.count("muq")) == 23


async def test_a_background_read_does_not_hold_writes(io: StoreIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read nobody waits for (an index built page by page) runs beside writes without holding them."""
    monkeypatch.setattr(store_io_module, "READS_FIRST_MAX_S", HELD_S)
    monkeypatch.setattr(store_rows, "WRITE_BYTES", 1)
    await _fill(io)
    entered, release = threading.Event(), threading.Event()

    def held_read(store: VectorStore) -> int:
        entered.set()
        assert release.wait(HELD_S)
        return store.count("muq")

    read = asyncio.ensure_future(io.read(held_read, background=True))
    assert await asyncio.to_thread(entered.wait, HELD_S)
    try:
        assert await io.call(lambda s: s.upsert("muq", _rows(3, start=500))) == 3  # while the read is still held
        assert not read.done()
    finally:
        release.set()
    assert await read == 23


async def test_a_read_opening_a_collection_does_not_deadlock_with_a_waiting_write(
    io: StoreIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that must open a collection waits for the write lane, which waits for reads: the read lets it go."""
    monkeypatch.setattr(store_io_module, "READS_FIRST_MAX_S", HELD_S)
    monkeypatch.setattr(store_rows, "WRITE_BYTES", 1)
    await _fill(io)
    read_entered, read_release = threading.Event(), threading.Event()
    gate_entered = threading.Event()
    gate = io.store.milvus.between_writes

    def noted_gate() -> None:
        gate_entered.set()
        gate()

    io.store.milvus.between_writes = noted_gate

    def read_then_open(store: VectorStore) -> int:
        read_entered.set()
        assert read_release.wait(HELD_S)
        io.prepare(store, "mert", 16)  # not open yet: the write lane opens it, behind the held write
        return store.count("mert")

    read = asyncio.ensure_future(io.read(read_then_open))
    assert await asyncio.to_thread(read_entered.wait, HELD_S)
    write = asyncio.ensure_future(io.call(lambda s: s.upsert("muq", _rows(3, start=500))))
    assert await asyncio.to_thread(gate_entered.wait, HELD_S)
    read_release.set()
    assert await read == 0  # within the test's timeout, not READS_FIRST_MAX_S per upsert
    assert await write == 3


async def test_a_cancelled_queued_read_never_runs(io: StoreIO) -> None:
    await _fill(io)
    entered, release = threading.Event(), threading.Event()
    ran = []

    def held(store: VectorStore) -> None:
        entered.set()
        assert release.wait(HELD_S)

    first = asyncio.ensure_future(io.read(held))
    assert await asyncio.to_thread(entered.wait, HELD_S)
    queued = asyncio.ensure_future(io.read(lambda s: ran.append(True)))
    await asyncio.sleep(0)  # let it be submitted
    lanes = io.lanes_view()["read"]
    assert lanes["depth"] == 1 and lanes["oldest_wait_s"] is not None and lanes["running_s"] is not None
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert io.lanes_view()["read"]["depth"] == 0
    release.set()
    await first
    await io.read(lambda s: None)  # the lane ran everything queued after the cancelled one
    assert ran == []


async def test_reads_follow_what_the_write_lane_changed(io: StoreIO) -> None:
    """Opened first by a read; then deleted rows and a committed rebuild of another width are seen by the next read."""
    with pytest.raises(EmbeddError) as err:
        await io.read(_by_track(io, "t3"))  # opens the (empty) collection through the write lane
    assert err.value.code is Code.NOT_FOUND
    await _fill(io)
    assert (await io.read(_by_track(io, "t3")))[0].track_id == "t3"

    await io.call(lambda s: s.delete("muq", ["t4"]))
    hits = await io.read(lambda s: s.search("muq", _rows(5)[4].vector, 20))
    assert "t4" not in {h.track_id for h in hits}

    def rebuild(store: VectorStore) -> None:
        handle = store.begin_rebuild("muq", "job1", 16)
        store.upsert("muq", _rows(5, dim=16, start=100, seed=1), target=handle)
        store.commit_rebuild(handle)

    await io.call(rebuild)
    hits = await io.read(_by_track(io, "t102", dim=16))  # the reader's store follows the new layout
    assert hits[0].track_id == "t102" and {h.track_id for h in hits} <= {f"t{100 + i}" for i in range(5)}


async def test_search_op_and_similarity_reads_use_the_read_lane(io: StoreIO) -> None:
    """``search`` (the op behind similar_tracks) and find_path's stored vectors are answered while a write is held."""
    from embedd.http.similarity import _vectors
    from embedd.ops.search import SearchArgs, search

    await _fill(io)

    async def described() -> None:
        return None

    executor = types.SimpleNamespace(model_dim=lambda model: DIM, described=described)
    service = types.SimpleNamespace(executor=executor, store_io=io)
    write, release = await _hold_write(io)
    try:
        found = await search(service, SearchArgs(model="muq", track_id="t3", limit=3))  # type: ignore[arg-type]
        assert found.hits[0].track_id == "t3"
        vectors = await _vectors(types.SimpleNamespace(service=service), "muq", ["t1", "t2", "nope"])  # type: ignore[arg-type]
        assert sorted(vectors) == ["t1", "t2"]
        assert not write.done()
    finally:
        release.set()
    await write

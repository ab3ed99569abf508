"""The Milvus store against Milvus Lite and a real Milvus standalone server (same tests, both backends).

The server is started once per session by ``milvus_fixtures``; each test uses
collection names of its own, so tests never see each other's rows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedd.errors import Code, EmbeddError
from embedd.store import MAX_LEN, Move, TrackRow, VectorStore, truncate_utf8

from tests.milvus_fixtures import MilvusServer, _free_ports
from tests.original_system import create_original_collection, original_reads

pytestmark = pytest.mark.timeout(300)

DIM = 48


@pytest.fixture(scope="module")
def lite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lite") / "milvus.db"


@pytest.fixture(params=["lite", "server"])
def uri(request: pytest.FixtureRequest, lite_path: Path) -> str:
    if request.param == "lite":
        return str(lite_path)
    server: MilvusServer = request.getfixturevalue("milvus_server")
    return server.uri


@pytest.fixture
def public() -> str:
    """A collection (alias) name of this test's own."""
    return f"embedding_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(uri: str, public: str) -> Iterator[VectorStore]:
    s = VectorStore(uri, timeout_s=20)
    yield s
    _drop_prefix(s, public)
    s.close()


def _drop_prefix(store: VectorStore, public: str) -> None:
    client = store.milvus.client()
    for name in client.list_collections():
        if name == public or name.startswith(public + "__"):
            for alias in client.list_aliases(name).get("aliases", []):
                client.drop_alias(alias)
            client.drop_collection(name)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows_for(vectors: np.ndarray, prefix: str = "t", title: str = "old") -> list[TrackRow]:
    return [
        TrackRow(
            track_id=f"{prefix}{i}",
            vector=v,
            path=f"/music/{prefix}{i}.flac",
            title=f"{title} {i}",
            artist=f"artist {i % 3}",
            album="album",
            duration_s=180.0 + i,
            model_id="tiny/muq",
            file_size=1000 + i,
            file_mtime=1_700_000_000.5 + i,
        )
        for i, v in enumerate(vectors)
    ]


# -- plain layout ----------------------------------------------------------------------------


def test_upsert_search_ranks_self_first(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(30, DIM, seed=1)
    assert store.upsert("muq", rows_for(vecs)) == 30
    assert store.count("muq") == 30
    store.upsert("muq", rows_for(vecs[:5]))  # upsert replaces, never duplicates
    assert store.count("muq") == 30
    for i in (0, 7, 29):
        hits = store.search("muq", vecs[i], limit=5)
        assert [h.track_id for h in hits][0] == f"t{i}"
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].title == f"old {i}" and hits[0].path == f"/music/t{i}.flac"
        assert hits[0].artist == f"artist {i % 3}" and hits[0].album == "album"
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len(hits) == 5
    # ranking agrees with exact cosine
    q = unit_vectors(1, DIM, seed=99)[0]
    expect = [f"t{j}" for j in np.argsort(-(vecs @ q))[:5]]
    assert [h.track_id for h in store.search("muq", q, limit=5)] == expect


def test_exclude_ids(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(12, DIM, seed=2)
    store.upsert("muq", rows_for(vecs))
    hits = store.search("muq", vecs[3], limit=20, exclude_track_ids=["t3", "t4", 'we"ird\\id'])
    ids = [h.track_id for h in hits]
    assert "t3" not in ids and "t4" not in ids and len(ids) == 10


def test_get_vector_and_missing(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(4, DIM, seed=3)
    store.upsert("muq", rows_for(vecs))
    got = store.get_vector("muq", "t2")
    assert got is not None and got.dtype == np.float32
    np.testing.assert_allclose(got, vecs[2], rtol=0, atol=1e-7)
    assert store.get_vector("muq", "no-such-track") is None


def test_fingerprints_paged_and_updated(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(25, DIM, seed=4)
    rows = rows_for(vecs)
    store.upsert("muq", rows)
    fps = list(store.fingerprints("muq", page_size=7))
    assert len(fps) == 25
    assert {f.track_id: (f.file_size, f.file_mtime) for f in fps} == {
        r.track_id: (r.file_size, r.file_mtime) for r in rows
    }
    rows[5].file_size, rows[5].file_mtime = 42, 1.25
    store.upsert("muq", [rows[5]])
    fp = {f.track_id: f for f in store.fingerprints("muq", page_size=10)}
    assert (fp["t5"].file_size, fp["t5"].file_mtime) == (42, 1.25) and len(fp) == 25


def test_delete_and_count(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(10, DIM, seed=5)
    store.upsert("muq", rows_for(vecs))
    store.delete("muq", ["t1", "t2", "absent"])
    assert store.count("muq") == 8
    assert store.get_vector("muq", "t1") is None
    assert "t1" not in [h.track_id for h in store.search("muq", vecs[1], limit=10)]


def test_long_unicode_metadata_truncated_safely(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    row = rows_for(unit_vectors(1, DIM, seed=6))[0]
    row.title = "é" * 700 + "😀" * 10  # 1440 bytes; the cut falls inside a 2-byte char
    row.path = "/music/" + "ü" * 3000 + "\udcff.mp3"  # a surrogate-escaped byte from a file name
    store.upsert("muq", [row])
    hit = store.search("muq", row.vector, limit=1)[0]
    assert len(hit.title.encode()) <= MAX_LEN["title"] and set(hit.title) == {"é"}
    assert len(hit.path.encode()) <= MAX_LEN["path"] and hit.path.startswith("/music/üü")


def test_bad_query_vectors(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    for bad in (np.ones(DIM + 1, np.float32), np.zeros(DIM, np.float32), np.full(DIM, np.nan, np.float32)):
        with pytest.raises(EmbeddError) as err:
            store.search("muq", bad, limit=3)
        assert err.value.code is Code.BAD_REQUEST and "muq" in err.value.message


def test_dim_change_is_reported(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    with pytest.raises(EmbeddError) as err:
        VectorStore(store.uri).ensure("muq", public, DIM * 2)
    assert err.value.code is Code.UNAVAILABLE and public in err.value.message


@given(st.text(), st.integers(min_value=0, max_value=64))
def test_truncate_utf8_property(text: str, limit: int) -> None:
    out = truncate_utf8(text, limit)
    raw = out.encode("utf-8")  # valid UTF-8: encodes without error
    assert len(raw) <= limit
    assert text.encode("utf-8", errors="replace").startswith(raw)


# -- rebuilds ----------------------------------------------------------------------------------


def _titles(store: VectorStore, vec: np.ndarray) -> tuple[str, str]:
    h = store.search("muq", vec, limit=1)[0]
    return h.track_id, h.title


def test_rebuild_commit_and_resume(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    old, new = unit_vectors(10, DIM, seed=7), unit_vectors(12, DIM, seed=8)
    store.upsert("muq", rows_for(old, title="old"))
    rb = store.begin_rebuild("muq", tag="job-1234")
    assert not rb.resumed and rb.physical == f"{public}__r_job_1234"
    store.upsert("muq", rows_for(new[:6], title="new"), target=rb)
    # search keeps answering from the complete old set
    assert _titles(store, old[2]) == ("t2", "old 2")
    assert store.count("muq") == 10 and store.count("muq", target=rb) == 6

    # the daemon dies; a new process reopens the same rebuild by its tag
    again = VectorStore(store.uri, timeout_s=20)
    again.ensure("muq", public, DIM)
    rb2 = again.begin_rebuild("muq", tag="job-1234")
    assert rb2.resumed and not rb2.committed and again.count("muq", target=rb2) == 6
    again.upsert("muq", rows_for(new, title="new"), target=rb2)
    assert _titles(again, old[2]) == ("t2", "old 2")
    again.commit_rebuild(rb2)
    assert again.count("muq") == 12
    assert _titles(again, new[2]) == ("t2", "new 2")
    # the first store follows the alias too
    assert _titles(store, new[11]) == ("t11", "new 11")
    names = store.milvus.client().list_collections()
    assert [n for n in names if n.startswith(public)] == [rb.physical]
    # a committed rebuild reopened by its tag is recognised; commit again is a harmless no-op
    rb3 = again.begin_rebuild("muq", tag="job-1234")
    assert rb3.committed
    again.commit_rebuild(rb3)
    assert again.count("muq") == 12
    again.close()


def test_rebuild_abort_keeps_old(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    old, new = unit_vectors(8, DIM, seed=9), unit_vectors(8, DIM, seed=10)
    store.upsert("muq", rows_for(old, title="old"))
    rb = store.begin_rebuild("muq", tag="j2")
    store.upsert("muq", rows_for(new, title="new"), target=rb)
    assert store.list_rebuilds("muq") == [rb.physical]
    assert store.abort_rebuild(rb)
    assert _titles(store, old[4]) == ("t4", "old 4")
    assert store.count("muq") == 8 and store.list_rebuilds("muq") == []
    assert not store.abort_rebuild(rb)


def test_live_writes_during_rebuild_are_mirrored(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(6, DIM, seed=11)
    store.upsert("muq", rows_for(vecs[:3]))
    rb = store.begin_rebuild("muq", tag="j3")
    store.upsert("muq", rows_for(vecs[3:], prefix="x"))  # an interactive store=true meanwhile
    store.delete("muq", ["t0"])
    assert store.count("muq", target=rb) == 3
    store.commit_rebuild(rb)
    assert {f.track_id for f in store.fingerprints("muq")} == {"x0", "x1", "x2"}


# -- the original system's collections and embedd's previous schema ---------------------------


def _previous_schema_collection(store: VectorStore, name: str, vecs: np.ndarray) -> None:
    """A collection as embedd wrote it before schema 2: vector field `vector`, no `name`."""
    from pymilvus import DataType, MilvusClient

    client = store.milvus.client()
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=f"embedd v1 model=muq;dim={DIM};parts=1")
    schema.add_field("track_id", DataType.VARCHAR, is_primary=True, max_length=256)
    for f in ("path", "title", "artist", "album", "model_id"):
        schema.add_field(f, DataType.VARCHAR, max_length=1024)
    for f in ("duration_s", "file_mtime", "embedded_at"):
        schema.add_field(f, DataType.DOUBLE)
    schema.add_field("file_size", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    client.create_collection(name, schema=schema, consistency_level="Strong")
    params = MilvusClient.prepare_index_params()
    params.add_index(field_name="vector", index_name="vector", index_type="HNSW", metric_type="COSINE", params={"M": 8, "efConstruction": 64})
    client.create_index(name, params)
    client.load_collection(name)
    client.insert(name, [
        {"track_id": r.track_id, "path": r.path, "title": r.title, "artist": r.artist, "album": r.album, "model_id": r.model_id,
         "duration_s": r.duration_s, "file_mtime": r.file_mtime, "embedded_at": 5.0, "file_size": r.file_size, "vector": r.vector}
        for r in rows_for(vecs, title="before")
    ])  # fmt: skip


def test_previous_schema_is_copied_not_reembedded(store: VectorStore, public: str) -> None:
    vecs = unit_vectors(7, DIM, seed=12)
    _previous_schema_collection(store, f"{public}__base", vecs)
    client = store.milvus.client()
    client.create_alias(f"{public}__base", public)
    store.ensure("muq", public, DIM)
    assert [n for n in client.list_collections() if n.startswith(public)] == [f"{public}__m_base"]
    assert store.count("muq") == 7 and _titles(store, vecs[3]) == ("t3", "before 3")
    assert list(store.fingerprints("muq"))[0].path.startswith("/music/t")
    reads = original_reads(client, public, vecs[3], ["artist 0 - before 3", "artist 1 - before 1"], limit=3)
    assert reads["all"][0] == "artist 0 - before 3" and set(reads["in"]) == {"artist 0 - before 3", "artist 1 - before 1"}
    assert "artist 0 - before 3" not in reads["not_in"] and len(reads["not_in"]) == 3
    again = VectorStore(store.uri)  # a restart finds the copy as it is
    again.ensure("muq", public, DIM)
    assert again.count("muq") == 7
    again.close()


def test_original_collection_serves_until_embedd_is_complete(store: VectorStore, public: str) -> None:
    client = store.milvus.client()
    old = unit_vectors(4, DIM, seed=20)
    old_names = [f"Old Artist - Old Song {i}" for i in range(4)]
    create_original_collection(client, public, old, old_names)
    store.ensure("muq", public, DIM)
    assert store.pending("muq") and store.count("muq") == 0
    new = unit_vectors(6, DIM, seed=21)
    store.upsert("muq", rows_for(new, title="new"))
    assert _titles(store, new[2]) == ("t2", "new 2")  # embedd's own search: its own set
    assert original_reads(client, public, old[1], old_names[:2])["in"][0] == "Old Artist - Old Song 1"  # untouched
    legacy = store.legacy_collections({"muq": public})
    assert [(c.collection, c.serving, c.rows) for c in legacy] == [(public, True, 4)]
    assert store.drop_legacy({"muq": public}, confirm=True) == []  # a serving one is never dropped

    assert store.adopt_public_name("muq") == f"{public}__legacy"
    assert not store.pending("muq") and store.adopt_public_name("muq") is None
    reads = original_reads(client, public, new[2], ["artist 2 - new 2", "artist 0 - new 3"], limit=4)
    assert reads["all"][0] == "artist 2 - new 2" and set(reads["in"]) == {"artist 2 - new 2", "artist 0 - new 3"}
    assert set(reads["not_in"]).isdisjoint({"artist 2 - new 2", "artist 0 - new 3"}) and len(reads["not_in"]) == 4
    assert original_reads(client, f"{public}__legacy", old[0], old_names)["in"][0] == old_names[0]

    # a committed rebuild drops embedd's old set, never the legacy collection
    rb = store.begin_rebuild("muq", tag="after-adoption")
    store.upsert("muq", rows_for(new, title="rebuilt"), target=rb)
    store.commit_rebuild(rb)
    assert sorted(n for n in client.list_collections() if n.startswith(public)) == sorted([rb.physical, f"{public}__legacy"])
    listed = store.drop_legacy({"muq": public}, confirm=False)
    assert [(c.collection, c.serving, c.rows) for c in listed] == [(f"{public}__legacy", False, 4)]
    assert f"{public}__legacy" in client.list_collections()
    assert [c.collection for c in store.drop_legacy({"muq": public}, confirm=True)] == [f"{public}__legacy"]
    assert store.legacy_collections({"muq": public}) == [] and _titles(store, new[0]) == ("t0", "rebuilt 0")


def test_rebuild_over_an_original_collection_moves_it_aside(store: VectorStore, public: str) -> None:
    client = store.milvus.client()
    old = unit_vectors(3, DIM, seed=22)
    create_original_collection(client, public, old, ["A - x", "A - y", "A - z"])
    store.ensure("muq", public, DIM)
    rb = store.begin_rebuild("muq", tag="first")
    vecs = unit_vectors(5, DIM, seed=23)
    store.upsert("muq", rows_for(vecs), target=rb)
    assert original_reads(client, public, old[2], ["A - z"])["in"] == ["A - z"]  # until the commit
    store.commit_rebuild(rb)
    assert sorted(n for n in client.list_collections() if n.startswith(public)) == sorted([rb.physical, f"{public}__legacy"])
    assert original_reads(client, public, vecs[4], [])["all"][0] == "artist 1 - old 4"
    assert store.count("muq") == 5


def test_rekey_moves_vectors_and_display_fields(store: VectorStore, public: str) -> None:
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(4, DIM, seed=24)
    store.upsert("muq", rows_for(vecs))
    moves = [Move("t1", "n1", "/music/t1.flac", "Renamed", "Someone", "LP", 1001, 1_700_000_001.5), Move("gone", "n9", "", "", "", "", 0, 0.0)]
    assert store.rekey("muq", moves) == ["n1"]
    assert {f.track_id for f in store.fingerprints("muq")} == {"t0", "n1", "t2", "t3"}
    hit = store.search("muq", vecs[1], limit=1)[0]
    assert (hit.track_id, hit.title, hit.artist, hit.album) == ("n1", "Renamed", "Someone", "LP") and hit.score > 0.999
    assert original_reads(store.milvus.client(), public, vecs[1], ["Someone - Renamed"])["in"] == ["Someone - Renamed"]


# -- MERT-sized vectors ---------------------------------------------------------------------------

MERT_DIM = 76_800


def test_mert_sized_vectors_self_first(store: VectorStore, public: str, capsys: pytest.CaptureFixture[str]) -> None:
    mert = public.replace("embedding_", "mert_embedding_")
    try:
        store.ensure("mert", mert, MERT_DIM)
        layout = store.layout("mert")
        assert layout.split == (not store.is_lite)  # Lite takes 76,800 dims whole; a server needs parts
        vecs = unit_vectors(36, MERT_DIM, seed=14)
        rows = rows_for(vecs)
        t0 = time.perf_counter()
        store.upsert("mert", rows)
        upsert_s = time.perf_counter() - t0
        assert store.count("mert") == 36
        lat = []
        for i in range(0, 36, 5):
            t0 = time.perf_counter()
            hits = store.search("mert", vecs[i], limit=10)
            lat.append(time.perf_counter() - t0)
            assert hits[0].track_id == f"t{i}" and hits[0].score == pytest.approx(1.0, abs=1e-4)
            expect = [f"t{j}" for j in np.argsort(-(vecs @ vecs[i]))[:10]]
            assert [h.track_id for h in hits] == expect  # exact full-vector cosine ranking
        # a perturbed query still finds its track first; exclusion works through the parts
        noisy = vecs[3] + 0.3 * unit_vectors(1, MERT_DIM, seed=15)[0]
        assert store.search("mert", noisy, limit=3)[0].track_id == "t3"
        assert "t3" not in [h.track_id for h in store.search("mert", vecs[3], limit=5, exclude_track_ids=["t3"])]
        got = store.get_vector("mert", "t7")
        assert got is not None and got.shape == (MERT_DIM,)
        np.testing.assert_allclose(got, vecs[7], atol=1e-7)
        assert len(list(store.fingerprints("mert", page_size=10))) == 36
        store.delete("mert", ["t0"])
        assert store.count("mert") == 35 and store.get_vector("mert", "t0") is None
        with capsys.disabled():
            kind = "server (split)" if layout.split else "lite (plain)"
            print(
                f"\n[store] mert 76800-dim on {kind}: upsert 36 rows {upsert_s * 1000:.0f} ms "
                f"({upsert_s / 36 * 1000:.1f} ms/row); search limit=10 median {np.median(lat) * 1000:.0f} ms"
            )
    finally:
        _drop_prefix(store, mert)


# -- availability ---------------------------------------------------------------------------------


def test_unreachable_server_is_unavailable_quickly() -> None:
    port = _free_ports(1)[0]
    store = VectorStore(f"http://127.0.0.1:{port}", timeout_s=2)
    t0 = time.monotonic()
    assert store.ping() is False
    with pytest.raises(EmbeddError) as err:
        store.ensure("muq", "embedding", DIM)
    assert err.value.code is Code.UNAVAILABLE and f"127.0.0.1:{port}" in err.value.message
    assert time.monotonic() - t0 < 10


def test_server_stop_and_restart(milvus_server: MilvusServer, capsys: pytest.CaptureFixture[str]) -> None:
    """The same store object reports UNAVAILABLE while the server is down and works again after."""
    public = f"embedding_{uuid.uuid4().hex[:10]}"
    store = VectorStore(milvus_server.uri, timeout_s=5)
    store.ensure("muq", public, DIM)
    vecs = unit_vectors(5, DIM, seed=16)
    store.upsert("muq", rows_for(vecs))
    milvus_server.stop()
    try:
        assert store.ping() is False
        t0 = time.monotonic()
        with pytest.raises(EmbeddError) as err:
            store.search("muq", vecs[0], limit=3)
        assert err.value.code is Code.UNAVAILABLE and milvus_server.uri.split("//")[1] in err.value.message
        assert time.monotonic() - t0 < 15
    finally:
        start_s = milvus_server.start()
    # A restarted server takes a while to serve searches again (collections reload); callers retry.
    t0 = time.monotonic()
    while True:
        try:
            hits = store.search("muq", vecs[0], limit=3)
            break
        except EmbeddError as exc:
            assert exc.code is Code.UNAVAILABLE
            assert time.monotonic() - t0 < 120, "the store did not recover after the server restart"
            time.sleep(1)
    with capsys.disabled():
        print(f"\n[store] server restart {start_s:.1f} s; searches served again {time.monotonic() - t0:.1f} s later")
    assert hits[0].track_id == "t0"
    assert store.count("muq") == 5
    _drop_prefix(store, public)
    store.close()


# -- error classification (no Milvus needed: real pymilvus and gRPC exception objects) -------------


def _refusal(code: int, legacy: int = 1, reason: str = "", *, retriable: bool = False) -> BaseException:
    """What pymilvus raises for a server's Status: ``MilvusException.from_status``, as its client does."""
    from pymilvus.exceptions import MilvusException
    from pymilvus.grpc_gen import common_pb2

    return MilvusException.from_status(common_pb2.Status(code=code, error_code=legacy, reason=reason, retriable=retriable))


def _grpc_failure(*, silent_peer: bool) -> BaseException:
    """A real gRPC failure: a call to a closed port (UNAVAILABLE), or to a peer that never answers (DEADLINE_EXCEEDED)."""
    import socket

    import grpc

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        if silent_peer:
            listener.listen()  # accepts the connection, never speaks HTTP/2
        port = listener.getsockname()[1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/milvus.proto.milvus.MilvusService/Connect")
            try:
                call(b"", timeout=0.3 if silent_peer else 2.0)
            except grpc.RpcError as exc:
                return exc
    raise AssertionError("a call without a Milvus behind it succeeded")


def test_availability_is_read_from_codes_not_messages() -> None:
    from pymilvus.grpc_gen import common_pb2

    from embedd.store.client import is_not_loaded, is_refused_parameter, is_unavailable

    down = [
        _refusal(2, reason="Fail connecting to server on 127.0.0.1:19530"),  # pymilvus CONNECT_FAILED
        _refusal(2, reason="service unavailable"),  # the server's ErrServiceUnavailable
        _refusal(1, common_pb2.NotReadyServe, "proxy not healthy"),  # a server starting or stopping
        _refusal(503, common_pb2.NoReplicaAvailable, "channel not available", retriable=True),
    ]
    up = [
        _refusal(100, common_pb2.CollectionNotExists, "collection not found; retry after connect timeout"),
        _refusal(1, reason="Unexpected error, message=<deadline of the server is not ready>"),  # pymilvus' own default
        _refusal(65535, reason="invalid dimension: 76800. should be in range 1 ~ 32768"),
        _refusal(1100, common_pb2.IllegalArgument, "invalid parameter"),
    ]
    assert [is_unavailable(e) for e in down] == [True] * len(down)
    assert [is_unavailable(e) for e in up] == [False] * len(up)
    # The width refusal carries no code of its own: 2.3/2.4 servers' catch-all or ErrParameterInvalid.
    assert [is_refused_parameter(e) for e in up] == [False, False, True, True]
    assert is_not_loaded(_refusal(101, reason="failed to query: collection not loaded[collection=4708]"))
    assert not is_not_loaded(_refusal(100, common_pb2.CollectionNotExists, "collection not loaded"))


def test_grpc_failures_and_pymilvus_wrappers_are_unavailable() -> None:
    import grpc
    from pymilvus.decorators import error_handler, retry_on_rpc_failure
    from pymilvus.exceptions import ConnectError, ParamError

    from embedd.store.client import is_unavailable

    refused = _grpc_failure(silent_peer=False)
    assert refused.code() is grpc.StatusCode.UNAVAILABLE and is_unavailable(refused)
    late = _grpc_failure(silent_peer=True)
    assert late.code() is grpc.StatusCode.DEADLINE_EXCEEDED and is_unavailable(late)

    @retry_on_rpc_failure(retry_times=2, initial_back_off=0.001)
    def rpc(_handler: object, **_kwargs: object) -> None:
        raise refused

    with pytest.raises(Exception) as gave_up:  # pymilvus' retries ran out: the gRPC code becomes the code
        rpc(object())
    assert gave_up.value.code is grpc.StatusCode.UNAVAILABLE and is_unavailable(gave_up.value)

    @error_handler(func_name="query")
    def reset_by_peer() -> None:
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(Exception) as wrapped:  # wrapped as a MilvusException with pymilvus' default code
        reset_by_peer()
    assert wrapped.value.code == 1 and is_unavailable(wrapped.value)
    assert is_unavailable(ConnectError(message="cannot connect"))
    assert not is_unavailable(ParamError(message="timeout must be a number; not connected yet"))


def test_failures_map_to_contract_codes(tmp_path: Path) -> None:
    from pymilvus import DataType, MilvusClient
    from pymilvus.grpc_gen import common_pb2

    from embedd.store.client import Milvus

    uri = str(tmp_path / "errors.db")
    milvus = Milvus(uri, timeout_s=10)
    client = milvus.client()

    def fail(exc: BaseException):
        def fn(_client: object) -> None:
            raise exc

        return fn

    with pytest.raises(EmbeddError) as down:
        milvus.call("search x", fail(_refusal(1, common_pb2.NotReadyServe, "stopping")))
    assert down.value.code is Code.UNAVAILABLE and uri in down.value.message
    assert milvus.client() is not client, "an unavailable Milvus gets a new client on the next call"
    with pytest.raises(EmbeddError) as refused:
        milvus.call("describe collection x", fail(_refusal(100, common_pb2.CollectionNotExists, "connect retry timeout")))
    assert refused.value.code is Code.INTERNAL and "refused to describe collection x" in refused.value.message

    # A released collection (as a restarted server has them) is loaded by a read that needs it.
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=16)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=4)
    params = MilvusClient.prepare_index_params()
    params.add_index(field_name="embedding", index_type="FLAT", metric_type="COSINE")
    c = milvus.client()
    c.create_collection("released", schema=schema, index_params=params)
    c.insert("released", [{"pk": "a", "embedding": [1.0, 0.0, 0.0, 0.0]}])
    c.release_collection("released")
    search = lambda c: c.search("released", data=[[1.0, 0.0, 0.0, 0.0]], limit=1)  # noqa: E731
    with pytest.raises(EmbeddError) as not_loaded:
        milvus.call("search released", search)
    assert not_loaded.value.code is Code.INTERNAL
    assert milvus.call("search released", search, loads="released")[0][0]["pk"] == "a"
    milvus.reset()

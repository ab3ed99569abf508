"""The daemon on a real Milvus server (not Milvus Lite): store, search, MERT's wide vectors, outages.

A Milvus server rejects vectors wider than 32,768 dims; the daemon's store splits
MERT's (see embedd/store/collections.py). Here the tiny MERT stays narrow, so the test also
forces the split path by asking the server for the real MERT width directly.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from tests.audio_fixtures import make_distinct_tracks
from tests.conftest import model_args
from tests.daemon import Daemon, short_tmpdir

ALL = ["muq", "mert", "latent"]
pytestmark = pytest.mark.timeout(400)


def ok(response: dict) -> dict:
    assert response["ok"] is True, response
    return response["result"]


@pytest.fixture(scope="module")
def server_daemon(tiny_models, milvus_server):
    root = short_tmpdir("eds-")
    music = root / "music"
    tracks = make_distinct_tracks(music, 5)
    d = Daemon(root, args=[*model_args(tiny_models), "--music-root", str(music), "--milvus-uri", milvus_server.uri],
               env={"HF_HUB_OFFLINE": "1"})
    d.start()
    d.tracks = tracks
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_store_and_search_on_a_server(server_daemon, milvus_server):
    status = ok(server_daemon.call("status"))
    assert status["milvus"] == {"uri": milvus_server.uri, "ok": True}
    for i, track in enumerate(server_daemon.tracks):
        ok(server_daemon.call("embed_file", path=str(track), models=ALL, store=True, track_id=f"srv-{i}"))
    for model in ALL:
        for i in range(len(server_daemon.tracks)):
            hits = ok(server_daemon.call("search", model=model, track_id=f"srv-{i}", limit=3))["hits"]
            assert hits[0]["track_id"] == f"srv-{i}" and hits[0]["score"] > 0.999, (model, hits)
    hits = ok(server_daemon.call("search", model="muq", text="noise", limit=5))["hits"]
    assert {h["track_id"] for h in hits} == {f"srv-{i}" for i in range(5)}


def test_real_mert_width_on_a_server(milvus_server):
    """76,800 dims on a server that allows 32,768: stored split, a track still finds itself first."""
    from embedd.store import TrackRow, VectorStore

    store = VectorStore(milvus_server.uri)
    try:
        store.ensure("mert", "mert_wide_test", 76_800)
        rng = np.random.default_rng(5)
        vectors = rng.standard_normal((12, 76_800)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert("mert", [TrackRow(track_id=f"w{i}", vector=v) for i, v in enumerate(vectors)])
        for i in (0, 5, 11):
            hits = store.search("mert", vectors[i], 3)
            assert hits[0].track_id == f"w{i}" and hits[0].score > 0.999
        assert np.allclose(store.get_vector("mert", "w3"), vectors[3], atol=1e-6)
    finally:
        store.close()


def test_deleted_tracks_leave_the_next_search_on_a_server(milvus_server):
    """A server's delete carries no timestamp for pymilvus's Session reads: the deleted rows must still be gone."""
    from embedd.store import TrackRow, VectorStore

    store = VectorStore(milvus_server.uri)
    try:
        store.ensure("muq", "delete_visibility_test", 16)
        rng = np.random.default_rng(7)
        for round_ in range(3):  # each round: new rows written, the previous ones deleted, then one search
            vectors = rng.standard_normal((24, 16)).astype(np.float32)
            store.upsert("muq", [TrackRow(track_id=f"r{round_}-{i}", vector=v) for i, v in enumerate(vectors)])
            store.delete("muq", [f"r{round_ - 1}-{i}" for i in range(24)] if round_ else [])
            found = {h.track_id for h in store.search("muq", vectors[0], 60)}
            assert {t.split("-")[0] for t in found} == {f"r{round_}"}, (round_, sorted(found))
    finally:
        store.close()


def test_milvus_outage_is_unavailable_then_recovers(server_daemon, milvus_server):
    track = str(server_daemon.tracks[0])
    milvus_server.stop()
    try:
        started = time.monotonic()
        r = server_daemon.call("embed_file", path=track, models=["latent"], store=True, track_id="outage")
        assert r["ok"] is False and r["error"]["code"] == "unavailable"
        assert milvus_server.uri.split("//")[1] in r["error"]["message"] or "Milvus" in r["error"]["message"]
        assert time.monotonic() - started < 60
        assert ok(server_daemon.call("status"))["milvus"]["ok"] is False
        assert ok(server_daemon.call("ping"))  # the daemon itself is fine
    finally:
        milvus_server.start()
    # After a restart the server reloads its collections (tens of seconds): until then the
    # daemon answers unavailable, never anything else, and then everything works again.
    deadline = time.monotonic() + 150
    while True:
        r = server_daemon.call("embed_file", path=track, models=["latent"], store=True, track_id="outage")
        if r["ok"]:
            r = server_daemon.call("search", model="latent", track_id="outage", limit=2)
            if r["ok"]:
                break
        assert r["error"]["code"] == "unavailable", r
        assert time.monotonic() < deadline, "the daemon never recovered after Milvus came back"
        time.sleep(2)
    # the same file is stored as srv-0 too: both tie for first place
    assert {h["track_id"] for h in r["result"]["hits"]} == {"outage", "srv-0"}
    assert ok(server_daemon.call("status"))["milvus"]["ok"] is True

"""Switching from the original system, through the real daemon, on Milvus Lite and on a real server.

- The original system's ``embedding`` collection (its own schema, its rows) keeps
  serving its readers until embedd's set is complete; the first job over the
  whole library (a ``clear_existing`` rebuild, or an incremental job) then
  takes the name over and keeps the old rows as ``embedding__legacy``; a
  committed rebuild after that does not drop them either (only ``drop_legacy``
  with ``confirm`` does), and the original reads work on embedd's collection.
- Navidrome rewrites every track id (its canonical-id migration): the next
  incremental job re-keys the stored vectors instead of re-embedding, in a small
  fraction of the first job's time, leaving exactly the new ids.

The server runs with ``proxy.maxDimension`` lowered below the tiny MERT's width,
so MERT is stored split there, as the real 76,800-dim MERT is on a default
server. Milvus Lite admits one process per file: its collections are read with
the daemon stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.batch_fixtures import BatchDaemon, Library, stored_ids
from tests.daemon import short_tmpdir
from tests.milvus_fixtures import MilvusServer
from tests.original_system import create_original_collection, original_reads

pytestmark = pytest.mark.timeout(600)

MODELS = ["muq", "mert", "latent"]
#: Below the tiny MERT's 288 dims, above the others' (48, 144): MERT is split on this server.
SERVER_MAX_DIMENSION = 160


class NarrowServer(MilvusServer):
    """A real standalone server that refuses vectors wider than ``SERVER_MAX_DIMENSION``."""

    def _configure(self) -> None:
        super()._configure()
        cfg = self.base_dir / "configs" / "milvus.yaml"
        text = cfg.read_text()
        assert "maxDimension: 32768" in text
        cfg.write_text(text.replace("maxDimension: 32768", f"maxDimension: {SERVER_MAX_DIMENSION}", 1))


@pytest.fixture(scope="module")
def narrow_server(tmp_path_factory: pytest.TempPathFactory):
    server = NarrowServer(tmp_path_factory.mktemp("narrow-milvus"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["lite", "server"])
def backend(request: pytest.FixtureRequest):
    """None for Milvus Lite (the daemon's own file), else a clean server's URI."""
    if request.param == "lite":
        return None
    server: NarrowServer = request.getfixturevalue("narrow_server")
    from pymilvus import MilvusClient

    client = MilvusClient(uri=server.uri)
    for name in client.list_collections():  # the public names are fixed: start from an empty server
        for alias in client.list_aliases(name).get("aliases", []):
            client.drop_alias(alias)
        client.drop_collection(name)
    client.close()
    _forget_schemas()
    return server.uri


def _forget_schemas() -> None:
    """pymilvus caches schemas by collection name, process-wide, across alias switches: this
    test process read ``embedding`` as other collections before (the daemon, a process of
    its own, forgets them itself when it switches a name)."""
    from pymilvus.client.cache import GlobalCache

    GlobalCache.schema.clear()


@pytest.fixture
def root():
    d = short_tmpdir("em-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _uri(d: BatchDaemon, backend: str | None) -> str:
    return backend or str(d.data_dir / "milvus.db")


def _client(uri: str):
    from pymilvus import MilvusClient

    if not uri.startswith("http"):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusClient(uri=uri, timeout=30)


def _release(client, uri: str) -> None:
    """Close the client; for Milvus Lite also stop this process's in-process server, which holds the file's lock."""
    client.close()
    if not uri.startswith("http"):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def _dims(d: BatchDaemon) -> dict[str, int]:
    return {m: v["dim"] for m, v in d.ok("status")["models"].items()}


def _legacy(d: BatchDaemon, timeout: float = 60.0) -> list[dict]:
    """status's legacy_collections, once Milvus answered (null while Milvus Lite is still starting)."""
    deadline = time.monotonic() + timeout
    while (found := d.ok("status")["legacy_collections"]) is None:
        assert time.monotonic() < deadline, d.log()
    return found


def _run_job(d: BatchDaemon, **args) -> tuple[dict, float]:
    t0 = time.monotonic()
    d.ok("batch_start", **args)
    final = d.wait_final(240)
    return final, time.monotonic() - t0


@pytest.mark.parametrize("first_job", ["clear_existing", "incremental"])
def test_original_collection_survives_a_rebuild_and_its_readers_move_to_embedd(root: Path, tiny_models, backend, first_job):
    lib = Library(root / "lib", "relative")
    tracks = lib.add_good(8)
    d = BatchDaemon(root / "d", lib, tiny_models, milvus_uri=backend)
    uri = _uri(d, backend)
    # The original's own width (narrow enough for the narrow server), not embedd's
    old = np.random.default_rng(3).standard_normal((5, 128)).astype(np.float32)
    old_names = [f"Original Artist - Old Song {i}" for i in range(5)]
    client = _client(uri)
    create_original_collection(client, "embedding", old, old_names)
    _release(client, uri)

    d.start()
    try:
        legacy = _legacy(d)
        assert legacy == [{"collection": "embedding", "public": "embedding", "model": "muq", "rows": 5, "serving": True}]
        # the first job over the whole library completes: embedd's set takes the public name over
        final, _ = _run_job(d, clear_existing=first_job == "clear_existing")
        assert final["status"] == "completed" and final["processed_tracks"] == len(tracks), final
        kept = {"collection": "embedding__legacy", "public": "embedding", "model": "muq", "rows": 5, "serving": False}
        assert _legacy(d) == [kept]
        # embedd's own search answers from its set
        probe = tracks[2].track_id
        hits = d.ok("search", model="muq", track_id=probe, limit=3)["hits"]
        assert hits[0]["track_id"] == probe
        # drop_legacy says what it would drop, and drops nothing without confirm
        assert d.ok("drop_legacy") == {"collections": [kept], "dropped": False}
        # a second committed rebuild drops embedd's previous set, never the legacy one
        final, _ = _run_job(d, clear_existing=True)
        assert final["status"] == "completed", final
        assert _legacy(d) == [kept]
    finally:
        d.stop()

    _forget_schemas()
    client = _client(uri)
    try:
        names = set(client.list_collections())
        assert "embedding__legacy" in names and "embedding" not in names  # "embedding" is an alias now
        # the old rows, intact, answer their old readers under the documented name
        legacy_reads = original_reads(client, "embedding__legacy", old[1], old_names[:2])
        assert legacy_reads["in"][0] == old_names[1] and set(legacy_reads["all"]) == set(old_names)
        # the original reads, unchanged, on embedd's collection
        from tests.batch_fixtures import _with_store

        dims = {"muq": 48}
        vec = _with_store(uri, dims, lambda s: s.get_vector("muq", probe))
        wanted = [f"{t.artist} - {t.title}" for t in tracks[:3]]
        reads = original_reads(client, "embedding", vec, wanted, limit=8)
        assert reads["all"][0] == f"{tracks[2].artist} - {tracks[2].title}"
        assert set(reads["all"]) == {f"{t.artist} - {t.title}" for t in tracks}
        assert set(reads["in"]) == set(wanted)
        assert set(reads["not_in"]) == {f"{t.artist} - {t.title}" for t in tracks[3:]}
        if backend:
            assert _with_store(uri, {"mert": 288}, lambda s: s.layout("mert").split)
    finally:
        _release(client, uri)

    d.start()
    try:
        dropped = d.ok("drop_legacy", confirm=True)
        assert dropped["dropped"] is True and [c["collection"] for c in dropped["collections"]] == ["embedding__legacy"]
        assert _legacy(d) == []
        assert d.ok("drop_legacy") == {"collections": [], "dropped": False}
    finally:
        d.stop()


def _scores(d: BatchDaemon, model: str, track_id: str) -> dict[str, float]:
    """Cosine of ``track_id``'s stored vector with every stored track's (the library has under 30)."""
    return {h["track_id"]: h["score"] for h in d.ok("search", model=model, track_id=track_id, limit=30)["hits"]}


def _rewrite_every_id(lib: Library) -> dict[str, str]:
    """What Navidrome's canonical-id migration does: every media_file id changes, paths/sizes/mtimes stay."""
    mapping = {old: hashlib.md5(f"canonical:{old}".encode()).hexdigest() for old in lib.tracks}
    conn = lib.db.conn
    conn.execute("begin immediate")
    for old, new in mapping.items():
        conn.execute("update media_file set id = ?, pid = ? where id = ?", (new, new, old))
    conn.execute("commit")
    lib.tracks = {mapping[o]: dataclasses.replace(t, track_id=mapping[o]) for o, t in lib.tracks.items()}
    return mapping


def test_every_id_rewritten_is_rekeyed_not_reembedded(root: Path, tiny_models, backend, capsys):
    lib = Library(root / "lib", "relative")
    *tracks, gone = lib.add_good(25)  # `gone` really leaves the library: its vectors are deleted as before
    d = BatchDaemon(root / "d", lib, tiny_models, milvus_uri=backend)
    d.start()
    try:
        first, first_s = _run_job(d)
        assert first["status"] == "completed" and first["processed_tracks"] == 25, first
        assert first["rekeyed_tracks"] == 0
        probe_old = tracks[5].track_id
        before = {m: _scores(d, m, probe_old) for m in MODELS}
        lib.delete(gone)
        mapping = _rewrite_every_id(lib)
        rekey, rekey_s = _run_job(d)
        assert rekey["status"] == "completed", rekey
        assert (rekey["processed_tracks"], rekey["failed_tracks"], rekey["skipped_tracks"]) == (0, 0, 24), rekey
        assert rekey["rekeyed_tracks"] == 24
        assert rekey_s < 0.25 * first_s, (rekey_s, first_s)
        # every vector moved to its own track's new id: the same scores against every track, per model
        probe = mapping[probe_old]
        back = {new: old for old, new in mapping.items()}
        for model in MODELS:
            after = _scores(d, model, probe)
            assert set(after) <= set(back) and after[probe] == pytest.approx(1.0, abs=1e-4), model  # only new ids
            # (an HNSW search may leave out a track or two, so compare the tracks both searches found)
            common = [t for t in after if back[t] in before[model]]
            assert len(common) >= 20, (model, len(common))
            for new_id in common:
                assert after[new_id] == pytest.approx(before[model][back[new_id]], abs=1e-5), (model, new_id)
        # ... with the display fields of the new rows
        hit = next(h for h in d.ok("search", model="mert", track_id=probe, limit=30)["hits"] if h["track_id"] == probe)
        assert (hit["title"], hit["artist"], hit["score"]) == (tracks[5].title, tracks[5].artist, pytest.approx(1.0, abs=1e-4))
        assert hit["path"] == str(lib.music / tracks[5].stored_path)
        dims = _dims(d)
        # nothing left to do: the next incremental job skips everything and re-keys nothing
        again, _ = _run_job(d)
        assert (again["processed_tracks"], again["skipped_tracks"], again["rekeyed_tracks"]) == (0, 24, 0), again
    finally:
        d.stop()
    with capsys.disabled():
        kind = "server (MERT split)" if backend else "lite"
        print(f"\n[rekey] {kind}: first job {first_s:.2f} s, re-key job {rekey_s:.2f} s ({rekey_s / first_s:.1%}) for 25/24 tracks")
    _forget_schemas()
    ids = stored_ids(_uri(d, backend), dims)
    for model in MODELS:
        assert sorted(ids[model]) == sorted(mapping.values()), model  # exactly the new ids, none of the old
    if backend:
        from tests.batch_fixtures import _with_store

        assert _with_store(backend, {"mert": dims["mert"]}, lambda s: s.layout("mert").split)

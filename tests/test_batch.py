"""The batch job against a real daemon process: tiny real models, generated audio, a Navidrome DB, Milvus.

Row counts are read from the Milvus Lite file after the daemon stopped (Milvus
Lite admits one process per file), duplicates by listing every stored id.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.batch_fixtures import BatchDaemon, Library, collection_counts, fingerprints, stored_ids
from tests.daemon import read_frame, send_frame, short_tmpdir
from tests.tiny_models import PRESETS, _build_mert

MODELS = ["muq", "mert", "latent"]


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, str]:
    return tiny_models


@pytest.fixture
def root():
    d = short_tmpdir("eb-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _dims(d: BatchDaemon) -> dict[str, int]:
    return {m: v["dim"] for m, v in d.ok("status")["models"].items()}


def _uri(d: BatchDaemon) -> str:
    return str(d.data_dir / "milvus.db")


def _watch(d: BatchDaemon, interval_s: float = 0.2, timeout: float = 90.0) -> list[dict]:
    """batch_watch frames until more: false."""
    frames = []
    with d.connect(timeout=timeout) as s:
        send_frame(s, {"op": "batch_watch", "id": 7, "interval_s": interval_s})
        while True:
            f = read_frame(s)
            assert f["ok"] and f["id"] == 7, f
            frames.append(f)
            if not f.get("more"):
                return frames


def test_full_job_then_incremental_then_cancelled_rebuild(root: Path, models):
    lib = Library(root / "lib", "relative")
    good = lib.add_good(45)
    broken = lib.add_broken()  # 5 undecodable files + 1 row whose file is gone
    d = BatchDaemon(root / "d", lib, models, extra=["--checkpoint-every", "10"])
    d.start()
    try:
        # -- a full job over ~50 tracks x 3 models
        started = d.ok("batch_start")
        assert started["total_tracks"] == len(good) + len(broken)
        busy = d.call("batch_start")
        assert not busy["ok"] and busy["error"]["code"] == "busy"
        frames = _watch(d)
        final = frames[-1]["result"]
        assert frames[-1]["more"] is False and all(f["more"] for f in frames[:-1])
        assert final["status"] == "completed_with_errors", final
        assert final["job_id"] == started["job_id"] and final["models"] == MODELS
        assert (final["processed_tracks"], final["failed_tracks"], final["skipped_tracks"]) == (45, 6, 0)
        assert final["progress_percent"] == 100.0
        seen_running = [f["result"] for f in frames if f["result"]["status"] == "running"]
        assert any(p["current_track"] and " - " in p["current_track"] for p in seen_running)
        failures = d.ok("batch_failures", limit=1000)
        assert failures["total"] == 6 * 3
        by_track = {}
        for f in failures["failures"]:
            by_track.setdefault(f["track_id"], set()).add(f["model"])
            assert f["code"] in ("decode_error", "not_found"), f
            assert f["path"] and f["message"]
        assert set(by_track) == {t.track_id for t in broken}
        assert all(ms == set(MODELS) for ms in by_track.values())
        codes = {f["track_id"]: f["code"] for f in failures["failures"]}
        assert codes[broken[-1].track_id] == "not_found"  # the vanished file
        page = d.ok("batch_failures", limit=4, offset=2)
        assert page["total"] == 18 and len(page["failures"]) == 4

        # -- incremental: 3 new files, 2 changed, 1 gone, 1 marked missing (kept: Navidrome may see it again)
        added = lib.add_good(3)
        changed = [lib.change(good[0]), lib.change(good[1])]
        lib.delete(good[2])
        lib.db.mark_missing(good[3])
        d.ok("batch_start")
        p = d.wait_final()
        assert p["status"] == "completed_with_errors", p  # the broken files fail again
        assert p["total_tracks"] == 45 + 3 - 2 + 6
        assert (p["processed_tracks"], p["failed_tracks"], p["skipped_tracks"]) == (5, 6, 45 - 4), p

        # -- a clear_existing rebuild cancelled halfway leaves the complete old set answering
        d.ok("batch_start", clear_existing=True)
        d.wait_for(lambda p: p["processed_tracks"] >= 8)
        assert d.ok("batch_cancel") == {"status": "cancelling"}
        p = d.wait_final()
        assert p["status"] == "cancelled" and p["processed_tracks"] < 46, p
        probe = good[10].track_id
        hits = d.ok("search", model="mert", track_id=probe, limit=1000)["hits"]
        assert len(hits) == 47 and hits[0]["track_id"] == probe
        assert len(d.ok("search", model="muq", text="calm piano", limit=1000)["hits"]) == 47
        dims = _dims(d)
    finally:
        d.stop()

    expected = {t.track_id for t in good[3:]} | {t.track_id for t in added} | {c.track_id for c in changed}
    ids = stored_ids(_uri(d), dims)
    for model in MODELS:
        assert sorted(ids[model]) == sorted(expected), model  # no duplicates, deleted ones gone
    fps = fingerprints(_uri(d), dims)
    for c in changed:
        assert fps["latent"][c.track_id][0] == c.size
    from embedd.models import CATALOG
    from embedd.store import VectorStore

    store = VectorStore(_uri(d))
    try:
        for model, dim in dims.items():
            store.ensure(model, CATALOG[model].collection, dim)
            assert store.list_rebuilds(model) == []  # the cancelled rebuild's collections were dropped
    finally:
        store.close()


def test_absolute_layout_shards_and_one_model_at_a_time(root: Path, models):
    lib = Library(root / "lib", "absolute", navidrome_root="/srv/navidrome/music")
    tracks = lib.add_good(14)
    d = BatchDaemon(root / "d", lib, models, extra=["--batch-one-model-at-a-time"])
    d.start()
    try:
        # nothing has run: idle, and nothing to act on
        frames = _watch(d)
        assert len(frames) == 1 and frames[0]["result"]["status"] == "idle" and frames[0]["more"] is False
        for op in ("batch_cancel", "batch_pause", "batch_resume"):
            r = d.call(op)
            assert not r["ok"] and r["error"]["code"] == "not_found", (op, r)
        assert d.ok("batch_failures") == {"total": 0, "tracks": 0, "failures": []}
        bad = d.call("batch_start", shard="2/2")
        assert not bad["ok"] and bad["error"]["code"] == "bad_request"

        totals = {}
        for shard in ("0/2", "1/2"):
            totals[shard] = d.ok("batch_start", shard=shard, models=["muq", "latent"])["total_tracks"]
            p = d.wait_final()
            assert p["status"] == "completed" and p["processed_tracks"] == totals[shard], p
        assert sum(totals.values()) == 14 and all(totals.values())
        dims = _dims(d)
        # a track that left the library is removed only by its own shard's job
        from embedd.library import shard_of

        gone = {shard_of(t.track_id, 2): t for t in tracks}
        for t in gone.values():
            lib.delete(t)
        d.ok("batch_start", shard="0/2", models=["muq", "latent"])
        p = d.wait_final()
        assert p["status"] == "completed" and p["skipped_tracks"] == totals["0/2"] - 1, p
    finally:
        d.stop()
    dims = {m: dims[m] for m in ("muq", "latent")}
    ids = stored_ids(_uri(d), dims)
    for model in dims:
        assert gone[0].track_id not in ids[model] and gone[1].track_id in ids[model]
        assert len(ids[model]) == len(set(ids[model])) == 13


#: Enough tracks that the job is still running while the test pauses, asks and cancels: each short
#: track costs a whole MERT window and MuQ-MuLan window since parity (issue 23), so fewer than before.
TRACKS = 120


def test_pause_resume_cancel_and_interactive_latency(root: Path, models):
    lib = Library(root / "lib")
    lib.add_good(TRACKS, rows_per_file=10, duration_s=3.0)
    d = BatchDaemon(root / "d", lib, models, extra=["--checkpoint-every", "10"])
    d.start()
    try:
        d.ok("batch_start")
        d.wait_for(lambda p: p["processed_tracks"] >= 10)
        # interactive requests are served while the job runs (how fast: bench/interactive.py)
        for _ in range(8):
            d.ok("embed_text", text="calm piano")
            assert d.progress()["status"] == "running"
        assert d.progress()["rate_tracks_per_s"] > 0 and d.progress()["estimated_completion"] > time.time()

        paused = d.ok("batch_pause")
        assert paused["status"] == "paused" and paused["processed_tracks"] < TRACKS
        assert not any(m["loaded"] for m in d.ok("status")["models"].values())
        deadline = time.monotonic() + 60  # the batch lane has nothing queued or running: nothing can move
        while (lane := d.ok("status")["executor"]["lanes"]["batch"])["depth"] or lane["pass"] is not None:
            assert time.monotonic() < deadline, lane
            time.sleep(0.05)
        still = {k: v for k, v in d.progress().items() if k != "library_watch"}  # the watcher polls on
        assert still == paused  # nothing of the job moves while paused
        assert d.call("batch_start")["error"]["code"] == "busy"
        assert d.ok("batch_resume")["status"] == "running"
        d.wait_for(lambda p: p["processed_tracks"] >= paused["processed_tracks"] + 10)

        at_cancel = d.ok("batch_cancel")
        assert at_cancel == {"status": "cancelling"}
        p = d.wait_final()
        assert p["status"] == "cancelled", p
        deadline = time.monotonic() + 60  # its queued work dropped, the pass in flight stopped at a boundary
        while (lane := d.ok("status")["executor"]["lanes"]["batch"])["depth"] or lane["pass"] is not None:
            assert time.monotonic() < deadline, lane
            time.sleep(0.05)
        assert p["processed_tracks"] < TRACKS
        for op in ("batch_cancel", "batch_pause", "batch_resume"):
            assert d.call(op)["error"]["code"] == "not_found"

        # what the cancelled job stored stays; an incremental job does the rest
        d.ok("batch_start")
        p2 = d.wait_final()
        assert p2["status"] == "completed", p2
        assert p2["processed_tracks"] + p2["skipped_tracks"] == TRACKS
        assert p2["skipped_tracks"] >= p["processed_tracks"]
        dims = _dims(d)
    finally:
        d.stop()
    assert collection_counts(_uri(d), dims) == {m: TRACKS for m in MODELS}


def test_sigkill_mid_job_resumes_by_itself_exactly_once(root: Path, models):
    lib = Library(root / "lib")
    lib.add_good(60, rows_per_file=10, duration_s=2.0)
    lib.add_broken()
    d = BatchDaemon(root / "d", lib, models, extra=["--checkpoint-every", "7"])
    d.start()
    try:
        job = d.ok("batch_start")["job_id"]
        before = d.wait_for(lambda p: p["processed_tracks"] >= 15)
        d.kill()
        d.start()
        p = d.progress()
        assert p["job_id"] == job and p["status"] == "running", p
        assert p["processed_tracks"] <= before["processed_tracks"] + 30  # only checkpointed work survived
        p = d.wait_final()
        assert p["status"] == "completed_with_errors", p
        assert (p["processed_tracks"], p["failed_tracks"]) == (60, 6), p
        assert d.ok("batch_failures")["total"] == 18
        dims = _dims(d)
    finally:
        d.stop()
    ids = stored_ids(_uri(d), dims)
    for model in MODELS:
        assert len(ids[model]) == len(set(ids[model])) == 60, model


@pytest.mark.slow
def test_milvus_server_outage_mid_job(root: Path, models, request):
    from tests.milvus_fixtures import MilvusServer

    server = MilvusServer(root / "milvus")
    server.start()
    try:
        lib = Library(root / "lib")
        lib.add_good(80, rows_per_file=10, duration_s=2.0)
        d = BatchDaemon(
            root / "d", lib, models, extra=["--checkpoint-every", "5", "--milvus-retry-s", "240"],
            milvus_uri=server.uri,
        )  # fmt: skip
        d.start()
        try:
            d.ok("batch_start", models=["muq", "latent"])
            d.wait_for(lambda p: p["processed_tracks"] >= 10, timeout=120)
            server.stop()
            stalled = d.wait_for(lambda p: p["waiting"] is not None, timeout=120)  # the writer met the outage
            assert stalled["status"] == "running" and stalled["waiting"].startswith("waiting for Milvus"), stalled
            assert stalled["processed_tracks"] <= 80
            server.start()
            d.wait_for(lambda p: p["waiting"] is None, timeout=240)  # back: the job goes on by itself
            p = d.wait_final(240)
            assert p["status"] == "completed" and p["processed_tracks"] == 80, p
            dims = _dims(d)
        finally:
            d.stop()
        counts = collection_counts(server.uri, {m: dims[m] for m in ("muq", "latent")})
        assert counts == {"muq": 80, "latent": 80}
    finally:
        server.stop()


def test_new_weights_of_another_width_are_replaced_by_a_rebuild(root: Path, models):
    """Swapping in a model whose vectors are wider: an incremental job refuses, a rebuild replaces the set."""
    wide = dict(PRESETS["tiny"], mert_hidden=48, mert_heads=2, mert_intermediate=96)
    wide_dir = root / "mert-wide"
    _build_mert(wide_dir, wide, seed=99)
    lib = Library(root / "lib", "relative")
    ids = [t.track_id for t in lib.add_good(8)]
    d = BatchDaemon(root / "d", lib, models)
    d.start()
    try:
        d.ok("batch_start", models=["mert"])
        assert d.wait_final()["status"] == "completed"
        narrow_dim = _dims(d)["mert"]
    finally:
        d.stop()

    d = BatchDaemon(root / "d", lib, {**models, "mert": str(wide_dir)})
    d.start()
    try:
        wide_dim = _dims(d)["mert"]
        assert wide_dim != narrow_dim
        before = d.ok("search", model="mert", track_id=ids[0], limit=3)["hits"]
        assert before[0]["track_id"] == ids[0]  # the old set answers
        d.ok("batch_start", models=["mert"])
        final = d.wait_final()
        assert final["status"] == "failed"
        assert "clear_existing" in d.log()  # the job says what to do
        d.ok("batch_start", models=["mert"], clear_existing=True)
        final = d.wait_final()
        assert final["status"] == "completed" and final["processed_tracks"] == 8, (final, d.log())
        hits = d.ok("search", model="mert", track_id=ids[3], limit=3)["hits"]
        assert hits[0]["track_id"] == ids[3] and hits[0]["score"] > 0.999
    finally:
        d.stop()
    counts = collection_counts(_uri(d), {"mert": wide_dim})
    assert counts["mert"] == 8


def test_rebuild_loses_nothing_when_tracks_fail(root: Path, models):
    """Failed tracks keep their old vectors; a rebuild that stored nothing is not switched in."""
    lib = Library(root / "lib", "relative")
    good = lib.add_good(10)
    d = BatchDaemon(root / "d", lib, models)
    d.start()
    try:
        d.ok("batch_start", models=["latent"])
        assert d.wait_final()["status"] == "completed"
        before = {t.track_id for t in good}

        # two files turn to garbage: the rebuild completes with errors, and they keep their old vectors
        for t in good[:2]:
            lib.path_of(t).write_bytes(b"not audio any more" * 100)
        d.ok("batch_start", models=["latent"], clear_existing=True)
        p = d.wait_final()
        assert (p["status"], p["processed_tracks"], p["failed_tracks"]) == ("completed_with_errors", 8, 2), p
        hits = d.ok("search", model="latent", track_id=good[0].track_id, limit=100)["hits"]
        assert {h["track_id"] for h in hits} == before and hits[0]["track_id"] == good[0].track_id

        # the whole music folder is gone: nothing is stored, so nothing is switched
        lib.music.rename(lib.music.with_name(lib.music.name + "-unmounted"))
        d.ok("batch_start", models=["latent"], clear_existing=True)
        p = d.wait_final()
        assert p["status"] == "failed" and p["failed_tracks"] == 10, p
        assert "not switched in" in d.log()
        hits = d.ok("search", model="latent", track_id=good[7].track_id, limit=100)["hits"]
        assert {h["track_id"] for h in hits} == before

        # a rebuild cannot be sharded: one shard's switch would hide the others' vectors
        r = d.call("batch_start", clear_existing=True, shard="0/2")
        assert r["error"]["code"] == "bad_request" and "shard" in r["error"]["message"]
    finally:
        d.stop()

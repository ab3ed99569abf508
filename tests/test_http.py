"""The HTTP face through real daemons: every route, auth on and off, bad input, metrics, a batch, load.

One daemon (the tiny models, a Navidrome library, ``--http 127.0.0.1:PORT``)
serves most tests: a batch job is started with the original ``POST
/batch/start`` and followed through ``GET /batch/progress`` to completion, and
the similarity routes then answer over that job's vectors. Two cheap daemons
without models cover tokens and the ``unix:`` listener; settings refusals run
``embedd serve`` and read its one line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedd.client import Client
from embedd.errors import EmbeddError
from embedd.http import params
from embedd.address import HttpAddress, parse_http_address
from embedd.http.legacy import legacy_progress
from embedd.ops import SCHEMAS as OP_SCHEMAS
from tests.batch_fixtures import BatchDaemon, Library
from tests.daemon import REPO, Daemon, short_tmpdir
from tests.http_fixtures import free_port, metric_samples, wait_http

MODELS = ["muq", "latent"]  # the job's models: MERT stays without vectors (a 404 case)
PROGRESS_KEYS = {
    "total_tracks", "processed_tracks", "failed_tracks", "current_track", "status", "progress_percent",
    "estimated_completion", "total_operations", "processed_operations", "current_model",
}  # fmt: skip
LEGACY_STATUSES = {"idle", "running", "completed", "completed_with_errors", "failed", "cancelled"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root():
    d = short_tmpdir("eh-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def library(root) -> Library:
    lib = Library(root / "lib")
    # one file, two rows with the same tags: the same song twice (first: the file names of later tracks differ)
    twins = [lib.db.change_track(t, title="Twin Song", artist="Twin Artist") for t in lib.add_good(2, rows_per_file=2)]
    good = lib.add_good(10)
    lib.add_broken()
    lib.tracks.update({t.track_id: t for t in twins})
    lib.db.conn.execute("update media_file set artist_id = 'ar-' || replace(lower(artist), ' ', '-')")
    lib.good, lib.twins = good, twins  # type: ignore[attr-defined]
    assert len(lib.tracks) == len(good) + len(twins) + 6
    return lib


@pytest.fixture(scope="module")
def daemon(root, library, tiny_models):
    port = free_port()
    d = BatchDaemon(root / "d", library, tiny_models, extra=["--http", f"127.0.0.1:{port}", "--http-max-body", "65536"])
    d.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    d.start()
    wait_http(d.url + "/healthz")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def token_daemon():
    root = short_tmpdir("eht-")
    port = free_port()
    d = Daemon(root, args=["--http", f"127.0.0.1:{port}", "--http-token", "s3cret-token"])
    d.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    d.start()
    wait_http(d.url + "/healthz")
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


async def get(url: str, **kw) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def post(url: str, body: object = None, *, raw: bytes | None = None, **kw) -> tuple[int, object]:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    async with aiohttp.ClientSession() as s, s.post(url, data=data, **kw) as r:
        return r.status, await r.json(content_type=None)


async def scrape(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return metric_samples(await r.text())


def requests_total(samples: dict, op: str, code: str = "ok") -> float:
    return samples.get(("embedd_requests_total", (("code", code), ("op", op))), 0.0)


def assert_error(status: int, body: object, expected_status: int, code: str, *words: str) -> None:
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) >= {"error", "code"} and body["code"] == code, body
    assert "Traceback" not in body["error"]
    for word in words:
        assert word in body["error"], (word, body)


# ---------------------------------------------------------------- the batch, over the original REST API


@pytest.fixture(scope="module")
def batch_run(daemon, library):
    """POST /batch/start, a second start while it runs, GET /batch/progress until the end."""

    async def run():
        before = await scrape(daemon.url)
        start = await post(daemon.url + "/batch/start", {"models": MODELS, "clearExisting": True})
        again = await post(daemon.url + "/batch/start", {"models": MODELS, "clearExisting": False})
        polls = []
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                async with s.get(daemon.url + "/batch/progress") as r:
                    assert r.status == 200
                    p = await r.json()
                polls.append(p)
                if p["status"] not in ("running",):
                    break
                await asyncio.sleep(0.1)
        after = await scrape(daemon.url)
        return {"start": start, "again": again, "polls": polls, "before": before, "after": after}

    return asyncio.run(run())


def test_batch_started_and_followed_over_the_original_api(batch_run, library, daemon):
    status, started = batch_run["start"]
    n_tracks = len(library.tracks)
    assert status == 200 and started["status"] == "started", started
    assert started["total_tracks"] == n_tracks and started["total_operations"] == n_tracks * len(MODELS)
    assert started["models"] == MODELS and started["job_id"]

    status, again = batch_run["again"]  # a second start while the first runs: refused, no second job
    assert status == 409 and again["status"] == "already_running" and again["code"] == "busy", again
    assert again["job_id"] == started["job_id"]

    polls = batch_run["polls"]
    final = polls[-1]
    assert final["status"] == "completed_with_errors", final  # the broken files fail, the rest is embedded
    assert final["job_id"] == started["job_id"] and final["embedd_status"] == "completed_with_errors"
    for p in polls:
        assert PROGRESS_KEYS <= set(p), PROGRESS_KEYS - set(p)
        assert p["status"] in LEGACY_STATUSES
        assert p["total_operations"] == p["total_tracks"] * len(MODELS)
        assert 0 <= p["processed_operations"] <= p["total_operations"]
    running = [p for p in polls if p["status"] == "running"]
    assert running, "the job was never seen running"
    assert all(p["current_model"] == "muq,latent" for p in running)
    assert [p["processed_operations"] for p in polls] == sorted(p["processed_operations"] for p in polls)
    assert final["processed_operations"] == final["total_operations"] and final["progress_percent"] == 100.0
    assert final["current_model"] is None and final["estimated_completion"] is None
    assert final["processed_tracks"] == len(library.good) + len(library.twins)
    assert final["failed_tracks"] == n_tracks - final["processed_tracks"]

    # the same job as the socket sees it
    socket_view = daemon.progress()
    assert {k: socket_view[k] for k in socket_view} == {k: final[k] for k in socket_view}


def test_batch_metrics_moved_with_the_job(batch_run, library):
    before, after = batch_run["before"], batch_run["after"]
    final = batch_run["polls"][-1]
    assert after[("embedd_batch_total_tracks", ())] == final["total_tracks"]
    assert after[("embedd_batch_processed_tracks", ())] == final["processed_tracks"]
    assert after[("embedd_batch_failed_tracks", ())] == final["failed_tracks"]
    for model in MODELS:
        key = ("embedd_audio_seconds_total", (("model", model),))
        assert after[key] - before.get(key, 0.0) >= 1.4 * final["processed_tracks"] * 0.99  # 1.5 s tracks
        assert after[("embedd_model_loaded", (("model", model),))] in (0.0, 1.0)
    assert after[("embedd_audio_seconds_total", (("model", "mert"),))] == 0.0
    # the starts and the polls were requests like any other
    assert requests_total(after, "batch_start") - requests_total(before, "batch_start") == 1
    assert requests_total(after, "batch_start", "busy") - requests_total(before, "batch_start", "busy") == 1
    polls = len(batch_run["polls"])
    assert requests_total(after, "batch_progress") - requests_total(before, "batch_progress") == polls


async def test_cancel_and_watch_when_nothing_runs(batch_run, daemon):
    assert_error(*await post(daemon.url + "/batch/cancel"), 404, "not_found", "no running or paused batch job")
    async with aiohttp.ClientSession() as s, s.post(daemon.url + "/v1/batch_watch", data=b"{}") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in (await r.text()).splitlines()]
    assert len(lines) == 1 and lines[0]["more"] is False
    assert lines[0]["result"]["status"] == "completed_with_errors"


# ---------------------------------------------------------------- the similarity API


async def test_similar_tracks_answers_audiomuse_shape_from_the_search_op(batch_run, daemon, library):
    seed = library.good[0].track_id
    status, tracks = await get(daemon.url + f"/api/similar_tracks?item_id={seed}&n=5")
    assert status == 200 and len(tracks) == 5
    assert all(set(t) == {"item_id", "title", "author", "album", "distance"} for t in tracks)
    assert seed not in [t["item_id"] for t in tracks]
    distances = [t["distance"] for t in tracks]
    assert distances == sorted(distances) and all(-1e-6 <= d <= 2.0 for d in distances)
    # the same neighbours, the same scores, as the socket's search op
    hits = daemon.ok("search", model="muq", track_id=seed, limit=5, exclude_track_ids=[seed])["hits"]
    assert distances == pytest.approx([1 - h["score"] for h in hits], abs=1e-6)
    # the same tracks in the same order, except among equal scores, whose order is the index's
    # (the library's generated tracks share audio, so some neighbours tie to the last bit)
    for t, h in zip(tracks, hits):
        tied = [o["track_id"] for o in hits if abs((1 - o["score"]) - t["distance"]) <= 1e-6]
        assert t["item_id"] == h["track_id"] or t["item_id"] in tied, (tracks, hits)
    row = library.tracks[tracks[0]["item_id"]]
    assert (tracks[0]["title"], tracks[0]["author"], tracks[0]["album"]) == (row.title, row.artist, row.album)

    status, latent = await get(daemon.url + f"/api/similar_tracks?item_id={seed}&n=3&model=latent")
    assert status == 200 and len(latent) == 3 and seed not in [t["item_id"] for t in latent]


async def test_similar_tracks_eliminates_duplicates(batch_run, daemon, library):
    twin_a, twin_b = (t.track_id for t in library.twins)
    status, plain = await get(daemon.url + f"/api/similar_tracks?item_id={twin_a}&n=4&eliminate_duplicates=false")
    assert status == 200 and plain[0]["item_id"] == twin_b and plain[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    status, deduped = await get(daemon.url + f"/api/similar_tracks?item_id={twin_a}&n=4&eliminate_duplicates=true")
    assert status == 200 and len(deduped) == 4
    assert twin_b not in [t["item_id"] for t in deduped]
    assert [t["item_id"] for t in deduped[:3]] == [t["item_id"] for t in plain[1:4]]
    # AudioMuse-AI's plugin sends parameters embedd has no use for: accepted, ignored
    status, same = await get(
        daemon.url + f"/api/similar_tracks?item_id={twin_a}&n=4&eliminate_duplicates=true&radius_similarity=true&server=x"
    )
    assert status == 200 and same == deduped


async def test_answers_name_navidromes_current_ids_and_musicbrainz_ids(batch_run, daemon, library):
    """Navidrome matches by id, then MusicBrainz id: both come from its database as it is now."""
    seed = library.good[0].track_id
    _, before = await get(daemon.url + f"/api/similar_tracks?item_id={seed}&n=4")
    tagged, renamed = before[0]["item_id"], before[1]["item_id"]
    conn = library.db.conn
    conn.execute("update media_file set mbz_recording_id = 'mb-tagged' where id = ?", (tagged,))
    conn.execute("update media_file set id = 'moved-' || id where id = ?", (renamed,))  # the id migration, one track
    try:
        status, after = await get(daemon.url + f"/api/similar_tracks?item_id={seed}&n=4")
        assert status == 200
        assert [t["item_id"] for t in after] == [tagged, "moved-" + renamed, *[t["item_id"] for t in before[2:]]]
        assert after[0]["mbid"] == "mb-tagged" and all("mbid" not in t for t in after[1:])
        assert [t["distance"] for t in after] == pytest.approx([t["distance"] for t in before], abs=1e-6)
        last = library.good[-1].track_id
        status, body = await get(daemon.url + f"/api/find_path?start_song_id={seed}&end_song_id={last}&count=12&path_fix_size=true")
        assert status == 200 and "moved-" + renamed in [p["item_id"] for p in body["path"]]
        assert renamed not in [p["item_id"] for p in body["path"]]
    finally:
        conn.execute("update media_file set id = ? where id = ?", (renamed, "moved-" + renamed))
        conn.execute("update media_file set mbz_recording_id = '' where id = ?", (tagged,))


async def test_find_path_walks_from_a_to_b_without_repeats(batch_run, daemon, library):
    a, b = library.good[0].track_id, library.good[-1].track_id
    for fix in ("false", "true"):
        status, body = await get(daemon.url + f"/api/find_path?start_song_id={a}&end_song_id={b}&count=6&path_fix_size={fix}")
        assert status == 200 and set(body) == {"path", "total_distance"}, body
        path = body["path"]
        ids = [p["item_id"] for p in path]
        assert ids[0] == a and ids[-1] == b and len(ids) == len(set(ids)) and 2 <= len(ids) <= 6
        if fix == "true":
            assert len(ids) == 6  # the library has enough tracks
        assert all(set(p) == {"item_id", "title", "author", "album", "distance"} for p in path)
        assert path[0]["distance"] == 0.0 and all(p["distance"] >= -1e-6 for p in path)
        assert body["total_distance"] == pytest.approx(sum(p["distance"] for p in path))
        assert path[0]["title"] == library.tracks[a].title and path[-1]["author"] == library.tracks[b].artist
    # AudioMuse-AI's own parameter name for the length
    status, body = await get(daemon.url + f"/api/find_path?start_song_id={a}&end_song_id={b}&max_steps=3&path_fix_size=true")
    assert status == 200 and len(body["path"]) == 3


async def test_similar_artists_by_name_and_by_id(batch_run, daemon, library):
    name = library.tracks[library.good[0].track_id].artist
    artist_id = "ar-" + name.lower().replace(" ", "-")
    status, by_name = await get(daemon.url + f"/api/similar_artists?artist={name}&n=3")
    assert status == 200 and 1 <= len(by_name) <= 3, by_name
    assert all(set(a) == {"artist", "artist_id", "divergence"} for a in by_name)
    assert name not in [a["artist"] for a in by_name]
    divergences = [a["divergence"] for a in by_name]
    assert divergences == sorted(divergences)
    assert all(a["artist_id"] == "ar-" + a["artist"].lower().replace(" ", "-") for a in by_name)

    status, by_id = await get(daemon.url + f"/api/similar_artists?artist={artist_id}&n=3&include_component_matches=true")
    assert status == 200 and [a["artist"] for a in by_id] == [a["artist"] for a in by_name]
    own = {tid for tid, t in library.tracks.items() if t.artist == name}
    for entry in by_id:
        matches = entry["component_matches"]
        assert 1 <= len(matches) <= 3
        for m in matches:
            (mine,) = m["artist1_representative_songs"]
            (theirs,) = m["artist2_representative_songs"]
            assert mine["item_id"] in own and library.tracks[theirs["item_id"]].artist == entry["artist"]
    status, lower = await get(daemon.url + f"/api/similar_artists?artist={name.upper()}&n=3")
    assert status == 200 and lower == by_name


# ---------------------------------------------------------------- the original embed_text and /v1


async def test_embed_text_original_shape_and_v1_match_the_socket(batch_run, daemon):
    socket_text = daemon.ok("embed_text", text="calm piano at night", vector_format="list")
    status, body = await post(daemon.url + "/embed_text", {"text": "calm piano at night", "model": "muq"})
    assert status == 200 and set(body) == {"embedding", "model", "dimension", "is_stub"}
    assert body["model"] == "muq" and body["is_stub"] is False and body["dimension"] == socket_text["dim"]
    assert np.allclose(body["embedding"], socket_text["vector"], atol=1e-6)

    status, v1 = await post(daemon.url + "/v1/embed_text", {"text": "calm piano at night"})  # bin by default
    assert status == 200 and set(v1) == {"model", "dim", "vector", "raw"}
    assert np.allclose(v1["vector"], socket_text["vector"], atol=1e-6)
    assert np.allclose(v1["raw"], socket_text["raw"], atol=1e-6)

    assert_error(*await post(daemon.url + "/embed_text", {"text": "x", "model": "mert"}), 422, "unsupported", "'mert'")
    # latent has vectors here (mert has none): a vector derived through MuQ-MuLan's nearest tracks (test_recommend checks it)
    status, derived = await post(daemon.url + "/embed_text", {"text": "x", "model": "latent"})
    assert status == 200 and derived["is_stub"] is False and derived["derived_from"] == "muq", derived
    assert derived["dimension"] == len(derived["embedding"]) and derived["bridge_track_ids"]
    assert daemon.call("embed_text", text="x", model="latent")["error"]["code"] == "unsupported"  # the op keeps refusing


async def test_every_op_is_reachable_under_v1(batch_run, daemon, library):
    seed = library.good[1].track_id
    path = str(library.path_of(library.good[1]))
    audio = library.path_of(library.good[2]).read_bytes()
    bodies = {
        "ping": {},
        "status": {},
        "unload": {"model": "mert"},
        "embed_file": {"path": path, "models": ["latent"]},
        "embed_text": {"text": "rain", "vector_format": "list"},
        "search": {"model": "muq", "track_id": seed, "limit": 2},
        "batch_progress": {},
        "batch_failures": {"limit": 2},
        "batch_watch": {},
        "batch_start": {"models": ["nope"]},  # routed to the op, which refuses the model: no job starts
        "drop_legacy": {},  # a dry run: says what it would drop
        "recommend": {"seeds": [{"track_id": seed}], "models": ["muq", "latent"], "limit": 2},
    }
    for op in OP_SCHEMAS:  # every op is reachable; those with something to act on answer 200
        status, result = await post(daemon.url + f"/v1/{op}", bodies.get(op, {}))
        assert status != 405 and not (isinstance(result, dict) and result.get("code") == "unknown_op"), (op, result)
        if op in bodies and op != "batch_start":
            assert status == 200, (op, result)
    status, emb = await post(daemon.url + "/v1/embed_file", bodies["embed_file"])
    assert isinstance(emb["models"]["latent"]["vector"], list) and len(emb["models"]["latent"]["vector"]) == emb["models"]["latent"]["dim"]
    status, up = await post(
        daemon.url + "/v1/embed_file",
        {"data": base64.b64encode(audio).decode(), "filename": "x.flac", "models": ["muq"], "vector_format": "list"},
    )
    assert status == 200 and up["duration_s"] > 1.0
    status, found = await post(daemon.url + "/v1/search", {"model": "muq", "vector": up["models"]["muq"]["vector"], "limit": 1})
    assert status == 200 and found["hits"][0]["track_id"] == library.good[2].track_id
    status, fails = await post(daemon.url + "/v1/batch_failures", {"limit": 2})
    assert fails["total"] >= 1 and len(fails["failures"]) == 2
    # the state-changing batch ops answer what the socket answers with nothing to act on
    for op in ("batch_pause", "batch_resume", "batch_cancel"):
        assert_error(*await post(daemon.url + f"/v1/{op}"), 404, "not_found")
        assert daemon.call(op)["error"]["code"] == "not_found"
    assert_error(*await post(daemon.url + "/v1/batch_start", {"models": ["nope"]}), 400, "bad_request", "'nope'")


# ---------------------------------------------------------------- health, readiness, metrics


async def test_health_readiness_and_metrics_move_with_requests(daemon):
    status, health = await get(daemon.url + "/healthz")
    assert status == 200 and health["status"] == "ok" and health["version"]
    status, ready = await get(daemon.url + "/readyz")
    assert status == 200 and ready["ready"] is True and ready["milvus"]["ok"] is True

    before = await scrape(daemon.url)
    for _ in range(3):
        assert (await post(daemon.url + "/v1/ping"))[0] == 200
    async with await Client.connect(daemon.socket) as c:
        for _ in range(4):
            await c.call("ping")
    await post(daemon.url + "/v1/search", {"model": "muq", "text": "x", "limit": 0})
    await post(daemon.url + "/v1/transcode")
    await get(daemon.url + "/api/similar_tracks?item_id=nope")
    after = await scrape(daemon.url)
    assert requests_total(after, "ping") - requests_total(before, "ping") == 7  # socket and HTTP alike
    assert requests_total(after, "search", "bad_request") - requests_total(before, "search", "bad_request") == 1
    assert requests_total(after, "unknown", "unknown_op") - requests_total(before, "unknown", "unknown_op") == 1
    assert requests_total(after, "similar_tracks", "not_found") - requests_total(before, "similar_tracks", "not_found") == 1
    count = ("embedd_request_duration_seconds_count", (("op", "ping"),))
    assert after[count] - before.get(count, 0.0) == 7
    for lane in ("interactive", "batch"):
        assert after[("embedd_queue_depth", (("lane", lane),))] == 0.0
        assert after[("embedd_queue_oldest_wait_seconds", (("lane", lane),))] == 0.0
        assert ("embedd_io_queue_depth", (("component", "decoder"), ("lane", lane))) in after
    assert ("embedd_io_queue_depth", (("component", "store"), ("lane", "read"))) in after
    assert ("embedd_model_loaded", (("model", "mert"),)) in after
    assert after[("embedd_model_state", (("model", "mert"), ("state", "unloaded")))] == 1.0
    assert after[("embedd_admitted_requests", ())] == 0.0  # a scrape is not admitted work; nothing else runs


# ---------------------------------------------------------------- bad input


async def test_every_bad_input_is_a_4xx_json_error(batch_run, daemon, library):
    u = daemon.url
    seed = library.good[0].track_id
    # bad JSON, not an object, too big
    assert_error(*await post(u + "/v1/search", raw=b'{"model": "muq",'), 400, "bad_request", "not JSON")
    assert_error(*await post(u + "/batch/start", raw=b"[1, 2]"), 400, "bad_request", "JSON object", "array")
    assert_error(*await post(u + "/embed_text", raw=b"\xff\xfe"), 400, "bad_request", "not JSON")
    assert_error(*await post(u + "/v1/ping", raw=b" " * 70_000), 413, "too_large", "65536")
    # wrong types
    assert_error(*await post(u + "/v1/search", {"model": "muq", "text": 5}), 400, "bad_request", "'text'")
    assert_error(*await post(u + "/batch/start", {"clearExisting": "yes"}), 400, "bad_request", "clearExisting")
    assert_error(*await post(u + "/embed_text", {"text": ["a"]}), 400, "bad_request", "'text'")
    assert_error(*await post(u + "/v1/batch_failures", {"limit": "many"}), 400, "bad_request", "'limit'")
    assert_error(*await get(u + f"/api/similar_tracks?item_id={seed}&n=ten"), 400, "bad_request", "'n'", "integer")
    assert_error(*await get(u + f"/api/similar_tracks?item_id={seed}&eliminate_duplicates=maybe"), 400, "bad_request")
    # unknown models
    assert_error(*await post(u + "/embed_text", {"text": "x", "model": "clap"}), 400, "bad_request", "'clap'")
    assert_error(*await post(u + "/batch/start", {"models": ["muq", "clap"]}), 400, "bad_request", "'clap'")
    assert_error(*await get(u + f"/api/similar_tracks?item_id={seed}&model=clap"), 400, "bad_request", "'clap'")
    # unknown ids
    assert_error(*await get(u + "/api/similar_tracks?item_id=nope"), 404, "not_found", "'nope'")
    assert_error(*await get(u + f"/api/similar_tracks?item_id={seed}&model=mert"), 404, "not_found", "mert_embedding")
    assert_error(*await get(u + f"/api/find_path?start_song_id={seed}&end_song_id=nope"), 404, "not_found", "'nope'")
    assert_error(*await get(u + "/api/similar_artists?artist=Nobody+At+All"), 404, "not_found", "Nobody At All")
    assert_error(*await post(u + "/v1/search", {"model": "muq", "track_id": "nope"}), 404, "not_found", "'nope'")
    # out-of-range numbers
    for query in ("n=0", "n=1001"):
        assert_error(*await get(u + f"/api/similar_tracks?item_id={seed}&{query}"), 400, "bad_request", "between 1 and 1000")
    assert_error(*await get(u + f"/api/find_path?start_song_id={seed}&end_song_id=x&count=1"), 400, "bad_request", "'count'")
    assert_error(*await get(u + "/api/similar_artists?artist=x&n=101"), 400, "bad_request", "'n'")
    assert_error(*await post(u + "/v1/search", {"model": "muq", "text": "x", "limit": 1001}), 400, "bad_request", "<= 1000")
    assert_error(*await post(u + "/v1/batch_watch", {"interval_s": 0}), 400, "bad_request", "'interval_s'")
    # missing and contradictory arguments
    assert_error(*await get(u + "/api/similar_tracks"), 400, "bad_request", "'item_id'")
    assert_error(*await get(u + f"/api/find_path?start_song_id={seed}&end_song_id={seed}"), 400, "bad_request", "same")
    assert_error(*await get(u + "/api/similar_artists"), 400, "bad_request", "'artist'")
    assert_error(*await post(u + "/v1/search", {"model": "muq"}), 400, "bad_request", "exactly one")
    assert_error(*await post(u + "/v1/ping", {"op": "status"}), 400, "bad_request", "'op'")
    assert_error(*await post(u + "/v1/embed_text", {"text": "x", "colour": "red"}), 400, "bad_request", "'colour'")
    # unknown ops and routes, wrong methods
    assert_error(*await post(u + "/v1/transcode"), 404, "unknown_op", "'transcode'")
    assert_error(*await get(u + "/api/nothing_here"), 404, "not_found", "/api/nothing_here")
    assert_error(*await get(u + "/v1/ping"), 405, "bad_request", "POST")
    assert_error(*await get(u + "/batch/start"), 405, "bad_request", "POST")
    # a file the daemon may not read
    assert_error(*await post(u + "/v1/embed_file", {"path": "/etc/passwd"}), 403, "forbidden")


async def test_cancel_a_running_rebuild_watched_over_http(batch_run, daemon, library):
    """A rebuild of the shared daemon, cancelled; whatever happens, the daemon is left with no job running
    (the tests after this one search its vectors)."""
    try:
        await _cancel_a_running_rebuild(daemon, library)
    finally:
        await _no_job_running(daemon)


async def _no_job_running(daemon) -> None:
    """Cancel the shared daemon's job if one is active, and wait (on batch_watch) until it has ended."""
    status, progress = await get(daemon.url + "/batch/progress")
    if progress["status"] in ("running", "paused", "cancelling"):
        await post(daemon.url + "/batch/cancel")
        async with aiohttp.ClientSession() as s, s.post(daemon.url + "/v1/batch_watch", data=b"{}") as r:
            async for _line in r.content:
                pass  # the stream ends with the job


async def _cancel_a_running_rebuild(daemon, library) -> None:
    status, started = await post(daemon.url + "/batch/start", {"clearExisting": True})  # all three models
    assert status == 200 and started["status"] == "started"
    async with aiohttp.ClientSession() as s, s.post(daemon.url + "/v1/batch_watch", data=b'{"interval_s": 0.05}') as r:
        assert r.status == 200
        first = json.loads(await r.content.readline())
        assert first["more"] is True and first["result"]["job_id"] == started["job_id"]
        status, cancelling = await post(daemon.url + "/batch/cancel")
        assert status == 200 and cancelling == {"status": "cancelling"}
        lines = [first] + [json.loads(line) async for line in r.content]
    assert lines[-1]["more"] is False and lines[-1]["result"]["status"] == "cancelled"
    assert all(line["more"] for line in lines[:-1])
    status, progress = await get(daemon.url + "/batch/progress")
    assert progress["status"] == "cancelled" and progress["job_id"] == started["job_id"]
    assert progress["current_model"] is None
    # the cancelled rebuild left the finished job's vectors searchable
    status, tracks = await get(daemon.url + f"/api/similar_tracks?item_id={library.good[0].track_id}&n=3&model=latent")
    assert status == 200 and len(tracks) == 3


# ---------------------------------------------------------------- load: HTTP and socket together


async def test_hundreds_of_http_requests_while_the_socket_serves(batch_run, daemon, library):
    seed = library.good[3].track_id
    before = await scrape(daemon.url)
    n_http, n_socket = 400, 400
    routes = [
        ("POST", "/v1/ping"), ("GET", "/batch/progress"), ("GET", "/healthz"),
        ("GET", f"/api/similar_tracks?item_id={seed}&n=3"), ("POST", "/v1/status"),
    ]  # fmt: skip
    connector = aiohttp.TCPConnector(limit=64)
    started = time.monotonic()

    async def http_side(session: aiohttp.ClientSession) -> list[int]:
        async def one(i: int) -> int:
            method, path = routes[i % len(routes)]
            async with session.request(method, daemon.url + path, data=b"{}" if method == "POST" else None) as r:
                await r.read()
                return r.status

        return await asyncio.gather(*(one(i) for i in range(n_http)))

    async def socket_side() -> list[dict]:
        async with await Client.connect(daemon.socket) as c:
            calls = [c.call("ping") if i % 2 else c.call("batch_progress") for i in range(n_socket)]
            return await asyncio.gather(*calls)

    async with aiohttp.ClientSession(connector=connector) as session:
        statuses, answers = await asyncio.wait_for(asyncio.gather(http_side(session), socket_side()), 60)
    elapsed = time.monotonic() - started
    assert statuses == [200] * n_http
    assert len(answers) == n_socket and all("version" in a or "status" in a for a in answers)
    assert elapsed < 60
    after = await scrape(daemon.url)
    pings = requests_total(after, "ping") - requests_total(before, "ping")
    assert pings == n_http // len(routes) + n_socket // 2
    similar = requests_total(after, "similar_tracks") - requests_total(before, "similar_tracks")
    assert similar == n_http // len(routes)


# ---------------------------------------------------------------- tokens, unix sockets, refusals


async def test_token_guards_every_route_but_healthz(token_daemon):
    u = token_daemon.url
    status, health = await get(u + "/healthz")
    assert status == 200 and health["status"] == "ok"
    for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/v1/ping"), ("GET", "/batch/progress"),
                         ("GET", "/api/similar_tracks?item_id=x"), ("POST", "/embed_text"), ("GET", "/no/such/route")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            async with aiohttp.ClientSession() as s, s.request(method, u + path, headers=headers) as r:
                body = await r.json(content_type=None)
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer", (path, headers, r.status)
                assert body["code"] == "forbidden" and "Authorization: Bearer" in body["error"]
    good = {"Authorization": "Bearer s3cret-token"}
    status, pong = await post(u + "/v1/ping", headers=good)
    assert status == 200 and pong["protocol"] == 1
    status, ready = await get(u + "/readyz", headers=good)
    assert status == 200 and ready["ready"] is True
    status, _ = await get(u + "/batch/progress", headers=good)
    assert status == 200
    # the socket needs no token: its file permissions guard it
    assert token_daemon.call("ping")["ok"] is True


async def test_unix_listener_serves_and_is_removed_at_exit():
    root = short_tmpdir("ehu-")
    http_sock = root / "http.sock"
    d = Daemon(root, args=["--http", f"unix:{http_sock}"])
    d.start()
    try:
        deadline = time.monotonic() + 30
        while not http_sock.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        connector = aiohttp.UnixConnector(path=str(http_sock))
        async with aiohttp.ClientSession(connector=connector) as s:
            async with s.get("http://embedd/healthz") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with s.post("http://embedd/v1/ping") as r:
                assert r.status == 200 and (await r.json())["protocol"] == 1
            # SIGTERM with a keep-alive connection still open: a clean, prompt exit
            started = time.monotonic()
            assert await asyncio.to_thread(d.stop) == 0
            assert time.monotonic() - started < 10
    finally:
        d.stop()
    assert not http_sock.exists()
    shutil.rmtree(root, ignore_errors=True)


async def test_readyz_is_503_naming_milvus_while_it_does_not_answer():
    root = short_tmpdir("ehm-")
    port, dead = free_port(), free_port()  # nothing listens on the Milvus port
    uri = f"http://127.0.0.1:{dead}"
    d = Daemon(root, args=["--http", f"127.0.0.1:{port}", "--milvus-uri", uri])
    d.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        status, health = await get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and health["status"] == "ok"  # alive, though not ready
        status, ready = await get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and ready["ready"] is False and ready["code"] == "unavailable", ready
        assert ready["error"] == f"Milvus at {uri} does not answer" and ready["milvus"] == {"uri": uri, "ok": False}
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_requests_in_progress_are_bounded():
    root = short_tmpdir("ehl-")
    port = free_port()
    d = Daemon(root, args=["--http", f"127.0.0.1:{port}", "--max-connections", "1"])
    d.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        # one request whose body is still arriving holds the only slot...
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/ping HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{")
        await writer.drain()
        for _ in range(100):  # ...once the daemon has started on it
            status, body = await post(f"http://127.0.0.1:{port}/v1/ping")
            if status == 503:
                break
            await asyncio.sleep(0.02)
        assert_error(status, body, 503, "overloaded", "1 HTTP requests in progress")
        writer.write(b"}")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()
        status, body = await post(f"http://127.0.0.1:{port}/v1/ping")  # the slot is free again
        assert status == 200 and body["protocol"] == 1
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def _serve(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedd", "serve", "--socket", str(root / "s.sock"), "--data-dir", str(root / "data"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=Daemon(root).environment(),
    )  # fmt: skip


def test_non_loopback_without_token_and_taken_ports_refuse_to_start():
    root = short_tmpdir("ehr-")
    try:
        for address in ("0.0.0.0:9002", "[::]:9002", "192.168.1.10:9002", "music.example:9002"):
            r = _serve(root, "--http", address)
            assert r.returncode == 2, r.stderr
            assert r.stderr.strip() == (
                f"embedd: invalid setting --http-token / EMBEDD_HTTP_TOKEN: --http {address} is reachable from other "
                "hosts; set a token (every route but /healthz then requires 'Authorization: Bearer TOKEN')"
            ), r.stderr
        r = _serve(root, "--http", "9002")
        assert r.returncode == 2 and "'9002' is not HOST:PORT, [IPv6]:PORT or unix:/path" in r.stderr
        with __import__("socket").socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            r = _serve(root, "--http", f"127.0.0.1:{port}")
        assert r.returncode == 1 and r.stderr.strip() == (
            f"embedd: cannot listen for HTTP on 127.0.0.1:{port}: Address already in use"
        ), r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- pure parts: addresses, parameters, progress

@pytest.mark.parametrize(
    "text, address, loopback",
    [
        ("127.0.0.1:9002", HttpAddress(host="127.0.0.1", port=9002), True),
        ("127.8.9.10:1", HttpAddress(host="127.8.9.10", port=1), True),
        ("[::1]:9002", HttpAddress(host="::1", port=9002), True),
        ("localhost:0", HttpAddress(host="localhost", port=0), True),
        ("unix:/run/embedd/http.sock", HttpAddress(path="/run/embedd/http.sock"), True),
        ("0.0.0.0:9002", HttpAddress(host="0.0.0.0", port=9002), False),
        ("[::]:80", HttpAddress(host="::", port=80), False),
        ("[0:0:0:0:0:0:0:1]:9002", HttpAddress(host="::1", port=9002), True),
        ("Music.Example:9002", HttpAddress(host="music.example", port=9002), False),
    ],
)
def test_http_addresses(text, address, loopback):
    parsed = parse_http_address(text)
    assert parsed == address and parsed.loopback is loopback
    assert parse_http_address(str(parsed)) == parsed


NOT_AN_ADDRESS = "is not HOST:PORT, [IPv6]:PORT or unix:/path"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("9002", NOT_AN_ADDRESS),
        ("127.0.0.1", NOT_AN_ADDRESS),
        ("127.0.0.1:", NOT_AN_ADDRESS),
        (":9002", NOT_AN_ADDRESS),
        ("127.0.0.1:65536", "port 65536 is above 65535"),
        ("[::1:9002", NOT_AN_ADDRESS),
        ("[nope]:1", "'nope' in brackets is not an IPv6 address"),
        ("::1:9002", NOT_AN_ADDRESS),
        ("unix:relative.sock", "the unix: socket path must be absolute"),
        ("unix:", "the unix: socket path must be absolute"),
        ("300.1.1.1:9002", "'300.1.1.1' is neither an IPv4 address nor a host name"),
        ("a b:1", "'a b' is neither an IPv4 address nor a host name"),
        ("http://127.0.0.1:9002", NOT_AN_ADDRESS),
        ("unix:/" + "x" * 120, "the socket path is longer than the 107 bytes a Unix socket allows"),
    ],
)
def test_bad_http_addresses_name_what_is_wrong(text, why):
    """Each bad address is refused with a sentence quoting it and saying what is wrong."""
    with pytest.raises(ValueError) as info:
        parse_http_address(text)
    assert str(info.value).startswith(repr(text)) and str(info.value).endswith(why)


@given(st.text(max_size=40))
def test_http_address_parser_never_fails_otherwise(text):
    try:
        parsed = parse_http_address(text)
    except ValueError:
        return
    assert parse_http_address(str(parsed)) == parsed
    assert (parsed.path is None) == (parsed.host is not None)


@given(st.dictionaries(st.sampled_from(["n", "count", "max_steps", "x"]), st.text(max_size=8), max_size=3))
def test_integer_parameters_are_in_range_or_named_errors(query):
    try:
        value = params.integer(query, ("count", "max_steps"), 25, 2, 200)
    except EmbeddError as exc:
        assert exc.code.value == "bad_request" and ("'count'" in exc.message or "'max_steps'" in exc.message)
        return
    assert 2 <= value <= 200
    if not query.get("count", "").strip() and not query.get("max_steps", "").strip():
        assert value == 25


@given(st.text(max_size=10))
def test_boolean_parameters(text):
    try:
        value = params.boolean({"flag": text}, "flag", False)
    except EmbeddError as exc:
        assert "'flag'" in exc.message
        return
    assert value is (text.strip().lower() in {"true", "1", "yes", "y", "on"})


def _progress(status: str, percent: float, total: int = 10, models=("muq", "mert")) -> dict:
    return {"job_id": "j", "status": status, "models": list(models), "total_tracks": total, "processed_tracks": 0,
            "failed_tracks": 0, "skipped_tracks": 0, "current_track": None, "progress_percent": percent,
            "started_at": 1.0, "estimated_completion": None, "rate_tracks_per_s": None}  # fmt: skip


def test_legacy_progress_counts_operations_and_names_the_model():
    one_pass = legacy_progress(_progress("running", 30.0), one_model_at_a_time=False)
    assert one_pass["total_operations"] == 20 and one_pass["processed_operations"] == 6
    assert one_pass["current_model"] == "muq,mert" and one_pass["status"] == "running"
    first = legacy_progress(_progress("running", 30.0), one_model_at_a_time=True)  # pass 1 of 2, 60% through it
    second = legacy_progress(_progress("running", 75.0), one_model_at_a_time=True)
    assert (first["current_model"], second["current_model"]) == ("muq", "mert")
    assert second["processed_operations"] == 15
    for status, word in (("paused", "running"), ("cancelling", "running"), ("cancelled", "cancelled"), ("idle", "idle")):
        p = legacy_progress(_progress(status, 50.0), one_model_at_a_time=False)
        assert p["status"] == word and p["embedd_status"] == status and p["current_model"] is None
    done = legacy_progress(_progress("completed", 100.0), one_model_at_a_time=True)
    assert done["processed_operations"] == done["total_operations"] == 20
    empty = legacy_progress(_progress("idle", 0.0, total=0, models=()), one_model_at_a_time=False)
    assert empty["total_operations"] == 0 and empty["processed_operations"] == 0

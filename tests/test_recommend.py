"""The recommender through a real daemon: the fork's POST /playlist/{mode}, the recommend op, /v1, embedd mix.

One daemon (the tiny models, a two-library Navidrome database, HTTP on) over
a Milvus Lite collection the test writes itself before the daemon opens it:
60 tracks per model with clustered random vectors (MERT lacks ten of them),
so every answer can be checked against brute-force cosine over the very
vectors stored. The pure ranking functions get property tests of their own.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import shutil
import subprocess
import sys

import aiohttp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.recommend import (
    BRIDGE_TRACKS,
    Candidate,
    SeedVector,
    bridge_seeds,
    bridged_vector,
    diversify,
    merge,
    model_scores,
    neighbours,
    penalised,
)
from tests.batch_fixtures import BatchDaemon, Library
from tests.daemon import REPO, short_tmpdir
from tests.http_fixtures import free_port, wait_http

MODELS = ("muq", "mert", "latent")
N_TRACKS = 60
MERT_MISSING = 10  # the last ten tracks have no MERT vector
MODES = ("recent", "favorites", "all", "discovery", "custom")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root():
    d = short_tmpdir("erc-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def rec(root, tiny_models):
    """The daemon, with ``tracks`` (FixtureTrack by index), ``vectors`` (model -> id -> vector), ``url``."""
    lib = Library(root / "lib")
    (root / "lib2").mkdir()
    lib.db.add_library(2, str(root / "lib2"))
    rows = []
    for i in range(N_TRACKS):
        rows.append(
            lib.db.make_track(
                f"Artist {i % 6}/{i:03d} - Song.flac", library_id=1 if i < 40 else 2, title=f"Song {i}", artist=f"Artist {i % 6}"
            )
        )
    lib.db.insert(rows)
    lib.db.conn.execute("update media_file set artist_id = 'ar-' || replace(lower(artist), ' ', '-')")
    port = free_port()
    d = BatchDaemon(root / "d", lib, tiny_models, extra=["--http", f"127.0.0.1:{port}"])
    d.start()
    dims = {m: v["dim"] for m, v in d.ok("status")["models"].items()}
    d.stop()

    rng = np.random.default_rng(7)
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for m in MODELS:
        centers = rng.normal(size=(6, dims[m]))
        vectors[m] = {}
        for i, t in enumerate(rows):
            if m == "mert" and i >= N_TRACKS - MERT_MISSING:
                continue
            vectors[m][t.track_id] = (centers[i % 6] + 0.8 * rng.normal(size=dims[m])).astype(np.float32)

    # Written in a child process: Milvus Lite's server lives as long as the process that opened the file.
    rows_of = {
        m: [
            dict(track_id=t.track_id, vector=vectors[m][t.track_id], path=f"/music/{t.stored_path}", title=t.title,
                 artist=t.artist, album=t.album, duration_s=t.duration, model_id="test", file_size=t.size,
                 file_mtime=t.mtime, embedded_at=1.0)  # fmt: skip
            for t in rows
            if t.track_id in vectors[m]
        ]
        for m in MODELS
    }
    payload = root / "rows.pickle"
    payload.write_bytes(pickle.dumps((str(d.data_dir / "milvus.db"), dims, rows_of)))
    subprocess.run([sys.executable, "-c", _POPULATE, str(payload)], cwd=REPO, check=True, timeout=300)
    d.start()
    d.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    wait_http(d.url + "/healthz")
    d.tracks = rows  # type: ignore[attr-defined]
    d.vectors = vectors  # type: ignore[attr-defined]
    d.dims = dims  # type: ignore[attr-defined]
    yield d
    d.stop()


_POPULATE = """
import pickle, sys
from embedd.models import CATALOG
from embedd.store import TrackRow, VectorStore
uri, dims, rows_of = pickle.loads(open(sys.argv[1], "rb").read())
store = VectorStore(uri, timeout_s=60.0)
for m, rows in rows_of.items():
    store.ensure(m, CATALOG[m].collection, dims[m])
    store.upsert(m, [TrackRow(**r) for r in rows])
store.close()
"""


def post(url: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    async def go():
        data = raw if raw is not None else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s, s.post(url, data=data) as r:
            return r.status, await r.json(content_type=None)

    return asyncio.run(go())


def playlist(d, mode: str, body: dict) -> dict:
    status, answer = post(f"{d.url}/playlist/{mode}", body)
    assert status == 200, answer
    assert set(answer) == {"tracks", "warnings"}
    return answer


def fork_request(seeds: list[dict], **extra) -> dict:
    """The fork's request as its Go server sends it (every field it knows)."""
    return {
        "user_id": "u-1", "user_name": "alice", "limit": 5, "mode": "recent", "seeds": seeds, "diversity": 0.0,
        "exclude_track_ids": [], "library_ids": [], "disliked_track_ids": [], "disliked_artist_ids": [],
        "dislike_strength": 0.5, "exclude_playlist_ids": ["pl-1"], "models": ["muq"], "merge_strategy": "union",
        "model_priorities": {"muq": 1, "mert": 2, "latent": 3}, "min_model_agreement": 1, "negative_prompts": [],
        "negative_prompt_penalty": 0.85, **extra,
    }  # fmt: skip


def seed(t, source: str = "recent", weight: float = 1.0) -> dict:
    return {"track_id": t.track_id, "weight": weight, "source": source, "played_at": "2025-03-01T12:00:00Z"}


# ---------------------------------------------------------------- brute force


def cos(matrix: np.ndarray, v: np.ndarray) -> np.ndarray:
    m = matrix.astype(np.float64)
    v = v.astype(np.float64)
    return (m @ v) / (np.linalg.norm(m, axis=1) * np.linalg.norm(v))


def bf_scores(stored: dict, seeds: list[tuple[np.ndarray, float, str]], excluded: set, limit: int) -> dict:
    """Per model: each seed's ``neighbours(limit)`` nearest non-excluded tracks, best cosine x weight kept."""
    ids = [t for t in stored if t not in excluded]
    matrix = np.stack([stored[t] for t in ids])
    best: dict[str, tuple[float, str]] = {}
    for vec, weight, reason in seeds:
        if weight <= 0:
            continue
        sims = cos(matrix, vec)
        for i in np.argsort(-sims, kind="stable")[: neighbours(limit)]:
            score = float(sims[i]) * weight
            if score > 0 and (ids[i] not in best or score > best[ids[i]][0]):
                best[ids[i]] = (score, reason)
    return best


def bf_merge(per_model: dict, strategy: str, min_agreement: int = 1, priority=("muq", "mert", "latent")) -> list:
    models = list(per_model)
    found = {t for s in per_model.values() for t in s}
    def mean(t, ms):
        return float(np.mean([per_model[m][t][0] for m in ms]))
    if strategy == "union":
        out = []
        for t in found:
            ms = [m for m in models if t in per_model[m]]
            if len(ms) >= min_agreement:
                out.append((t, mean(t, ms)))
        return sorted(out, key=lambda x: (-x[1], x[0]))
    common = sorted(((t, mean(t, models)) for t in found if all(t in per_model[m] for m in models)), key=lambda x: (-x[1], x[0]))
    if strategy == "intersection":
        return common
    seen = {t for t, _ in common}
    out = list(common)
    for m in sorted(models, key=priority.index):
        rest = sorted(((t, s) for t, (s, _) in per_model[m].items() if t not in seen), key=lambda x: (-x[1], x[0]))
        out += rest
        seen |= {t for t, _ in rest}
    return out


def assert_ranking(tracks: list[dict], expected: list[tuple[str, float]], limit: int) -> None:
    """Same tracks in the same order and scores, allowing float32-level ties to swap."""
    expected = expected[:limit]
    assert len(tracks) == len(expected), (tracks, expected)
    score_of = dict(expected)
    for got, (tid, score) in zip(tracks, expected):
        assert got["score"] == pytest.approx(score, rel=1e-4, abs=1e-5), (got, tid, score)
        if got["track_id"] != tid:
            assert got["track_id"] in score_of and abs(score_of[got["track_id"]] - score) < 1e-5, (tracks, expected)


# ---------------------------------------------------------------- the fork's route


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_single_model_matches_brute_force(rec, mode):
    t = rec.tracks
    seeds = [seed(t[0], "recent", 1.0), seed(t[7], "favorite", 0.6), seed(t[13], "playlist", 0.3)]
    body = fork_request(seeds, mode=mode, exclude_track_ids=[t[6].track_id], limit=6, some_future_key={"x": 1})
    answer = playlist(rec, mode, body)
    stored = rec.vectors["muq"]
    excluded = {s["track_id"] for s in seeds} | {t[6].track_id}
    expected = bf_scores(stored, [(stored[s["track_id"]], s["weight"], f"seed:{s['source']}") for s in seeds], excluded, 6)
    ranked = sorted(((k, v[0]) for k, v in expected.items()), key=lambda x: (-x[1], x[0]))
    assert_ranking(answer["tracks"], ranked, 6)
    for track in answer["tracks"]:
        assert track["reason"] == expected[track["track_id"]][1]
        assert track["models"] == ["muq"] and track["track_id"] not in excluded
        assert track["title"].startswith("Song ") and "negative_similarity" not in track
    assert answer["warnings"] == []


def _per_model(rec, seeds: list[dict], models, limit: int, excluded: set) -> dict:
    per = {}
    for m in models:
        stored = rec.vectors[m]
        s = [(stored[x["track_id"]], x["weight"], f"seed:{x['source']}") for x in seeds if x["track_id"] in stored]
        if s:
            per[m] = bf_scores(stored, s, excluded, limit)
    return per


@pytest.mark.parametrize(
    "strategy,agreement", [("union", 1), ("union", 2), ("union", 3), ("intersection", 1), ("priority", 1)]
)
def test_multi_model_merges_use_each_models_own_seed_vectors(rec, strategy, agreement):
    t = rec.tracks
    seeds = [seed(t[2], "recent"), seed(t[55], "favorite", 0.8)]  # t[55] has no MERT vector
    models = ["latent", "muq", "mert"]
    body = fork_request(seeds, models=models, merge_strategy=strategy, min_model_agreement=agreement, limit=8)
    answer = playlist(rec, "all", body)
    excluded = {s["track_id"] for s in seeds}
    per = _per_model(rec, seeds, models, 8, excluded)
    expected = bf_merge(per, strategy, agreement)
    assert_ranking(answer["tracks"], expected, 8)
    for track in answer["tracks"]:
        found_by = [m for m in models if track["track_id"] in per[m]]
        if strategy != "priority":
            assert track["models"] == found_by
        if strategy == "union":
            assert len(found_by) >= agreement
        if strategy == "intersection":
            assert found_by == models


def test_priority_honours_model_priorities(rec):
    t = rec.tracks
    seeds = [seed(t[3])]
    body = fork_request(seeds, models=["muq", "latent"], merge_strategy="priority", model_priorities={"latent": 0}, limit=40)
    answer = playlist(rec, "custom", body)
    per = _per_model(rec, seeds, ["muq", "latent"], 40, {t[3].track_id})
    expected = bf_merge(per, "priority", priority=("latent", "muq", "mert"))
    assert_ranking(answer["tracks"], expected, 40)


def test_text_mode_muq_and_bridged_mert(rec):
    """The fork's text mode: /embed_text, then a placeholder seed carrying the vector; mert bridges through MuQ."""
    status, muq = post(f"{rec.url}/embed_text", {"text": "calm piano at night", "model": "muq"})
    assert status == 200 and muq["is_stub"] is False
    text_seed = {"track_id": "_text_query_", "weight": 1.0, "source": "text", "embedding": muq["embedding"]}
    q = np.asarray(muq["embedding"], dtype=np.float32)

    answer = playlist(rec, "text", fork_request([text_seed], mode="text", limit=5))
    expected = bf_scores(rec.vectors["muq"], [(q, 1.0, "seed:text")], set(), 5)
    assert_ranking(answer["tracks"], sorted(((k, v[0]) for k, v in expected.items()), key=lambda x: (-x[1], x[0])), 5)
    assert all(tr["reason"] == "seed:text" for tr in answer["tracks"])

    # MERT: the text's BRIDGE_TRACKS nearest MuQ tracks (with a MERT vector) stand in, weighted by their MuQ cosine.
    answer = playlist(rec, "text", fork_request([text_seed], mode="text", limit=5, models=["mert"]))
    muq_ids = list(rec.vectors["muq"])
    sims = cos(np.stack([rec.vectors["muq"][x] for x in muq_ids]), q)
    nearest = [(muq_ids[i], float(sims[i])) for i in np.argsort(-sims)[:BRIDGE_TRACKS]]
    bridge = [(tid, s) for tid, s in nearest if s > 0 and tid in rec.vectors["mert"]]
    top = max(s for _, s in bridge)
    seeds = [(rec.vectors["mert"][tid], s / top, "seed:text via muq") for tid, s in bridge]
    expected = bf_scores(rec.vectors["mert"], seeds, set(), 5)
    assert_ranking(answer["tracks"], sorted(((k, v[0]) for k, v in expected.items()), key=lambda x: (-x[1], x[0])), 5)
    assert all(tr["reason"] == "seed:text via muq" for tr in answer["tracks"])
    assert any("bridged through MuQ-MuLan" in w for w in answer["warnings"])

    # /embed_text for mert: 200, not a stub, the bridged direction in MERT's space.
    status, mert = post(f"{rec.url}/embed_text", {"text": "calm piano at night", "model": "mert"})
    assert status == 200, mert
    assert mert["is_stub"] is False and mert["derived_from"] == "muq" and mert["dimension"] == rec.dims["mert"]
    assert mert["bridge_track_ids"] == [tid for tid, _ in bridge]
    want = bridged_vector([SeedVector(v, w, "") for v, w, _ in seeds])
    np.testing.assert_allclose(np.asarray(mert["embedding"]), want, rtol=1e-4, atol=1e-5)


def test_text_seed_and_negative_prompts_are_embedded_by_the_daemon(rec):
    t = rec.tracks
    r = rec.call("embed_text", text="loud drums", model="muq", vector_format="list")
    neg = np.asarray(r["result"]["vector"], dtype=np.float32)
    seeds = [seed(t[4]), seed(t[10], "favorite", 0.9)]
    body = fork_request(seeds, limit=6, negative_prompts=["loud drums"], negative_prompt_penalty=0.5)
    answer = playlist(rec, "recent", body)
    stored = rec.vectors["muq"]
    excluded = {s["track_id"] for s in seeds}
    base = bf_scores(stored, [(stored[s["track_id"]], s["weight"], "") for s in seeds], excluded, 6)
    negs = {tid: float(cos(stored[tid][None, :], neg)[0]) for tid in base}
    expected = sorted(((k, penalised(s, negs[k], 0.5)) for k, (s, _) in base.items()), key=lambda x: (-x[1], x[0]))
    assert_ranking(answer["tracks"], expected, 6)
    for track in answer["tracks"]:
        assert track["negative_similarity"] == pytest.approx(negs[track["track_id"]], abs=1e-5)

    # The same negative given as a vector (negative_embeddings) answers the same.
    body = fork_request(seeds, limit=6, negative_prompts=["loud drums"], negative_prompt_penalty=0.5,
                        negative_embeddings={"muq": [neg.tolist()]})  # fmt: skip
    assert playlist(rec, "recent", body)["tracks"] == answer["tracks"]

    # A text seed (the native extension: embedd embeds it) equals the same vector given.
    r = rec.call("embed_text", text="sunny guitar", model="muq", vector_format="list")
    as_text = rec.ok("recommend", seeds=[{"text": "sunny guitar"}], limit=5)
    as_vector = rec.ok("recommend", seeds=[{"embedding": r["result"]["vector"], "source": "text"}], limit=5)
    assert [x["track_id"] for x in as_text["tracks"]] == [x["track_id"] for x in as_vector["tracks"]]


def test_dislikes_and_library_filter(rec):
    t = rec.tracks
    seeds = [seed(t[1]), seed(t[41], "favorite")]
    stored = rec.vectors["muq"]
    excluded = {s["track_id"] for s in seeds}
    plain = playlist(rec, "discovery", fork_request(seeds, limit=10))
    first = plain["tracks"][0]["track_id"]
    artist_of = {x.track_id: "ar-" + x.artist.lower().replace(" ", "-") for x in t}
    disliked_artist = artist_of[plain["tracks"][1]["track_id"]]

    answer = playlist(rec, "discovery", fork_request(seeds, limit=10, disliked_track_ids=[first],
                                                     disliked_artist_ids=[disliked_artist], dislike_strength=0.5))  # fmt: skip
    base = bf_scores(stored, [(stored[s["track_id"]], 1.0, "") for s in seeds], excluded | {first}, 10)
    expected = sorted(
        ((k, s * (0.5 if artist_of[k] == disliked_artist else 1.0)) for k, (s, _) in base.items()), key=lambda x: (-x[1], x[0])
    )
    assert_ranking(answer["tracks"], expected, 10)
    assert first not in {x["track_id"] for x in answer["tracks"]}

    answer = playlist(rec, "discovery", fork_request(seeds, limit=10, disliked_artist_ids=[disliked_artist], dislike_strength=1.0))
    assert answer["tracks"] and all(artist_of[x["track_id"]] != disliked_artist for x in answer["tracks"])

    library_of = {x.track_id: x.library_id for x in t}
    answer = playlist(rec, "all", fork_request(seeds, limit=10, library_ids=[2]))
    base = bf_scores(stored, [(stored[s["track_id"]], 1.0, "") for s in seeds], excluded, 10 * 3)
    expected = sorted(((k, s) for k, (s, _) in base.items() if library_of[k] == 2), key=lambda x: (-x[1], x[0]))
    assert answer["tracks"] and all(library_of[x["track_id"]] == 2 for x in answer["tracks"])
    assert_ranking(answer["tracks"], expected, 10)


def test_diversity_is_maximal_marginal_relevance(rec):
    t = rec.tracks
    seeds = [seed(t[5])]
    stored = rec.vectors["latent"]
    base = bf_scores(stored, [(stored[t[5].track_id], 1.0, "seed:recent")], {t[5].track_id}, 8)
    ranked = [Candidate(k, s, r, ["latent"]) for k, (s, r) in sorted(base.items(), key=lambda x: (-x[1][0], x[0]))]
    spread = {}
    for d in (0.0, 0.5, 1.0):
        answer = playlist(rec, "all", fork_request(seeds, models=["latent"], limit=8, diversity=d))
        want = diversify(ranked, {"latent": stored}, d, 8)
        assert [x["track_id"] for x in answer["tracks"]] == [c.track_id for c in want]
        ids = [x["track_id"] for x in answer["tracks"]]
        m = np.stack([stored[i] / np.linalg.norm(stored[i]) for i in ids])
        spread[d] = float((m @ m.T)[np.triu_indices(len(ids), 1)].mean())
    assert spread[1.0] < spread[0.0]


def test_empty_unknown_and_partly_unknown_seeds(rec):
    answer = playlist(rec, "recent", fork_request([]))
    assert answer["tracks"] == [] and "no seeds" in answer["warnings"][0]
    answer = playlist(rec, "recent", fork_request([{"track_id": "nope-1", "weight": 1, "source": "recent"}]))
    assert answer["tracks"] == [] and "'nope-1'" in answer["warnings"][0] and "empty playlist" in answer["warnings"][0]
    answer = playlist(rec, "recent", fork_request([seed(rec.tracks[0]), {"track_id": "nope-2"}], limit=3))
    assert len(answer["tracks"]) == 3 and any("'nope-2'" in w for w in answer["warnings"])
    # Go's nil slices arrive as null: absent; unknown keys in a seed are ignored.
    body = fork_request([{**seed(rec.tracks[0]), "rating": 5}], limit=3, library_ids=None, negative_embeddings=None)
    assert len(playlist(rec, "recent", body)["tracks"]) == 3


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"limit": "10"}, "limit"), ({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"seeds": "x"}, "seeds"),
        ({"seeds": [{"track_id": "a", "weight": -1}]}, "seeds[0].weight"), ({"seeds": [{"track_id": 5}]}, "seeds[0].track_id"),
        ({"seeds": [{"track_id": "a", "played_at": "yesterday"}]}, "seeds[0].played_at"), ({"models": ["foo"]}, "models[0]"),
        ({"models": "muq"}, "models"), ({"merge_strategy": "best"}, "merge_strategy"), ({"library_ids": ["a"]}, "library_ids[0]"),
        ({"diversity": 2}, "diversity"), ({"negative_prompt_penalty": 0.1}, "negative_prompt_penalty"),
        ({"min_model_agreement": 0}, "min_model_agreement"), ({"dislike_strength": "x"}, "dislike_strength"),
        ({"negative_embeddings": {"muq": "x"}}, "negative_embeddings"), ({"user_id": 3}, "user_id"),
    ],
)  # fmt: skip
def test_bad_fields_are_400_naming_the_field(rec, patch, field):
    status, answer = post(f"{rec.url}/playlist/recent", {**fork_request([seed(rec.tracks[0])]), **patch})
    assert status == 400 and answer["code"] == "bad_request", answer
    assert field in answer["error"], answer


def test_bad_bodies_are_4xx(rec):
    status, answer = post(f"{rec.url}/playlist/recent", raw=b"[1, 2]")
    assert status == 400 and answer["code"] == "bad_request"
    status, answer = post(f"{rec.url}/playlist/recent", raw=b"{nope")
    assert status == 400 and "not JSON" in answer["error"]
    # An embedding of a width no model has: a warning, not an error.
    answer = playlist(rec, "text", fork_request([{"track_id": "_text_query_", "embedding": [0.1, 0.2, 0.3]}]))
    assert answer["tracks"] == [] and any("3 values" in w for w in answer["warnings"])


# ---------------------------------------------------------------- socket, /v1, CLI


def test_socket_op_and_v1_answer_like_the_fork_route(rec):
    t = rec.tracks
    args = {"seeds": [seed(t[20]), seed(t[33], "favorite", 0.5)], "models": ["muq", "latent"], "limit": 7, "diversity": 0.3}
    over_http = playlist(rec, "recent", {**fork_request(args["seeds"]), **args})
    over_socket = rec.ok("recommend", **args)
    status, over_v1 = post(f"{rec.url}/v1/recommend", args)
    assert status == 200
    assert over_socket == over_v1
    assert [x["track_id"] for x in over_socket["tracks"]] == [x["track_id"] for x in over_http["tracks"]]
    # The socket op is strict: an unknown argument is a bad_request.
    r = rec.call("recommend", seeds=[seed(t[20])], colour="blue")
    assert not r["ok"] and r["error"]["code"] == "bad_request" and "colour" in r["error"]["message"]


def _mix(rec, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedd", "mix", "--socket", str(rec.socket), *argv],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip


def test_cli_mix(rec, root):
    t = rec.tracks
    r = _mix(rec, "--track-id", t[8].track_id, "--track-id", t[9].track_id, "-m", "muq", "-m", "latent", "-n", "4",
             "--exclude", t[10].track_id, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = rec.ok("recommend", seeds=[{"track_id": t[8].track_id, "source": "track"}, {"track_id": t[9].track_id, "source": "track"}],
                  models=["muq", "latent"], limit=4, diversity=0.0, exclude_track_ids=[t[10].track_id])  # fmt: skip
    assert got == want

    r = _mix(rec, "--text", "calm piano", "--not", "loud drums", "-m", "mert", "-n", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("bridged through MuQ-MuLan" in line for line in lines if line.startswith("warning:"))
    ranked = [line for line in lines if line.lstrip()[:2] in ("1.", "2.", "3.")]
    assert len(ranked) == 3 and all("seed:text via muq (mert)" in line and "Artist " in line for line in ranked)

    from tests.batch_fixtures import write_audio

    audio = write_audio(root / "lib2" / "seed-file", 3)
    r = _mix(rec, "--file", str(audio), "-n", "3", "--json")
    assert r.returncode == 0, r.stderr
    emb = rec.ok("embed_file", path=str(audio), models=["muq"])["models"]["muq"]["vector"]
    want = rec.ok("recommend", seeds=[{"embeddings": {"muq": emb}, "source": "file"}], models=["muq"], limit=3, diversity=0.0)
    assert json.loads(r.stdout) == want and all(x["reason"] == "seed:file" for x in want["tracks"])

    r = _mix(rec, "-n", "3")
    assert r.returncode != 0 and "--track-id" in r.stderr


# ---------------------------------------------------------------- the pure ranking


vec = st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=4, max_size=4).filter(lambda v: any(abs(x) > 1e-3 for x in v))


@settings(max_examples=60, deadline=None)
@given(st.lists(vec, min_size=3, max_size=12, unique_by=tuple), st.lists(st.tuples(vec, st.floats(0, 2)), min_size=1, max_size=4))
def test_model_scores_is_brute_force_best_over_seeds(tracks, seeds):
    stored = {f"t{i}": np.asarray(v, dtype=np.float32) for i, v in enumerate(tracks)}
    matrix = np.stack(list(stored.values()))
    sv = [SeedVector(np.asarray(v, dtype=np.float32), w, f"s{j}") for j, (v, w) in enumerate(seeds)]
    hits = [[(tid, float(c)) for tid, c in zip(stored, cos(matrix, s.vector))] for s in sv]
    got = model_scores(sv, hits)
    for i, tid in enumerate(stored):
        best = max(float(cos(matrix[i : i + 1], s.vector)[0]) * s.weight for s in sv)
        if best > 0:
            assert got[tid][0] == pytest.approx(best, abs=1e-9)
        else:
            assert tid not in got


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(MODELS), st.dictionaries(st.sampled_from("abcdefgh"), st.floats(0.01, 1), max_size=8), min_size=1),
       st.integers(1, 3), st.none() | st.integers(1, 10))  # fmt: skip
def test_merge_matches_reference(per, agreement, top):
    per_model = {m: {t: (s, f"r-{m}") for t, s in d.items()} for m, d in per.items()}
    for strategy in ("union", "intersection", "priority"):
        got = merge(per_model, strategy, min_agreement=agreement, top=top)
        want = bf_merge(per_model, strategy, agreement)[:top]
        assert [(c.track_id, pytest.approx(c.score)) for c in got] == [(t, s) for t, s in want]
        assert len({c.track_id for c in got}) == len(got)


@settings(max_examples=40, deadline=None)
@given(st.lists(vec, min_size=2, max_size=10), st.floats(0, 1), st.integers(1, 10))
def test_diversify(vectors, diversity, limit):
    ranked = [Candidate(f"t{i}", 1.0 - i / 20, "r", ["m"]) for i in range(len(vectors))]
    stored = {"m": {f"t{i}": np.asarray(v, dtype=np.float32) for i, v in enumerate(vectors)}}
    got = diversify(ranked, stored, diversity, limit)
    assert len(got) == min(limit, len(ranked)) and len({c.track_id for c in got}) == len(got)
    assert got[0].track_id == "t0"  # the best always comes first
    if diversity == 0:
        assert got == ranked[:limit]


def test_bridge_seeds_weights():
    vs = {"a": np.ones(2, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}
    seeds = bridge_seeds([("a", 0.5), ("b", 0.25), ("c", 0.4), ("d", -0.1)], vs, 2.0, "r")
    assert [s.weight for s in seeds] == [2.0, 1.0]

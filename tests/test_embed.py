"""embed_file, embed_text and search through the socket of a real daemon, on the tiny models.

The daemon loads the tiny real-architecture models through the same loaders as
the real weights, decodes generated audio of every format, and stores into
Milvus Lite (the real-server variant lives in test_milvus_server.py).
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from tests.audio_fixtures import make_broken_fixtures, make_distinct_tracks, make_format_fixtures, make_long_wav
from tests.conftest import model_args
from tests.daemon import Daemon, frame, read_frame, short_tmpdir

ALL = ["muq", "mert", "latent"]


@pytest.fixture(scope="module")
def library_dir():
    root = short_tmpdir("edm-")
    music = root / "music"
    formats = make_format_fixtures(music / "formats")
    broken = make_broken_fixtures(music / "broken")
    long = make_long_wav(music / "long.wav", duration_s=4.0)
    distinct = make_distinct_tracks(music / "distinct", 6)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(formats["wav_s16"].path.read_bytes() if "wav_s16" in formats else b"")
    os.symlink(outside / "secret.wav", music / "link-out.wav")
    yield {"root": root, "music": music, "formats": formats, "broken": broken, "long": long, "outside": outside,
           "distinct": distinct}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def model_daemon(tiny_models, library_dir):
    d = Daemon(
        library_dir["root"] / "d",
        args=[*model_args(tiny_models), "--music-root", str(library_dir["music"]), "--max-audio-s", "3",
              "--idle-unload-s", "600"],
        env={"HF_HUB_OFFLINE": "1"},
    )
    (library_dir["root"] / "d").mkdir(exist_ok=True)
    d.start()
    yield d
    d.stop()


def ok(response: dict) -> dict:
    assert response["ok"] is True, response
    return response["result"]


def err(response: dict) -> dict:
    assert response["ok"] is False, response
    return response["error"]


def vec(value) -> np.ndarray:
    return np.frombuffer(value, dtype="<f4") if isinstance(value, bytes) else np.asarray(value, np.float32)


def test_every_format_with_every_model(model_daemon, library_dir):
    dims = {name: m["dim"] for name, m in ok(model_daemon.call("status"))["models"].items()}
    for name, fixture in library_dir["formats"].items():
        r = ok(model_daemon.call("embed_file", path=str(fixture.path), models=ALL))
        assert abs(r["duration_s"] - fixture.duration_s) < 0.1, name
        assert set(r["models"]) == set(ALL)
        for model, m in r["models"].items():
            v = vec(m["vector"])
            assert m["dim"] == len(v) == dims[model], (name, model)
            assert m["windows"] >= 1
            assert np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-4, (name, model)
    status = ok(model_daemon.call("status"))
    assert all(status["models"][m]["loaded"] for m in ALL)  # loaded lazily by the calls above


def test_dims_come_from_the_loaded_models(model_daemon):
    models = ok(model_daemon.call("status"))["models"]
    # the tiny models are not the real sizes: nothing may be the contract's hard-coded 1536/76800/576
    assert models["muq"]["dim"] % 3 == 0 and models["muq"]["dim"] != 1536
    assert models["mert"]["dim"] != 76800


@pytest.mark.parametrize(
    "name, code",
    [
        ("random.mp3", "decode_error"),
        ("text.flac", "decode_error"),
        ("empty.wav", "decode_error"),
        ("header_only.flac", "decode_error"),
        ("video_only.mp4", "decode_error"),
    ],
)
def test_broken_files_get_their_contract_error(model_daemon, library_dir, name, code):
    e = err(model_daemon.call("embed_file", path=str(library_dir["broken"][name]), models=["muq"]))
    assert e["code"] == code and name in e["message"]
    assert ok(model_daemon.call("ping"))["protocol"] == 1


def test_truncated_file_embeds_what_is_decodable(model_daemon, library_dir):
    r = ok(model_daemon.call("embed_file", path=str(library_dir["broken"]["truncated.flac"]), models=["latent"]))
    assert 0 < r["duration_s"] < 2.0


def test_path_errors(model_daemon, library_dir):
    music = library_dir["music"]
    e = err(model_daemon.call("embed_file", path=str(music / "nope.mp3")))
    assert e["code"] == "not_found" and "nope.mp3" in e["message"]
    e = err(model_daemon.call("embed_file", path=str(library_dir["outside"] / "secret.wav")))
    assert e["code"] == "forbidden"
    e = err(model_daemon.call("embed_file", path=str(music / "link-out.wav")))
    assert e["code"] == "forbidden", "a symlink inside the root that points out must be refused"
    e = err(model_daemon.call("embed_file", path="/etc/passwd"))
    assert e["code"] == "forbidden"
    e = err(model_daemon.call("embed_file", path=str(music / ".." / "outside" / "secret.wav")))
    assert e["code"] == "forbidden"


def test_too_long_audio(model_daemon, library_dir):
    e = err(model_daemon.call("embed_file", path=str(library_dir["long"]), models=["muq"]))
    assert e["code"] == "too_large" and "long.wav" in e["message"]


def test_uploaded_bytes(model_daemon, library_dir):
    fixture = next(iter(library_dir["formats"].values()))
    by_path = ok(model_daemon.call("embed_file", path=str(fixture.path), models=["muq"]))
    uploaded = ok(model_daemon.call("embed_file", data=fixture.path.read_bytes(), filename=fixture.path.name, models=["muq"]))
    np.testing.assert_allclose(vec(uploaded["models"]["muq"]["vector"]), vec(by_path["models"]["muq"]["vector"]), atol=1e-5)
    e = err(model_daemon.call("embed_file", data=b"\x00garbage" * 100, filename="x.mp3"))
    assert e["code"] == "decode_error" and "x.mp3" in e["message"]


def test_vector_formats_agree(model_daemon, library_dir):
    path = str(next(iter(library_dir["formats"].values())).path)
    as_bin = ok(model_daemon.call("embed_file", path=path, models=["latent"]))
    as_list = ok(model_daemon.call("embed_file", path=path, models=["latent"], vector_format="list"))
    assert isinstance(as_list["models"]["latent"]["vector"], list)
    np.testing.assert_allclose(vec(as_bin["models"]["latent"]["vector"]), vec(as_list["models"]["latent"]["vector"]), atol=1e-6)


def test_embed_text(model_daemon):
    models = ok(model_daemon.call("status"))["models"]
    r = ok(model_daemon.call("embed_text", text="calm piano with soft strings"))
    assert r["model"] == "muq" and r["dim"] == models["muq"]["dim"] == len(vec(r["vector"]))
    assert len(vec(r["raw"])) * 3 == r["dim"]
    assert abs(np.linalg.norm(vec(r["vector"])) - 1) < 1e-4
    for model in ("mert", "latent"):
        e = err(model_daemon.call("embed_text", text="x", model=model))
        assert e["code"] == "unsupported" and model in e["message"]


def test_store_then_search_finds_the_track_first(model_daemon, library_dir):
    fixtures = library_dir["distinct"]
    for i, path in enumerate(fixtures):
        ok(model_daemon.call("embed_file", path=str(path), models=ALL, store=True, track_id=f"t{i}",
                             name=f"Song {i}"))
    for model in ALL:
        for i in (0, 3, 5):
            hits = ok(model_daemon.call("search", model=model, track_id=f"t{i}", limit=5))["hits"]
            assert hits[0]["track_id"] == f"t{i}", (model, hits)
            assert hits[0]["score"] > 0.999
            assert hits[0]["title"] == f"Song {i}" and hits[0]["path"] == str(fixtures[i])
            scores = [h["score"] for h in hits]
            assert scores == sorted(scores, reverse=True)
        hits = ok(model_daemon.call("search", model=model, track_id="t0", exclude_track_ids=["t0", "t1"]))["hits"]
        assert {"t0", "t1"}.isdisjoint(h["track_id"] for h in hits) and len(hits) == 4
    # search by a vector from a fresh embedding of the same file
    r = ok(model_daemon.call("embed_file", path=str(fixtures[2]), models=["mert"]))
    hits = ok(model_daemon.call("search", model="mert", vector=r["models"]["mert"]["vector"], limit=3))["hits"]
    assert hits[0]["track_id"] == "t2"
    # by text: a ranked list of stored tracks
    hits = ok(model_daemon.call("search", model="muq", text="a sine tone", limit=3))["hits"]
    assert len(hits) == 3 and {h["track_id"] for h in hits} <= {f"t{i}" for i in range(6)}
    e = err(model_daemon.call("search", model="muq", track_id="never-stored"))
    assert e["code"] == "not_found" and "never-stored" in e["message"]
    e = err(model_daemon.call("search", model="latent", text="piano"))
    assert e["code"] == "unsupported"
    e = err(model_daemon.call("search", model="muq", vector=b"\x00\x00\x80\x3f" * 7))
    assert e["code"] == "bad_request" and "7" in e["message"]


def test_slow_request_does_not_hold_up_a_pipelined_fast_one(model_daemon, library_dir):
    path = str(library_dir["formats"][next(iter(library_dir["formats"]))].path)
    with model_daemon.connect(timeout=60) as s:
        s.sendall(frame({"id": "slow", "op": "embed_file", "path": path, "models": ALL}) + frame({"id": "fast", "op": "ping"}))
        order = [read_frame(s)["id"], read_frame(s)["id"]]
    assert order == ["fast", "slow"]


def test_unload_then_reload_on_next_use(model_daemon):
    ok(model_daemon.call("embed_text", text="load muq"))
    unloaded = ok(model_daemon.call("unload"))["unloaded"]
    assert "muq" in unloaded
    status = ok(model_daemon.call("status"))
    assert not any(m["loaded"] for m in status["models"].values())
    ok(model_daemon.call("embed_text", text="again"))
    assert ok(model_daemon.call("status"))["models"]["muq"]["loaded"]


def test_idle_timeout_unloads_through_the_daemon(tiny_models, sock_dir):
    with Daemon(sock_dir, args=[*model_args(tiny_models), "--idle-unload-s", "0.5", "--idle-check-s", "0.1"],
                env={"HF_HUB_OFFLINE": "1"}) as d:
        ok(d.call("embed_text", text="hello"))
        deadline = time.monotonic() + 10
        while ok(d.call("status"))["models"]["muq"]["loaded"]:
            assert time.monotonic() < deadline, "muq was never unloaded"
            time.sleep(0.1)
        ok(d.call("embed_text", text="hello again"))
        assert ok(d.call("status"))["models"]["muq"]["loaded"]


def test_model_that_cannot_load_is_unavailable_and_daemon_keeps_serving(sock_dir, tiny_models):
    with Daemon(sock_dir, args=[*model_args(tiny_models), "--muq-model", str(sock_dir / "no-such-model")],
                env={"HF_HUB_OFFLINE": "1"}) as d:
        e = err(d.call("embed_text", text="x"))
        assert e["code"] == "unavailable" and "muq" in e["message"] and "no-such-model" in e["message"]
        assert ok(d.call("ping"))


def test_sigterm_during_a_long_embed_exits_cleanly(tiny_models, sock_dir):
    """The model is mid-forward: shutdown stops it between batches, answers the request cancelled and exits 0."""
    music = sock_dir / "music"
    music.mkdir()
    long = make_long_wav(music / "twenty-minutes.wav", duration_s=1200.0)
    # a grace of 1 s for requests in flight at SIGTERM: this one cannot finish in it
    d = Daemon(sock_dir, args=[*model_args(tiny_models), "--music-root", str(music), "--shutdown-timeout-s", "1"],
               env={"HF_HUB_OFFLINE": "1"})
    d.start()
    with d.connect(timeout=60) as s:
        s.sendall(frame({"id": 1, "op": "embed_file", "path": str(long), "models": ["latent"]}))
        # Decoded, and into the forward passes: the daemon's own status says the model is running.
        deadline = time.monotonic() + 120
        while ok(d.call("status"))["models"]["latent"]["state"] != "running":
            assert time.monotonic() < deadline, "the embed never reached the model"
            time.sleep(0.05)
        d.proc.send_signal(15)
        answer = read_frame(s)
    assert d.proc.wait(60) == 0
    assert answer["id"] == 1 and answer["ok"] is False and answer["error"]["code"] == "cancelled"
    assert not d.socket.exists()
    d.stop()

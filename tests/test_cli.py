"""The `embedd` command line and the socat debug script, against a real daemon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.audio_fixtures import make_distinct_tracks
from tests.conftest import model_args
from tests.daemon import Daemon, short_tmpdir

REPO = Path(__file__).resolve().parent.parent
EMBEDD = [sys.executable, "-m", "embedd"]


@pytest.fixture(scope="module")
def cli_daemon(tiny_models):
    root = short_tmpdir("edc-")
    music = root / "music"
    tracks = make_distinct_tracks(music, 3)
    d = Daemon(root, args=[*model_args(tiny_models), "--music-root", str(music)], env={"HF_HUB_OFFLINE": "1"})
    d.start()
    d.tracks = tracks
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def run(daemon: Daemon | None, *args: str, socket: str | None = None) -> subprocess.CompletedProcess:
    sock = socket or str(daemon.socket)
    return subprocess.run([*EMBEDD, *args, "--socket", sock], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_ping_and_status(cli_daemon):
    r = run(cli_daemon, "ping")
    assert r.returncode == 0 and r.stdout.startswith("pong: embedd ") and "protocol 1" in r.stdout
    r = run(cli_daemon, "status")
    assert r.returncode == 0
    assert "on cpu" in r.stdout and "muq" in r.stdout and "-> mert_embedding" in r.stdout
    r = run(cli_daemon, "status", "--json")
    status = json.loads(r.stdout)
    assert status["device"] == "cpu" and set(status["models"]) == {"muq", "mert", "latent"}


def test_embed_store_and_search_table(cli_daemon):
    for i, track in enumerate(cli_daemon.tracks):
        r = run(cli_daemon, "embed", str(track), "-m", "muq", "-m", "latent", "--store", "--track-id", f"cli-{i}")
        assert r.returncode == 0, r.stderr
        assert "muq" in r.stdout and "latent" in r.stdout and "windows" in r.stdout
    r = run(cli_daemon, "search", "--track-id", "cli-1", "-n", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("  1. 1.0000") and "[cli-1]" in lines[0]
    r = run(cli_daemon, "search", "a noisy chord", "--json")
    hits = json.loads(r.stdout)["hits"]
    assert {h["track_id"] for h in hits} == {"cli-0", "cli-1", "cli-2"}


def test_text_json_gives_the_vector_as_floats(cli_daemon):
    r = run(cli_daemon, "text", "dreamy synth pop", "--json")
    result = json.loads(r.stdout)
    assert result["model"] == "muq" and len(result["vector"]) == result["dim"]
    assert all(isinstance(x, float) for x in result["vector"][:5])


def test_daemon_errors_exit_one_with_the_message(cli_daemon):
    r = run(cli_daemon, "text", "x", "-m", "mert")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("embedd: unsupported: ") and "mert" in r.stderr
    r = run(cli_daemon, "embed", "/etc/hostname")
    assert r.returncode == 1 and "forbidden" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_daemon_exit_three(tmp_path):
    r = run(None, "ping", socket=str(tmp_path / "nobody.sock"))
    assert r.returncode == 3
    assert "no embedd socket" in r.stderr and "Traceback" not in r.stderr


def test_unload(cli_daemon):
    run(cli_daemon, "text", "load muq")
    r = run(cli_daemon, "unload", "muq")
    assert r.returncode == 0 and r.stdout.strip() == "unloaded: muq"
    r = run(cli_daemon, "unload")
    assert r.returncode == 0 and r.stdout.startswith("unloaded: ")


def test_frame_helper_round_trip():
    encoded = subprocess.run([*EMBEDD[:2], "embedd.frame", "encode", '{"op":"ping","id":3}'],
                             capture_output=True, timeout=60, cwd=REPO).stdout
    assert encoded[:4] == len(encoded[4:]).to_bytes(4, "big")
    decoded = subprocess.run([*EMBEDD[:2], "embedd.frame", "decode"], input=encoded,
                             capture_output=True, timeout=60, cwd=REPO)
    assert json.loads(decoded.stdout) == {"op": "ping", "id": 3}


def test_socat_debug_script(cli_daemon):
    assert shutil.which("socat"), "socat is missing: scripts/bootstrap --test installs it"
    env = {**os.environ, "EMBEDD_PYTHON": sys.executable}
    r = subprocess.run(
        [str(REPO / "scripts" / "embedd-debug"), "-s", str(cli_daemon.socket),
         '{"op":"ping","id":1}', '{"op":"embed_text","text":"guitar","id":2}', '{"op":"nope","id":3}'],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 0, r.stderr
    answers = {m["id"]: m for m in map(json.loads, r.stdout.strip().splitlines())}
    assert answers[1]["result"]["protocol"] == 1
    assert answers[2]["ok"] and answers[2]["result"]["vector"].startswith("<bin ")  # vectors shortened
    assert answers[3]["error"]["code"] == "unknown_op"
    # uploaded bytes through {"$file": ...}
    track = str(cli_daemon.tracks[0])
    request = json.dumps({"op": "embed_file", "data": {"$file": track}, "filename": "t.flac", "models": ["latent"]})
    r = subprocess.run([str(REPO / "scripts" / "embedd-debug"), "-s", str(cli_daemon.socket), request],
                       capture_output=True, text=True, timeout=120, env=env)
    answer = json.loads(r.stdout)
    assert answer["ok"] and "float32" in answer["result"]["models"]["latent"]["vector"]


def test_a_model_that_cannot_be_loaded_names_its_setting_and_shows_under_status(sock_dir):
    d = Daemon(sock_dir, args=["--muq-model", str(sock_dir / "no-such-weights")])
    d.start()
    try:
        r = run(d, "text", "calm piano")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        message = r.stderr.strip()
        assert message.startswith(f"embedd: unavailable: model 'muq' could not be loaded from '{sock_dir / 'no-such-weights'}'")
        assert "point EMBEDD_MUQ_MODEL (--muq-model) at " in message and "docs/operations.md §3 Model weights" in message
        lines = run(d, "status").stdout.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("  muq "))
        assert lines[at + 1].strip().startswith("error: model 'muq' could not be loaded from "), lines
        assert "EMBEDD_MUQ_MODEL" in lines[at + 1]
    finally:
        d.stop()


def test_socat_debug_script_refuses_what_it_cannot_send_in_one_line(tmp_path):
    """Bad JSON, a $file that is not there, a frame over the limit: one line each, nothing sent, no traceback."""
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 4096)
    env = {**os.environ, "EMBEDD_PYTHON": sys.executable, "EMBEDD_MAX_FRAME": "2048"}
    cases = {
        '{"op": "ping",}': "embedd.frame: request 1 is not valid JSON: ",
        json.dumps({"op": "embed_file", "data": {"$file": str(tmp_path / "gone.mp3")}}):
            f'embedd.frame: cannot read the file of {{"$file": "{tmp_path / "gone.mp3"}"}}: No such file or directory',
        json.dumps({"op": "embed_file", "data": {"$file": str(big)}, "filename": "big.flac"}):
            "embedd.frame: request 1 is 4",  # ... bytes, over the daemon's frame limit of 2048 bytes
    }  # fmt: skip
    for request, expected in cases.items():
        # the socket does not exist: a request that got as far as socat would say so too
        r = subprocess.run([str(REPO / "scripts" / "embedd-debug"), "-s", str(tmp_path / "none.sock"), request],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2 and r.stdout == "", r
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(expected), r.stderr
    assert "over the daemon's frame limit of 2048 bytes (max_frame, EMBEDD_MAX_FRAME)" in r.stderr


def test_status_prints_the_library_watchers_pending_work_and_why_it_waits():
    from embedd import cli

    soon = time.time() + 120
    line = cli._watch_line({"enabled": True, "pending": {"added": 3, "changed": 1, "removed": 0},
                            "next_job_at": soon, "waiting": "quiet_period", "scan_in_progress": False})
    assert line.startswith("3 added, 1 changed; next automatic job in 1")
    assert line.endswith("(waiting: quiet period)")
    assert cli._watch_line({"enabled": True, "pending": {}, "waiting": None}) == "current"
    assert cli._watch_line({"enabled": False}) == "not watched (watch = false)"

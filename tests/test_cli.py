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
    from embedd.cli.status import watch_line

    soon = time.time() + 120
    line = watch_line({"enabled": True, "pending": {"added": 3, "changed": 1, "removed": 0},
                        "next_job_at": soon, "waiting": "quiet_period", "scan_in_progress": False})
    assert line.startswith("3 added, 1 changed; next automatic job in 1")
    assert line.endswith("(waiting: quiet period)")
    assert watch_line({"enabled": True, "pending": {}, "waiting": None}) == "current"
    assert watch_line({"enabled": False}) == "not watched (watch = false)"


def _ray_view(**over) -> dict:
    """A hand-made ``cluster`` key of ``batch_progress`` (RayCluster.view with two workers' views)."""
    def worker(name, state, host, device, done, failed, rate, **more):
        return {"name": name, "state": state, "host": host, "device": device, "pid": 4242, "allocator": "",
                "models": ["muq"], "in_flight": 0, "tracks_done": done, "tracks_failed": failed, "tracks_per_hour": rate,
                "restarts": 0, "last_error": None, **more}

    return {"address": "ray://nas:10001", "state": "up", "error": None, "down_since": None, "fallback": "wait",
            "workers": [worker("cpu-0", "ready", "vm", "cpu", 12, 0, 340.5, allocator="tcmalloc"),
                        worker("gpu-0", "starting", "desk", "cuda", 0, 1, None, restarts=1, in_flight=2,
                               last_error="RayActorError: the actor died unexpectedly")],
            **over}  # fmt: skip


def test_the_ray_cluster_and_its_workers_print_under_the_jobs_progress(capsys):
    from embedd.cli.batch import print_progress
    from embedd.cli.render import cluster_lines, render_progress
    from embedd.cli.status import print_status

    assert cluster_lines(_ray_view()) == [
        "ray: ray://nas:10001 up",
        "  cpu-0  ready     vm (cpu, tcmalloc)  12 done, 0 failed, 340.5 tracks/h",
        "  gpu-0  starting  desk (cuda)  0 done, 1 failed, ? tracks/h, 2 in flight, 1 restart",
        "         last error: RayActorError: the actor died unexpectedly",
    ]
    down = _ray_view(state="down", error="ConnectionError: GCS unreachable", down_since=time.time() - 75, workers=[])
    assert cluster_lines(down) == ["ray: ray://nas:10001 down: ConnectionError: GCS unreachable (for 1m15s; the job waits for it)"]
    assert cluster_lines(_ray_view(state="closed", workers=[])) == ["ray: ray://nas:10001 closed"]

    progress = {"job_id": "j1", "status": "running", "total_tracks": 10, "processed_tracks": 4, "failed_tracks": 1,
                "skipped_tracks": 0, "progress_percent": 40.0, "rate_tracks_per_s": 0.1, "estimated_completion": None,
                "current_track": "Kestrel - Hollow Oak", "cluster": _ray_view()}
    print_progress(progress)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == render_progress(progress) and lines[1:] == cluster_lines(_ray_view())
    # batch watch redraws one line: the cluster in a few words, before the track
    assert render_progress(progress, cluster=True).endswith(" running | ray up, 1/2 workers ready | Kestrel - Hollow Oak")
    # models in the daemon (cluster None): nothing more than before
    print_progress({**progress, "cluster": None})
    assert capsys.readouterr().out.splitlines() == [render_progress(progress)]
    assert render_progress({**progress, "cluster": None}, cluster=True) == render_progress(progress)

    status = {"version": "0", "device": "cpu", "milvus": {"uri": "m.db", "ok": True}, "queue": {"interactive": 0, "batch": 0},
              "models": {}, "batch": {**progress, "job_id": None, "status": "idle", "cluster": down}}
    print_status(status)
    out = capsys.readouterr().out.splitlines()
    at = out.index("batch: no job has run")
    assert out[at + 1] == cluster_lines(down)[0]

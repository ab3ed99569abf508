"""What a newcomer hits on a first run, against a real daemon with the tiny real-architecture models.

One library job drives most of it: digital silence and a file that is not audio
come first (track ids sort first), a few hundred cheap rows follow so that the
job is still running while the test looks at it. Checkpoints are off for the
job's length, so everything the test sees while it runs is buffered, not yet
written to the job's state.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import embedd.batch.progress as progress_module
from embedd.batch.progress import Progress
from embedd.cli import render_progress
from tests.audio_fixtures import encode
from tests.batch_fixtures import BatchDaemon, Library
from tests.daemon import REPO, short_tmpdir

SILENT_ID = "0" * 31 + "1"
NOT_AUDIO_ID = "0" * 31 + "2"
#: Rows of two files: about 100 s of job with the tiny models, against the test's seconds before its
#: Ctrl-C, so that the job is still running when the Ctrl-C comes. The job is cancelled.
FILLER_ROWS = 600
FILLER_S = 3.0


@pytest.fixture(scope="module")
def job_daemon(tiny_models):
    root = short_tmpdir("efu-")
    lib = Library(root / "lib")
    silent = lib.music / "silent.flac"
    silent.write_bytes(encode(np.zeros((2, 44_100 * 2), np.float32), 44_100, container_format="flac", codec="flac"))
    not_audio = lib.music / "notes.flac"
    not_audio.write_text("liner notes, not audio\n")
    lib._insert([
        lib._row("silent.flac", silent, track_id=SILENT_ID),
        lib._row("notes.flac", not_audio, track_id=NOT_AUDIO_ID),
    ])  # fmt: skip
    lib.add_good(FILLER_ROWS, rows_per_file=FILLER_ROWS // 2, duration_s=FILLER_S)
    d = BatchDaemon(root / "d", lib, tiny_models, extra=["--checkpoint-every", "100000", "--allowed-roots", str(lib.music)])
    d.start()
    d.silent = silent
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _norm(result: dict, model: str) -> float:
    return float(np.linalg.norm(np.frombuffer(result["models"][model]["vector"], dtype="<f4")))


def test_silence_gives_every_model_a_unit_vector_or_no_vector(job_daemon):
    """Digital silence through the tiny MERT is all zero: refused as that model's error, never a zero vector."""
    d = job_daemon
    r = d.call("embed_file", path=str(d.silent), models=["muq", "latent"])
    assert r["ok"], r
    assert abs(_norm(r["result"], "muq") - 1) < 1e-5 and abs(_norm(r["result"], "latent") - 1) < 1e-5
    r = d.call("embed_file", path=str(d.silent), models=["mert"])
    assert not r["ok"] and r["error"]["code"] == "unsupported", r
    assert r["error"]["message"].startswith("model 'mert' gives this audio an all-zero embedding")


def _ctrl_c_as_at_a_terminal() -> None:
    """A command at a terminal gets Ctrl-C; one started by a shell script's ``&`` inherits SIGINT ignored.

    The suite may itself run in the background (``scripts/test ... &``): without this, the CLI
    under test would ignore the test's Ctrl-C as it should, and follow the job to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_library_job_followed_interrupted_listed_and_cancelled(job_daemon):
    d = job_daemon
    follow = subprocess.Popen(
        [sys.executable, "-m", "embedd", "batch", "start", "--follow", "--socket", str(d.socket)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=_ctrl_c_as_at_a_terminal,
    )  # fmt: skip
    try:
        started = follow.stdout.readline()
        assert started.startswith("started job "), started + follow.stderr.read()
        job_id = started.split()[2]
        first = follow.stdout.readline()
        # the first update of a job that has done nothing yet has no rate (not thousands of tracks/s)
        assert " ? tracks/s ETA ? running" in first, first

        # failures are listed while the job runs, before any checkpoint wrote them
        running = d.wait_for(lambda p: p["failed_tracks"] >= 2)
        assert running["status"] == "running", running
        failures = d.ok("batch_failures")
        assert d.progress()["status"] == "running"  # still running after the listing: nothing was checkpointed
        pairs = {(f["track_id"], f["model"]): f for f in failures["failures"]}
        assert failures["tracks"] == 2 and failures["total"] == len(pairs) == 4, failures
        assert {m for t, m in pairs if t == NOT_AUDIO_ID} == {"muq", "mert", "latent"}
        assert {m for t, m in pairs if t == SILENT_ID} == {"mert"}  # its muq and latent vectors are fine
        assert pairs[(SILENT_ID, "mert")]["code"] == "unsupported"
        r = subprocess.run(
            [sys.executable, "-m", "embedd", "batch", "failures", "--socket", str(d.socket)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        assert r.stdout.splitlines()[0] == "2 failed tracks, 4 failures (one per track and model)", r.stdout

        # Ctrl-C stops the following, not the job, and says how to get back to it
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=120)  # a bound on a hang only
        assert follow.returncode == 130, (out, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"batch job {job_id} goes on in the daemon" in err
        assert "'embedd batch watch'" in err and "'embedd batch cancel'" in err
        before = d.progress()
        assert before["status"] == "running" and before["job_id"] == job_id

        # a cancel shows the counts so far, not the last checkpoint's (none: 0)
        assert d.ok("batch_cancel")["status"] == "cancelling"
        cancelling = d.progress()
        settled = ("processed_tracks", "failed_tracks", "skipped_tracks")
        assert sum(cancelling[k] for k in settled) >= sum(before[k] for k in settled) >= 2, (before, cancelling)
        assert " tracks/s" not in render_progress(cancelling)
        final = d.wait_final()
        assert final["status"] == "cancelled"
        assert sum(final[k] for k in settled) >= sum(cancelling[k] for k in settled)
        assert d.ok("batch_failures")["total"] == 4  # now from the job's state
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def test_the_rate_of_a_burst_is_measured_from_the_start_of_the_run(monkeypatch):
    """Tracks finish in bursts (one pass covers several): two at one instant are no rate of thousands a second."""
    now = [100.0]
    monkeypatch.setattr(progress_module, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    progress = Progress()
    assert progress.rate() is None  # nothing done yet: no rate
    now[0] = 110.0
    progress.worked(4)
    progress.worked(4)  # the same instant
    assert progress.rate() == pytest.approx(0.8)  # 8 tracks in the 10 s since the run began
    now[0] = 200.0  # paused for a while, then resumed
    progress.reset_rate()
    assert progress.rate() is None
    now[0] = 205.0
    progress.worked(1)
    assert progress.rate() == pytest.approx(0.2)


def test_progress_lines_show_a_rate_only_while_running():
    base = {"job_id": "j", "total_tracks": 25, "processed_tracks": 5, "failed_tracks": 0, "skipped_tracks": 0,
            "progress_percent": 20.0, "estimated_completion": None}  # fmt: skip
    assert "? tracks/s ETA ? running" in render_progress({**base, "status": "running", "rate_tracks_per_s": None})
    assert "0.50 tracks/s ETA " in render_progress({**base, "status": "running", "rate_tracks_per_s": 0.5})
    for status in ("cancelling", "cancelled", "paused", "completed"):
        assert render_progress({**base, "status": status, "rate_tracks_per_s": None}).endswith(f"skipped 0 {status}")


def test_start_and_stop_leave_no_noise_in_the_log(job_daemon, tiny_models):
    """Loading MuQ-MuLan, MERT and Music2Latent and stopping the daemon log only embedd's own lines.

    Last in the module: it stops the module's daemon.
    """
    d = job_daemon
    assert d.call("embed_text", text="a quiet song", model="muq")["ok"]
    d.call("embed_file", path=str(d.silent), models=["mert", "latent"])  # loads both (mert's answer is an error)
    status = d.ok("status")["models"]
    assert all(status[m]["loaded"] for m in ("muq", "mert", "latent")), status
    d.stop()
    log = d.log_path.read_text(errors="replace")
    for noise in ("Loading weights from local directory", "trust_remote_code"):
        assert noise not in log, f"{noise!r} in the daemon log:\n{log[-3000:]}"
    # No semaphore leaks. The resource tracker can still name one it was told about late,
    # when a worker's unlink reached it after the daemon exited: it then finds the name gone
    # (ENOENT), so nothing leaked. Only a semaphore it really had to remove is a leak.
    import re

    claimed = sum(int(n) for n in re.findall(r"There appear to be (\d+) leaked semaphore", log))
    already_gone = len(re.findall(r"resource_tracker: '/mp-[^']+': \[Errno 2\] No such file or directory", log))
    assert claimed == already_gone, f"{claimed - already_gone} semaphore(s) leaked:\n{log[-3000:]}"


def test_a_stalled_job_says_every_reason_and_each_source_clears_only_its_own():
    """Milvus and the Ray cluster each stall a job on their own: Milvus coming back must not hide that
    the job still waits for the cluster (and its log must not say the job goes on)."""
    progress = Progress()
    progress.wait("ray", "waiting for the Ray cluster at 10.0.0.2:6379")
    progress.wait("milvus", "waiting for Milvus (3 s)")
    assert progress.waiting == "waiting for the Ray cluster at 10.0.0.2:6379; waiting for Milvus (3 s)"
    progress.wait("milvus", None)
    assert progress.waiting == "waiting for the Ray cluster at 10.0.0.2:6379"
    assert progress.waiting_for("ray") and not progress.waiting_for("milvus")
    progress.wait("ray", None)
    assert progress.waiting is None

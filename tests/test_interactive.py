"""Users first: a person is served during a library job, and a cancel frees the models within one pass.

The real daemon, through its socket, runs a three-model job with the stock-size
Music2Latent (233 MB, random weights: its forward passes take seconds on a CPU,
as on a real host) while a person searches by text. Every claim is read from
the executor's own order of events (``status.executor``: one sequence number
for every job and forward pass), never from wall-clock durations, so the test
holds on a loaded machine and fails only when the behaviour breaks.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.batch_fixtures import BatchDaemon, Library
from tests.daemon import short_tmpdir


def _status(d: BatchDaemon) -> dict:
    return d.ok("status")


def _until(d: BatchDaemon, predicate, what: str, timeout: float = 600.0) -> dict:
    """Poll ``status`` until ``predicate(status)``: the daemon's state, not a duration, is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        st = _status(d)
        if predicate(st):
            return st
        assert time.monotonic() < deadline, f"never saw {what}; last executor view {st['executor']}\n{d.log()}"
        time.sleep(0.05)


def _latent_pass_in_flight(st: dict) -> bool:
    running = (st["executor"]["lanes"]["batch"]["pass"] or {}).get("model") == "latent"
    return running and st["models"]["latent"]["state"] == "running"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_person_is_served_during_a_three_model_job_and_a_cancel_frees_the_models(real_models) -> None:
    root = short_tmpdir()
    try:
        lib = Library(root / "lib")
        lib.add_good(6, duration_s=20.0)
        models = {**real_models, "mert": real_models["tiny_mert"]}  # tiny MuQ and MERT, real-size latent
        d = BatchDaemon(
            root / "d", lib, models,
            extra=["--idle-unload-s", "1", "--idle-check-s", "0.1", "--pass-budget-s", "1"],
        )  # fmt: skip
        d.start()
        try:
            d.ok("batch_start", models=["muq", "mert", "latent"])

            # -- a person's text search while a batch pass of the real-size model is in flight
            overlapped = 0
            for attempt in range(20):  # until a request has arrived mid-pass (the pass may end first)
                st = _until(d, _latent_pass_in_flight, "a latent batch pass in flight")
                assert st["models"]["latent"]["running"] == ["batch"] and st["models"]["latent"]["pinned"]
                assert st["models"]["muq"]["pinned"] and st["models"]["mert"]["pinned"]
                r = d.call("search", model="muq", text=f"calm piano at night {attempt}", limit=3)
                assert r["ok"], r
                recent = _status(d)["executor"]["recent"]
                [text] = [j for j in recent["jobs"] if j["kind"] == "text" and j["lane"] == "interactive"][-1:]
                queued, done = text["queued_seq"], text["done_seq"]
                batch = [p for p in recent["passes"] if p["lane"] == "batch"]
                # answered before the batch started another pass, always ...
                assert all(p["started_seq"] > done for p in batch if p["started_seq"] > queued), recent
                # ... and it did arrive while a batch pass was running
                overlapped += any(
                    p["started_seq"] < queued and (p["ended_seq"] is None or p["ended_seq"] > queued) for p in batch
                )
                if overlapped:
                    break
            assert overlapped, "no text search arrived during a batch pass in 20 tries"

            # -- a model the job uses is never unloaded while it runs (idle timeout 1 s)
            log_before_cancel = d.log_path.read_text(errors="replace")
            assert "unloaded model" not in log_before_cancel, log_before_cancel[-3000:]

            # -- cancel: the batch lane is free within one pass
            _until(d, _latent_pass_in_flight, "a latent batch pass in flight")
            d.ok("batch_cancel")
            cancelled_at = _status(d)["executor"]["seq"]
            d.wait_final(600)
            st = _until(d, lambda s: s["executor"]["lanes"]["batch"]["pass"] is None, "the batch lane idle")
            batch = [p for p in st["executor"]["recent"]["passes"] if p["lane"] == "batch"]
            assert not [p for p in batch if p["started_seq"] > cancelled_at], batch  # no pass after the cancel
            assert len([p for p in batch if (p["ended_seq"] or 0) > cancelled_at]) <= 1, batch  # the one in flight
            assert st["executor"]["lanes"]["batch"]["depth"] == 0

            # -- the next job starts at once and runs to the end
            job = d.ok("batch_start", models=["muq"])["job_id"]
            p = d.wait_final(600)
            assert p["job_id"] == job and p["status"] == "completed", p
        finally:
            d.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

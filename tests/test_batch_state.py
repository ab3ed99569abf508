"""The batch job's state file: lifecycle, counters, resume after SIGKILL, failures."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.batch.checkpoint import Checkpointer
from embedd.batch.job import Failure, FailurePage, JobStatus, Outcome
from embedd.batch.state import JobStore
from embedd.errors import Code, EmbeddError

pytestmark = pytest.mark.timeout(60)
MODELS = ("muq", "mert", "latent")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "data" / "state.db")
    yield s
    s.close()


def test_new_file_is_idle_and_wal(tmp_path):
    path = tmp_path / "deep" / "dir" / "state.db"
    with JobStore(path) as s:
        assert s.latest_job() is None and s.resumable_job() is None
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_create_job_and_busy(store):
    job = store.create_job(models=MODELS, clear_existing=True, shard="1/3", total_tracks=42, rebuild={"muq": {"new": "embedding_v2"}})
    assert job.status is JobStatus.RUNNING and job.active and not job.final
    assert (job.models, job.clear_existing, job.shard, job.total_tracks) == (MODELS, True, "1/3", 42)
    assert job.rebuild == {"muq": {"new": "embedding_v2"}}
    assert job.started_at is not None and job.finished_at is None
    with pytest.raises(EmbeddError) as e:
        store.create_job(models=["muq"])
    assert e.value.code is Code.BUSY and job.job_id in e.value.message
    store.set_status(job.job_id, "paused")
    with pytest.raises(EmbeddError) as e:
        store.create_job(models=["muq"])  # paused is still a job
    assert e.value.code is Code.BUSY
    store.set_status(job.job_id, JobStatus.CANCELLED)
    second = store.create_job(models=["muq"])
    assert store.latest_job() == second and second.job_id != job.job_id
    with pytest.raises(EmbeddError) as e:
        store.create_job(models=[])
    assert e.value.code is Code.BAD_REQUEST


def test_status_machine(store):
    job = store.create_job(models=["muq"])
    assert store.set_status(job.job_id, "running") == store.get_job(job.job_id)  # same status: no-op
    assert store.set_status(job.job_id, "paused").status is JobStatus.PAUSED
    assert store.set_status(job.job_id, "running").status is JobStatus.RUNNING
    assert store.set_status(job.job_id, "cancelling").status is JobStatus.CANCELLING
    with pytest.raises(EmbeddError) as e:
        store.set_status(job.job_id, "paused")
    assert e.value.code is Code.NOT_FOUND and "cancelling" in e.value.message
    done = store.set_status(job.job_id, "cancelled")
    assert done.final and done.finished_at is not None and store.resumable_job() is None
    for status in JobStatus:
        if status not in (JobStatus.CANCELLED, JobStatus.IDLE):
            with pytest.raises(EmbeddError) as e:
                store.set_status(job.job_id, status)
            assert e.value.code is Code.NOT_FOUND
    with pytest.raises(EmbeddError) as e:
        store.set_status(job.job_id, "idle")
    assert e.value.code is Code.INTERNAL
    with pytest.raises(EmbeddError) as e:
        store.set_status("nope", "paused")
    assert e.value.code is Code.NOT_FOUND and "'nope'" in e.value.message
    failed = store.create_job(models=["muq"])
    assert store.set_status(failed.job_id, "failed", error="Milvus unreachable for 600 s").error == "Milvus unreachable for 600 s"


def test_checkpoint_counts_each_track_once(store):
    job = store.create_job(models=["muq", "mert"], total_tracks=4)
    fail = Failure("t3", "mert", "decode_error", "t3.flac could not be decoded.", "/m/t3.flac")
    j = store.checkpoint(
        job.job_id,
        done=[("t1", "muq"), ("t1", "mert"), ("t3", "muq")],
        failures=[fail],
        finished=[("t1", Outcome.PROCESSED), ("t3", "failed"), ("t4", Outcome.SKIPPED)],
    )
    assert (j.processed_tracks, j.failed_tracks, j.skipped_tracks, j.settled_tracks) == (1, 1, 1, 3)
    assert j.checkpoints == 1 and j.last_checkpoint_at is not None
    # The same results again (a replay after a crash) change no counter.
    j = store.checkpoint(job.job_id, done=[("t1", "muq")], failures=[fail], finished=[("t1", "processed"), ("t3", "failed")])
    assert (j.processed_tracks, j.failed_tracks, j.skipped_tracks) == (1, 1, 1)
    assert store.failure_page(job.job_id) == FailurePage(1, 1, [fail])
    assert store.is_done(job.job_id, "t1", "mert") and not store.is_done(job.job_id, "t3", "mert")
    assert store.done_count(job.job_id) == 3 and store.done_count(job.job_id, "muq") == 2
    assert store.settled(job.job_id, ["t1", "t2", "t3", "t1"]) == {"t1": {"muq", "mert"}, "t3": {"muq", "mert"}}
    assert store.finished_tracks(job.job_id, ["t1", "t2", "t3", "t4"]) == {"t1", "t3", "t4"}
    with pytest.raises(ValueError):
        store.checkpoint(job.job_id, finished=[("t9", "exploded")])


def test_new_job_forgets_old_records_but_keeps_history(tmp_path):
    with JobStore(tmp_path / "s.db", keep_jobs=3) as s:
        ids = []
        for k in range(5):
            j = s.create_job(models=["muq"])
            s.checkpoint(j.job_id, done=[(f"t{k}", "muq")], failures=[Failure("x", "muq", "decode_error", "bad", "/x")])
            s.set_status(j.job_id, "completed_with_errors")
            ids.append(j.job_id)
        assert s.get_job(ids[0]) is None and s.get_job(ids[1]) is None
        assert s.get_job(ids[2]) is not None
        assert s.failure_page(ids[4]).total == 1
        assert s.failure_page(ids[3]).total == 0  # only the latest job's records are kept
        assert s.done_count(ids[3]) == 0


def test_failures_paging(store):
    job = store.create_job(models=["muq", "mert"])
    fails = [Failure(f"t{i:03d}", "muq" if i % 2 else "mert", "decode_error", f"t{i}.ogg is corrupt.", f"/m/t{i}.ogg") for i in range(250)]
    for k in range(0, 250, 100):
        store.checkpoint(job.job_id, failures=fails[k : k + 100])
    first = store.failure_page(job.job_id, limit=100, offset=0)
    total, page = first.total, first.failures
    assert total == 250 and page == fails[:100]
    assert store.failure_page(job.job_id, limit=100, offset=200) == FailurePage(250, 250, fails[200:])
    assert store.failure_page(job.job_id, limit=10, offset=300) == FailurePage(250, 250, [])
    assert store.failure_page(job.job_id, limit=0).failures == []
    assert page[0].to_wire() == {"track_id": "t000", "path": "/m/t0.ogg", "model": "mert", "code": "decode_error", "message": "t0.ogg is corrupt."}
    for bad in ({"limit": -1}, {"offset": -5}):
        with pytest.raises(EmbeddError) as e:
            store.failure_page(job.job_id, **bad)
        assert e.value.code is Code.BAD_REQUEST and next(iter(bad)) in e.value.message


def test_a_running_jobs_failures_include_those_waiting_for_the_checkpoint(store):
    """batch_failures while the job runs: recorded ones first, then buffered ones; pairs and tracks counted."""
    job = store.create_job(models=["muq", "mert"])
    cp = Checkpointer(store, job.job_id, every=1000)

    def fail(track: str, model: str) -> Failure:
        return Failure(track, model, "decode_error", f"{track} is broken.", f"/m/{track}")

    cp.add("a", "failed", failures=[fail("a", "muq"), fail("a", "mert")])
    page = cp.failure_page()
    assert (page.total, page.tracks, page.failures) == (2, 1, [fail("a", "muq"), fail("a", "mert")])
    cp.flush()
    cp.add("b", "failed", failures=[fail("b", "muq")])
    cp.add("a", "failed", failures=[fail("a", "muq")])  # again (a resumed job): counted once
    page = cp.failure_page()
    assert (page.total, page.tracks) == (3, 2)
    assert page.failures == [fail("a", "muq"), fail("a", "mert"), fail("b", "muq")]
    assert cp.failure_page(limit=2, offset=1).failures == [fail("a", "mert"), fail("b", "muq")]
    assert cp.failure_page(limit=5, offset=3).failures == []
    assert page.to_wire()["tracks"] == 2 and page.to_wire()["total"] == 3
    cp.flush()
    assert store.failure_page(job.job_id) == page  # the same, now recorded


def test_failure_from_error():
    f = Failure.from_error("t1", "muq", "/m/a.wav", EmbeddError(Code.TOO_LARGE, "a.wav is 3 h long."))
    assert (f.code, f.message, f.path) == ("too_large", "a.wav is 3 h long.", "/m/a.wav")


def test_reopen_resumes_the_interrupted_job(tmp_path):
    path = tmp_path / "state.db"
    s1 = JobStore(path)
    job = s1.create_job(models=MODELS, total_tracks=10)
    s1.checkpoint(job.job_id, done=[("a", m) for m in MODELS], finished=[("a", "processed")])
    # no close(): the process "dies" with the connection open
    s2 = JobStore(path)
    resumed = s2.resumable_job()
    assert resumed is not None and resumed.job_id == job.job_id and resumed.status is JobStatus.RUNNING
    assert resumed.processed_tracks == 1 and s2.settled(job.job_id, ["a", "b"]) == {"a": frozenset(MODELS)}
    s1.close()
    s2.close()


_CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from embedd.batch.checkpoint import Checkpointer
    from embedd.batch.state import JobStore
    store = JobStore({path!r})
    job = store.create_job(models=["muq", "mert"], total_tracks=1000)
    cp = Checkpointer(store, job.job_id, every=100)
    for i in range(1000):
        tid = f"t{{i:04d}}"
        if cp.add(tid, "processed", done_models=["muq", "mert"]):
            cp.flush()
        if i == {kill_at}:
            print(job.job_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_mid_job_then_resume_exactly_once(tmp_path):
    path = str(tmp_path / "state.db")
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHER.format(repo=REPO, path=path, kill_at=349)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    job_id = proc.stdout.strip()
    with JobStore(path) as s:
        job = s.resumable_job()
        assert job is not None and job.job_id == job_id and job.status is JobStatus.RUNNING
        # Tracks 0..299 were checkpointed; 300..349 were buffered and are lost (to be redone).
        assert job.processed_tracks == 300 and job.checkpoints == 3
        ids = [f"t{i:04d}" for i in range(1000)]
        settled = s.settled(job_id, ids)
        assert set(settled) == set(ids[:300]) and all(v == {"muq", "mert"} for v in settled.values())
        # Resume: redo everything not settled, including a replay of already-settled work.
        cp = Checkpointer(s, job_id, every=100)
        todo = [t for t in ids if t not in s.finished_tracks(job_id, ids)]
        assert todo == ids[300:]
        for t in ids[290:]:  # 290..299 replayed on purpose
            if cp.add(t, "processed", done_models=["muq", "mert"]):
                cp.flush()
        cp.flush()
        final = s.set_status(job_id, "completed")
        assert final.processed_tracks == 1000 and s.done_count(job_id) == 2000 and final.final


def test_checkpointer_buffers_and_keeps_work_on_error(tmp_path):
    with JobStore(tmp_path / "s.db") as s:
        job = s.create_job(models=["muq"])
        cp = Checkpointer(s, job.job_id, every=3)
        assert cp.flush() is None
        assert cp.add("a", "processed", done_models=["muq"]) is False
        assert cp.add("b", "failed", failures=[Failure("b", "muq", "decode_error", "b is broken.", "/b")]) is False
        assert s.get_job(job.job_id).checkpoints == 0  # nothing written before a flush
        assert cp.add("c", "skipped") is True and cp.pending == 3
        j = cp.flush()
        assert (j.processed_tracks, j.failed_tracks, j.skipped_tracks, cp.pending) == (1, 1, 1, 0)
        cp.add("d", "processed", done_models=["muq"])
        bad = Checkpointer(s, "no-such-job")
        bad.add("x", "processed")
        with pytest.raises(EmbeddError):
            bad.flush()
        assert bad.pending == 1  # kept for the next try
    with pytest.raises(ValueError):
        Checkpointer(s, job.job_id, every=0)


def test_concurrent_callers_from_threads(store):
    job = store.create_job(models=["muq"])
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(50):
                store.checkpoint(job.job_id, done=[(f"{k}-{i}", "muq")], finished=[(f"{k}-{i}", "processed")])
                store.latest_job()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.get_job(job.job_id).processed_tracks == 200


def test_unusable_state_files(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(EmbeddError) as e:
        JobStore(junk)
    assert e.value.code is Code.UNAVAILABLE and str(junk) in e.value.message
    newer = tmp_path / "newer.db"
    c = sqlite3.connect(newer)
    c.execute("PRAGMA user_version = 99")
    c.close()
    with pytest.raises(EmbeddError) as e:
        JobStore(newer)
    assert "newer embedd" in e.value.message
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EmbeddError) as e:
        JobStore(blocker / "state.db")
    assert e.value.code is Code.UNAVAILABLE and "state.db" in e.value.message


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from(list(Outcome))),
        max_size=60,
    )
)
def test_counters_match_first_outcome_per_track(tmp_path_factory, events):
    """Whatever batches arrive, replays included, each track counts once, by its first outcome."""
    with JobStore(tmp_path_factory.mktemp("p") / "s.db") as s:
        job = s.create_job(models=["muq"])
        first: dict[str, Outcome] = {}
        for k in range(0, len(events), 7):
            batch = [(f"t{i}", o) for i, o in events[k : k + 7]]
            s.checkpoint(job.job_id, finished=batch)
            for t, o in batch:
                first.setdefault(t, o)
        j = s.get_job(job.job_id)
        expect = {o: sum(1 for v in first.values() if v is o) for o in Outcome}
        assert (j.processed_tracks, j.failed_tracks, j.skipped_tracks) == (
            expect[Outcome.PROCESSED],
            expect[Outcome.FAILED],
            expect[Outcome.SKIPPED],
        )
        everyone = [f"t{i}" for i in range(100)]
        assert s.finished_tracks(job.job_id, everyone) == set(first)  # every track that arrived, none other


# ---- the crash-loop guard


def test_a_track_in_flight_at_two_unclean_exits_is_failed_once_per_model(store):
    job = store.create_job(models=["muq", "latent"])
    jid = job.job_id
    store.begin_track(jid, "poison", "/m/poison.flac")
    store.begin_track(jid, "bystander", "/m/ok.flac")
    store.begin_track(jid, "finished", "/m/done.flac")
    store.end_track(jid, "finished")  # its passes ended before the crash: not a suspect
    store.checkpoint(jid, done=[("poison", "muq")])
    # first unclean exit: both in flight are suspects, nothing failed yet
    suspects, failed = store.recover_in_flight(jid)
    assert suspects == {"poison", "bystander"} and failed == []
    # the retries: the bystander finishes alone, the poison kills the daemon again
    store.begin_track(jid, "bystander", "/m/ok.flac")
    store.end_track(jid, "bystander")
    store.begin_track(jid, "poison", "/m/poison.flac")
    suspects, failed = store.recover_in_flight(jid)
    assert suspects == set()
    assert [(f.track_id, f.model, f.code) for f in failed] == [("poison", "latent", "internal")]  # muq was stored
    assert "stopped 2 times while embedding '/m/poison.flac'" in failed[0].message
    job = store.get_job(jid)
    assert job.failed_tracks == 1 and store.failure_page(jid).total == 1
    assert store.finished_tracks(jid, ["poison", "bystander"]) == {"poison"}
    # a third start-up finds nothing left to blame
    assert store.recover_in_flight(jid) == (set(), [])


def test_a_clean_stop_is_not_counted_as_a_crash(store):
    jid = store.create_job(models=["muq"]).job_id
    store.begin_track(jid, "a", "/m/a.flac")
    store.stand_down(jid)  # SIGTERM: what was in flight was stopped by the daemon itself
    assert store.recover_in_flight(jid) == (set(), [])
    store.begin_track(jid, "b", "/m/b.flac")
    assert store.recover_in_flight(jid)[0] == {"b"}  # crashed once
    store.begin_track(jid, "b", "/m/b.flac")
    store.stand_down(jid)  # a clean stop during its retry keeps the one crash, adds none
    suspects, failed = store.recover_in_flight(jid)
    assert suspects == {"b"} and failed == []


def test_written_outcomes_leave_pending_only_when_the_view_takes_the_job(tmp_path):
    """flush (a thread) writes; published (the loop, with the new job) moves the counts: never a low frame."""
    with JobStore(str(tmp_path / "state.db")) as s:
        job = s.create_job(models=["muq"], total_tracks=10)
        cp = Checkpointer(s, job.job_id, every=100)
        for i in range(3):
            cp.add(f"t{i}", "processed", done_models=["muq"])
        job, written = cp.flush_for_view()
        assert job is not None and job.processed_tracks == 3 and written == [Outcome.PROCESSED] * 3
        # between the write and the loop's publish, the old view (0 durable) still adds the 3 pending
        assert cp.pending_outcomes[Outcome.PROCESSED] == 3
        cp.add("t3", "processed", done_models=["muq"])  # another flush's track: not taken by this publish
        cp.published(written)
        assert cp.pending_outcomes[Outcome.PROCESSED] == 1
        assert cp.flush().processed_tracks == 4 and cp.pending_outcomes[Outcome.PROCESSED] == 0

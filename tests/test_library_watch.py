"""The library watcher (issue 20): Navidrome's changes reach the vectors by themselves.

The unit part drives :class:`LibraryWatcher` poll by poll over a real
Navidrome-schema database with a fake clock and a fake batch manager: what it
reads, what it finds, when it starts a job and why it waits. The daemon part
runs a real daemon with short configured delays over a database the test
mutates the way Navidrome's scanner does (WAL never checkpointed), and waits
on the watcher's own poll counter, never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from pathlib import Path

import pytest

from embedd.batch.job import Job, JobStatus
from embedd.batch.watch import LibraryWatcher, NavidromeProbe, Snapshot, WatchConfig, next_window_start, parse_windows
from embedd.errors import Code, EmbeddError
from tests.navidrome_fixtures import NavidromeDB, go_time

# ---------------------------------------------------------------- helpers


def begin_scan(db: NavidromeDB, at: float, *, full: bool = False) -> None:
    """What Navidrome's scanner writes when a scan starts (library.ScanBegin)."""
    db.conn.execute(
        "update library set last_scan_started_at = ?, full_scan_in_progress = ?", (go_time(at), int(full))
    )


def end_scan(db: NavidromeDB, at: float) -> None:
    """...and when it ends (library.ScanEnd)."""
    db.conn.execute(
        "update library set last_scan_at = ?, last_scan_started_at = '0000-00-00 00:00:00', full_scan_in_progress = false",
        (go_time(at),),
    )


def _job(job_id: str, status: JobStatus = JobStatus.RUNNING) -> Job:
    return Job(job_id, ("muq",), False, None, status, 0.0, 0.0, None, 0.0, 0, 0, 0, 0, 0, None, None, None, "auto", True)


class FakeJobs:
    def __init__(self) -> None:
        self.started: list[tuple[list[str], list[str]]] = []
        self.active: Job | None = None
        self.ended: dict[str, Job] = {}

    @property
    def active_job(self) -> Job | None:
        return self.active

    async def start_auto(self, models, scope) -> Job:
        if self.active is not None:
            raise EmbeddError(Code.BUSY, "busy")
        self.started.append((list(models), list(scope)))
        self.active = _job(f"auto-{len(self.started)}")
        return self.active

    async def finished_job(self, job_id: str) -> Job | None:
        if self.active is not None and self.active.job_id == job_id:
            return self.active
        return self.ended.get(job_id)

    def finish(self, status: JobStatus = JobStatus.COMPLETED) -> None:
        assert self.active is not None
        self.ended[self.active.job_id] = dataclasses.replace(self.active, status=status)
        self.active = None


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def nd(tmp_path: Path):
    db = NavidromeDB(tmp_path / "navidrome.db", "relative")
    db.conn.execute("PRAGMA wal_autocheckpoint = 0")  # like a busy Navidrome: the WAL is never checkpointed
    yield db
    db.close()


def _watcher(tmp_path: Path, nd: NavidromeDB, clock: Clock, jobs: FakeJobs, **config) -> LibraryWatcher:
    async def models() -> list[str]:
        return ["muq"]

    cfg = WatchConfig(**{"poll_s": 60.0, "quiet_s": 300.0, **config})
    return LibraryWatcher(
        cfg, probe=NavidromeProbe(nd.path), snapshot=Snapshot(tmp_path / "watch.sqlite3"), jobs=jobs,
        models_with_vectors=models, clock=clock,
    )  # fmt: skip


# ---------------------------------------------------------------- unit: the watcher poll by poll


def test_a_scan_is_debounced_into_one_job_over_exactly_what_changed(tmp_path: Path, nd: NavidromeDB) -> None:
    clock, jobs = Clock(), FakeJobs()
    kept, changed, moved, missing, deleted = nd.add_tracks(5)
    end_scan(nd, clock.t - 3600)
    w = _watcher(tmp_path, nd, clock, jobs)

    async def main() -> None:
        await w.poll()  # the baseline: a snapshot, no job
        assert w.view()["pending"] == {"added": 0, "changed": 0, "removed": 0} and not jobs.started
        assert w.last_poll["diff_rows_read"] == 5
        await w.poll()  # nothing written since: nothing read
        assert w.last_poll == {"rows_read": 0, "diff_rows_read": 0, "duration_s": w.last_poll["duration_s"]}

        # A scan runs for a long time: rows change under it, no job starts however long it takes.
        clock.t += 10
        begin_scan(nd, clock.t)
        added = nd.add_tracks(2)
        nd.change_track(changed, size=changed.size + 1, mtime=changed.mtime + 60)
        nd.conn.execute("update media_file set path = ? where id = ?", ("Elsewhere/" + moved.stored_path, moved.track_id))
        nd.mark_missing(missing)
        nd.delete_track(deleted)
        for _ in range(3):
            clock.t += 3600
            nd.conn.execute("update library set updated_at = ?", (go_time(clock.t),))  # the scanner keeps writing
            await w.poll()
            assert w.view()["scan_in_progress"] and w.last_poll["diff_rows_read"] == 0
            assert w.view()["waiting"] is None and not jobs.started  # nothing pending is known during the scan
        clock.t += 5
        end_scan(nd, clock.t)
        await w.poll()  # the scan finished: one diff
        v = w.view()
        assert v["pending"] == {"added": 2, "changed": 2, "removed": 2}, v
        assert v["waiting"] == "quiet_period" and v["next_job_at"] == clock.t + 300 and not jobs.started
        clock.t += 299
        await w.poll()
        assert not jobs.started
        clock.t += 1
        await w.poll()
        assert len(jobs.started) == 1
        models, scope = jobs.started[0]
        assert models == ["muq"]
        assert sorted(scope) == sorted([t.track_id for t in added] + [changed.track_id, moved.track_id, missing.track_id, deleted.track_id])
        assert kept.track_id not in scope
        v = w.view()
        assert v["pending"] == {"added": 0, "changed": 0, "removed": 0} and v["last_job_id"] == "auto-1"
        jobs.finish()
        clock.t += 10_000
        await w.poll()
        await w.poll()
        assert len(jobs.started) == 1  # exactly once

    asyncio.run(main())
    w.snapshot.close()


def test_a_running_or_paused_job_is_waited_for_and_a_failed_auto_job_gives_its_tracks_back(tmp_path: Path, nd: NavidromeDB) -> None:
    clock, jobs = Clock(), FakeJobs()
    nd.add_tracks(3)
    w = _watcher(tmp_path, nd, clock, jobs, quiet_s=0.0)

    async def main() -> None:
        await w.poll()
        jobs.active = _job("manual-1", JobStatus.PAUSED)
        new = nd.add_tracks(1)
        end_scan(nd, clock.t)
        clock.t += 1
        await w.poll()
        assert w.view()["waiting"] == "job_paused" and not jobs.started
        jobs.active = dataclasses.replace(jobs.active, status=JobStatus.RUNNING)
        await w.poll()
        assert w.view()["waiting"] == "job_running"
        jobs.finish()
        await w.poll()  # queued behind it: starts now
        assert jobs.started == [(["muq"], [new[0].track_id])]
        jobs.finish(JobStatus.FAILED)
        await w.poll()  # its tracks come back, and a new job takes them
        assert len(jobs.started) == 2 and jobs.started[1][1] == [new[0].track_id]

    asyncio.run(main())
    w.snapshot.close()


def test_quiet_hours_and_the_off_switch_hold(tmp_path: Path, nd: NavidromeDB) -> None:
    local_midnight = time.mktime(time.strptime("2027-03-10 00:00", "%Y-%m-%d %H:%M"))
    clock, jobs = Clock(local_midnight + 12 * 3600), FakeJobs()  # noon
    nd.add_tracks(2)
    w = _watcher(tmp_path, nd, clock, jobs, quiet_s=60.0, hours=parse_windows(["01:00-07:00"]))

    async def main() -> None:
        await w.poll()
        nd.add_tracks(1)
        end_scan(nd, clock.t)
        clock.t += 1
        await w.poll()
        clock.t += 3600  # quiet long enough, but outside the window
        await w.poll()
        v = w.view()
        assert v["waiting"] == "quiet_hours" and not jobs.started
        assert v["next_job_at"] == local_midnight + 25 * 3600  # 01:00 tomorrow
        clock.t = local_midnight + 25 * 3600 + 30
        await w.poll()
        assert len(jobs.started) == 1

    asyncio.run(main())
    w.snapshot.close()

    off_jobs = FakeJobs()
    off = _watcher(tmp_path / "off", nd, clock, off_jobs, enabled=False, quiet_s=0.0) if (tmp_path / "off").mkdir() is None else None

    async def never() -> None:
        off.start()  # the off switch: no polling task at all
        await off.poll()
        nd.add_tracks(1)
        end_scan(nd, clock.t + 5)
        clock.t += 10
        await off.poll()
        assert off.view()["waiting"] == "off" and not off_jobs.started

    asyncio.run(never())
    off.snapshot.close()


def test_windows_parse_and_cross_midnight() -> None:
    assert parse_windows(["01:00-07:00", "22:30-06:00"]) == ((60, 420), (1350, 360))
    for bad in ("1-7", "25:00-26:00", "07:00-07:00"):
        with pytest.raises(ValueError):
            parse_windows([bad])
    day = time.mktime(time.strptime("2027-03-10 00:00", "%Y-%m-%d %H:%M"))
    w = parse_windows(["22:30-06:00"])
    assert next_window_start(w, day + 3 * 3600) == day + 3 * 3600  # inside, after midnight
    assert next_window_start(w, day + 12 * 3600) == day + 22.5 * 3600
    assert next_window_start((), day) is None


def test_many_tracks_marked_missing_at_once_are_held_not_removed(tmp_path: Path, nd: NavidromeDB) -> None:
    clock, jobs = Clock(), FakeJobs()
    tracks = nd.add_tracks(60)
    w = _watcher(tmp_path, nd, clock, jobs, quiet_s=0.0)

    async def main() -> None:
        await w.poll()
        for t in tracks[:30]:  # a share unmounted during the scan
            nd.mark_missing(t)
        end_scan(nd, clock.t)
        await w.poll()
        v = w.view()
        assert v["held_missing"] == 30 and v["pending"]["removed"] == 0 and not jobs.started
        nd.delete_track(tracks[0])  # Navidrome's "empty missing": now it is gone for good
        end_scan(nd, clock.t + 1)
        await w.poll()
        assert jobs.started and jobs.started[0][1] == [tracks[0].track_id] and w.view()["held_missing"] == 29

    asyncio.run(main())
    w.snapshot.close()


# ---------------------------------------------------------------- a real daemon


from tests.batch_fixtures import BatchDaemon, Library, _with_store, fingerprints, stored_ids  # noqa: E402
from tests.daemon import short_tmpdir  # noqa: E402

QUIET_S = 0.5


@pytest.fixture
def root():
    d = short_tmpdir("ew-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _watch_view(d: BatchDaemon) -> dict:
    return d.progress()["library_watch"]


def _polls(d: BatchDaemon, n: int) -> dict:
    """Wait until the watcher has polled ``n`` more times (its own counter, not a sleep)."""
    start = _watch_view(d)["polls"]
    d.wait_for(lambda p: p["library_watch"]["polls"] >= start + n, timeout=60)
    return _watch_view(d)


def test_the_daemon_keeps_the_collections_current_by_itself(root: Path, tiny_models) -> None:
    lib = Library(root / "lib", "relative")
    lib.db.conn.execute("PRAGMA wal_autocheckpoint = 0")  # Navidrome's WAL, never checkpointed meanwhile
    kept, changed, migrated, moved, gone = lib.add_good(5)
    end_scan(lib.db, time.time() - 60)
    d = BatchDaemon(
        root / "d", lib, tiny_models, extra=["--watch-poll-s", "0.05", "--watch-quiet-s", str(QUIET_S), "--checkpoint-every", "1"]
    )
    d.start()
    try:
        d.ok("batch_start", models=["muq"])
        manual = d.wait_final()
        assert manual["status"] == "completed" and manual["trigger"] == "manual"
        d.wait_for(lambda p: p["library_watch"]["last_seen_at"] is not None)  # the baseline is taken
        uri, dims = str(d.data_dir / "milvus.db"), {"muq": d.ok("status")["models"]["muq"]["dim"]}

        # Navidrome scans: new files, a re-encoded one, one whose id an id migration changed, one moved
        # (same id, new path), one gone missing, and one the fork uploaded and stored through
        # embed_file before the scan found it.
        begin_scan(lib.db, time.time())
        lib._n += 100  # Library.add_good numbers a second call's files over the first call's
        added = lib.add_good(2)
        new_audio = lib.change(changed)
        lib.delete(migrated)
        remigrated = lib._insert([dataclasses.replace(migrated, track_id="migrated-" + migrated.track_id[:8])])[0]
        link = lib.path_of(moved).with_name("moved " + lib.path_of(moved).name)
        link.hardlink_to(lib.path_of(moved))
        moved = lib.db.change_track(moved, stored_path=str(link.relative_to(lib.music)))
        lib.db.mark_missing(gone)
        upload_file = lib.path_of(added[0]).with_name("upload.flac")
        upload_file.write_bytes(lib.path_of(added[0]).read_bytes())
        upload = lib._row(str(upload_file.relative_to(lib.music)), upload_file)
        d.ok("embed_file", path=str(upload_file), store=True, track_id=upload.track_id, models=["muq"])
        lib._insert([upload])

        v = _polls(d, 5)  # the scan runs: no job, however many polls
        assert v["scan_in_progress"] and d.progress()["job_id"] == manual["job_id"]

        end_scan(lib.db, time.time())
        p = d.wait_for(lambda p: p["trigger"] == "auto" and p["status"] in ("completed", "completed_with_errors", "failed"))
        assert p["status"] == "completed", d.log()
        v = p["library_watch"]
        assert p["started_at"] >= v["last_activity_at"] + QUIET_S - 0.01  # after the quiet period, by the daemon's clock
        assert p["processed_tracks"] == 3, p  # the two new files and the re-encoded one: each embedded once
        assert p["skipped_tracks"] == 3 and p["rekeyed_tracks"] >= 1  # the migrated, the moved, the upload: not again
        assert v["pending"] == {"added": 0, "changed": 0, "removed": 0} and v["auto_jobs"] == 1
        _polls(d, 5)
        assert d.progress()["job_id"] == p["job_id"]  # nothing left: no second job
        metrics_ok = d.ok("status")["library_watch"]
        assert metrics_ok["last_job_id"] == p["job_id"] and metrics_ok["waiting"] is None
    finally:
        d.stop()

    ids = stored_ids(uri, dims)["muq"]
    expected = {kept.track_id, new_audio.track_id, remigrated.track_id, moved.track_id, upload.track_id, *(t.track_id for t in added)}
    assert sorted(ids) == sorted(expected)  # the missing and the old id left; no duplicates
    fps = fingerprints(uri, dims)["muq"]
    assert fps[new_audio.track_id][0] == new_audio.size
    paths = _with_store(uri, dims, lambda s: {fp.track_id: fp.path for fp in s.fingerprints("muq")})
    assert paths[moved.track_id] == str(link)  # the moved file's row follows it, without re-embedding


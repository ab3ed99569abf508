"""The batch run's decisions, in-process: the real manager, run, job state, Milvus Lite, decoder and tiny models.

Each test builds the daemon's own :class:`~embedd.service.Service` over a small
generated library (no socket, no subprocess) and drives the ``batch_*`` ops the
way the server does, so a failure points at one decision of the run: what it
skips, re-embeds, deletes and retries, where a pause or a cancel leaves the job,
and what it does with a track that was in flight when the daemon died.

How much a run embedded is read from the executor's own ``audio_seconds``
counter: every good track is ``TRACK_S`` long, so a run that skipped a track
did not put it through a model. Waiting is event-driven: the progress watch
wakes on every change the run makes, and the executor is held at a known point
by a control job that blocks its thread until the test lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from embedd.batch.job import JobStatus
from embedd.batch.state import JobStore
from embedd.executor import Lane
from embedd.ops import OPS, build_handlers
from embedd.ops.batch import BatchFailuresArgs, BatchStartArgs
from embedd.protocol import NoArgs
from embedd.service import Service
from embedd.settings import Settings

from tests.batch_fixtures import Library, write_audio
from tests.navidrome_fixtures import FixtureTrack

pytestmark = pytest.mark.timeout(240)

TRACK_S = 1.5
#: The cheapest tiny model; one model keeps each job short.
MODEL = "latent"
_FINAL = {"completed", "completed_with_errors", "failed", "cancelled"}


class Daemon:
    """A started :class:`Service` and the batch ops, called as the server calls them."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.batch = service.batch
        self.ops = build_handlers(service, {name: op for name, op in OPS.items() if name.startswith("batch_")})
        self._seconds_at_start = 0.0

    async def op(self, name: str, args: Any = None) -> dict[str, Any]:
        return await self.ops[name].fn(args if args is not None else NoArgs())

    async def start(self, *models: str, clear_existing: bool = False) -> dict[str, Any]:
        self._seconds_at_start = self.service.executor.audio_seconds[MODEL]
        return await self.op("batch_start", BatchStartArgs(models=list(models or (MODEL,)), clear_existing=clear_existing))

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        """The first progress view that satisfies ``predicate`` (woken by the run's own changes)."""

        async def watch() -> dict[str, Any]:
            view: dict[str, Any] = {}
            async for view, _more in self.batch.progress.watch(0.0):
                if predicate(view):
                    return view
            raise AssertionError(f"the job ended without reaching the condition: {view}")

        return await asyncio.wait_for(watch(), timeout)

    async def final(self, timeout: float = 120.0) -> dict[str, Any]:
        return await self.until(lambda v: v["status"] in _FINAL, timeout)

    async def first_embedded(self, timeout: float = 60.0) -> None:
        """Until the run has put a new track through a model (the pass is under way, most tracks still ahead).

        No progress event marks it (results reach the view only with a write), so
        this polls the executor's counter: a condition wait, not a fixed sleep.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        before = self._seconds_at_start
        while self.service.executor.audio_seconds[MODEL] <= before:
            assert loop.time() < deadline, f"no track was embedded: {self.batch.progress.view()}"
            await asyncio.sleep(0.002)

    def embedded_tracks(self, model: str = MODEL) -> int:
        """Good tracks put through ``model`` so far (each is TRACK_S long)."""
        return round(self.service.executor.audio_seconds[model] / TRACK_S)

    async def stored(self, model: str = MODEL) -> list[str]:
        """Every stored track id of the model's live set, duplicates kept."""
        return await self.service.store_io.call(lambda s: sorted(fp.track_id for fp in s.fingerprints(model)))

    @contextlib.asynccontextmanager
    async def executor_held(self) -> AsyncIterator[None]:
        """Hold the executor thread: embeds already queued or submitted wait until the block ends."""
        release, holding = threading.Event(), threading.Event()

        def hold(_registry: object) -> None:
            holding.set()
            release.wait(60)

        held = asyncio.ensure_future(self.service.executor.call(Lane.CONTROL, hold))
        try:
            await asyncio.to_thread(holding.wait, 60)  # the control lane overtakes queued batch work
            yield
        finally:
            release.set()
            await held


def _settings(root: Path, lib: Library, models: dict[str, str], **overrides: Any) -> Settings:
    return Settings(
        data_dir=root / "data",
        navidrome_db=Path(lib.db.path),
        muq_model=models["muq"],
        mert_model=models["mert"],
        latent_model=models["latent"],
        preload=[],
        decode_workers=1,
        checkpoint_every=1,
        **overrides,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    service = Service(settings)
    await service.start()
    try:
        yield Daemon(service)
    finally:
        await service.quiesce()
        await service.stop(30.0)


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return Library(tmp_path / "lib")


def _ids(tracks: list[FixtureTrack]) -> list[str]:
    return sorted(t.track_id for t in tracks)


async def test_incremental_jobs_skip_unchanged_reembed_changed_delete_stale_and_retry_failed(
    tmp_path: Path, lib: Library, tiny_models: dict[str, str]
) -> None:
    good = lib.add_good(5, duration_s=TRACK_S)
    [late] = lib.db.insert([lib.db.make_track("late/arrival.flac", title="Late", artist="Nobody")])  # no file yet
    async with running(_settings(tmp_path, lib, tiny_models)) as d:
        first = await d.start()
        assert first["total_tracks"] == 6
        p = await d.final()
        assert (p["status"], p["processed_tracks"], p["failed_tracks"], p["skipped_tracks"]) == ("completed_with_errors", 5, 1, 0)
        failures = await d.op("batch_failures", BatchFailuresArgs())
        assert [(f["track_id"], f["code"]) for f in failures["failures"]] == [(late.track_id, "not_found")]
        assert d.embedded_tracks() == 5 and await d.stored() == _ids(good)

        # Nothing changed: the stored tracks are skipped without a model; the failed one is tried again (and fails again).
        await d.start()
        p = await d.final()
        assert (p["processed_tracks"], p["failed_tracks"], p["skipped_tracks"]) == (0, 1, 5), p
        assert d.embedded_tracks() == 5

        # The missing file appears, one file changes, one track leaves the library, one arrives.
        st = write_audio(lib.music / "late" / "arrival", 0, TRACK_S).stat()  # index 0 is a flac, as the row says
        lib.db.change_track(late, size=st.st_size, mtime=st.st_mtime)
        changed = lib.change(good[0])
        lib.delete(good[1])
        [added] = lib.add_good(1, duration_s=TRACK_S)
        before = d.service.executor.audio_seconds[MODEL]
        await d.start()
        p = await d.final()
        assert (p["status"], p["processed_tracks"], p["failed_tracks"], p["skipped_tracks"]) == ("completed", 3, 0, 3), p
        # lib.change rewrites the file 2 s long: the changed track counts a little more audio.
        assert round((d.service.executor.audio_seconds[MODEL] - before - 2.0) / TRACK_S) == 2
        expected = {late.track_id, changed.track_id, added.track_id} | {t.track_id for t in good[2:]}
        assert await d.stored() == sorted(expected)  # the departed track's vector was deleted, nothing twice


async def test_pause_checkpoints_and_resume_goes_on_from_there(
    tmp_path: Path, lib: Library, tiny_models: dict[str, str]
) -> None:
    # A pause lets the tracks already taken finish: with one decode worker and a batch
    # queue of one, that is at most 4 in the workers' hands, 4 queued and 1 being queued.
    tracks = lib.add_good(16, duration_s=TRACK_S)
    async with running(_settings(tmp_path, lib, tiny_models, batch_queue=1)) as d:
        job_id = (await d.start())["job_id"]
        await d.first_embedded()
        async with d.executor_held():
            pausing = asyncio.ensure_future(d.op("batch_pause"))
            run = d.service.batch._run
            assert run is not None
            await asyncio.wait_for(run.stop_taking.wait(), 60)  # the pause has asked the run to stop taking tracks
            for _ in range(100):  # ... and, however many loop turns pass, waits for the tracks held at the executor
                await asyncio.sleep(0)
            assert not pausing.done()
        paused = await pausing
        assert paused["status"] == "paused", paused
        settled = paused["processed_tracks"]
        assert 1 <= settled < len(tracks)
        # The pause wrote its checkpoint: the state file and Milvus agree on what is done.
        with JobStore(d.service.settings.state_db) as jobs:
            job = jobs.get_job(job_id)
            assert job is not None and job.status is JobStatus.PAUSED and job.processed_tracks == settled
            done = jobs.settled(job_id, [t.track_id for t in tracks])
        assert await d.stored() == sorted(done) and len(done) == settled
        assert d.embedded_tracks() == settled

        resumed = await d.op("batch_resume")
        assert resumed["status"] == "running"
        p = await d.final()
        assert (p["status"], p["processed_tracks"], p["failed_tracks"], p["skipped_tracks"]) == ("completed", 16, 0, 0), p
        assert d.embedded_tracks() == len(tracks), "a track settled before the pause was embedded again"
        assert await d.stored() == _ids(tracks)


async def test_cancelled_rebuild_keeps_the_live_set_and_drops_its_own(
    tmp_path: Path, lib: Library, tiny_models: dict[str, str]
) -> None:
    tracks = lib.add_good(8, duration_s=TRACK_S)
    async with running(_settings(tmp_path, lib, tiny_models, batch_queue=1)) as d:
        await d.start()
        assert (await d.final())["status"] == "completed"
        await d.start(clear_existing=True)
        await d.first_embedded()
        async with d.executor_held():
            assert await d.op("batch_cancel") == {"status": "cancelling"}
        p = await d.final()
        assert p["status"] == "cancelled" and p["processed_tracks"] < len(tracks), p
        assert await d.stored() == _ids(tracks)  # search still answers from the complete old set
        assert await d.service.store_io.call(lambda s: s.list_rebuilds(MODEL)) == []
        # A new incremental job finds everything up to date.
        await d.start()
        p = await d.final()
        assert (p["processed_tracks"], p["skipped_tracks"]) == (0, len(tracks)), p


async def test_a_track_in_flight_at_an_unclean_exit_is_retried_alone_then_given_up(
    tmp_path: Path, lib: Library, tiny_models: dict[str, str]
) -> None:
    tracks = lib.add_good(4, duration_s=TRACK_S)
    suspect, doomed = tracks[0], tracks[1]
    settings = _settings(tmp_path, lib, tiny_models)
    settings.data_dir.mkdir(parents=True)
    paths = {t.track_id: str(lib.path_of(t)) for t in tracks}
    # The state a daemon leaves when it dies mid-track: the track recorded as in flight, never ended.
    # ``doomed`` was in flight at an earlier death too (recover_in_flight counted it once).
    with JobStore(settings.state_db) as jobs:
        job = jobs.create_job(models=[MODEL], total_tracks=len(tracks))
        jobs.begin_track(job.job_id, doomed.track_id, paths[doomed.track_id])
        assert jobs.recover_in_flight(job.job_id) == ({doomed.track_id}, [])
        jobs.begin_track(job.job_id, doomed.track_id, paths[doomed.track_id])
        jobs.begin_track(job.job_id, suspect.track_id, paths[suspect.track_id])

    async with running(settings) as d:  # start-up resumes the interrupted job
        p = await d.final()
        assert p["job_id"] == job.job_id
        assert (p["status"], p["processed_tracks"], p["failed_tracks"]) == ("completed_with_errors", 3, 1), p
        failures = (await d.op("batch_failures", BatchFailuresArgs()))["failures"]
        assert [(f["track_id"], f["code"]) for f in failures] == [(doomed.track_id, "internal")]
        assert "stopped 2 times" in failures[0]["message"]
        # The twice-fatal track never reached a model again; the once-suspect one was embedded (alone).
        assert d.embedded_tracks() == 3
        assert await d.stored() == sorted(t.track_id for t in tracks if t is not doomed)


async def test_a_suspect_track_runs_with_nothing_else_in_flight() -> None:
    """The crash-loop guard's gate: a suspect waits for the tracks in flight, and no track starts beside it."""
    from embedd.batch.gate import IsolationGate

    gate = IsolationGate()
    log: list[str] = []
    release = {name: asyncio.Event() for name in ("a", "b", "suspect", "c")}
    entered = {name: asyncio.Event() for name in release}

    async def track(name: str, *, alone: bool = False) -> None:
        async with gate.hold(alone=alone):
            log.append(f"+{name}")
            entered[name].set()
            await release[name].wait()
            log.append(f"-{name}")

    tasks = [asyncio.create_task(track("a")), asyncio.create_task(track("b"))]
    await entered["a"].wait()
    await entered["b"].wait()
    tasks.append(asyncio.create_task(track("suspect", alone=True)))
    tasks.append(asyncio.create_task(track("c")))  # arrives after the suspect: waits behind it
    release["a"].set()
    await tasks[0]
    assert not entered["suspect"].is_set() and not entered["c"].is_set()  # b is still in flight
    release["b"].set()
    await entered["suspect"].wait()
    assert not entered["c"].is_set()
    release["suspect"].set()
    await entered["c"].wait()
    release["c"].set()
    await asyncio.gather(*tasks)
    assert log == ["+a", "+b", "-a", "-b", "+suspect", "-suspect", "+c", "-c"]

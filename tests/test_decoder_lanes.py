"""The decoder's lanes: interactive decodes go to a worker before queued batch ones; a cancelled queued decode never runs.

The order is observed through events (a worker held on a FIFO the test
opens, the order in which awaiting tasks finish), never through sleeps.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from embedd.audio import AudioDecoder
from embedd.audio.lanes import DecodeLanes, check_lane
from embedd.audio.pool import job_path
from embedd.audio.track import check_targets

from tests.audio_fixtures import encode, tone

pytestmark = pytest.mark.timeout(120)

TARGETS = {(16_000, 1)}


async def _settle() -> None:
    """Let every ready task run until it waits again (loop turns, not wall-clock time)."""
    for _ in range(5):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- the dispatcher alone


async def test_a_freed_worker_takes_the_interactive_decode_before_queued_batch_ones() -> None:
    lanes = DecodeLanes(workers=1, unadmitted=2)
    await lanes.start("batch")  # the one worker is busy with a batch decode
    order: list[str] = []

    def queue(name: str, lane: str) -> asyncio.Task:
        task = asyncio.ensure_future(lanes.start(lane))  # type: ignore[arg-type]
        task.add_done_callback(lambda _t: order.append(name))
        return task

    b1, b2 = queue("b1", "batch"), queue("b2", "batch")
    await _settle()
    i1 = queue("i1", "interactive")
    await _settle()
    view = lanes.view()
    assert view["batch"]["depth"] == 2 and view["interactive"]["depth"] == 1
    assert view["batch"]["running"] == 1 and view["interactive"]["oldest_wait_s"] is not None

    # each time the worker frees (the lane of the decode it finished), the next decode gets it
    for done_lane, expected in (("batch", ["i1"]), ("interactive", ["i1", "b1"]), ("batch", ["i1", "b1", "b2"])):
        lanes.finished(done_lane)  # type: ignore[arg-type]
        lanes.admitted()
        await _settle()
        assert order == expected
    await asyncio.gather(b1, b2, i1)
    assert lanes.view()["interactive"]["depth"] == lanes.view()["batch"]["depth"] == 0


async def test_a_cancelled_queued_decode_leaves_its_queue_at_once_and_never_gets_a_worker() -> None:
    lanes = DecodeLanes(workers=1, unadmitted=2)
    await lanes.start("batch")
    cancelled = asyncio.ensure_future(lanes.start("batch"))
    kept = asyncio.ensure_future(lanes.start("batch"))
    await _settle()
    assert lanes.view()["batch"]["depth"] == 2
    cancelled.cancel()
    await _settle()
    assert cancelled.cancelled() and lanes.view()["batch"]["depth"] == 1 and lanes.withdrawn == 1
    lanes.finished("batch")
    lanes.admitted()
    await kept  # the freed worker went to the decode still waiting
    assert lanes.view()["batch"] == {"depth": 0, "oldest_wait_s": None, "running": 1}


async def test_results_waiting_for_the_held_budget_bound_new_decodes() -> None:
    lanes = DecodeLanes(workers=1, unadmitted=2)
    await lanes.start("batch")
    lanes.finished("batch")  # its result waits for admission: the worker is free
    await lanes.start("batch")
    lanes.finished("batch")
    third = asyncio.ensure_future(lanes.start("interactive"))
    await _settle()
    assert not third.done()  # two results already wait in /dev/shm
    lanes.admitted()
    await third


def test_lane_names() -> None:
    from embedd.executor import Lane

    assert check_lane("batch") == "batch" and check_lane(Lane.INTERACTIVE) == "interactive"
    with pytest.raises(ValueError, match="interactive"):
        check_lane("bulk")


# --------------------------------------------------------------------------- the real decoder (worker processes)


def _held_decode(fifo: str, *job: object):
    """Decode only once the test opens ``fifo`` for writing (a worker held by an event, not a sleep)."""
    with open(fifo, "rb") as f:
        f.read()
    return job_path(*job)  # type: ignore[arg-type]


def _noted_decode(marker: str, *job: object):
    """Decode, leaving ``marker`` behind: the test sees whether this decode ever ran."""
    Path(marker).write_text("ran")
    return job_path(*job)  # type: ignore[arg-type]


async def test_decoder_serves_interactive_first_and_never_runs_a_withdrawn_batch_decode(tmp_path: Path) -> None:
    song = tmp_path / "song.wav"
    song.write_bytes(encode(tone(16_000, 1, 0.5), 16_000, container_format="wav", codec="pcm_s16le"))
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    marker = tmp_path / "withdrawn-ran"
    decoder = AudioDecoder(roots=[tmp_path], workers=1)
    try:
        job = (str(song), decoder.roots, check_targets(TARGETS), decoder.max_audio_s, decoder._tag)
        held = asyncio.ensure_future(decoder._run("held.wav", _held_decode, str(fifo), *job, lane="batch"))
        await _settle()
        finished: list[str] = []

        def queue(name: str, coro) -> asyncio.Task:
            task = asyncio.ensure_future(coro)
            task.add_done_callback(lambda t: finished.append(name) if not t.cancelled() else None)
            return task

        b1 = queue("b1", decoder.decode_path(str(song), TARGETS, lane="batch"))
        withdrawn = queue("withdrawn", decoder._run("w.wav", _noted_decode, str(marker), *job, lane="batch"))
        b2 = queue("b2", decoder.decode_path(str(song), TARGETS, lane="batch"))
        await _settle()
        interactive = queue("interactive", decoder.decode_path(str(song), TARGETS))  # the default lane
        await _settle()
        view = decoder.lanes_view()
        assert view["batch"]["depth"] == 3 and view["interactive"]["depth"] == 1 and view["batch"]["running"] == 1

        withdrawn.cancel()  # as a batch cancel cancels the run's tasks
        await _settle()
        assert withdrawn.cancelled() and decoder.lanes_view()["batch"]["depth"] == 2

        await asyncio.to_thread(lambda: open(fifo, "wb").close())  # release the worker
        results = await asyncio.gather(held, b1, b2, interactive)
        assert finished == ["interactive", "b1", "b2"]  # one worker: the order it was given the decodes
        assert all(r.duration_s == pytest.approx(0.5, abs=0.05) for r in results)
        assert not marker.exists()  # the withdrawn decode never reached a worker
        assert decoder.lanes_view()["batch"] == {"depth": 0, "oldest_wait_s": None, "running": 0}
    finally:
        decoder.close()


async def test_withdraw_answers_the_lanes_waiting_decodes_cancelled():
    from embedd.audio.lanes import DecodeLanes
    from embedd.errors import Code, EmbeddError

    lanes = DecodeLanes(workers=1, unadmitted=2)
    await lanes.start("batch")  # the one worker is busy
    waiting = [asyncio.ensure_future(lanes.start("batch")) for _ in range(3)]
    person = asyncio.ensure_future(lanes.start("interactive"))
    await asyncio.sleep(0)
    assert lanes.view()["batch"]["depth"] == 3
    assert lanes.withdraw("batch") == 3  # a paused job's decodes never reach a worker
    for task in waiting:
        with pytest.raises(EmbeddError) as info:
            await task
        assert info.value.code is Code.CANCELLED
    lanes.finished("batch")
    lanes.admitted()
    await person  # the person's decode takes the freed worker
    assert lanes.view()["batch"]["depth"] == 0 and lanes.running == 1

"""Admission: one bound on the work admitted, socket and HTTP alike, refused with ``overloaded`` before any work.

The daemon test runs the real server in this process (socket and HTTP
listeners, the real op table) with a decoder double that counts the decodes
started and holds them until the test lets go: the order of events, not
timing, shows that a refused request started nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import shutil

import aiohttp
import pytest

from embedd.admission import Admission, held_bytes
from embedd.client import Client
from embedd.errors import Code, EmbeddError
from embedd.ops import OPS
from embedd.ops.embed_file import EmbedFileArgs
from embedd.ops.search import SearchArgs
from embedd.protocol import Handler, NoArgs
from embedd.server import Server
from embedd.settings import build_settings

from tests.daemon import short_tmpdir

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


# --------------------------------------------------------------------------- the permits alone


def _table(started: list[str], release: asyncio.Event) -> dict[str, Handler]:
    async def work(args):
        started.append(type(args).__name__)
        await release.wait()
        return {"done": True}

    async def cheap(args):
        return {"cheap": True}

    return {
        "embed_file": Handler(work, admitted=True),
        "search": Handler(work, admitted=True),
        "status": Handler(cheap),
        "batch_progress": Handler(cheap),
        "ping": Handler(lambda args: {"pong": True}, inline=True),
    }


async def test_past_the_request_bound_a_request_is_refused_before_its_handler_runs() -> None:
    started: list[str] = []
    release = asyncio.Event()
    admission = Admission(max_requests=2, max_bytes=MiB)
    ops = admission.wrap(_table(started, release))
    running = [asyncio.ensure_future(ops["search"].fn(SearchArgs(model="muq", track_id=f"t{i}"))) for i in range(2)]
    await asyncio.sleep(0)
    assert len(started) == 2 and admission.view()["in_flight"] == 2
    with pytest.raises(EmbeddError) as err:
        await ops["search"].fn(SearchArgs(model="muq", track_id="t3"))
    assert err.value.code is Code.OVERLOADED and "max_inflight_requests" in err.value.message
    assert len(started) == 2  # refused before any work
    # cheap ops are never refused
    assert ops["ping"].fn(NoArgs()) == {"pong": True}
    assert await ops["status"].fn(NoArgs()) == {"cheap": True}
    assert await ops["batch_progress"].fn(NoArgs()) == {"cheap": True}
    release.set()
    await asyncio.gather(*running)
    assert admission.view() == {
        "in_flight": 0, "limit": 2, "bytes_held": 0, "bytes_limit": MiB, "overloaded_total": 1,
        "overloaded": {"requests": 1, "bytes": 0},
    }  # fmt: skip


async def test_past_the_byte_bound_an_upload_is_refused_and_one_oversized_upload_runs_alone() -> None:
    started: list[str] = []
    release = asyncio.Event()
    admission = Admission(max_requests=10, max_bytes=MiB)
    ops = admission.wrap(_table(started, release))

    def upload(nbytes: int) -> EmbedFileArgs:
        return EmbedFileArgs(data=b"\0" * nbytes, filename="x.wav")

    big = asyncio.ensure_future(ops["embed_file"].fn(upload(3 * MiB)))  # alone: admitted over the bound
    await asyncio.sleep(0)
    assert admission.view()["bytes_held"] == 3 * MiB
    with pytest.raises(EmbeddError) as err:
        await ops["embed_file"].fn(upload(1024))
    assert err.value.code is Code.OVERLOADED and "max_inflight_mb" in err.value.message
    # a request without data is still admitted: the byte bound is about bytes
    search = asyncio.ensure_future(ops["search"].fn(SearchArgs(model="muq", track_id="t1")))
    await asyncio.sleep(0)
    assert started == ["EmbedFileArgs", "SearchArgs"]
    release.set()
    await asyncio.gather(big, search)
    assert admission.view()["bytes_held"] == 0 and admission.view()["overloaded"] == {"requests": 0, "bytes": 1}


async def test_a_permit_is_given_back_when_the_request_fails_or_is_cancelled() -> None:
    admission = Admission(max_requests=1, max_bytes=MiB)
    gate = asyncio.Event()

    async def fails(args):
        raise EmbeddError(Code.NOT_FOUND, "no such track")

    async def waits(args):
        await gate.wait()

    ops = admission.wrap({"search": Handler(fails, admitted=True), "embed_text": Handler(waits, admitted=True)})
    with pytest.raises(EmbeddError):
        await ops["search"].fn(SearchArgs(model="muq", track_id="t"))
    task = asyncio.ensure_future(ops["embed_text"].fn(NoArgs()))
    await asyncio.sleep(0)
    assert admission.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert admission.in_flight == 0 and admission.bytes_held == 0


async def test_ops_run_inside_a_held_route_take_no_permit_of_their_own() -> None:
    admission = Admission(max_requests=1, max_bytes=MiB)
    calls = []

    async def search(args):
        calls.append(args.track_id)
        return {}

    ops = admission.wrap({"search": Handler(search, admitted=True)})
    with admission.hold("similar_artists"):  # the route's one permit: the limit is reached
        await asyncio.gather(*(ops["search"].fn(SearchArgs(model="muq", track_id=f"t{i}")) for i in range(3)))
        another_request = asyncio.create_task(
            ops["search"].fn(SearchArgs(model="muq", track_id="x")), context=contextvars.Context()
        )
        with pytest.raises(EmbeddError) as err:
            await another_request
        assert err.value.code is Code.OVERLOADED
    assert calls == ["t0", "t1", "t2"] and admission.in_flight == 0


def test_exempt_ops_are_the_cheap_and_the_operators() -> None:
    exempt = {name for name, op in OPS.items() if not op.admitted}
    assert {"ping", "status", "batch_progress", "batch_cancel", "batch_watch", "unload"} <= exempt
    assert {name for name, op in OPS.items() if op.admitted} == {"embed_file", "embed_text", "search", "recommend"}
    assert held_bytes(EmbedFileArgs(data=b"abc", filename="a.mp3")) == 3 and held_bytes(NoArgs()) == 0


# --------------------------------------------------------------------------- the daemon, socket and HTTP


class HeldDecoder:
    """Stands in for the AudioDecoder: counts decodes started and holds each until ``release``."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def decode_bytes(self, data, filename, targets, *, lane="interactive"):
        self.started += 1
        await self.release.wait()
        raise EmbeddError(Code.DECODE_ERROR, f"{filename}: held by the test, never decoded")

    async def decode_path(self, path, targets, *, lane="interactive"):
        return await self.decode_bytes(b"", path, targets, lane=lane)

    def lanes_view(self):
        return {}

    def close(self, *, wait: bool = True) -> None:
        pass


async def test_the_daemon_refuses_work_past_its_bound_over_socket_and_http_before_any_decode() -> None:
    root = short_tmpdir()
    settings = build_settings(
        {
            "socket": str(root / "s.sock"), "data_dir": str(root / "data"), "http": f"unix:{root / 'h.sock'}",
            "max_inflight_requests": 2, "max_inflight_mb": 1, "decode_workers": 1,
        }
    )  # fmt: skip
    server = Server(settings)
    server.loop = asyncio.get_running_loop()
    await server.startup()
    real_decoder, held = server.service.decoder, HeldDecoder()
    server.service.decoder = held  # type: ignore[assignment]
    try:
        client = await Client.connect(settings.socket)
        http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(root / "h.sock")))
        try:
            upload = {"data": b"\0" * (MiB // 2 + 1), "filename": "a.wav"}
            first = asyncio.ensure_future(client.call("embed_file", **upload))
            while held.started < 1:
                await asyncio.sleep(0.01)  # until the daemon has started the first decode

            # the bytes bound: a second half-MiB upload would hold more than 1 MiB
            with pytest.raises(EmbeddError) as err:
                await client.call("embed_file", **upload)
            assert err.value.code is Code.OVERLOADED and "max_inflight_mb" in err.value.message
            assert held.started == 1

            second = asyncio.ensure_future(client.call("embed_file", path=str(root / "b.wav")))
            while held.started < 2:
                await asyncio.sleep(0.01)
            # the request bound: two in progress; socket and HTTP share it
            with pytest.raises(EmbeddError) as err:
                await client.call("embed_file", path=str(root / "c.wav"))
            assert err.value.code is Code.OVERLOADED and "max_inflight_requests" in err.value.message
            async with http.post("http://embedd/v1/search", data=json.dumps({"model": "muq", "track_id": "t1"})) as r:
                assert r.status == 503 and (await r.json())["code"] == "overloaded"
            async with http.get("http://embedd/api/similar_tracks", params={"item_id": "t1"}) as r:
                assert r.status == 503 and "max_inflight_requests" in (await r.json())["error"]
            assert held.started == 2  # nothing refused ever reached the decoder

            # never refused: liveness, status, the job's controls
            assert (await client.call("ping"))["protocol"] == 1
            assert "models" in await client.call("status")
            assert "status" in await client.call("batch_progress")
            async with http.post("http://embedd/v1/status", data="{}") as r:
                assert r.status == 200
            assert server.admission.view()["in_flight"] == 2

            held.release.set()
            for request in (first, second):
                with pytest.raises(EmbeddError) as err:
                    await request
                assert err.value.code is Code.DECODE_ERROR
            view = server.admission.view()
            assert view["in_flight"] == 0 and view["bytes_held"] == 0 and view["overloaded_total"] == 4
        finally:
            await http.close()
            await client.close()
    finally:
        server.service.decoder = real_decoder
        await server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


async def test_the_refusal_quoted_in_the_operations_guide_is_the_codes_own() -> None:
    from tests.daemon import REPO

    admission = Admission(max_requests=64, max_bytes=256 * MiB)
    admission.in_flight = 64  # as if 64 requests were in progress
    ops = admission.wrap({"search": Handler(lambda args: None, admitted=True)})
    with pytest.raises(EmbeddError) as err:
        await ops["search"].fn(SearchArgs(model="muq", track_id="t"))
    guide = (REPO / "docs" / "operations.md").read_text()
    assert f"embedd: {err.value.code.value}: {err.value.message}\n" in guide

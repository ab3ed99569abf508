"""The executor thread and its model registry, in-process with a registry entry of the tests' own.

The real backends have their own tests (test_models.py); here a small numpy
model stands in so that timing-sensitive behaviour — lane priority, idle
unloading, overload, cancellation — can be driven exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Sequence

import numpy as np
import pytest

from embedd.errors import Code, EmbeddError
from embedd.executor import Executor, Lane, ModelRegistry
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec, TextEmbedding


class RecordingModel(EmbeddingModel):
    """Embeds by summing; records which thread did what, and can be made slow or broken."""

    info = CATALOG["muq"]
    events: list[tuple[str, str]]

    def __init__(self, spec: ModelSpec, *, delay_s: float = 0.0, fail_load: bool = False) -> None:
        super().__init__(spec)
        self.delay_s = delay_s
        self.fail_load = fail_load
        self.events = []
        self.loads = 0
        self.calls: list[int] = []  # how many tracks each embed_audio_many call received
        self.threads: set[str] = set()
        self.gate: threading.Event | None = None
        self.batch_gate: threading.Event | None = None  # holds only the batch lane's thread
        self.entered = 0  # calls that reached the model (and maybe wait at the gate)

    def _load(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_load:
            raise OSError("weights file is corrupt")
        self.loads += 1

    def _unload(self) -> None:
        self.threads.add(threading.current_thread().name)

    @property
    def dim(self) -> int:
        return 3

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        self.threads.add(threading.current_thread().name)
        self.entered += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.batch_gate is not None and threading.current_thread().name == "embedd-batch":
            self.batch_gate.wait(10)
        time.sleep(self.delay_s)
        self.calls.append(len(waveforms))
        out = []
        for w in waveforms:
            self.events.append(("audio", str(float(w.sum()))))
            v = np.array([w.sum(), w.size, 1.0], dtype=np.float32)
            out.append(AudioEmbedding(vector=v / np.linalg.norm(v), windows=1))
        return out

    def embed_text(self, text: str) -> TextEmbedding:
        self.threads.add(threading.current_thread().name)
        self.entered += 1
        if self.gate is not None:
            self.gate.wait(10)
        self.events.append(("text", text))
        v = np.ones(3, dtype=np.float32) / np.sqrt(3)
        return TextEmbedding(raw=v, vector=v)


SPEC = ModelSpec(source="test", device="cpu", precision="fp32", batch_size=4)


def make_executor(model: RecordingModel, *, idle_s: float = 60.0, preload=(), limits=None, idle_check_s=0.05,
                  clock=time.monotonic):
    def build(device: str) -> ModelRegistry:
        return ModelRegistry(
            {"muq": SPEC},
            idle_timeout_s={"muq": idle_s},
            preload=preload,
            factories={"muq": lambda spec: model},
            clock=clock,
        )

    return Executor(
        build,
        device="cpu",
        queue_limits=limits or {Lane.INTERACTIVE: 64, Lane.BATCH: 64},
        idle_check_s=idle_check_s,
    )


@pytest.fixture
async def running():
    started: list[Executor] = []

    def start(model: RecordingModel, **kw) -> Executor:
        ex = make_executor(model, **kw)
        ex.start()
        started.append(ex)
        return ex

    yield start
    for ex in started:
        await ex.stop()


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_model_code_runs_only_on_the_lane_threads(running):
    model = RecordingModel(SPEC)
    ex = running(model)
    await ex.embed_audio(Lane.INTERACTIVE, "muq", np.ones((1, 10), np.float32))
    await ex.embed_text(Lane.INTERACTIVE, "muq", "hello")
    await ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 10), np.float32))
    await ex.unload("muq")
    assert model.threads == {"embedd-interactive", "embedd-batch"}


class FakeClock:
    """The registry's clock, moved by the test: idle timers run out without real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_registry(model: RecordingModel, clock: FakeClock, *, idle_s: float, preload=()) -> ModelRegistry:
    return ModelRegistry(
        {"muq": SPEC}, idle_timeout_s={"muq": idle_s}, preload=preload, factories={"muq": lambda spec: model}, clock=clock
    )


async def test_lazy_load_idle_unload_and_reload(running):
    model = RecordingModel(SPEC)
    clock = FakeClock()
    ex = running(model, idle_s=30.0, clock=clock)
    assert ex.snapshot() == {} or not ex.snapshot()["muq"].loaded  # nothing loaded at start
    await ex.embed_text(Lane.INTERACTIVE, "muq", "a")
    assert model.loads == 1
    await wait_for(lambda: ex.snapshot()["muq"].loaded)
    clock.now += 30.0
    await wait_for(lambda: not ex.snapshot()["muq"].loaded)  # the executor's idle check unloaded it
    assert not model.loaded
    await ex.embed_text(Lane.INTERACTIVE, "muq", "b")  # next use loads it again
    assert model.loads == 2 and model.loaded


def test_use_renews_the_idle_timer():
    model = RecordingModel(SPEC)
    clock = FakeClock()
    registry = make_registry(model, clock, idle_s=30.0)
    registry.get("muq")
    for _ in range(4):  # 80 s of steady use, every 20 s: never idle for 30 s
        clock.now += 20.0
        assert registry.unload_idle() == []
        registry.get("muq")
    assert registry.snapshot()["muq"].idle_s == 0.0
    clock.now += 29.9
    assert registry.unload_idle() == [] and model.loaded
    clock.now += 0.1  # 30 s since the last use
    assert registry.unload_idle() == ["muq"] and not model.loaded
    assert model.loads == 1


def test_preloaded_model_never_expires():
    model = RecordingModel(SPEC)
    clock = FakeClock()
    registry = make_registry(model, clock, idle_s=0.1, preload=["muq"])
    registry.preload_all()
    assert model.loaded
    clock.now += 86_400.0
    assert registry.unload_idle() == []
    assert model.loaded and model.loads == 1
    assert registry.unload("muq")  # an explicit unload still works
    assert not model.loaded


async def test_unload_op_semantics(running):
    model = RecordingModel(SPEC)
    ex = running(model)
    assert await ex.unload() == []
    await ex.embed_text(Lane.INTERACTIVE, "muq", "x")
    assert await ex.unload() == ["muq"]
    assert await ex.unload("muq") == []


async def test_interactive_work_does_not_wait_for_the_batch_call_in_flight(running):
    model = RecordingModel(SPEC)
    model.batch_gate = threading.Event()  # hold the batch thread inside its call
    ex = running(model)
    first = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.full((1, 4), 100.0, np.float32)))
    await wait_for(lambda: model.entered == 1)  # taken by the batch thread, blocked on the gate
    batch = [
        asyncio.create_task(ex.call(Lane.BATCH, lambda r, i=i: r.get("muq").embed_text(f"batch-{i}")))
        for i in range(5)
    ]
    await wait_for(lambda: ex.queue_depths["batch"] == 5)
    # answered while the batch call is still held: the interactive lane has its own thread
    await ex.embed_text(Lane.INTERACTIVE, "muq", "person")
    assert not first.done() and ex.queue_depths["batch"] == 5
    model.batch_gate.set()
    await asyncio.gather(first, *batch)
    texts = [value for kind, value in model.events if kind == "text"]
    assert texts == ["person", *(f"batch-{i}" for i in range(5))]


class PassModel(RecordingModel):
    """Embeds through the real ``run_batched``: one forward pass per sample, each recorded."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.pass_gates: dict[int, threading.Event] = {}  # pass number -> held until set
        self.passes = 0

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        from embedd.models.runtime import run_batched

        import torch

        items = [torch.tensor([float(x)]) for w in waveforms for x in w.reshape(-1)]

        def forward(chunk):
            self.passes += 1
            number = self.passes
            self.events.append(("pass", str(number)))
            gate = self.pass_gates.get(number)
            if gate is not None:
                gate.wait(10)
            return torch.stack(list(chunk))

        rows = run_batched(items, forward, 1, model_name="muq")
        v = np.array([float(sum(r.item() for r in rows)), 1.0, 1.0], np.float32)
        return [AudioEmbedding(vector=v / np.linalg.norm(v), windows=len(rows))]


async def test_batch_yields_to_interactive_work_at_the_next_pass_boundary(running):
    model = PassModel(SPEC)
    model.pass_gates[1] = threading.Event()
    model.gate = None
    ex = running(model)
    job = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 3), np.float32)))
    await wait_for(lambda: model.passes == 1)  # batch pass 1 in flight, held
    assert ex.lanes_view()["lanes"]["batch"]["pass"]["model"] == "muq"
    model.gate = threading.Event()  # hold the person's request inside the model
    person = asyncio.create_task(ex.embed_text(Lane.INTERACTIVE, "muq", "person"))
    await wait_for(lambda: model.entered == 1)  # inside embed_text, held
    model.pass_gates[1].set()  # batch pass 1 ends while the person's request runs
    await wait_for(lambda: ex.lanes_view()["lanes"]["batch"]["yielding"] or model.passes > 1)
    assert model.passes == 1  # the batch waits at the pass boundary instead of starting pass 2
    model.gate.set()
    await asyncio.gather(person, job)
    assert [e for e in model.events if e[0] in ("pass", "text")] == [
        ("pass", "1"), ("text", "person"), ("pass", "2"), ("pass", "3"),
    ]
    recent = ex.lanes_view()["recent"]
    text_job = next(j for j in recent["jobs"] if j["kind"] == "text")
    later = [p for p in recent["passes"] if p["lane"] == "batch" and p["started_seq"] > text_job["queued_seq"]]
    assert later and all(p["started_seq"] > text_job["done_seq"] for p in later)


async def test_withdrawn_batch_work_stops_at_the_next_pass_boundary(running):
    model = PassModel(SPEC)
    model.pass_gates[1] = threading.Event()
    ex = running(model)
    job = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 5), np.float32)))
    await wait_for(lambda: model.passes == 1)  # pass 1 of 5 in flight, held
    waiting = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 2), np.float32)))
    await wait_for(lambda: ex.queue_depths["batch"] == 1)
    assert ex.withdraw(Lane.BATCH) == 2  # the queued job and the call in flight (a paused job)
    assert ex.queue_depths["batch"] == 0
    model.pass_gates[1].set()
    for task in (job, waiting):
        with pytest.raises(EmbeddError) as info:
            await task
        assert info.value.code is Code.CANCELLED
    assert model.passes == 1  # the call stopped at its next pass boundary; the queued one never ran
    await ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 1), np.float32))  # the lane serves again at once
    assert model.passes == 2


async def test_a_cancelled_batch_call_frees_the_lane_within_one_pass(running):
    model = PassModel(SPEC)
    model.pass_gates[1] = threading.Event()
    ex = running(model)
    job = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 50), np.float32)))
    await wait_for(lambda: model.passes == 1)
    job.cancel()  # the batch job was cancelled: nobody waits for this call
    await wait_for(lambda: job.done())
    model.pass_gates[1].set()
    await ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 1), np.float32))
    assert model.passes == 2  # pass 1 finished, the abandoned call stopped, the next job ran one pass
    assert ex.lanes_view()["lanes"]["batch"]["dropped"] >= 1


def test_pinned_and_running_models_are_never_unloaded():
    model = RecordingModel(SPEC)
    clock = FakeClock()
    registry = make_registry(model, clock, idle_s=30.0)
    registry.get("muq")
    registry.pin(["muq"])  # a running batch job uses it
    clock.now += 3600.0
    assert registry.unload_idle() == [] and model.loaded
    assert registry.unload("muq") is False and "batch job" in registry.busy_reason("muq")
    assert registry.snapshot()["muq"].pinned
    registry.unpin(["muq"])
    with registry.using("muq", "batch"):  # a pass in flight
        assert registry.snapshot()["muq"].state == "running"
        assert registry.snapshot()["muq"].running == ("batch",)
        assert registry.unload("muq") is False
    assert registry.unload_idle(queued=["muq"]) == []  # queued work counts as use
    clock.now += 30.0
    assert registry.unload_idle() == ["muq"] and not model.loaded


async def test_full_lane_answers_overloaded_at_once(running):
    model = RecordingModel(SPEC)
    model.gate = threading.Event()
    ex = running(model, limits={Lane.INTERACTIVE: 2, Lane.BATCH: 1})
    blocker = asyncio.create_task(ex.embed_text(Lane.INTERACTIVE, "muq", "running"))
    await wait_for(lambda: model.entered == 1)
    waiting = [asyncio.create_task(ex.embed_text(Lane.INTERACTIVE, "muq", f"w{i}")) for i in range(2)]
    await wait_for(lambda: ex.queue_depths["interactive"] == 2)
    with pytest.raises(EmbeddError) as info:  # at once: the running call is gated, waiting for it would hang
        await ex.embed_text(Lane.INTERACTIVE, "muq", "one too many")
    assert info.value.code is Code.OVERLOADED and not model.gate.is_set()
    assert "interactive" in info.value.message
    # the batch lane has its own bound
    queued_batch = asyncio.create_task(ex.embed_text(Lane.BATCH, "muq", "b0"))
    await wait_for(lambda: ex.queue_depths["batch"] == 1)
    with pytest.raises(EmbeddError) as info:
        await ex.embed_text(Lane.BATCH, "muq", "b1")
    assert info.value.code is Code.OVERLOADED
    model.gate.set()
    await asyncio.gather(blocker, queued_batch, *waiting)
    # with the queue drained, requests are accepted again
    await ex.embed_text(Lane.INTERACTIVE, "muq", "after")


async def test_cancelled_request_is_dropped_before_it_reaches_the_model(running):
    model = RecordingModel(SPEC)
    model.gate = threading.Event()
    ex = running(model)
    blocker = asyncio.create_task(ex.embed_text(Lane.INTERACTIVE, "muq", "running"))
    await wait_for(lambda: model.entered == 1)
    gone = asyncio.create_task(ex.embed_text(Lane.INTERACTIVE, "muq", "client-gone"))
    await wait_for(lambda: ex.queue_depths["interactive"] == 1)
    gone.cancel()
    await wait_for(lambda: ex.queue_depths["interactive"] == 0)
    model.gate.set()
    await blocker
    await ex.embed_text(Lane.INTERACTIVE, "muq", "later")
    assert [v for _, v in model.events] == ["running", "later"]


async def test_queued_audio_of_one_model_is_coalesced(running):
    model = RecordingModel(SPEC)
    model.gate = threading.Event()
    ex = running(model)
    first = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 8), np.float32)))
    await wait_for(lambda: model.entered == 1)
    rest = [
        asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.full((1, 8), float(i), np.float32)))
        for i in range(6)
    ]
    await wait_for(lambda: ex.queue_depths["batch"] == 6)
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    assert model.calls == [1, 6]  # the six queued tracks shared one call
    for i, result in enumerate(results[1:]):  # and each got its own answer back
        expected = np.array([8.0 * i, 8, 1], np.float32)
        np.testing.assert_allclose(result.vector, expected / np.linalg.norm(expected), rtol=1e-6)


async def test_failing_load_is_unavailable_and_the_executor_keeps_serving(running):
    model = RecordingModel(SPEC, fail_load=True)
    attempts = 0
    real_load = model._load

    def counting_load() -> None:
        nonlocal attempts
        attempts += 1
        real_load()

    model._load = counting_load  # type: ignore[method-assign]
    clock = FakeClock()
    ex = running(model, clock=clock)
    for _ in range(3):
        with pytest.raises(EmbeddError) as info:
            await ex.embed_text(Lane.INTERACTIVE, "muq", "x")
        assert info.value.code is Code.UNAVAILABLE
        assert "weights file is corrupt" in info.value.message and "muq" in info.value.message
    # one real attempt; the next requests were answered at once during the back-off
    assert attempts == 1
    assert "next load attempt in 30 s" in info.value.message
    assert ex.snapshot()["muq"].error
    clock.now += 31  # the back-off is over: one more attempt, which fails and doubles it
    with pytest.raises(EmbeddError):
        await ex.embed_text(Lane.INTERACTIVE, "muq", "x")
    assert attempts == 2
    clock.now += 31
    with pytest.raises(EmbeddError) as info:
        await ex.embed_text(Lane.INTERACTIVE, "muq", "x")
    assert attempts == 2 and "next load attempt in 29 s" in info.value.message
    model.fail_load = False
    await ex.unload("muq")  # the operator fixed the weights: `unload` clears the back-off
    await ex.embed_text(Lane.INTERACTIVE, "muq", "x")
    assert attempts == 3 and ex.snapshot()["muq"].error is None


async def test_backend_bug_is_internal_not_a_crash(running):
    model = RecordingModel(SPEC)
    ex = running(model)

    def broken(registry):
        raise ZeroDivisionError("oops")

    with pytest.raises(EmbeddError) as info:
        await ex.call(Lane.INTERACTIVE, broken)
    assert info.value.code is Code.INTERNAL and "ZeroDivisionError" in info.value.message
    await ex.embed_text(Lane.INTERACTIVE, "muq", "still alive")


async def test_stop_cancels_queued_work_and_unloads(running):
    model = RecordingModel(SPEC)
    model.gate = threading.Event()
    ex = running(model)
    model.gate = None
    await ex.embed_text(Lane.INTERACTIVE, "muq", "load it")
    model.gate = threading.Event()
    blocker = asyncio.create_task(ex.embed_text(Lane.INTERACTIVE, "muq", "running"))
    await wait_for(lambda: model.entered == 2)
    queued = asyncio.create_task(ex.embed_text(Lane.BATCH, "muq", "queued"))
    await wait_for(lambda: ex.queue_depths["batch"] == 1)
    stopping = asyncio.create_task(ex.stop())
    await wait_for(lambda: ex.queue_depths["batch"] == 0)  # stop() withdrew the queued job
    model.gate.set()
    await stopping
    with pytest.raises(EmbeddError) as info:
        await queued
    assert info.value.code is Code.CANCELLED
    assert not model.loaded
    with pytest.raises(EmbeddError) as info:
        await ex.embed_text(Lane.INTERACTIVE, "muq", "after stop")
    assert info.value.code is Code.CANCELLED
    assert (await blocker).vector.shape == (3,)  # the job that was running finished normally


async def test_lane_metrics_count_passes_and_drops(running):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from embedd.metrics import _lane_families

    model = PassModel(SPEC)
    ex = running(model)
    await ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 3), np.float32))
    model.pass_gates[4] = threading.Event()
    held = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 2), np.float32)))
    await wait_for(lambda: model.passes == 4)
    held.cancel()  # nobody waits: the call stops before its second pass
    model.pass_gates[4].set()
    await wait_for(lambda: ex.lanes_view()["lanes"]["batch"]["pass"] is None and ex.stats["batch"].dropped == 1)

    class Lanes(Collector):
        def collect(self):
            return _lane_families(ex)

    registry = CollectorRegistry()
    registry.register(Lanes())
    text = generate_latest(registry).decode()
    assert 'embedd_pass_duration_seconds_count{lane="batch",model="muq"} 4.0' in text, text
    assert 'embedd_queue_wait_seconds_count{lane="batch"} 2.0' in text, text
    assert 'embedd_jobs_dropped_total{lane="batch"} 1.0' in text, text
    assert 'embedd_queue_oldest_wait_seconds{lane="interactive"} 0.0' in text, text


class LayeredModel(RecordingModel):
    """One forward pass through three torch modules; the first can be held, each records that it ran."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        import torch

        self.ran: list[int] = []
        self.hold = threading.Event()
        self.inside = threading.Event()
        model = self

        class Layer(torch.nn.Module):
            def __init__(self, n: int) -> None:
                super().__init__()
                self.n = n

            def forward(self, x):
                model.ran.append(self.n)
                if self.n == 1:
                    model.inside.set()
                    model.hold.wait(10)
                return x + 1

        self.net = torch.nn.Sequential(Layer(1), Layer(2), Layer(3))

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        import torch

        from embedd.models.runtime import run_batched

        rows = run_batched([torch.zeros(3)], lambda chunk: self.net(torch.stack(list(chunk))), 1, model_name="muq")
        v = rows[0].numpy() + 1
        return [AudioEmbedding(vector=v / np.linalg.norm(v), windows=1) for _ in waveforms]


async def test_a_cancelled_pass_stops_between_its_layers(running):
    model = LayeredModel(SPEC)
    ex = running(model)
    job = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 4), np.float32)))
    await wait_for(model.inside.is_set)  # one item, one pass, inside its first layer
    job.cancel()
    await wait_for(job.done)
    model.hold.set()
    await wait_for(lambda: ex.lanes_view()["lanes"]["batch"]["pass"] is None)
    assert model.ran == [1]  # layers 2 and 3 of the abandoned pass never ran
    model.hold.set()
    await ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 4), np.float32))  # and the lane serves again
    assert model.ran == [1, 1, 2, 3]


async def test_a_cancel_during_a_load_never_marks_the_model_broken(running):
    model = LayeredModel(SPEC)

    def load_with_probe() -> None:  # like MERT's load: a probe forward pass
        import torch

        model.net(torch.zeros(1, 3))

    model._load = load_with_probe  # type: ignore[method-assign]
    ex = running(model)
    job = asyncio.create_task(ex.embed_audio(Lane.BATCH, "muq", np.ones((1, 4), np.float32)))
    await wait_for(model.inside.is_set)  # inside the load's probe pass
    job.cancel()
    await wait_for(job.done)
    model.hold.set()
    await ex.embed_text(Lane.INTERACTIVE, "muq", "after the cancel")  # loaded, not backed off
    assert model.loaded and ex.snapshot()["muq"].error is None
    assert model.ran[:3] == [1, 2, 3]  # the probe ran whole

"""The model executor: two lane threads that own every model, and the registry they share.

The event loop never runs model code. It submits a job and awaits a future.
Two threads take the jobs, one per kind of waiting:

- the **interactive** thread takes the *control* lane (unload, housekeeping)
  and the *interactive* lane (a person is waiting: a text search, a file
  embed, a recommendation);
- the **batch** thread takes the *batch* lane (the library job).

Why two threads and not one queue with priorities: one forward pass of a big
model on a small CPU takes seconds (a MERT 30 s window is 2.1 TFLOP), and a
priority queue only helps *between* passes. With a thread of its own, an
interactive request starts at once, beside the batch pass in flight; the batch
thread runs at a lower CPU priority (``nice``) and on at most ``batch_threads``
cores, so the kernel gives the person's request, and Navidrome's own streaming,
the CPU first. And the batch yields: before every forward pass (see
:mod:`embedd.models.passes`) it waits while interactive work is queued or
running, so a person's request is served before the batch's next pass, and the
batch lane's passes are sized by time (``pass_budget_s``) as well as memory.
Work nobody waits for any more (a cancelled or paused job, a client that went
away) is withdrawn from the queues at once and stops the call running it at
its next pass boundary.

Each lane is bounded: a full lane answers ``overloaded`` at once instead of
queueing without limit. Audio jobs for the same model and lane are coalesced:
a thread takes the first one plus whatever else is queued for that model and
runs them as one ``embed_audio_many`` call, so windows share forward passes.

The :class:`ModelRegistry` creates, loads and unloads the backends for both
threads. A model is loaded once (a per-model lock: the second thread waits for
the first one's load), used concurrently (the backends keep no per-call state
on the object), and never unloaded while a thread is inside it, while work for
it is queued, or while the running batch job uses it (``pin``). What the event
loop may see of it (``snapshot``) is plain data replaced wholesale.

Long because: the two lane threads, their scheduling between passes and the model
registry they share.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import enum
import gc
import itertools
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG, backend_class
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec, TextEmbedding
from embedd.models.passes import PassPolicy, running_on, stop_between_layers
from embedd.priority import lower_this_thread

__all__ = ["Executor", "Lane", "LaneSettings", "ModelRegistry", "ModelState", "resolve_device"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Most tracks (or samples) one coalesced audio call takes: enough to fill
#: forward batches, small enough that a cancel or pause loses little.
COALESCE_MAX_TRACKS = 16
COALESCE_MAX_SAMPLES = 24_000 * 60 * 20
#: A model that failed to load answers ``unavailable`` at once for this long, doubling per
#: failure up to the maximum; the ``unload`` op (or a restart) clears it.
LOAD_BACKOFF_S = 30.0
LOAD_BACKOFF_MAX_S = 600.0
#: Buckets of the queue-wait and pass-duration histograms, seconds.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Passes and jobs kept for ``status`` (``executor.recent``).
RECENT = 64


class Lane(enum.IntEnum):
    CONTROL = 0
    INTERACTIVE = 1
    BATCH = 2

    @property
    def label(self) -> str:
        return self.name.lower()


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'. Imports torch only when needed."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True, slots=True)
class LaneSettings:
    """How the batch lane shares the host (the interactive lane always gets every core at normal priority).

    ``batch_threads``: compute threads of the batch lane (0: every core the daemon may use).
    ``batch_nice``: how much lower the batch lane's CPU priority is (0: the same; Linux nice, 0-19).
    ``pass_budget_s``: the most seconds one batch forward pass should take (0: sized by memory alone).
    """

    batch_threads: int = 0
    batch_nice: int = 10
    pass_budget_s: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class ModelState:
    """What the loop may know of one model, copied out of the registry."""

    loaded: bool
    idle_s: float | None
    dim: int | None
    error: str | None = None
    state: str = "unloaded"  # unloaded | loading | idle | running
    running: tuple[str, ...] = ()  # the lanes inside the model now
    pinned: bool = False  # a running batch job uses it: never idle-unloaded
    compiled: dict[str, Any] | None = None  # its compilation (models.compiled.CompiledForward.view), if compiled


ModelFactory = Callable[[ModelSpec], EmbeddingModel]


class ModelRegistry:
    """Creates, loads, idles out and hands out the backends, to both lane threads."""

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        *,
        idle_timeout_s: Mapping[str, float],
        preload: Sequence[str] = (),
        factories: Mapping[str, ModelFactory] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._specs = dict(specs)
        self._idle_timeout_s = dict(idle_timeout_s)
        self._preload = frozenset(preload)
        self._factories = dict(factories or {})
        self._clock = clock
        self._lock = threading.RLock()  # the dicts below
        # One load (or unload) at a time, whichever model: two loads at once would double the
        # load-time peak (MuQ-MuLan's is 6.3 GB), and a second thread wanting the same model waits.
        self._load_lock = threading.Lock()
        self._models: dict[str, EmbeddingModel] = {}
        self._last_used: dict[str, float] = {}
        self._dims: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}  # a model that failed to load is not retried before this
        self._backoff_s: dict[str, float] = {}
        self._loading: set[str] = set()
        self._inside: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in self._specs}
        self._pins: collections.Counter[str] = collections.Counter()
        self.interrupt = threading.Event()  # set at shutdown: running forward passes stop between batches
        #: Called when a model was loaded with a compilation due (embedd.models.compiled): the executor
        #: wakes its batch lane, whose chore that is.
        self.on_compile_due: Callable[[], None] = lambda: None

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def _instance(self, name: str) -> EmbeddingModel:
        with self._lock:
            model = self._models.get(name)
            if model is None:
                spec = self._specs.get(name)
                if spec is None:
                    raise EmbeddError(Code.BAD_REQUEST, f"there is no model {name!r}")
                factory = self._factories.get(name) or backend_class(name)
                model = self._models[name] = factory(spec)
                model.interrupt = self.interrupt
            return model

    def get(self, name: str) -> EmbeddingModel:
        """The loaded model, loading it first if needed; renews its idle timer."""
        model = self._instance(name)
        if not model.loaded:
            with self._load_lock:  # a second thread waits here for the first one's load
                if not model.loaded:
                    self._load(name, model)
        with self._lock:
            self._last_used[name] = self._clock()
        return model

    def _load(self, name: str, model: EmbeddingModel) -> None:
        retry_at = self._retry_at.get(name)
        if retry_at is not None and self._clock() < retry_at:
            raise EmbeddError(
                Code.UNAVAILABLE,
                f"{self._errors[name]} (next load attempt in {retry_at - self._clock():.0f} s)",
            )
        started = time.perf_counter()
        with self._lock:
            self._loading.add(name)
        try:
            with running_on(None):  # a load's own probe pass is no lane's work: never stopped midway
                model.load()
        except EmbeddError as exc:
            # Loading can cost tens of seconds of hub retries: fail fast for a while
            # instead of paying that on every request, and say so once in the log.
            with self._lock:
                delay = min(LOAD_BACKOFF_MAX_S, self._backoff_s.get(name, LOAD_BACKOFF_S / 2) * 2)
                self._backoff_s[name] = delay
                self._retry_at[name] = self._clock() + delay
                self._errors[name] = exc.message
            log.error("%s; next attempt in %.0f s at the earliest", exc.message, delay)
            raise
        finally:
            with self._lock:
                self._loading.discard(name)
        with self._lock:
            self._errors.pop(name, None)
            self._retry_at.pop(name, None)
            self._backoff_s.pop(name, None)
            self._dims[name] = model.dim
        log.info("loaded model %s from %s in %.1f s", name, model.spec.source, time.perf_counter() - started)
        if model.compile_due:
            self.on_compile_due()

    def compile_due(self) -> str | None:
        """A loaded model whose compilation is due, if any."""
        with self._lock:
            return next((n for n, m in self._models.items() if m.loaded and m.compile_due), None)

    def compile(self, name: str, lane: str) -> None:
        """Compile ``name`` on the calling thread if it is still loaded and due; held for ``lane`` meanwhile."""
        with self._lock:
            model = self._models.get(name)
            if model is None or not model.loaded or not model.compile_due:
                return
            self._inside[name][lane] += 1  # never unloaded under the compiler
        try:
            model.compile_now()
        finally:
            with self._lock:
                self._inside[name][lane] -= 1

    @contextlib.contextmanager
    def using(self, name: str, lane: str) -> Iterator[EmbeddingModel]:
        """The loaded model, held for ``lane`` while the body runs: it cannot be unloaded meanwhile."""
        self._instance(name)  # an unknown name is the caller's bad_request
        with self._lock:
            self._inside[name][lane] += 1  # before loading: a model being loaded for a lane is in use
        try:
            yield self.get(name)
        finally:
            with self._lock:
                self._inside[name][lane] -= 1
                self._last_used[name] = self._clock()  # idle counts from the end of the work

    def pin(self, names: Iterable[str]) -> None:
        """A running job uses these: never unload them for idleness until :meth:`unpin`."""
        with self._lock:
            self._pins.update(n for n in names if n in self._specs)

    def unpin(self, names: Iterable[str]) -> None:
        with self._lock:
            self._pins.subtract(n for n in names if n in self._specs)
            self._pins = +self._pins  # drop counts at zero

    def preload_all(self) -> None:
        for name in self._preload:
            try:
                self.get(name)
            except EmbeddError:
                pass  # logged by get(); status shows it

    def forget_failures(self, name: str | None = None) -> None:
        """Let the next request try loading again at once (the operator fixed the weights)."""
        with self._lock:
            for n in [name] if name else list(self._retry_at):
                self._retry_at.pop(n, None)
                self._backoff_s.pop(n, None)

    def busy_reason(self, name: str) -> str | None:
        """Why ``name`` must stay loaded now, or None."""
        with self._lock:
            lanes = sorted(lane for lane, n in self._inside.get(name, {}).items() if n > 0)
            if lanes:
                return f"model {name!r} is running {' and '.join(lanes)} work"
            if self._pins.get(name):
                return f"model {name!r} is used by the running batch job"
            return None

    def unload(self, name: str, *, wait: bool = True) -> bool:
        """Unload one model; False when it was not loaded or must stay (in use, pinned).

        ``wait=False`` (the idle timer): give up at once while another model loads,
        instead of holding the interactive thread for the length of that load.
        """
        if not self._load_lock.acquire(blocking=wait):
            return False
        try:
            with self._lock:  # the check and the unload as one step: no lane enters in between
                model = self._models.get(name)
                if model is None or not model.loaded:
                    return False
                reason = self.busy_reason(name)
                if reason is not None:
                    log.info("not unloading %s: %s", name, reason.removeprefix(f"model {name!r} "))
                    return False
                model.unload()
                self._last_used.pop(name, None)
        finally:
            self._load_lock.release()
        _release_memory()
        log.info("unloaded model %s", name)
        return True

    def unload_all(self) -> list[str]:
        return [name for name in list(self._models) if self.unload(name)]

    def unload_idle(self, queued: Iterable[str] = ()) -> list[str]:
        """Unload models idle past their timeout; a model with ``queued`` work counts as in use."""
        now = self._clock()
        waiting = set(queued)
        with self._lock:
            idle = [
                name
                for name, used in self._last_used.items()
                if name not in self._preload
                and name not in waiting
                and now - used >= self._idle_timeout_s.get(name, float("inf"))
            ]
        return [name for name in idle if self.unload(name, wait=False)]

    def describe(self, name: str) -> None:
        """Learn a model's stored dim without loading it (cheap config read), for status."""
        if name in self._dims:
            return
        try:
            dim = self._instance(name).expected_dim()
        except Exception as exc:  # status must keep working whatever a backend's config says
            log.debug("cannot describe %s: %s", name, exc)
            return
        if dim:
            with self._lock:
                self._dims[name] = dim

    def snapshot(self) -> dict[str, ModelState]:
        now = self._clock()
        states = {}
        with self._lock:
            for name in self._specs:
                model = self._models.get(name)
                loaded = bool(model and model.loaded)
                running = tuple(sorted(lane for lane, n in self._inside[name].items() if n > 0))
                used = self._last_used.get(name)
                if name in self._loading:
                    state = "loading"
                elif not loaded:
                    state = "unloaded"
                else:
                    state = "running" if running else "idle"
                states[name] = ModelState(
                    loaded=loaded,
                    idle_s=(now - used) if state == "idle" and used is not None else None,
                    dim=self._dims.get(name),
                    error=self._errors.get(name),
                    state=state,
                    running=running if loaded else (),
                    pinned=bool(self._pins.get(name)),
                    compiled=model.compile_view() if model is not None and loaded else None,
                )
        return states


def _release_memory() -> None:
    """Give freed model memory back: Python refs first, then the CUDA caching allocator."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Histogram:
    """Per-bucket counts and a sum; one writer (a lane thread), read at scrape time."""

    def __init__(self, buckets: Sequence[float] = WAIT_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


@dataclasses.dataclass(slots=True)
class LaneStats:
    """What one lane did, for ``/metrics``: written by its thread (and refusals by the loop)."""

    queue_wait: Histogram = dataclasses.field(default_factory=Histogram)
    pass_duration: dict[str, Histogram] = dataclasses.field(default_factory=dict)  # per model
    dropped: int = 0  # jobs withdrawn or stopped because nobody waited for them any more
    overloaded: int = 0  # jobs refused because the lane was full


_seq = itertools.count(1)  # one order for every event of the executor: what happened before what


@dataclasses.dataclass(eq=False, slots=True)
class _Job:
    lane: Lane
    future: asyncio.Future
    fn: Callable[[ModelRegistry], Any] | None = None
    model: str | None = None  # the model this job runs (audio and text jobs)
    waveform: np.ndarray | None = None  # set for coalescable audio work
    kind: str = "call"
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    queued_seq: int = dataclasses.field(default_factory=lambda: next(_seq))
    started_seq: int | None = None
    abandoned: bool = False  # nobody waits for the answer any more


@dataclasses.dataclass(slots=True)
class _Pass:
    """One forward pass, from its start (in flight) to its end."""

    lane: str
    model: str
    items: int
    started_at: float
    started_seq: int
    ended_seq: int | None = None
    seconds: float | None = None

    def to_wire(self, now: float) -> dict[str, Any]:
        return {
            "lane": self.lane,
            "model": self.model,
            "items": self.items,
            "age_s": round(now - self.started_at, 3) if self.ended_seq is None else None,
            "seconds": round(self.seconds, 3) if self.seconds is not None else None,
            "started_seq": self.started_seq,
            "ended_seq": self.ended_seq,
        }


class Executor:
    """The actor: jobs in through lanes, one reply future per job, two threads doing the work."""

    def __init__(
        self,
        registry_builder: Callable[[str], ModelRegistry],
        *,
        device: str,
        queue_limits: Mapping[Lane, int],
        idle_check_s: float = 5.0,
        lanes: LaneSettings = LaneSettings(),
    ) -> None:
        self._registry_builder = registry_builder
        self._requested_device = device
        self.device = device  # "auto" until the thread has resolved it
        self._limits = dict(queue_limits)
        self._idle_check_s = idle_check_s
        self.lanes = lanes
        self._queues: dict[Lane, collections.deque[_Job]] = {lane: collections.deque() for lane in Lane}
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._registry: ModelRegistry | None = None
        self._failed: str | None = None
        self._ready = threading.Event()  # set once the registry exists (or the start failed)
        self._described = threading.Event()  # set once the thread knows every model's dims
        self._pins: collections.Counter[str] = collections.Counter()  # models of the running batch job
        self._interactive_running = 0  # jobs the interactive thread is inside (guarded by _cond)
        self._running: dict[str, list[_Job]] = {}  # lane thread -> the jobs of the call it runs
        self._in_flight: dict[str, _Pass] = {}  # lane thread -> its pass in flight
        self._yielding: set[str] = set()  # lane threads waiting at a pass boundary for interactive work
        self._recent_passes: collections.deque[_Pass] = collections.deque(maxlen=RECENT)
        self._recent_jobs: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.stats: dict[str, LaneStats] = {"interactive": LaneStats(), "batch": LaneStats()}
        self.threads_of: dict[str, int] = {}  # lane thread -> compute threads it was given
        #: Seconds of audio embedded per model (requests and batch alike), for /metrics.
        self.audio_seconds: collections.Counter[str] = collections.Counter()

    # -- lifecycle (event loop side) -----------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("Executor.start() called twice")
        for name, target in (("embedd-interactive", self._run_interactive), ("embedd-batch", self._run_batch)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is queued, let the running jobs finish (their passes stop early), unload every model."""
        if self._registry is not None:
            self._registry.interrupt.set()
        with self._cond:
            self._stopping = True
            dropped = [job for queue in self._queues.values() for job in queue]
            for queue in self._queues.values():
                queue.clear()
            self._cond.notify_all()
        self._ready.set()
        for job in dropped:
            if not job.future.done():
                job.future.set_exception(EmbeddError(Code.CANCELLED, "the daemon is shutting down"))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))

    # -- views (event loop side) -------------------------------------------------
    @property
    def queue_depths(self) -> dict[str, int]:
        return {"interactive": len(self._queues[Lane.INTERACTIVE]), "batch": len(self._queues[Lane.BATCH])}

    def snapshot(self) -> dict[str, ModelState]:
        """Every model's state now, read from the registry (empty before the thread built it)."""
        registry = self._registry
        return registry.snapshot() if registry is not None else {}

    def model_dim(self, name: str) -> int:
        """The model's stored dim: from the loaded model or its config, else the catalogue's."""
        state = self.snapshot().get(name)
        return state.dim if state and state.dim else CATALOG[name].nominal_dim

    async def described(self, timeout: float = 30.0) -> None:
        """Wait (briefly, at start-up) until the thread has read every model's config."""
        if not self._described.is_set():
            await asyncio.to_thread(self._described.wait, timeout)

    def lanes_view(self) -> dict[str, Any]:
        """Per lane: queue depth, oldest wait, the pass in flight, threads and priority; recent passes."""
        now = time.monotonic()
        with self._cond:  # passes change under this lock: each is read whole
            queued = {lane: list(queue) for lane, queue in self._queues.items()}
            in_flight = {label: entry.to_wire(now) for label, entry in self._in_flight.items()}
            yielding = set(self._yielding)
            recent = [entry.to_wire(now) for entry in self._recent_passes]
            jobs = list(self._recent_jobs)
        view: dict[str, Any] = {}
        for label, lanes in (("interactive", (Lane.CONTROL, Lane.INTERACTIVE)), ("batch", (Lane.BATCH,))):
            waiting = [job for lane in lanes for job in queued[lane] if not job.abandoned]
            current = in_flight.get(label)
            view[label] = {
                "depth": len(waiting),
                "oldest_wait_s": round(now - min(j.queued_at for j in waiting), 3) if waiting else None,
                "pass": current,
                "yielding": label in yielding,  # waiting at a pass boundary for interactive work
                "threads": self.threads_of.get(label),
                "nice": self.lanes.batch_nice if label == "batch" else 0,
                "pass_budget_s": (self.lanes.pass_budget_s or None) if label == "batch" else None,
                "dropped": self.stats[label].dropped,
                "overloaded": self.stats[label].overloaded,
            }
        return {
            "lanes": view,
            "recent": {"passes": recent, "jobs": jobs},
            "seq": next(_seq),  # this view's place in the order of the events above
        }

    # -- submitting (event loop side) -------------------------------------------
    async def call(self, lane: Lane, fn: Callable[[ModelRegistry], T], *, model: str | None = None) -> T:
        """Run ``fn(registry)`` on the lane's thread and return its result.

        With ``model``, the model is held (loaded, never unloaded) while ``fn`` runs.
        """
        job = _Job(lane, asyncio.get_running_loop().create_future(), fn=fn, model=model)
        return await self._submit(job)

    async def embed_audio(
        self, lane: Lane, model: str, waveform: np.ndarray, seconds: float | None = None
    ) -> AudioEmbedding:
        """Embed one track; coalesced with other queued tracks of the same model.

        ``seconds``: the track's duration, for the audio-seconds metric (a model that
        takes the file's own rate, Music2Latent, gets samples at a rate only the
        decoder knows); without it, the samples at the model's catalogue rate.
        """
        job = _Job(lane, asyncio.get_running_loop().create_future(), model=model, waveform=waveform, kind="audio")
        embedding = await self._submit(job)
        self.audio_seconds[model] += seconds if seconds is not None else waveform.shape[-1] / CATALOG[model].sample_rate
        return embedding

    async def embed_text(self, lane: Lane, model: str, text: str) -> TextEmbedding:
        job = _Job(
            lane,
            asyncio.get_running_loop().create_future(),
            fn=lambda registry: registry.get(model).embed_text(text),
            model=model,
            kind="text",
        )
        return await self._submit(job)

    async def unload(self, name: str | None = None) -> list[str]:
        def _unload(registry: ModelRegistry) -> list[str]:
            registry.forget_failures(name)
            if name is None:
                return registry.unload_all()
            return [name] if registry.unload(name) else []

        return await self.call(Lane.CONTROL, _unload)

    def withdraw(self, lane: Lane) -> int:
        """Drop the lane's work (a paused job): queued jobs answer ``cancelled`` now, the call in
        flight stops at its next pass boundary. Event loop side; returns the jobs withdrawn."""
        with self._cond:
            queued = list(self._queues[lane])
            self._queues[lane].clear()
            label = "batch" if lane is Lane.BATCH else "interactive"
            running = [job for job in self._running.get(label, []) if job.lane is lane]
            for job in queued + running:
                job.abandoned = True
            self.stats[label].dropped += len(queued)
            self._cond.notify_all()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(EmbeddError(Code.CANCELLED, "the work was withdrawn (the batch job paused)"))
        return len(queued) + len(running)

    def busy_reason(self, name: str) -> str | None:
        """Why an unload of ``name`` would be refused now (for the ``unload`` op's answer)."""
        return self._registry.busy_reason(name) if self._registry is not None else None

    @contextlib.contextmanager
    def pinned(self, models: Iterable[str]) -> Iterator[None]:
        """While the body runs, ``models`` are never unloaded for idleness (a running job uses them)."""
        names = list(models)
        with self._cond:  # before the registry exists, the pins wait for it (_run_interactive)
            self._pins.update(names)
            if self._registry is not None:
                self._registry.pin(names)
        try:
            yield
        finally:
            with self._cond:
                self._pins.subtract(names)
                self._pins = +self._pins
                if self._registry is not None:
                    self._registry.unpin(names)

    async def _submit(self, job: _Job) -> Any:
        with self._cond:
            if self._failed:
                raise EmbeddError(Code.UNAVAILABLE, self._failed)
            if self._stopping:
                raise EmbeddError(Code.CANCELLED, "the daemon is shutting down")
            queue = self._queues[job.lane]
            limit = self._limits.get(job.lane)
            if limit is not None and len(queue) >= limit:
                self.stats["batch" if job.lane is Lane.BATCH else "interactive"].overloaded += 1
                raise EmbeddError(
                    Code.OVERLOADED,
                    f"the {job.lane.label} queue is full ({limit} waiting); retry later",
                )
            queue.append(job)
            self._cond.notify_all()
        try:
            return await job.future
        except asyncio.CancelledError:
            # Nobody waits any more: drop the job if it has not started; a running call
            # whose every job was abandoned stops at its next pass boundary.
            with self._cond:
                job.abandoned = True
                try:
                    self._queues[job.lane].remove(job)
                    self.stats["batch" if job.lane is Lane.BATCH else "interactive"].dropped += 1
                except ValueError:
                    pass
                self._cond.notify_all()
            raise

    # -- the threads --------------------------------------------------------------
    def _run_interactive(self) -> None:
        """Start-up (device, registry, dims, preload), then serve control and interactive work."""
        try:
            self.device = resolve_device(self._requested_device)
            if self.device == "cpu":
                self.threads_of["interactive"] = _set_compute_threads(0)
                log.info("interactive model work runs on %d CPU threads", self.threads_of["interactive"])
            stop_between_layers()
            registry = self._registry_builder(self.device)
            registry.on_compile_due = self._wake_batch
            with self._cond:
                registry.pin(self._pins.elements())
                self._registry = registry
            self._ready.set()
            for name in registry.names:
                registry.describe(name)
            self._described.set()
            registry.preload_all()
        except BaseException:
            log.exception("the executor could not start")
            self._fail_everything("the model executor could not start; see the daemon log")
            return
        finally:
            self._ready.set()
            self._described.set()
        policy = PassPolicy(
            lane="interactive",
            budget_s=None,
            before_pass=lambda model: self._before_pass("interactive", yield_to_interactive=False),
            started=lambda model, items: self._pass_started("interactive", model, items),
            ended=self._pass_ended,
            stopping=lambda: self._stopping_now("interactive"),
        )
        try:
            with running_on(policy):
                self._serve(registry, "interactive", (Lane.CONTROL, Lane.INTERACTIVE))
        except BaseException:  # a bug: say so, and fail what waits instead of leaving it hanging
            log.exception("the model executor stopped unexpectedly")
            self._fail_everything("the model executor stopped unexpectedly; see the daemon log")
        finally:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(timeout=5.0)  # the batch thread leaves its models first
            try:
                registry.unload_all()
            except Exception:
                log.exception("unloading the models at exit failed")

    def _run_batch(self) -> None:
        """Lower the thread's priority and cores, then serve the batch lane."""
        self._ready.wait()
        registry = self._registry
        if registry is None or self._failed:
            return
        lanes = self.lanes
        failed = lower_this_thread(lanes.batch_nice)  # its compute threads, made later, inherit it
        if failed:
            log.warning("cannot lower the batch lane's CPU priority: %s", failed)
        if self.device == "cpu":
            self.threads_of["batch"] = _set_compute_threads(lanes.batch_threads)
            log.info(
                "batch model work runs on %d CPU threads at nice %d, passes of about %s s",
                self.threads_of["batch"], lanes.batch_nice, lanes.pass_budget_s or "unbounded",
            )  # fmt: skip
        policy = PassPolicy(
            lane="batch",
            budget_s=lanes.pass_budget_s or None,
            before_pass=lambda model: self._before_pass("batch", yield_to_interactive=True),
            started=lambda model, items: self._pass_started("batch", model, items),
            ended=self._pass_ended,
            stopping=lambda: self._stopping_now("batch"),
        )
        try:
            with running_on(policy):
                self._serve(registry, "batch", (Lane.BATCH,))
        except BaseException:
            log.exception("the model executor's batch lane stopped unexpectedly")
            self._fail_everything("the model executor stopped unexpectedly; see the daemon log")

    def _interactive_busy(self) -> bool:
        """Interactive or control work queued or running (caller holds ``_cond``)."""
        if self._interactive_running:
            return True
        return any(not job.abandoned for lane in (Lane.CONTROL, Lane.INTERACTIVE) for job in self._queues[lane])

    def _wake_batch(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _serve(self, registry: ModelRegistry, label: str, lanes: tuple[Lane, ...]) -> None:
        interactive = label == "interactive"
        next_idle_check = time.monotonic() + self._idle_check_s
        while True:
            compile_due: str | None = None
            with self._cond:
                while not self._stopping:
                    # The batch lane's chores: its queue, and compiling a freshly loaded model (before
                    # the next batch job, which then runs compiled; see embedd.models.compiled).
                    compile_due = None if interactive else registry.compile_due()
                    if compile_due or any(self._queues[lane] for lane in lanes):
                        if interactive or not self._interactive_busy():
                            break  # the batch lane starts nothing while a person's work waits or runs
                    timeout = next_idle_check - time.monotonic() if interactive else None
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                batch = [] if compile_due else self._take(lanes)
                if batch:
                    self._running[label] = batch
                    if interactive:
                        self._interactive_running += 1
            if compile_due:
                registry.compile(compile_due, label)
            if batch:
                try:
                    self._execute(registry, label, batch)
                finally:
                    with self._cond:
                        self._running.pop(label, None)
                        if interactive:
                            self._interactive_running -= 1
                        self._cond.notify_all()
            if interactive and time.monotonic() >= next_idle_check:
                try:
                    registry.unload_idle(queued=self._queued_models())
                except Exception:  # e.g. a CUDA error while freeing: keep serving
                    log.exception("unloading idle models failed")
                next_idle_check = time.monotonic() + self._idle_check_s

    def _queued_models(self) -> set[str]:
        with self._cond:
            return {job.model for queue in self._queues.values() for job in queue if job.model}

    def _take(self, lanes: tuple[Lane, ...]) -> list[_Job]:
        """The next job by lane priority, plus queued audio jobs it can share a forward pass with.

        Caller holds ``_cond``.
        """
        for lane in lanes:
            queue = self._queues[lane]
            while queue:
                first = queue.popleft()
                if first.abandoned or first.future.done():  # cancelled while queued
                    continue
                batch = [first]
                if first.waveform is not None:
                    samples = first.waveform.shape[-1]
                    for job in list(queue):
                        if len(batch) >= COALESCE_MAX_TRACKS or samples >= COALESCE_MAX_SAMPLES:
                            break
                        if job.waveform is not None and job.model == first.model and not job.abandoned:
                            queue.remove(job)
                            batch.append(job)
                            samples += job.waveform.shape[-1]
                stats = self.stats["batch" if lane is Lane.BATCH else "interactive"]
                now = time.monotonic()
                seq = next(_seq)
                for job in batch:
                    job.started_seq = seq
                    stats.queue_wait.observe(now - job.queued_at)
                return batch
        return []

    # -- between passes (lane threads) ---------------------------------------------
    def _before_pass(self, label: str, *, yield_to_interactive: bool) -> None:
        """Stop a call nobody waits for; on the batch lane, wait while a person's work is queued or running."""
        with self._cond:
            if yield_to_interactive and self._interactive_busy():
                self._yielding.add(label)
                try:
                    while not self._stopping and self._interactive_busy():
                        self._cond.wait()
                finally:
                    self._yielding.discard(label)
            jobs = self._running.get(label)
        if jobs and all(job.abandoned for job in jobs):
            raise EmbeddError(Code.CANCELLED, "nobody waits for this work any more (cancelled)")

    def _stopping_now(self, label: str) -> bool:
        """Whether the lane's call should stop mid-pass: shutdown, or nobody waits for any of its jobs.

        Asked before every module of a forward pass: no lock (reads of a dict entry, a
        list and bools are atomic in CPython; a stale answer only delays the stop by a layer).
        """
        if self._stopping:
            return True
        jobs = self._running.get(label)
        return bool(jobs) and all(job.abandoned for job in jobs)

    def _pass_started(self, label: str, model: str, items: int) -> _Pass:
        entry = _Pass(label, model, items, time.monotonic(), next(_seq))
        with self._cond:
            self._in_flight[label] = entry
            self._recent_passes.append(entry)  # shown in flight, then with its end
        return entry

    def _pass_ended(self, token: object, seconds: float) -> None:
        entry = token if isinstance(token, _Pass) else None
        if entry is None:
            return
        with self._cond:
            entry.ended_seq, entry.seconds = next(_seq), seconds
        stats = self.stats[entry.lane]
        histogram = stats.pass_duration.get(entry.model)
        if histogram is None:
            histogram = stats.pass_duration[entry.model] = Histogram()
        histogram.observe(seconds)
        with self._cond:
            if self._in_flight.get(entry.lane) is entry:
                del self._in_flight[entry.lane]

    # -- running a job (lane threads) -----------------------------------------------
    def _execute(self, registry: ModelRegistry, label: str, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]]
        first = batch[0]
        try:
            if first.model is None:
                results = [first.fn(registry)]  # type: ignore[misc]
            else:
                with registry.using(first.model, label) as model:
                    if first.waveform is None:
                        results = [first.fn(registry)]  # type: ignore[misc]
                    else:
                        results = model.embed_audio_many([job.waveform for job in batch])  # type: ignore[misc]
                        if len(results) != len(batch):
                            raise RuntimeError(f"{model.name} returned {len(results)} embeddings for {len(batch)} tracks")
            outcomes = [(result, None) for result in results]
        except EmbeddError as exc:
            outcomes = [(None, exc)] * len(batch)
        except Exception as exc:  # a bug in a backend: say so, keep serving
            log.exception("executor job failed")
            err = EmbeddError(Code.INTERNAL, f"executor job failed: {type(exc).__name__}: {exc}")
            outcomes = [(None, err)] * len(batch)
        done_seq = next(_seq)
        with self._cond:
            if all(job.abandoned for job in batch) and any(exc is not None for _, exc in outcomes):
                self.stats[label].dropped += len(batch)  # stopped early: nobody waited for it
            for job in batch:
                self._recent_jobs.append({
                    "lane": job.lane.label, "kind": job.kind, "model": job.model,
                    "queued_seq": job.queued_seq, "started_seq": job.started_seq, "done_seq": done_seq,
                })  # fmt: skip
        for job, (result, exc) in zip(batch, outcomes, strict=True):
            self._resolve(job, result=result, exc=exc)

    def _resolve(self, job: _Job, *, result: Any = None, exc: BaseException | None = None) -> None:
        loop = job.future.get_loop()

        def _set() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

        try:
            loop.call_soon_threadsafe(_set)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _fail_everything(self, message: str) -> None:
        with self._cond:
            self._failed = message
            jobs = [job for queue in self._queues.values() for job in queue]
            for queue in self._queues.values():
                queue.clear()
            self._cond.notify_all()
        self._ready.set()
        for job in jobs:
            self._resolve(job, exc=EmbeddError(Code.UNAVAILABLE, message))


def _set_compute_threads(wanted: int) -> int:
    """Give this thread's torch work ``wanted`` CPU threads (0: all the daemon may use); returns how many.

    torch keeps the count per calling thread once the thread has touched
    torch (it initialises a thread's count lazily from the last value set in
    any thread), so each lane thread first touches it, then sets its own.
    """
    from embedd.models.runtime import available_cores

    import torch

    cores = available_cores()
    count = cores if wanted <= 0 else max(1, min(wanted, cores))
    torch.get_num_threads()
    torch.set_num_threads(count)
    return count

"""The GPU executor: one thread that owns every model, fed by two lanes.

The event loop never runs model code. It submits a job and awaits a future; the
executor thread takes jobs from the *control* lane (unload), then the
*interactive* lane (a person is waiting), then the *batch* lane, so a text query
overtakes whatever the re-embedding job has queued. Each lane is bounded: a full
lane answers ``overloaded`` at once instead of queueing without limit, and the
permit is held exactly while the job waits.

Audio jobs for the same model and lane are coalesced: the thread takes the
first one plus whatever else is queued for that model and runs them as one
``embed_audio_many`` call, so windows of concurrent requests share forward
passes.

The :class:`ModelRegistry` lives on the executor thread too: it creates, loads
and unloads the backends, and unloads each one after its idle timeout from that
same thread, so no lock ever guards a model object. What the event loop may see
of it (``snapshot``) is plain data replaced wholesale.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import gc
import logging
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG, backend_class
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec, TextEmbedding

__all__ = ["Executor", "Lane", "ModelRegistry", "ModelState", "resolve_device"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Most tracks (or samples) one coalesced audio call takes: enough to fill
#: forward batches, small enough that an interactive job never waits long.
COALESCE_MAX_TRACKS = 16
COALESCE_MAX_SAMPLES = 24_000 * 60 * 20
#: A model that failed to load answers ``unavailable`` at once for this long, doubling per
#: failure up to the maximum; the ``unload`` op (or a restart) clears it.
LOAD_BACKOFF_S = 30.0
LOAD_BACKOFF_MAX_S = 600.0


class Lane(enum.IntEnum):
    CONTROL = 0
    INTERACTIVE = 1
    BATCH = 2


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'. Imports torch only when needed."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelState:
    """What the loop may know of one model, copied out of the executor thread."""

    loaded: bool
    idle_s: float | None
    dim: int | None
    error: str | None = None


ModelFactory = Callable[[ModelSpec], EmbeddingModel]


class ModelRegistry:
    """Creates, loads and idles out the backends. Executor thread only."""

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
        self._models: dict[str, EmbeddingModel] = {}
        self._last_used: dict[str, float] = {}
        self._dims: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}  # a model that failed to load is not retried before this
        self._backoff_s: dict[str, float] = {}
        self.interrupt = threading.Event()  # set at shutdown: running forward passes stop between batches

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def _instance(self, name: str) -> EmbeddingModel:
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
            retry_at = self._retry_at.get(name)
            if retry_at is not None and self._clock() < retry_at:
                raise EmbeddError(
                    Code.UNAVAILABLE,
                    f"{self._errors[name]} (next load attempt in {retry_at - self._clock():.0f} s)",
                )
            started = time.perf_counter()
            try:
                model.load()
            except EmbeddError as exc:
                # Loading can cost tens of seconds of hub retries: fail fast for a while
                # instead of paying that on every request, and say so once in the log.
                delay = min(LOAD_BACKOFF_MAX_S, self._backoff_s.get(name, LOAD_BACKOFF_S / 2) * 2)
                self._backoff_s[name] = delay
                self._retry_at[name] = self._clock() + delay
                self._errors[name] = exc.message
                log.error("%s; next attempt in %.0f s at the earliest", exc.message, delay)
                raise
            self._errors.pop(name, None)
            self._retry_at.pop(name, None)
            self._backoff_s.pop(name, None)
            self._dims[name] = model.dim
            log.info("loaded model %s from %s in %.1f s", name, model.spec.source, time.perf_counter() - started)
        self._last_used[name] = self._clock()
        return model

    def preload_all(self) -> None:
        for name in self._preload:
            try:
                self.get(name)
            except EmbeddError:
                pass  # logged by get(); status shows it

    def forget_failures(self, name: str | None = None) -> None:
        """Let the next request try loading again at once (the operator fixed the weights)."""
        for n in [name] if name else list(self._retry_at):
            self._retry_at.pop(n, None)
            self._backoff_s.pop(n, None)

    def unload(self, name: str) -> bool:
        model = self._models.get(name)
        if model is None or not model.loaded:
            return False
        model.unload()
        self._last_used.pop(name, None)
        _release_memory()
        log.info("unloaded model %s", name)
        return True

    def unload_all(self) -> list[str]:
        return [name for name in list(self._models) if self.unload(name)]

    def unload_idle(self) -> list[str]:
        now = self._clock()
        idle = [
            name
            for name, used in self._last_used.items()
            if name not in self._preload and now - used >= self._idle_timeout_s.get(name, float("inf"))
        ]
        return [name for name in idle if self.unload(name)]

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
            self._dims[name] = dim

    def snapshot(self) -> dict[str, ModelState]:
        now = self._clock()
        states = {}
        for name in self._specs:
            model = self._models.get(name)
            loaded = bool(model and model.loaded)
            used = self._last_used.get(name)
            states[name] = ModelState(
                loaded=loaded,
                idle_s=(now - used) if loaded and used is not None else None,
                dim=self._dims.get(name),
                error=self._errors.get(name),
            )
        return states


def _release_memory() -> None:
    """Give freed model memory back: Python refs first, then the CUDA caching allocator."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclasses.dataclass(eq=False, slots=True)
class _Job:
    lane: Lane
    future: asyncio.Future
    fn: Callable[[ModelRegistry], Any] | None = None
    # set for coalescable audio work: (model name, waveform)
    model: str | None = None
    waveform: np.ndarray | None = None


class Executor:
    """The actor: jobs in through lanes, one reply future per job."""

    def __init__(
        self,
        registry_builder: Callable[[str], ModelRegistry],
        *,
        device: str,
        queue_limits: Mapping[Lane, int],
        idle_check_s: float = 5.0,
    ) -> None:
        self._registry_builder = registry_builder
        self._requested_device = device
        self.device = device  # "auto" until the thread has resolved it
        self._limits = dict(queue_limits)
        self._idle_check_s = idle_check_s
        self._queues: dict[Lane, collections.deque[_Job]] = {lane: collections.deque() for lane in Lane}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._registry: ModelRegistry | None = None
        self._snapshot: dict[str, ModelState] = {}
        self._failed: str | None = None
        self._described = threading.Event()  # set once the thread knows every model's dims
        #: Seconds of audio embedded per model (requests and batch alike), for /metrics.
        self.audio_seconds: collections.Counter[str] = collections.Counter()

    # -- lifecycle (event loop side) -----------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Executor.start() called twice")
        self._thread = threading.Thread(target=self._run, name="embedd-executor", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is queued, let the running job finish, unload every model."""
        if self._registry is not None:
            self._registry.interrupt.set()
        with self._cond:
            self._stopping = True
            dropped = [job for queue in self._queues.values() for job in queue]
            for queue in self._queues.values():
                queue.clear()
            self._cond.notify_all()
        for job in dropped:
            if not job.future.done():
                job.future.set_exception(EmbeddError(Code.CANCELLED, "the daemon is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    @property
    def queue_depths(self) -> dict[str, int]:
        return {"interactive": len(self._queues[Lane.INTERACTIVE]), "batch": len(self._queues[Lane.BATCH])}

    def snapshot(self) -> dict[str, ModelState]:
        return self._snapshot

    def model_dim(self, name: str) -> int:
        """The model's stored dim: from the loaded model or its config, else the catalogue's."""
        state = self._snapshot.get(name)
        return state.dim if state and state.dim else CATALOG[name].nominal_dim

    async def described(self, timeout: float = 30.0) -> None:
        """Wait (briefly, at start-up) until the thread has read every model's config."""
        if not self._described.is_set():
            await asyncio.to_thread(self._described.wait, timeout)

    # -- submitting (event loop side) -------------------------------------------
    async def call(self, lane: Lane, fn: Callable[[ModelRegistry], T]) -> T:
        """Run ``fn(registry)`` on the executor thread and return its result."""
        return await self._submit(_Job(lane, asyncio.get_running_loop().create_future(), fn=fn))

    async def embed_audio(self, lane: Lane, model: str, waveform: np.ndarray) -> AudioEmbedding:
        """Embed one track; coalesced with other queued tracks of the same model."""
        job = _Job(lane, asyncio.get_running_loop().create_future(), model=model, waveform=waveform)
        embedding = await self._submit(job)
        self.audio_seconds[model] += waveform.shape[-1] / CATALOG[model].sample_rate
        return embedding

    async def embed_text(self, lane: Lane, model: str, text: str) -> TextEmbedding:
        return await self.call(lane, lambda registry: registry.get(model).embed_text(text))

    async def unload(self, name: str | None = None) -> list[str]:
        def _unload(registry: ModelRegistry) -> list[str]:
            registry.forget_failures(name)
            if name is None:
                return registry.unload_all()
            return [name] if registry.unload(name) else []

        return await self.call(Lane.CONTROL, _unload)

    async def _submit(self, job: _Job) -> Any:
        with self._cond:
            if self._failed:
                raise EmbeddError(Code.UNAVAILABLE, self._failed)
            if self._stopping:
                raise EmbeddError(Code.CANCELLED, "the daemon is shutting down")
            queue = self._queues[job.lane]
            limit = self._limits.get(job.lane)
            if limit is not None and len(queue) >= limit:
                raise EmbeddError(
                    Code.OVERLOADED,
                    f"the {job.lane.name.lower()} queue is full ({limit} waiting); retry later",
                )
            queue.append(job)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The client is gone: drop the job if it has not started. A running job
            # finishes on the thread; its result is discarded.
            with self._cond:
                try:
                    self._queues[job.lane].remove(job)
                except ValueError:
                    pass
            raise

    # -- the thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.device = resolve_device(self._requested_device)
            if self.device == "cpu":
                from embedd.models.runtime import use_available_cores

                log.info("models run on %d CPU threads", use_available_cores())
            registry = self._registry = self._registry_builder(self.device)
            for name in registry.names:
                registry.describe(name)
            self._snapshot = registry.snapshot()
            self._described.set()
            registry.preload_all()
        except BaseException:
            log.exception("the executor could not start")
            self._fail_everything("the model executor could not start; see the daemon log")
            return
        finally:
            self._described.set()
        self._snapshot = registry.snapshot()
        try:
            self._serve(registry)
        except BaseException:  # a bug: say so, and fail what waits instead of leaving it hanging
            log.exception("the model executor stopped unexpectedly")
            self._fail_everything("the model executor stopped unexpectedly; see the daemon log")
        finally:
            try:
                registry.unload_all()
            except Exception:
                log.exception("unloading the models at exit failed")
            self._snapshot = registry.snapshot()

    def _serve(self, registry: ModelRegistry) -> None:
        next_idle_check = time.monotonic() + self._idle_check_s
        while True:
            with self._cond:
                while not self._stopping and not any(self._queues.values()):
                    timeout = next_idle_check - time.monotonic()
                    if timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                batch = self._take()
            if batch:
                self._execute(registry, batch)
            if time.monotonic() >= next_idle_check:
                try:
                    registry.unload_idle()
                except Exception:  # e.g. a CUDA error while freeing: keep serving
                    log.exception("unloading idle models failed")
                next_idle_check = time.monotonic() + self._idle_check_s
            self._snapshot = registry.snapshot()

    def _take(self) -> list[_Job]:
        """The next job by lane priority, plus queued audio jobs it can share a forward pass with."""
        for lane in Lane:
            queue = self._queues[lane]
            while queue:
                first = queue.popleft()
                if first.future.done():  # cancelled while queued
                    continue
                if first.model is None:
                    return [first]
                batch = [first]
                samples = first.waveform.shape[-1]
                for job in list(queue):
                    if len(batch) >= COALESCE_MAX_TRACKS or samples >= COALESCE_MAX_SAMPLES:
                        break
                    if job.model == first.model and not job.future.done():
                        queue.remove(job)
                        batch.append(job)
                        samples += job.waveform.shape[-1]
                return batch
        return []

    def _execute(self, registry: ModelRegistry, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]]
        try:
            if batch[0].model is None:
                results = [batch[0].fn(registry)]
            else:
                model = registry.get(batch[0].model)
                results = model.embed_audio_many([job.waveform for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{model.name} returned {len(results)} embeddings for {len(batch)} tracks")
            outcomes = [(result, None) for result in results]
        except EmbeddError as exc:
            outcomes = [(None, exc)] * len(batch)
        except Exception as exc:  # a bug in a backend: say so, keep serving
            log.exception("executor job failed")
            err = EmbeddError(Code.INTERNAL, f"executor job failed: {type(exc).__name__}: {exc}")
            outcomes = [(None, err)] * len(batch)
        # Publish the registry's new state before anyone hears back, so a client that
        # asks for ``status`` right after its answer sees what its request did.
        self._snapshot = registry.snapshot()
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
        for job in jobs:
            self._resolve(job, exc=EmbeddError(Code.UNAVAILABLE, message))

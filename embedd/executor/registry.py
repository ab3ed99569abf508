"""The model registry: creates, loads, idles out, pins and hands out the backends to both lane threads.

A model is loaded once (one load at a time: the second thread waits for the
first one's load), used concurrently (the backends keep no per-call state on
the object), and never unloaded while a thread is inside it, while work for it
is queued, or while the running batch job uses it (``pin``). A model that
failed to load answers ``unavailable`` at once for a while instead of paying
the load's retries on every request. What the event loop may see of it
(:meth:`ModelRegistry.snapshot`) is plain data replaced wholesale. Its own
module because it has its own lock and knows nothing of lanes' queues.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from embedd.allocator import release_free_memory
from embedd.errors import Code, EmbeddError
from embedd.models import backend_class
from embedd.models.base import EmbeddingModel, ModelSpec
from embedd.models.passes import running_on

log = logging.getLogger("embedd.executor")  # the name the journal showed before the split

#: A model that failed to load answers ``unavailable`` at once for this long, doubling per
#: failure up to the maximum; the ``unload`` op (or a restart) clears it.
LOAD_BACKOFF_S = 30.0
LOAD_BACKOFF_MAX_S = 600.0


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
    """Give freed model memory back: Python refs first, then the process's allocator, then CUDA's cache."""
    gc.collect()
    release_free_memory()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""The service: every long-lived component of the daemon, built and stopped in order.

The server knows sockets; the service knows what the daemon *does*. It owns the
executor (models), the decoder pool (audio), the Milvus store and its I/O
thread, the Navidrome library and the batch job, and it is what the op handlers
talk to. Start-up order is the dependency order; shutdown is its reverse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

from embedd import __version__
from embedd.audio import AudioDecoder
from embedd.batch.pipeline import BatchManager
from embedd.errors import Code, EmbeddError, StartupError
from embedd.executor import Executor, Lane, ModelRegistry
from embedd.library import NavidromeLibrary
from embedd.lockfile import take_lock
from embedd.models import CATALOG, MODEL_NAMES
from embedd.models.base import ModelSpec
from embedd.settings import Settings
from embedd.store import VectorStore

__all__ = ["Service"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long ``status`` waits for Milvus to answer a ping before it reports it down.
MILVUS_PING_TIMEOUT_S = 2.0
#: A successful Milvus call this recent answers ``status`` without a ping.
MILVUS_OK_FRESH_S = 5.0


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = __version__
        self.started_monotonic = time.monotonic()
        self.executor = Executor(
            self._build_registry,
            device=settings.device,
            queue_limits={Lane.INTERACTIVE: settings.interactive_queue, Lane.BATCH: settings.batch_queue},
            idle_check_s=settings.idle_check_s,
        )
        self.library: NavidromeLibrary | None = (
            NavidromeLibrary(settings.navidrome_db, music_root=settings.music_root) if settings.navidrome_db else None
        )
        self.decoder: AudioDecoder | None = None
        self.store = VectorStore(settings.resolved_milvus_uri)
        # One thread owns the store: pymilvus clients are not shared across threads,
        # and Milvus calls block.
        self._store_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedd-store")
        self._store_ready: set[tuple[str, int, bool]] = set()  # prepare_store calls done (store thread only)
        self._data_lock: int | None = None
        self._store_ok_at = float("-inf")
        self._milvus_ping: asyncio.Future[bool] | None = None
        self.batch = BatchManager(self)

    def _build_registry(self, device: str) -> ModelRegistry:
        """Runs on the executor thread once the device is known."""
        s = self.settings
        specs = {
            name: ModelSpec(
                source=s.model_source(name),
                device=device,
                half=device.startswith("cuda"),
                batch_size=s.batch_size,
                cache_dir=str(s.model_cache_dir) if s.model_cache_dir else None,
            )
            for name in MODEL_NAMES
        }
        return ModelRegistry(
            specs,
            idle_timeout_s={name: s.idle_timeout_of(name) for name in MODEL_NAMES},
            preload=s.preload,
        )

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        try:
            s.data_dir.mkdir(parents=True, exist_ok=True)
            s.spool_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the data directory {str(s.data_dir)!r}: {exc.strerror}") from None
        self._lock_data_dir()
        self.executor.start()
        roots = await self._allowed_roots()
        log.info("embed_file may read below: %s", ", ".join(map(str, roots)))
        self.decoder = AudioDecoder(roots=roots, workers=s.decode_workers, max_audio_s=s.max_audio_s)
        await self.batch.start_up()  # resumes an interrupted batch job

    def _lock_data_dir(self) -> None:
        """One daemon per data directory: two would share one Milvus Lite file and one job state."""
        self._data_lock = take_lock(
            self.settings.data_dir / "embedd.lock",
            f"another embedd daemon is already using the data directory {str(self.settings.data_dir)!r}",
        )

    async def _allowed_roots(self) -> list[Path]:
        roots = [self.settings.spool_dir, *self.settings.allowed_roots]
        if self.settings.music_root:
            roots.append(self.settings.music_root)
        if self.library is not None:
            try:
                roots.extend(Path(p) for p in await self.library.music_roots())
            except EmbeddError as exc:
                log.warning("cannot read the library roots from Navidrome's database: %s", exc.message)
        return list(dict.fromkeys(roots))

    async def quiesce(self) -> None:
        """Stop taking new work that outlives a request (the batch job), keeping its state consistent."""
        await self.batch.quiesce()

    async def stop(self, timeout: float) -> None:
        """Stop everything within ``timeout``; a part that will not stop in time is left behind.

        The process exits right after (``cli.cmd_serve``), so a thread still inside
        torch or a Milvus call cannot hold the exit up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:
            return max(0.1, deadline - loop.time())

        await self.executor.stop(timeout=left() * 0.7)
        if self.decoder is not None:
            await asyncio.to_thread(self.decoder.close, wait=False)
        try:
            await asyncio.wait_for(loop.run_in_executor(self._store_thread, self.store.close), left())
        except asyncio.TimeoutError:
            log.warning("Milvus did not answer within the shutdown deadline; leaving its connection behind")
        self._store_thread.shutdown(wait=False)
        if self._data_lock is not None:
            os.close(self._data_lock)
            self._data_lock = None

    # -- the store ---------------------------------------------------------------
    async def store_io(self, fn: Callable[[VectorStore], T]) -> T:
        """Run ``fn(store)`` on the store's own thread."""
        result = await asyncio.get_running_loop().run_in_executor(self._store_thread, fn, self.store)
        self._store_ok_at = time.monotonic()  # any answer from Milvus says it is up
        return result

    def prepare_store(self, store: VectorStore, model: str, dim: int, *, any_dim: bool = False) -> None:
        """Make the model's collection usable for ``dim``-wide vectors (store thread; cached).

        ``any_dim``: open the live set whatever width it holds. A clear_existing job
        needs this when new weights changed the width (the old set stays live until
        the rebuild commits), and so does a search by stored track, which takes its
        query vector from that same set.
        """
        key = (model, dim, any_dim)
        if key not in self._store_ready:
            store.ensure(model, CATALOG[model].collection, dim, for_rebuild=any_dim)
            self._store_ready.add(key)

    async def milvus_ok(self) -> bool:
        """Whether Milvus answers: a recent successful call, else one shared ping.

        Pings queue on the store thread behind real work, so ``status`` under load
        would report a busy Milvus as down; recent success is the better witness,
        and concurrent ``status`` requests share one ping instead of queueing many.
        """
        if time.monotonic() - self._store_ok_at < MILVUS_OK_FRESH_S:
            return True
        if self._milvus_ping is None or self._milvus_ping.done():
            self._milvus_ping = asyncio.ensure_future(self._ping_milvus())
        return await asyncio.shield(self._milvus_ping)

    async def _ping_milvus(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            ok = await asyncio.wait_for(
                loop.run_in_executor(self._store_thread, self.store.ping), MILVUS_PING_TIMEOUT_S
            )
        except (asyncio.TimeoutError, EmbeddError):
            return False
        if ok:
            self._store_ok_at = time.monotonic()
        return bool(ok)

    # -- views ---------------------------------------------------------------------
    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def model_dim(self, name: str) -> int:
        """The model's stored dim: from the loaded model or its config, else the catalogue's."""
        state = self.executor.snapshot().get(name)
        return state.dim if state and state.dim else CATALOG[name].nominal_dim

    def models_view(self) -> dict[str, dict]:
        snapshot = self.executor.snapshot()
        view = {}
        for name, info in CATALOG.items():
            state = snapshot.get(name)
            view[name] = {
                "loaded": bool(state and state.loaded),
                "idle_s": state.idle_s if state else None,
                "dim": self.model_dim(name),
                "collection": info.collection,
                "text": info.text,
            }
        return view

    def status_line(self) -> str:
        loaded = [name for name, state in self.executor.snapshot().items() if state.loaded]
        batch = self.batch.status_line()
        return f"serving; models loaded: {', '.join(loaded) or 'none'}; batch: {batch}"

    def require_library(self) -> NavidromeLibrary:
        if self.library is None:
            raise EmbeddError(
                Code.UNAVAILABLE,
                "no Navidrome database is configured; set NAVIDROME_DB_PATH (or --navidrome-db)",
            )
        return self.library

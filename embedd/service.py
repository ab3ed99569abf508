"""The service: every long-lived component of the daemon, built and stopped in order.

The server knows sockets; the service knows what the daemon *does*. It builds the
executor (models), the decoder pool (audio), the store and its thread
(:class:`~embedd.store.io.StoreIO`), the Navidrome library and the batch job,
and hands each its collaborators; the op handlers talk to those. Start-up order is the dependency order; shutdown is its reverse.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from embedd import __version__
from embedd.admission import Admission
from embedd.audio import AudioDecoder
from embedd.batch.manager import BatchManager
from embedd.batch.watch import WATCH_FILE, LibraryWatcher, NavidromeProbe, Snapshot, WatchConfig, models_with_vectors
from embedd.cluster.client import RayCluster
from embedd.errors import EmbeddError, StartupError
from embedd.executor.build import build_executor
from embedd.library import NavidromeLibrary, require_library
from embedd.lockfile import take_lock
from embedd.models import CATALOG, MODEL_NAMES
from embedd.models.memory import MiB
from embedd.settings import Settings
from embedd.store import VectorStore
from embedd.store.index import VectorIndex, default_cache_bytes
from embedd.store.io import StoreIO

__all__ = ["Service"]

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = __version__
        self.started_monotonic = time.monotonic()
        self.executor = build_executor(settings)
        self.library: NavidromeLibrary | None = (
            NavidromeLibrary(settings.navidrome_db, music_root=settings.music_root) if settings.navidrome_db else None
        )
        self.decoder: AudioDecoder | None = None
        self.store_io = StoreIO(
            VectorStore(settings.resolved_milvus_uri), {name: info.collection for name, info in CATALOG.items()}
        )
        # The recommender's in-memory index: the write lane's store tells it of every write, the read lane searches it.
        cache_mb = settings.vector_cache_mb
        self.vector_index = VectorIndex(
            default_cache_bytes() if cache_mb is None else cache_mb * MiB,
            refresh_s=settings.vector_cache_refresh_s,
            graph_min_rows=settings.vector_graph_min_rows,
            graph_nice=settings.batch_nice,
        )
        self.store_io.store.index = self.store_io.reader.index = self.vector_index
        #: One bound on the work admitted, for the socket and HTTP alike (the server wraps its op table in it).
        self.admission = Admission.from_settings(settings)
        self._data_lock: int | None = None
        #: The library job's model work on a Ray cluster (``ray_address``); None: on this daemon's executor.
        self.cluster = RayCluster(settings) if settings.ray_address else None
        self.batch = BatchManager(
            settings, store_io=self.store_io, executor=self.executor, library=self.library, cluster=self.cluster
        )
        self.watch: LibraryWatcher | None = None  # the library watcher, once started (needs the library)

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
        self.decoder = AudioDecoder(
            roots=roots, workers=s.decode_workers, max_audio_s=s.max_audio_s, held_bytes=s.decoded_audio_mb * MiB
        )
        await self.batch.start_up(self.decoder)  # resumes an interrupted batch job
        self._start_watch()
        self.vector_index.start(self.store_io, self._model_dims)  # warms big collections, then refreshes

    async def _model_dims(self) -> dict[str, int]:
        await self.executor.described()
        dims = {name: self.executor.model_dim(name) for name in MODEL_NAMES}
        return {name: dim for name, dim in dims.items() if dim}

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

    def _start_watch(self) -> None:
        """The library watcher (automatic jobs), when there is a library; its view shows 'off' when disabled."""
        if self.library is None:
            return
        self.watch = LibraryWatcher(
            WatchConfig.from_settings(self.settings),
            probe=NavidromeProbe(self.library.db_path),
            snapshot=Snapshot(self.settings.data_dir / WATCH_FILE),
            jobs=self.batch,
            models_with_vectors=lambda: models_with_vectors(self.store_io, self._model_dims),
        )
        self.batch.watch_view = self.watch.view
        self.watch.start()

    def watch_view(self) -> dict | None:
        return self.watch.view() if self.watch is not None else None

    async def quiesce(self) -> None:
        """Stop taking new work that outlives a request (the batch job), keeping its state consistent."""
        if self.watch is not None:
            await self.watch.stop()
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

        await self.vector_index.stop()
        await self.executor.stop(timeout=left() * 0.7)
        if self.decoder is not None:
            await asyncio.to_thread(self.decoder.close, wait=False)
        await self.store_io.close(left())
        if self._data_lock is not None:
            os.close(self._data_lock)
            self._data_lock = None

    # -- views ---------------------------------------------------------------------
    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def models_view(self) -> dict[str, dict]:
        snapshot = self.executor.snapshot()
        view = {}
        for name, info in CATALOG.items():
            state = snapshot.get(name)
            view[name] = {
                "loaded": bool(state and state.loaded),
                "state": state.state if state else "unloaded",
                "running": list(state.running) if state else [],
                "pinned": bool(state and state.pinned),
                "idle_s": state.idle_s if state else None,
                "dim": self.executor.model_dim(name),
                "collection": info.collection,
                "text": info.text,
                "error": state.error if state else None,
                "compile": state.compiled if state else None,
            }
        return view

    def status_line(self) -> str:
        loaded = [name for name, state in self.executor.snapshot().items() if state.loaded]
        batch = self.batch.progress.status_line()
        return f"serving; models loaded: {', '.join(loaded) or 'none'}; batch: {batch}"

    def require_library(self) -> NavidromeLibrary:
        return require_library(self.library)

"""The daemon's decoder: a pool of worker processes, retried once when a worker dies.

A decoder crash on a hostile file then costs one worker, not the daemon, and
decoding never holds the GIL of the event loop or the GPU thread. Results come
back through :mod:`embedd.audio.shm` and are admitted against the budget of
decoded audio held (:mod:`embedd.audio.budget`) before a caller sees them.

Decodes come in two lanes (:mod:`embedd.audio.lanes`): a request's
(``embed_file``, interactive, the default) and the batch job's. The pool is
given no more decodes than it has workers; the rest wait in the daemon,
interactive ones first, and a waiting decode whose caller is cancelled never
reaches a worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import av

from embedd.audio import shm
from embedd.audio.budget import DEFAULT_HELD_BYTES, HeldAudioGate
from embedd.audio.lanes import INTERACTIVE, DecodeLane, DecodeLanes, check_lane
from embedd.audio.decode import decode_memory_into, decode_path_into
from embedd.audio.track import DEFAULT_MAX_AUDIO_S, DecodedAudio, Target, check_targets
from embedd.errors import Code, EmbeddError

__all__ = ["AudioDecoder", "job_bytes", "job_path"]

log = logging.getLogger("embedd.audio")  # the name the journal showed before the split


# ---- in the worker (module-level: the pool pickles them by name)


def _worker_init() -> None:
    from embedd.forkserver_guard import die_with_parent

    die_with_parent()  # and with it (the forkserver) when the daemon is killed
    # The daemon handles Ctrl-C and shuts the pool down; workers must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Errors reach the client as decode_error; ffmpeg's per-packet chatter is noise in the journal.
    av.logging.set_libav_level(av.logging.FATAL)


def job_path(path: str, roots: tuple[str, ...], targets: frozenset[Target], max_audio_s: float, owner_tag: str) -> DecodedAudio | shm.ShmResult:
    root_paths = [Path(r) for r in roots]
    return shm.run_in_worker(lambda alloc: decode_path_into(path, targets, max_audio_s, root_paths, alloc), owner_tag)


def job_bytes(data: bytes, filename: str, targets: frozenset[Target], max_audio_s: float, owner_tag: str) -> DecodedAudio | shm.ShmResult:
    return shm.run_in_worker(lambda alloc: decode_memory_into(data, filename, targets, max_audio_s, alloc), owner_tag)


# ---- in the daemon


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` on the loop, from any thread (a pool's callbacks); nothing once the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class _WorkerDied(EmbeddError):
    """A decoder worker process died under this request (it may not be this file's fault)."""


class AudioDecoder:
    """Decodes in a pool of worker processes; the daemon's only way to decode.

    ``forkserver`` (never plain ``fork``): the daemon runs threads, and forking
    a threaded process can copy a held lock into the child. A worker that dies
    (a decoder crash on a hostile file, the OOM killer) breaks the pool; the
    pool is replaced and the requests it took down get ``decode_error``, while
    later requests run normally.
    """

    def __init__(
        self,
        *,
        roots: Sequence[Path],
        workers: int | None = None,
        max_audio_s: float = DEFAULT_MAX_AUDIO_S,
        held_bytes: int = DEFAULT_HELD_BYTES,
        start_method: str = "forkserver",
    ) -> None:
        if start_method == "fork":
            raise ValueError("AudioDecoder refuses the 'fork' start method: the daemon is multi-threaded")
        self.roots = tuple(str(Path(r)) for r in roots)
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.max_audio_s = float(max_audio_s)
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":  # the forkserver dies with the daemon (see forkserver_guard)
            self._context.set_forkserver_preload(["embedd.forkserver_guard"])
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._closed = False
        self._retry_lock = asyncio.Lock()  # see _run
        self._held = HeldAudioGate(held_bytes)
        # One decode per worker in the pool, the rest waiting here by lane; decodes started
        # but not yet admitted to the held budget (their results wait in /dev/shm, memory
        # too) are bounded as well.
        self._lanes = DecodeLanes(self.workers, unadmitted=2 * self.workers)
        shm.sweep_stale()
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context, initializer=_worker_init
        )

    def _replace_pool(self, broken: concurrent.futures.ProcessPoolExecutor) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise EmbeddError(Code.CANCELLED, "The audio decoder has been shut down.")
            if self._pool is broken:
                self._pool = self._new_pool()
                broken.shutdown(wait=False, cancel_futures=True)
            return self._pool

    async def warm_up(self) -> None:
        """Start every worker now, so that the first requests do not pay for process start-up."""
        pool = self._pool
        await asyncio.gather(*(asyncio.wrap_future(pool.submit(os.getpid)) for _ in range(self.workers)))

    async def decode_path(self, path: str, targets: Iterable[Target], *, lane: DecodeLane = INTERACTIVE) -> DecodedAudio:
        """Check ``path`` against the roots and decode it in a worker.

        ``lane``: ``"interactive"`` (a request) or ``"batch"`` (the batch job): a
        worker that frees takes the oldest interactive decode before any batch one.
        """
        targets = check_targets(targets)
        return await self._run(path, job_path, str(path), self.roots, targets, self.max_audio_s, self._tag, lane=lane)

    async def decode_bytes(
        self, data: bytes, filename: str, targets: Iterable[Target], *, lane: DecodeLane = INTERACTIVE
    ) -> DecodedAudio:
        """Decode uploaded bytes in a worker, from memory (``lane`` as for :meth:`decode_path`)."""
        targets = check_targets(targets)
        return await self._run(filename, job_bytes, bytes(data), filename, targets, self.max_audio_s, self._tag, lane=lane)

    def withdraw(self, lane: DecodeLane) -> int:
        """Answer the lane's decodes still waiting for a worker ``cancelled`` (a paused job); how many."""
        return self._lanes.withdraw(check_lane(lane))

    def lanes_view(self) -> dict[str, dict[str, Any]]:
        """Per lane: decodes waiting for a worker (``depth``), the oldest one's wait, decodes in the workers."""
        return self._lanes.view()

    async def _run(self, display: str, fn: Callable[..., Any], *args: Any, lane: DecodeLane = INTERACTIVE) -> DecodedAudio:
        """Decode in a worker; retried once if a worker died.

        A dying worker breaks the whole pool, failing every request in flight, not
        just the one that killed it. The retry runs on a fresh pool, so innocent
        requests succeed and only a file that kills its worker twice is an error.
        """
        lane = check_lane(lane)
        try:
            return await self._run_once(lane, display, fn, *args)
        except _WorkerDied:
            log.warning("a decoder process died while decoding %r; retrying it once", display)
        # Retries run one at a time: the file that kills its worker does so again on
        # its retry, and must not take the other requests' retries down with it.
        async with self._retry_lock:
            try:
                return await self._run_once(lane, display, fn, *args)
            except _WorkerDied as exc:
                raise EmbeddError(Code.DECODE_ERROR, exc.message) from None

    @property
    def held_bytes(self) -> int:
        """Decoded audio handed out and not yet released."""
        return self._held.held

    async def _run_once(self, lane: DecodeLane, display: str, fn: Callable[..., Any], *args: Any) -> DecodedAudio:
        await self._lanes.start(lane)  # a cancel while waiting here withdraws the decode
        try:
            result = await self._submit(lane, display, fn, *args)
            nbytes = result.nbytes
            try:
                await self._held.acquire(nbytes)
            except BaseException:
                shm.discard(result)
                raise
        finally:
            self._lanes.admitted()
        release = self._held.releaser(nbytes, asyncio.get_running_loop())
        try:
            audio = shm.receive(result, release)
        except BaseException:
            release()
            raise
        weakref.finalize(audio, release)  # a caller that forgets release() still gives it back
        return audio

    async def _submit(self, lane: DecodeLane, display: str, fn: Callable[..., Any], *args: Any) -> DecodedAudio | shm.ShmResult:
        """Give the decode to the pool (a worker is free for it); the lane hears when the worker is done."""
        loop = asyncio.get_running_loop()
        try:
            if self._closed:
                raise EmbeddError(Code.CANCELLED, "The audio decoder has been shut down.")
            pool = self._pool
            try:
                cf = pool.submit(fn, *args)
            except BrokenProcessPool:
                pool = self._replace_pool(pool)
                cf = pool.submit(fn, *args)
            except RuntimeError:  # shut down under us
                raise EmbeddError(Code.CANCELLED, "The audio decoder has been shut down.") from None
        except BaseException:
            self._lanes.finished(lane)
            raise
        cf.add_done_callback(lambda _cf: _call_soon(loop, self._lanes.finished, lane))
        try:
            result = await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            cf.add_done_callback(shm.discard_orphan)
            raise
        except BrokenProcessPool:
            if not self._closed:
                self._replace_pool(pool)
            raise _WorkerDied(Code.DECODE_ERROR, f"The decoder process died while decoding '{display}'.") from None
        except concurrent.futures.CancelledError:
            raise EmbeddError(Code.CANCELLED, f"Decoding '{display}' was cancelled by shutdown.") from None
        return result

    def close(self, *, wait: bool = True) -> None:
        """Stop the workers; queued requests are cancelled, running ones finish if ``wait``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool = self._pool
        pool.shutdown(wait=wait, cancel_futures=True)
        if wait:  # results of requests cancelled mid-flight that nobody received
            shm.remove_owned(self._tag)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> AudioDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The daemon's side of a Ray cluster: the bridge process, tracks sent and answered, what it does when the cluster goes.

The daemon never imports Ray (:mod:`embedd.cluster.bridge` says why): it runs
the bridge as a child process while a batch job runs (:meth:`RayCluster.open`
at the job's start, :meth:`RayCluster.close` at its end) and hands it whole
tracks (:meth:`RayCluster.embed_track`). What stays here, on the daemon:

- **Retries and the crash-loop guard.** A track whose worker died is sent
  again, alone on a worker (nothing else in flight beside it); a track in
  flight on two workers that died is failed (``internal``, saying so) and not
  tried again by this job, as a track that takes the daemon down twice is
  (:mod:`embedd.batch.state`). Nothing else is lost: a track is only ever
  recorded by the job once its vectors are back and written.
- **A lost cluster.** The bridge exits when Ray loses the cluster (or cannot
  reach it); every track in flight is sent again once there is a cluster,
  without a strike. ``ray_fallback = wait`` (the default): the job waits,
  ``batch progress`` says why, and the bridge is started again every
  :data:`RETRY_S` seconds; ``local``: the job goes on in this process
  (:class:`ClusterFallback` tells the run) until it ends, and the next job tries
  the cluster again.
- **Pause and cancel.** :meth:`RayCluster.withdraw` cancels the tracks on the
  workers (their executors stop at the next pass boundary) and answers every
  waiting track ``cancelled``, as the in-process lanes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedd.audio.budget import HeldAudioGate
from embedd.cluster.wire import read_message, write_message
from embedd.errors import Code, EmbeddError
from embedd.settings import Settings

__all__ = ["ClusterFallback", "RayCluster", "TrackResult"]

log = logging.getLogger("embedd.cluster")

#: Seconds between tries to reach a lost cluster (``ray_fallback = wait``).
RETRY_S = 10.0
#: Seconds :meth:`RayCluster.open` waits for the bridge to say how many workers there are.
SETTLE_S = 60.0
#: The biggest file shipped to a worker (a 30-minute WAV at 96 kHz 24-bit stereo is about 1 GB).
MAX_SHIPPED_BYTES = 2**30


class ClusterFallback(Exception):
    """The cluster is unreachable and ``ray_fallback = local``: embed this track in the daemon."""


class TrackResult:
    __slots__ = ("errors", "seconds", "vectors")

    def __init__(self, vectors: dict[str, np.ndarray], errors: dict[str, EmbeddError], seconds: float) -> None:
        self.vectors, self.errors, self.seconds = vectors, errors, seconds


class RayCluster:
    """One bridge process at a time, while a job runs; its state and workers for ``status``."""

    def __init__(self, settings: Settings, *, on_waiting: Callable[[str | None], None] = lambda _why: None) -> None:
        self.settings = settings
        self.address = settings.ray_address
        self.on_waiting = on_waiting
        self.state = "closed"  # closed | connecting | up | down | fallback
        self.error: str | None = None
        self.down_since: float | None = None  # wall clock, for the view
        self.workers: list[dict[str, Any]] = []
        self.capacity = 2
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._retry: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._withdrawals = 0
        self._strikes: dict[str, list[str]] = {}
        self._open = False
        #: Encoded files read and not yet answered, within the decoded-audio budget.
        self._shipped = HeldAudioGate(settings.decoded_audio_mb * 2**20)

    # ---- lifecycle (the run's start and end)
    async def open(self) -> None:
        if self._open:
            return
        self._open = True
        self._strikes.clear()
        await self._spawn()
        # Until the bridge says up or down, nobody knows how many workers there are (the run sizes its
        # pipeline by them). ray.init and the resource count take seconds; a cluster that is slower
        # than SETTLE_S to answer is waited for by the tracks instead.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._settled(), SETTLE_S)

    async def _settled(self) -> None:
        while self.state == "connecting":
            await self._changed.wait()

    async def close(self) -> None:
        self._open = False
        if self._retry is not None:
            self._retry.cancel()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await write_message(proc.stdin, {"op": "stop"})
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), 30.0)
            except (OSError, asyncio.TimeoutError):
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._set_state("closed")
        self.on_waiting(None)

    async def _spawn(self) -> None:
        self._set_state("connecting")
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "embedd.cluster.bridge",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**16,
        )  # fmt: skip
        log.info("connecting to the Ray cluster at %s (bridge pid %d)", self.address, proc.pid)
        await write_message(proc.stdin, {"op": "start", "settings": self.settings})
        self._reader = asyncio.get_running_loop().create_task(self._read(proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        reason: str | None = None
        while (message := await read_message(proc.stdout)) is not None:
            op = message["op"]
            if op == "up":
                self.capacity = message["capacity"]
                self.workers = message["workers"]
                self.error = self.down_since = None
                self._set_state("up")
                self.on_waiting(None)
                log.info("the Ray cluster at %s is up: %d model workers", self.address, len(self.workers))
            elif op == "workers":
                self.workers = message["workers"]
            elif op == "down":
                reason = message["error"]
            elif (future := self._pending.pop(message.get("id", 0), None)) is not None and not future.done():
                future.set_result(message)
        code = await proc.wait()
        self._lost(reason or f"its Ray driver (the bridge process) exited with status {code}")

    def _lost(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_result({"op": "lost"})
        self._pending.clear()
        # The workers went with the bridge: at the job's end (closed) or with the cluster.
        self.workers = [dict(w, state="dead" if self._open else "stopped", in_flight=0) for w in self.workers]
        if not self._open:
            return
        self.error, self.down_since = reason, time.time()
        log.warning("the Ray cluster at %s is unreachable: %s", self.address, reason)
        if self.settings.ray_fallback == "local":
            self._set_state("fallback")
            return
        self._set_state("down")
        self.on_waiting(
            f"waiting for the Ray cluster at {self.address}: {reason}; trying again every {RETRY_S:.0f} s "
            "(ray_fallback = wait)"
        )
        self._retry = asyncio.get_running_loop().create_task(self._respawn())

    async def _respawn(self) -> None:
        await asyncio.sleep(RETRY_S)
        if self._open:
            await self._spawn()

    def _set_state(self, state: str) -> None:
        self.state = state
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- tracks
    async def embed_track(self, track_id: str, path: str, display: str, models: tuple[str, ...]) -> TrackResult:
        """Every model's vector (or error) for one track, from whichever worker is free.

        Raises :class:`ClusterFallback` (embed it in the daemon instead) and
        ``cancelled`` (the job paused or was cancelled: embedded again later).
        """
        if self.settings.ray_shared_paths:
            return await self._embed(track_id, path, display, models)
        try:
            size = await asyncio.to_thread(_size_of, path)
        except EmbeddError as exc:
            return TrackResult({}, {m: exc for m in models}, 0.0)
        await self._shipped.acquire(size)  # files in flight held within decoded_audio_mb, as decoded audio is
        try:
            data = await asyncio.to_thread(_read_file, path)
            return await self._embed(track_id, data, display, models)
        except EmbeddError as exc:
            if exc.code is Code.CANCELLED:
                raise
            return TrackResult({}, {m: exc for m in models}, 0.0)
        finally:
            self._shipped.releaser(size, asyncio.get_running_loop())()

    async def _embed(self, track_id: str, source: bytes | str, display: str, models: tuple[str, ...]) -> TrackResult:
        withdrawals = self._withdrawals
        while True:
            await self._usable(withdrawals)
            answer = await self._send_track(source, display, models, alone=track_id in self._strikes)
            op = answer["op"]
            if op == "result":
                return _result(answer["outcome"], answer["seconds"])
            if op == "cancelled":
                raise EmbeddError(Code.CANCELLED, "the batch job paused or was cancelled")
            if op == "died":
                deaths = self._strikes.setdefault(track_id, [])
                deaths.append(f"{answer['worker']}: {answer['error']}")
                if len(deaths) >= 2:
                    error = EmbeddError(
                        Code.INTERNAL,
                        f"{display} was in flight on two Ray model workers that died ({'; '.join(deaths)}); "
                        "this job does not try it again",
                    )
                    return TrackResult({}, {m: error for m in models}, 0.0)
            # "lost" (the cluster went away) or a first death: send it again once there is a worker

    async def _usable(self, withdrawals: int) -> None:
        while True:
            if self._withdrawals != withdrawals or self.state == "closed":
                raise EmbeddError(Code.CANCELLED, "the batch job paused or was cancelled")
            if self.state == "up":
                return
            if self.state == "fallback":
                raise ClusterFallback(self.error)
            await self._changed.wait()

    async def _send_track(self, source: bytes | str, display: str, models: tuple[str, ...], *, alone: bool) -> dict:
        proc = self._proc
        request_id = next(self._ids)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message = {"op": "embed", "id": request_id, "source": source, "display": display, "models": list(models), "alone": alone}
        try:
            if proc is None:
                raise ConnectionResetError("no bridge")
            await write_message(proc.stdin, message)
        except OSError:
            self._pending.pop(request_id, None)
            await asyncio.sleep(0)  # the reader sees the end of the bridge and says "lost"
            return {"op": "lost"}
        try:
            return await future
        finally:
            self._pending.pop(request_id, None)

    def withdraw(self) -> None:
        """Pause or cancel: tracks waiting for a worker or the cluster, and those on the workers, end ``cancelled``."""
        self._withdrawals += 1
        self._set_state(self.state)  # wakes the tracks waiting for the cluster
        proc = self._proc
        if proc is not None and proc.returncode is None:
            asyncio.get_running_loop().create_task(_quietly(write_message(proc.stdin, {"op": "cancel_all"})))

    # ---- views
    def view(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "state": self.state,
            "error": self.error,
            "down_since": self.down_since,
            "fallback": self.settings.ray_fallback,
            "workers": list(self.workers),
        }


def _size_of(path: str) -> int:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise EmbeddError(Code.DECODE_ERROR, f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_SHIPPED_BYTES:
        raise EmbeddError(
            Code.TOO_LARGE,
            f"{path} is {size} bytes, over the {MAX_SHIPPED_BYTES} bytes shipped to a Ray worker "
            "(set ray_shared_paths if the workers see the music)",
        )
    return size


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise EmbeddError(Code.DECODE_ERROR, f"cannot read {path}: {exc.strerror}") from None


def _result(outcome: dict[str, tuple], seconds: float) -> TrackResult:
    vectors: dict[str, np.ndarray] = {}
    errors: dict[str, EmbeddError] = {}
    for model, value in outcome.items():
        if value[0] == "ok":
            vectors[model] = np.frombuffer(value[1], dtype="<f4")
        else:
            errors[model] = EmbeddError(Code(value[1]), value[2])
    return TrackResult(vectors, errors, seconds)


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except OSError:
        pass

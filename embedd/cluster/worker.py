"""One model worker of a Ray cluster: embedd's own executor on one device, fed whole tracks.

A worker is a Ray actor (:mod:`embedd.cluster.bridge` creates it). It builds
the executor the daemon would build from the same settings
(:func:`embedd.executor.build.build_executor`: memory budget, precision,
bounded passes, compile), on its own device, and keeps its models loaded while
the job runs. It decodes each track with embedd's own decoder, where the
models are: the daemon ships the file's encoded bytes (a few MB, where the
decoded audio of every model's rate would be ten times that), or only its path
when the workers see the music at the same paths (``ray_shared_paths``).
Tracks in flight on one worker go through its batch lane together, so its
executor coalesces them into forward batches exactly as the daemon's does.

What comes back is plain data (no embedd class crosses the wire, so a worker's
result unpickles anywhere): per model ``("ok", float32 bytes)`` or
``("error", code, message)``, and the track's duration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from embedd import allocator
from embedd.audio import decode_bytes, decode_file
from embedd.embedding import decode_targets, embed_decoded
from embedd.errors import Code, EmbeddError
from embedd.executor import Lane
from embedd.executor.build import build_executor
from embedd.settings import Settings

__all__ = ["ModelWorker", "Outcome"]

log = logging.getLogger("embedd.cluster")

#: A track's result: per model ("ok", vector bytes) or ("error", code, message); and its seconds.
Outcome = tuple[dict[str, tuple], float]


class ModelWorker:
    """The actor's body (``ray.remote`` is applied by the bridge, so this module imports without Ray)."""

    def __init__(self, settings: Settings, device: str | None, name: str, threads: int = 0) -> None:
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if threads:  # the CPUs Ray gave this worker, not every core of its host (shared with other workers)
            settings = settings.model_copy(update={"batch_threads": threads})
        self.settings = settings
        self.name = name
        self.executor = build_executor(settings, device=device)
        self.executor.start()
        self.started = time.monotonic()

    async def ready(self) -> dict[str, Any]:
        """Where this worker runs, once its executor knows its device (models load at the first track)."""
        await self.executor.described()
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.executor.device,
            "allocator": allocator.running(),
        }

    async def embed(self, source: bytes | str, display: str, models: list[str]) -> Outcome:
        """Every model's vector of one track: ``source`` is the file's bytes, or its path (shared paths)."""
        targets = decode_targets(models)
        max_s = self.settings.max_audio_s
        try:
            if isinstance(source, str):
                audio = await asyncio.to_thread(decode_file, source, targets, max_audio_s=max_s)
            else:
                audio = await asyncio.to_thread(decode_bytes, source, display, targets, max_audio_s=max_s)
        except EmbeddError as exc:
            return {m: ("error", exc.code.value, exc.message) for m in models}, 0.0
        outcomes = await embed_decoded(audio, models, self._embed_one, return_exceptions=True)
        out: dict[str, tuple] = {}
        for model, result in outcomes.items():
            if isinstance(result, EmbeddError):
                out[model] = ("error", result.code.value, result.message)
            elif isinstance(result, BaseException):
                log.error("%s: %s failed on %s: %r", self.name, model, display, result)
                out[model] = ("error", Code.INTERNAL.value, f"{type(result).__name__}: {result}")
            else:
                out[model] = ("ok", result.vector.astype("<f4", copy=False).tobytes())
        return out, audio.duration_s

    async def _embed_one(self, model: str, wave: Any, seconds: float) -> Any:
        while True:
            try:
                return await self.executor.embed_audio(Lane.BATCH, model, wave, seconds)
            except EmbeddError as exc:
                if exc.code is not Code.OVERLOADED:
                    raise
            await asyncio.sleep(0.05)  # the lane is full: backpressure, not a failure

    async def stop(self) -> None:
        await self.executor.stop(timeout=10.0)

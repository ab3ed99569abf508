"""The service: every long-lived component of the daemon, built and stopped in order.

The server knows sockets; the service knows what the daemon *does*. It owns the
executor (models), and — as they land — the decoder pool, the Milvus store and
the batch job, and it is what the op handlers talk to.
"""

from __future__ import annotations

import logging
import time

from embedd import __version__
from embedd.executor import Executor, Lane, ModelRegistry
from embedd.models import CATALOG, MODEL_NAMES
from embedd.models.base import ModelSpec
from embedd.settings import Settings

__all__ = ["Service"]

log = logging.getLogger(__name__)


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
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.executor.start()

    async def quiesce(self) -> None:
        """Stop taking new work that outlives a request (the batch job), keeping its state consistent."""

    async def stop(self, timeout: float) -> None:
        await self.executor.stop(timeout=timeout)

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
                "idle_s": state.idle_s if state else None,
                "dim": (state.dim if state and state.dim else info.nominal_dim),
                "collection": info.collection,
                "text": info.text,
            }
        return view

    def status_line(self) -> str:
        loaded = [name for name, state in self.executor.snapshot().items() if state.loaded]
        return f"serving; models loaded: {', '.join(loaded) or 'none'}; batch: idle"

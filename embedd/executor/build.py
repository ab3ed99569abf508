"""The executor a set of settings asks for: the daemon's, and each Ray model worker's.

One place builds it so that a model worker on another host runs the models
exactly as the daemon would (the same memory budget, precision, bounded
passes, compile setting, hop and chunk overrides): its vectors are the
daemon's vectors (:mod:`embedd.cluster`).
"""

from __future__ import annotations

import logging

from embedd.executor.core import Executor
from embedd.executor.lanes import Lane, LaneSettings
from embedd.executor.registry import ModelRegistry
from embedd.models import MODEL_NAMES
from embedd.models.base import ModelSpec
from embedd.models.memory import MiB, default_budget_bytes
from embedd.models.precision import resolve_precision
from embedd.settings import Settings

__all__ = ["build_executor", "build_registry"]

log = logging.getLogger("embedd.executor")


def build_executor(settings: Settings, *, device: str | None = None) -> Executor:
    """An executor (not started) for ``settings``; ``device`` overrides ``settings.device`` (a Ray worker's GPU)."""
    return Executor(
        lambda resolved: build_registry(settings, resolved),
        device=device or settings.device,
        queue_limits={Lane.INTERACTIVE: settings.interactive_queue, Lane.BATCH: settings.batch_queue},
        idle_check_s=settings.idle_check_s,
        lanes=LaneSettings(
            batch_threads=settings.batch_threads,
            batch_nice=settings.batch_nice,
            pass_budget_s=settings.pass_budget_s,
        ),
    )


def build_registry(s: Settings, device: str) -> ModelRegistry:
    """The models for ``device``; the executor calls it on its thread once the device is known."""
    budget = s.memory_budget_mb * MiB if s.memory_budget_mb else default_budget_bytes(device)
    precision = resolve_precision(s.precision, device)
    log.info("models run on %s in %s with a %d MiB activation budget", device, precision, budget // MiB)
    from embedd.models.compiled import compile_mode, use_cache_dir  # torch: on the executor thread only

    compiled = {name: compile_mode(s.compile, name, device) for name in MODEL_NAMES}
    if any(mode != "off" for mode in compiled.values()):
        cache = use_cache_dir(s.data_dir / "compile-cache")
        wanted = ", ".join(f"{n} ({mode})" for n, mode in compiled.items() if mode != "off")
        log.info("compiling %s in the background on the batch lane (cache %s)", wanted, cache)
    specs = {
        name: ModelSpec(
            source=s.model_source(name),
            device=device,
            precision=precision,
            batch_size=s.batch_size,
            cache_dir=str(s.model_cache_dir) if s.model_cache_dir else None,
            memory_budget=budget,
            hop_s=s.hop_override(name),
            chunk_s=s.chunk_override(name),
            quantize=s.quantize,
            compile=compiled[name],
        )
        for name in MODEL_NAMES
    }
    return ModelRegistry(
        specs,
        idle_timeout_s={name: s.idle_timeout_of(name) for name in MODEL_NAMES},
        preload=s.preload,
    )

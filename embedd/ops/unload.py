"""``unload``: free a model's memory now (the idle timer does it on its own later)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedd.models import CATALOG
from embedd.ops.op import Op, Result
from embedd.protocol import Args, ModelName

if TYPE_CHECKING:
    from embedd.service import Service


class UnloadArgs(Args):
    model: ModelName | None = None  # None: every model


class UnloadResult(Result):
    unloaded: list[str]
    kept: dict[str, str]  # a loaded model left alone, and why (a lane runs work in it, the batch job uses it)


async def unload(service: Service, args: UnloadArgs) -> UnloadResult:
    """Unload one model, or every idle one; models in use are kept, each with the reason."""
    executor = service.executor
    unloaded = await executor.unload(args.model)
    names = [args.model] if args.model else list(CATALOG)
    loaded = {name for name, state in executor.snapshot().items() if state.loaded}
    kept = {name: reason for name in names if name in loaded and (reason := executor.busy_reason(name))}
    return UnloadResult(unloaded=list(unloaded), kept=kept)


OPS = (Op("unload", UnloadArgs, UnloadResult, unload),)

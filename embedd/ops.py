"""The op handlers: what each request of protocol v1 does.

A handler receives arguments already validated by :mod:`embedd.protocol` and
returns the result map (or raises :class:`~embedd.errors.EmbeddError`). Cheap
handlers that never wait are marked ``inline`` and answered without a task;
streaming handlers are async generators of ``(result, more)`` pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from embedd import PROTOCOL_VERSION
from embedd.errors import Code, EmbeddError
from embedd.protocol import OP_SCHEMAS, NoArgs, UnloadArgs
from embedd.service import Service

__all__ = ["Handler", "build_handlers"]


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    fn: Callable[[Any], Any]
    inline: bool = False  # synchronous and instant: answered without a task
    streaming: bool = False  # an async generator of (result, more)


def build_handlers(service: Service) -> dict[str, Handler]:
    def ping(_: NoArgs) -> dict:
        return {"version": service.version, "protocol": PROTOCOL_VERSION, "uptime_s": service.uptime_s}

    async def status(_: NoArgs) -> dict:
        return {
            "version": service.version,
            "device": service.executor.device,
            "models": service.models_view(),
            "batch": None,
            "queue": service.executor.queue_depths,
            "milvus": {"uri": service.settings.resolved_milvus_uri, "ok": False},
        }

    async def unload(args: UnloadArgs) -> dict:
        return {"unloaded": await service.executor.unload(args.model)}

    handlers = {
        "ping": Handler(ping, inline=True),
        "status": Handler(status),
        "unload": Handler(unload),
    }
    for op, schema in OP_SCHEMAS.items():
        handlers.setdefault(op, _not_built_yet(op, streaming=schema.streaming))
    return handlers


def _not_built_yet(op: str, *, streaming: bool) -> Handler:
    async def handler(_: Any) -> dict:
        raise EmbeddError(Code.UNAVAILABLE, f"op {op!r} is not available in this build of embedd yet")

    return Handler(handler)

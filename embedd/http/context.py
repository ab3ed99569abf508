"""What every HTTP route works with, and the one way a route runs an op.

``call`` is the HTTP twin of the socket connection's dispatch: the same
``parse_request`` validates the arguments and the same op table runs them.
Routes that answer one op (``/v1/<op>``, the original REST API) use the
counted table, so their requests show in ``embedd_requests_total`` exactly
like socket requests; the similarity routes, which run several ops per
request, use the raw table and are counted once, under their own name.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from embedd.admission import Admission
from embedd.errors import EmbeddError, Misuse
from embedd.metrics import Metrics
from embedd.ops import parse_request
from embedd.protocol import Handler, Request
from embedd.service import Service
from embedd.settings import Settings

__all__ = ["HttpContext"]


@dataclasses.dataclass(eq=False)
class HttpContext:
    settings: Settings
    service: Service
    handlers: dict[str, Handler]  # counted: what clients reach
    ops: dict[str, Handler]  # the same handlers, uncounted: for routes that count themselves
    metrics: Metrics
    admission: Admission | None = None  # the ops are admitted; a route running several ops holds one permit
    streams: set[asyncio.Task] = dataclasses.field(default_factory=set)  # open NDJSON streams
    stopping: bool = False

    def parse(self, op: str, fields: dict[str, Any], *, counted: bool = True) -> Request:
        """Validate ``fields`` as the arguments of ``op`` (bad_request / unknown_op otherwise)."""
        try:
            return parse_request({**fields, "op": op})
        except EmbeddError as exc:
            if counted:
                self.metrics.rejected(op, exc.code.value)
            raise

    async def call(self, op: str, fields: dict[str, Any], *, counted: bool = True) -> dict[str, Any]:
        """Run a non-streaming op with ``fields`` as its arguments; its result map."""
        request = self.parse(op, fields, counted=counted)
        handler = (self.handlers if counted else self.ops)[request.op]
        if handler.streaming:
            raise Misuse(f"{op} streams: call its handler directly, HttpContext.call() collects one result")
        if handler.inline:
            return handler.fn(request.args)
        return await handler.fn(request.args)

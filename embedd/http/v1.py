"""``POST /v1/<op>``: every socket op over HTTP, same arguments, same result.

The body is the op's argument map as JSON; the answer is the op's result map
as JSON (vectors as arrays of floats). ``batch_watch``, the one streaming op,
answers NDJSON: one ``{"result": ..., "more": ...}`` line per frame the socket
would send.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from embedd.errors import Code, EmbeddError, Misuse
from embedd.http.context import HttpContext
from embedd.http.responses import decode_object, encode, json_response

__all__ = ["routes"]


def routes(ctx: HttpContext) -> list[web.RouteDef]:
    async def op_route(request: web.Request) -> web.StreamResponse:
        op = request.match_info["op"]
        fields = decode_object(await request.read())
        for reserved in ("op", "id"):
            if reserved in fields:
                ctx.metrics.rejected(op, Code.BAD_REQUEST.value)
                raise EmbeddError(
                    Code.BAD_REQUEST, f"{op}: {reserved!r} does not go in the body over HTTP; the op is named by the URL"
                )
        parsed = ctx.parse(op, fields)
        handler = ctx.handlers[parsed.op]
        if handler.streaming:
            return await _stream(ctx, request, handler.fn(parsed.args))
        result = handler.fn(parsed.args) if handler.inline else await handler.fn(parsed.args)
        return json_response(result)

    return [web.post("/v1/{op}", op_route)]


async def _stream(ctx: HttpContext, request: web.Request, frames) -> web.StreamResponse:
    """NDJSON lines as the op yields them; an error after the first line becomes the last line.

    At shutdown the daemon cancels open streams (``HttpSite.stop``); the client
    sees the response end without a ``"more": false`` line.
    """
    task = asyncio.current_task()
    if task is None:
        raise Misuse("a /v1 stream handler outside a task: aiohttp runs each request in one")
    ctx.streams.add(task)
    response: web.StreamResponse | None = None
    try:
        async for result, more in frames:
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
            await response.write(encode({"result": result, "more": more}) + b"\n")
    except EmbeddError as exc:
        if response is None:
            raise
        await response.write(encode({"error": exc.message, "code": exc.code.value, "more": False}) + b"\n")
    finally:
        ctx.streams.discard(task)
        await frames.aclose()
    if response is None:  # a generator that yields nothing (never happens for batch_watch)
        return json_response({})
    await response.write_eof()
    return response

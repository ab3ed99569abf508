"""``/healthz`` (alive), ``/readyz`` (serving and Milvus reachable), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from embedd.http.context import HttpContext
from embedd.http.responses import json_response

__all__ = ["routes"]


def routes(ctx: HttpContext) -> list[web.RouteDef]:
    service = ctx.service

    async def healthz(_: web.Request) -> web.Response:
        return json_response({"status": "ok", "version": service.version, "uptime_s": service.uptime_s})

    async def readyz(_: web.Request) -> web.Response:
        uri = ctx.settings.resolved_milvus_uri
        if ctx.stopping:
            return json_response(
                {"ready": False, "error": "the daemon is shutting down", "code": "unavailable"}, status=503
            )
        ok = await service.store_io.ok()
        milvus = {"uri": uri, "ok": ok}
        if not ok:
            return json_response(
                {"ready": False, "error": f"Milvus at {uri} does not answer", "code": "unavailable", "milvus": milvus},
                status=503,
            )
        return json_response({"ready": True, "milvus": milvus})

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=ctx.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]

"""The REST API of the system embedd replaces, unchanged in shape, over embedd's ops.

The Navidrome fork's Go handlers and admin panel call ``POST /batch/start``,
``GET /batch/progress``, ``POST /batch/cancel`` and ``POST /embed_text``. Each
route translates the original JSON to one op's arguments, runs that op through
the counted op table, and translates the result back. Unknown body keys are
ignored, as the original services did; a known key of the wrong type is a 400.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from aiohttp import web

from embedd.errors import Code, EmbeddError
from embedd.http.context import HttpContext
from embedd.http.responses import decode_object, error_response, json_response
from embedd.metrics import outcome_code
from embedd.models import CATALOG
from embedd.ops.recommend import RecommendArgs, RecommendSeed
from embedd.protocol import encode_vector
from embedd.recommend import bridged_text_vector

__all__ = ["fork_request", "legacy_progress", "routes"]

#: embedd's job states that the original did not have, in the original's words.
STATUS_WORDS = {"paused": "running", "cancelling": "running"}


def routes(ctx: HttpContext) -> list[web.RouteDef]:
    async def batch_start(request: web.Request) -> web.Response:
        body = decode_object(await request.read())
        fields: dict[str, Any] = {}
        if "models" in body:
            fields["models"] = body["models"]
        for key in ("clearExisting", "clear_existing"):
            if key in body:
                if not isinstance(body[key], bool):
                    ctx.metrics.rejected("batch_start", Code.BAD_REQUEST.value)
                    raise EmbeddError(Code.BAD_REQUEST, f"batch_start: {key!r} must be true or false")
                fields["clear_existing"] = body[key]
        try:
            started = await ctx.call("batch_start", fields)
        except EmbeddError as exc:
            if exc.code is not Code.BUSY:
                raise
            return error_response(exc, status="already_running", job_id=ctx.service.batch.progress.view()["job_id"])
        models = ctx.service.batch.progress.view()["models"]
        return json_response(
            {
                "status": "started",
                "job_id": started["job_id"],
                "total_tracks": started["total_tracks"],
                "total_operations": started["total_tracks"] * len(models),
                "models": models,
            }
        )

    async def batch_progress(_: web.Request) -> web.Response:
        progress = await ctx.call("batch_progress", {})
        return json_response(legacy_progress(progress, one_model_at_a_time=ctx.settings.batch_one_model_at_a_time))

    async def batch_cancel(_: web.Request) -> web.Response:
        return json_response(await ctx.call("batch_cancel", {}))

    async def embed_text(request: web.Request) -> web.Response:
        body = decode_object(await request.read())
        fields = {k: body[k] for k in ("text", "model") if k in body}
        args = ctx.parse("embed_text", {**fields, "vector_format": "list"}).args
        if not CATALOG[args.model].text:
            # No text tower (MERT, Music2Latent): a vector derived through MuQ-MuLan's, as the recommender bridges.
            start, code = time.perf_counter(), "ok"
            try:
                vector, bridge = await bridged_text_vector(ctx.service, args.model, args.text)
            except (Exception, asyncio.CancelledError) as exc:
                code = outcome_code(exc)
                raise
            finally:
                ctx.metrics.observe("embed_text", code, time.perf_counter() - start)
            return json_response(
                {
                    "embedding": encode_vector(vector, "list"), "model": args.model, "dimension": int(vector.shape[-1]),
                    "is_stub": False, "derived_from": "muq", "bridge_track_ids": bridge,
                }
            )  # fmt: skip
        result = await ctx.call("embed_text", {**fields, "vector_format": "list"})
        return json_response(
            {"embedding": result["vector"], "model": result["model"], "dimension": result["dim"], "is_stub": False}
        )

    async def playlist(request: web.Request) -> web.Response:
        """The fork's recommender: ``POST /playlist/{mode}``, answered by the ``recommend`` op."""
        body = decode_object(await request.read())
        fields = fork_request(body, request.match_info["mode"])
        return json_response(await ctx.call("recommend", fields))

    return [
        web.post("/batch/start", batch_start),
        web.get("/batch/progress", batch_progress),
        web.post("/batch/cancel", batch_cancel),
        web.post("/embed_text", embed_text),
        web.post("/playlist/{mode}", playlist),
    ]


_REQUEST_KEYS = frozenset(f.name for f in msgspec.structs.fields(RecommendArgs))
_SEED_KEYS = frozenset(f.name for f in msgspec.structs.fields(RecommendSeed))


def fork_request(body: dict[str, Any], mode: str) -> dict[str, Any]:
    """The fork's ``/playlist/{mode}`` body as ``recommend`` arguments.

    Unknown keys are dropped (in the body and in each seed), as the original
    did; ``null`` means absent (Go's nil slices and maps). The path's mode wins.
    Everything else goes to the op's schema as sent, so a wrong type is a 400
    naming the field.
    """
    fields = {k: v for k, v in body.items() if k in _REQUEST_KEYS and v is not None}
    seeds = fields.get("seeds")
    if isinstance(seeds, list):
        fields["seeds"] = [
            {k: v for k, v in seed.items() if k in _SEED_KEYS and v is not None} if isinstance(seed, dict) else seed
            for seed in seeds
        ]
    fields["mode"] = mode
    return fields


def legacy_progress(progress: dict[str, Any], *, one_model_at_a_time: bool) -> dict[str, Any]:
    """embedd's progress map plus the original's operation counters and status words."""
    models = progress["models"]
    total_tracks = progress["total_tracks"]
    total_ops = total_tracks * len(models)
    # progress_percent already counts the work of every pass; an operation is one (track, model).
    done_ops = min(total_ops, round(progress["progress_percent"] / 100.0 * total_ops))
    current_model = None
    if progress["status"] == "running" and models:
        if one_model_at_a_time and total_tracks:
            current_model = models[min(len(models) - 1, done_ops // total_tracks)]
        else:
            current_model = ",".join(models)
    return {
        **progress,
        "status": STATUS_WORDS.get(progress["status"], progress["status"]),
        "embedd_status": progress["status"],
        "total_operations": total_ops,
        "processed_operations": done_ops,
        "current_model": current_model,
    }

"""The op handlers: what each request of protocol v1 does.

A handler receives arguments already validated by :mod:`embedd.protocol` and
returns the result map (or raises :class:`~embedd.errors.EmbeddError`). Cheap
handlers that never wait are marked ``inline`` and answered without a task;
streaming handlers are async generators of ``(result, more)`` pairs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time

import numpy as np

from embedd import PROTOCOL_VERSION
from embedd.embedding import decode_targets, embed_decoded
from embedd.errors import Code, EmbeddError, Misuse
from embedd.executor import Lane
from embedd.models import CATALOG, text_model_hint
from embedd.protocol import (
    OP_SCHEMAS,
    EmbedFileArgs,
    DropLegacyArgs,
    Handler,
    EmbedTextArgs,
    NoArgs,
    RecommendArgs,
    SearchArgs,
    TakeOverArgs,
    UnloadArgs,
    decode_vector,
    encode_vector,
)
from embedd.recommend import recommend as recommend_tracks
from embedd.service import Service
from embedd.store import TrackRow
from embedd.takeover import take_over as take_over_vectors

__all__ = ["Handler", "build_handlers"]


def build_handlers(service: Service) -> dict[str, Handler]:
    def ping(_: NoArgs) -> dict:
        return {"version": service.version, "protocol": PROTOCOL_VERSION, "uptime_s": service.uptime_s}

    async def status(_: NoArgs) -> dict:
        await service.executor.described()
        return {
            "version": service.version,
            "device": service.executor.device,
            "models": service.models_view(),
            "batch": service.batch.progress.view(),
            "queue": service.executor.queue_depths,
            "executor": service.executor.lanes_view(),
            "decoder": service.decoder.lanes_view() if service.decoder is not None else None,
            "store": service.store_io.lanes_view(),
            "admission": service.admission.view(),
            "milvus": {"uri": service.settings.resolved_milvus_uri, "ok": await service.store_io.ok()},
            "legacy_collections": await service.store_io.legacy_view(),
            "library_watch": service.watch_view(),
        }

    async def unload(args: UnloadArgs) -> dict:
        unloaded = await service.executor.unload(args.model)
        names = [args.model] if args.model else list(CATALOG)
        loaded = {name for name, state in service.executor.snapshot().items() if state.loaded}
        kept = {name: reason for name in names if name in loaded and (reason := service.executor.busy_reason(name))}
        return {"unloaded": unloaded, "kept": kept}

    async def embed_file(args: EmbedFileArgs) -> dict:
        return await _embed_file(service, args)

    async def embed_text(args: EmbedTextArgs) -> dict:
        info = CATALOG[args.model]
        if not info.text:
            raise EmbeddError(Code.UNSUPPORTED, f"model {args.model!r} cannot embed text; {text_model_hint()}")
        text = await service.executor.embed_text(Lane.INTERACTIVE, args.model, args.text)
        return {
            "model": args.model,
            "dim": int(text.vector.shape[-1]),
            "vector": encode_vector(text.vector, args.vector_format),
            "raw": encode_vector(text.raw, args.vector_format),
        }

    async def search(args: SearchArgs) -> dict:
        await service.executor.described()
        return await _search(service, args)

    async def drop_legacy(args: DropLegacyArgs) -> dict:
        return await service.store_io.drop_legacy(args.model, confirm=args.confirm)

    async def recommend(args: RecommendArgs) -> dict:
        return await recommend_tracks(service, args)

    async def take_over(args: TakeOverArgs) -> dict:
        return await take_over_vectors(service, args.model, model_id=args.model_id, dry_run=args.dry_run)

    handlers = {
        "ping": Handler(ping, inline=True),
        "status": Handler(status),
        "unload": Handler(unload),
        "embed_file": Handler(embed_file),
        "embed_text": Handler(embed_text),
        "search": Handler(search),
        "drop_legacy": Handler(drop_legacy),
        "recommend": Handler(recommend),
        "take_over": Handler(take_over),
    }
    handlers.update(service.batch.handlers())
    missing = set(OP_SCHEMAS) - set(handlers)
    if missing:  # a bug, caught at start-up
        raise Misuse(f"ops without a handler: {sorted(missing)}; add them to the op table in embedd/ops.py")
    return handlers


async def _embed_file(service: Service, args: EmbedFileArgs) -> dict:
    decoder = service.decoder
    if decoder is None:
        raise Misuse("embed_file before the service started: Service.start() creates the decoder")
    targets = decode_targets(args.models)
    if args.path is not None:
        audio = await decoder.decode_path(args.path, targets)
    else:
        audio = await decoder.decode_bytes(args.data, args.filename, targets)
    embed = functools.partial(service.executor.embed_audio, Lane.INTERACTIVE)
    # The audio is released once the models are done: the store write below needs only its duration.
    embeddings = await embed_decoded(audio, args.models, embed)

    if args.store:
        path = args.path or ""
        size, mtime = 0, 0.0
        if args.path is not None:
            try:
                st = await asyncio.to_thread(os.stat, args.path)
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                pass
        elif args.data is not None:
            size = len(args.data)
        title = args.name or os.path.splitext(os.path.basename(args.path or args.filename or ""))[0]
        now = time.time()

        def write(store) -> None:
            for model, emb in embeddings.items():
                service.store_io.prepare(store, model, int(emb.vector.shape[-1]))
                row = TrackRow(
                    track_id=args.track_id,
                    vector=emb.vector,
                    path=path,
                    title=title,
                    duration_s=audio.duration_s,
                    model_id=service.settings.model_id(model),
                    file_size=size,
                    file_mtime=mtime,
                    embedded_at=now,
                )
                store.upsert(model, [row])

        await service.store_io.call(write)

    return {
        "duration_s": audio.duration_s,
        "models": {
            model: {
                "dim": int(emb.vector.shape[-1]),
                "windows": emb.windows,
                "vector": encode_vector(emb.vector, args.vector_format),
            }
            for model, emb in embeddings.items()
        },
    }


async def _search(service: Service, args: SearchArgs) -> dict:
    model = args.model
    if args.text is not None:
        if not CATALOG[model].text:
            raise EmbeddError(Code.UNSUPPORTED, f"model {model!r} cannot search by text; {text_model_hint()}")
        query = (await service.executor.embed_text(Lane.INTERACTIVE, model, args.text)).vector
    elif args.vector is not None:
        query = decode_vector(args.vector)
    else:
        query = None
    # The collection is prepared for the model's own dim; a query vector of another
    # length is then the client's mistake (bad_request from the store), not a new collection.
    dim = service.executor.model_dim(model)
    track_id = args.track_id
    exclude = list(args.exclude_track_ids)

    def run(store) -> list:
        service.store_io.prepare(store, model, dim, any_dim=query is None)
        vector = query
        if vector is None:
            vector = store.get_vector(model, track_id)
            if vector is None:
                raise EmbeddError(
                    Code.NOT_FOUND, f"track {track_id!r} has no stored vector in {CATALOG[model].collection!r}"
                )
        return store.search(model, np.asarray(vector, dtype=np.float32), args.limit, exclude)

    hits = await service.store_io.read(run)  # the read lane: never behind the batch job's upserts
    return {
        "hits": [
            {
                "track_id": h.track_id,
                "score": float(h.score),
                "path": h.path,
                "title": h.title,
                "artist": h.artist,
                "album": h.album,
            }
            for h in hits
        ]
    }

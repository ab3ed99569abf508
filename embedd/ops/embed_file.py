"""``embed_file``: one audio file (a path the daemon reads, or uploaded bytes) through the models."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from typing import TYPE_CHECKING, Annotated

import msgspec

from embedd.embedding import decode_targets, embed_decoded
from embedd.errors import Misuse
from embedd.executor import Lane
from embedd.ops.op import Op, Result
from embedd.protocol import DEFAULT_MODEL, Args, ModelName, VectorFormat, WireVector, check_models, encode_vector
from embedd.store import TrackRow

if TYPE_CHECKING:
    from embedd.service import Service


class EmbedFileArgs(Args):
    path: str | None = None
    data: bytes | None = None
    filename: str | None = None
    models: Annotated[list[ModelName], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [DEFAULT_MODEL]
    )
    store: bool = False
    track_id: str | None = None
    name: str | None = None
    vector_format: VectorFormat = "bin"

    def check(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("give exactly one of 'path' or 'data'")
        if self.path is not None and not self.path:
            raise ValueError("'path' is empty")
        if self.data is not None and not self.filename:
            raise ValueError("'data' needs 'filename'")
        if self.path is not None and self.filename is not None:
            raise ValueError("'filename' goes with 'data', not with 'path'")
        if self.store and not self.track_id:
            raise ValueError("'store': true requires 'track_id'")
        check_models(self.models)


class ModelEmbedding(Result):
    dim: int
    windows: int
    vector: WireVector


class EmbedFileResult(Result):
    duration_s: float
    models: dict[str, ModelEmbedding]


async def embed_file(service: Service, args: EmbedFileArgs) -> EmbedFileResult:
    """Decode in a worker process, embed on the interactive lane, optionally store the rows."""
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
        await _store(service, args, {m: e.vector for m, e in embeddings.items()}, audio.duration_s)
    return EmbedFileResult(
        duration_s=audio.duration_s,
        models={
            model: ModelEmbedding(
                dim=int(emb.vector.shape[-1]),
                windows=emb.windows,
                vector=encode_vector(emb.vector, args.vector_format),
            )
            for model, emb in embeddings.items()
        },
    )


async def _store(service: Service, args: EmbedFileArgs, vectors: dict, duration_s: float) -> None:
    size, mtime = 0, 0.0
    if args.path is not None:
        try:
            st = await asyncio.to_thread(os.stat, args.path)
            size, mtime = st.st_size, st.st_mtime
        except OSError:
            pass
    elif args.data is not None:
        size = len(args.data)
    now = time.time()
    rows = {
        model: TrackRow(
            track_id=args.track_id,
            vector=vector,
            path=args.path or "",
            title=args.name or os.path.splitext(os.path.basename(args.path or args.filename or ""))[0],
            duration_s=duration_s,
            model_id=service.settings.model_id(model),
            file_size=size,
            file_mtime=mtime,
            embedded_at=now,
        )
        for model, vector in vectors.items()
    }
    await service.store_io.upsert_rows(rows)


OPS = (Op("embed_file", EmbedFileArgs, EmbedFileResult, embed_file, admitted=True),)

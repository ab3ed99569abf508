"""``search``: the stored tracks nearest to a vector, a stored track or a text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec

from embedd.errors import Code, EmbeddError
from embedd.executor import Lane
from embedd.models import CATALOG, text_model_hint
from embedd.ops.op import Op, Result
from embedd.protocol import Args, ModelName, WireVector, decode_vector

if TYPE_CHECKING:
    from embedd.service import Service


class SearchArgs(Args):
    model: ModelName
    vector: WireVector | None = None
    track_id: str | None = None
    text: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    exclude_track_ids: Annotated[list[str], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)

    def check(self) -> None:
        given = [k for k in ("vector", "track_id", "text") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'vector', 'track_id' or 'text'")
        if isinstance(self.vector, bytes) and (len(self.vector) == 0 or len(self.vector) % 4):
            raise ValueError("'vector' bin must hold a whole, non-zero number of float32 values")
        if isinstance(self.vector, list) and not self.vector:
            raise ValueError("'vector' is empty")
        if self.text is not None and not self.text.strip():
            raise ValueError("'text' is blank")


class Hit(Result):
    track_id: str
    score: float
    path: str
    title: str
    artist: str
    album: str


class SearchResult(Result):
    hits: list[Hit]  # best first


async def search(service: Service, args: SearchArgs) -> SearchResult:
    """Nearest stored tracks by cosine, on the store's read lane (never behind the job's writes)."""
    await service.executor.described()
    model = args.model
    if args.text is not None:
        if not CATALOG[model].text:
            raise EmbeddError(Code.UNSUPPORTED, f"model {model!r} cannot search by text; {text_model_hint()}")
        query = (await service.executor.embed_text(Lane.INTERACTIVE, model, args.text)).vector
    elif args.vector is not None:
        query = decode_vector(args.vector)
    else:
        query = None
    dim = service.executor.model_dim(model)
    hits = await service.store_io.search(
        model, dim, vector=query, track_id=args.track_id, limit=args.limit, exclude=args.exclude_track_ids
    )
    return SearchResult(
        hits=[
            Hit(track_id=h.track_id, score=float(h.score), path=h.path, title=h.title, artist=h.artist, album=h.album)
            for h in hits
        ]
    )


OPS = (Op("search", SearchArgs, SearchResult, search, admitted=True),)

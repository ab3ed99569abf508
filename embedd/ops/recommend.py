"""``recommend``: tracks near a set of seeds (stored tracks, vectors, texts), over one or several models.

The request is the Navidrome fork's recommender request (its ``POST
/playlist/{mode}`` body, translated by :mod:`embedd.http.legacy`); what the
engine does with it lives in :mod:`embedd.recommend`.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from embedd.ops.op import Op, Result
from embedd.protocol import DEFAULT_MODEL, Args, ModelName, WireVector, check_models, is_vector
from embedd.recommend import recommend as recommend_tracks

if TYPE_CHECKING:
    from embedd.service import Service


class RecommendSeed(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One seed of ``recommend``: a stored track, a query vector, or a text (see docs/protocol.md)."""

    track_id: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    weight: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    source: Annotated[str, msgspec.Meta(max_length=100)] = ""
    played_at: str | None = None  # RFC 3339; accepted (the fork sends it), not used for ranking
    embedding: WireVector | None = None  # a query vector in one model's space (list or float32 bin)
    text: Annotated[str, msgspec.Meta(max_length=10_000)] | None = None  # embedded through MuQ-MuLan
    embeddings: dict[ModelName, WireVector] | None = None  # one vector per model (an audio file's)


class RecommendArgs(Args):
    seeds: Annotated[list[RecommendSeed], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 25
    models: Annotated[list[ModelName], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [DEFAULT_MODEL]
    )
    merge_strategy: Literal["union", "intersection", "priority"] = "union"
    model_priorities: dict[ModelName, int] = msgspec.field(default_factory=dict)
    min_model_agreement: Annotated[int, msgspec.Meta(ge=1)] = 1
    diversity: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    exclude_track_ids: Annotated[list[str], msgspec.Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    library_ids: Annotated[list[int], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)
    disliked_track_ids: Annotated[list[str], msgspec.Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    disliked_artist_ids: Annotated[list[str], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)
    dislike_strength: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    negative_prompts: Annotated[list[Annotated[str, msgspec.Meta(max_length=10_000)]], msgspec.Meta(max_length=64)] = (
        msgspec.field(default_factory=list)
    )
    negative_prompt_penalty: Annotated[float, msgspec.Meta(ge=0.3, le=1.0)] = 0.85
    negative_embeddings: dict[ModelName, Annotated[list[WireVector], msgspec.Meta(max_length=64)]] = (
        msgspec.field(default_factory=dict)
    )
    # The fork's request carries these; accepted, not used for ranking.
    mode: Annotated[str, msgspec.Meta(max_length=100)] = ""
    user_id: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    user_name: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    exclude_playlist_ids: Annotated[list[str], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)

    def check(self) -> None:
        check_models(self.models)
        for i, seed in enumerate(self.seeds):
            if seed.played_at is not None:
                try:
                    datetime.datetime.fromisoformat(seed.played_at.replace("Z", "+00:00").replace("z", "+00:00"))
                except ValueError:
                    raise ValueError(f"argument 'seeds[{i}].played_at': {seed.played_at[:60]!r} is not an RFC 3339 time") from None
            if isinstance(seed.embedding, bytes) and (len(seed.embedding) == 0 or len(seed.embedding) % 4):
                raise ValueError(f"argument 'seeds[{i}].embedding': a bin must hold a whole, non-zero number of float32 values")
            if isinstance(seed.embedding, list) and not seed.embedding:
                raise ValueError(f"argument 'seeds[{i}].embedding' is empty")
            if seed.text is not None and not seed.text.strip():
                raise ValueError(f"argument 'seeds[{i}].text' is blank")
            if sum(x is not None for x in (seed.embedding, seed.text, seed.embeddings)) > 1:
                raise ValueError(f"seeds[{i}]: give at most one of 'embedding', 'embeddings' or 'text'")
            if not seed.track_id and seed.embedding is None and seed.text is None and not seed.embeddings:
                raise ValueError(f"seeds[{i}] has neither 'track_id', 'embedding', 'embeddings' nor 'text'")
            for model, v in (seed.embeddings or {}).items():
                if not is_vector(v):
                    raise ValueError(f"argument 'seeds[{i}].embeddings.{model}' is not a vector")
        for i, text in enumerate(self.negative_prompts):
            if not text.strip():
                raise ValueError(f"argument 'negative_prompts[{i}]' is blank")
        for model, vectors in self.negative_embeddings.items():
            for i, v in enumerate(vectors):
                if not is_vector(v):
                    raise ValueError(f"argument 'negative_embeddings.{model}[{i}]' is not a vector")


class RecommendedTrack(Result):
    track_id: str
    score: float
    reason: str  # e.g. "seed:recent", "seed:text via muq"
    models: list[str]  # the models whose neighbourhoods held it
    # What the store knows of it (absent for a track the store no longer describes):
    path: str | msgspec.UnsetType = msgspec.UNSET
    title: str | msgspec.UnsetType = msgspec.UNSET
    artist: str | msgspec.UnsetType = msgspec.UNSET
    album: str | msgspec.UnsetType = msgspec.UNSET
    negative_similarity: float | msgspec.UnsetType = msgspec.UNSET  # only near a negative prompt


class RecommendResult(Result):
    tracks: list[RecommendedTrack]  # best first
    warnings: list[str]  # why the list is short or empty, which model was bridged through MuQ


async def recommend(service: Service, args: RecommendArgs) -> RecommendResult:
    """Seeds' neighbours per model, merged by the strategy, filtered, diversified (MMR)."""
    return RecommendResult.of(await recommend_tracks(service, args))


OPS = (Op("recommend", RecommendArgs, RecommendResult, recommend, admitted=True),)

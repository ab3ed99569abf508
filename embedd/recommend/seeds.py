"""A recommend request's seeds, resolved to what each model searches with.

Owns the step from the request's seeds (:class:`embedd.ops.recommend.RecommendArgs`,
whose shape and validation live in :mod:`embedd.ops.recommend` for every face: the
``recommend`` op, ``/v1/recommend``, the fork's ``/playlist/{mode}``) to
:class:`Query` objects: track seeds deduplicated (the highest weight wins),
vectors decoded, texts set aside for MuQ-MuLan. No I/O: the texts are embedded
and the stored vectors fetched by :mod:`embedd.recommend.engine`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from embedd.protocol import decode_vector

if TYPE_CHECKING:
    from embedd.ops.recommend import RecommendArgs

__all__ = ["Query", "resolve_seeds", "seed_reason"]


@dataclasses.dataclass(eq=False)
class Query:
    """A seed as the request gave it, resolved to what each model searches with."""

    index: int
    weight: float
    reason: str
    track_id: str | None = None  # a stored track to look up per model
    vector: np.ndarray | None = None  # a direct vector (any model whose width it has)
    muq: np.ndarray | None = None  # a MuQ-space vector (from a text), bridged into the other models
    per_model: dict[str, np.ndarray] | None = None  # a vector for each model (an audio file's)


def seed_reason(source: str) -> str:
    """A seed's reason as the playlist shows it: ``seed:`` and where it came from (a track by default)."""
    return f"seed:{source or 'track'}"


def resolve_seeds(args: RecommendArgs) -> tuple[list[Query], list[tuple[Query, str]]]:
    """The request's seeds as queries, deduplicated by track (the highest weight wins), vectors decoded.

    Returns the queries and the (query, text) pairs whose text MuQ-MuLan still has to embed.
    """
    queries: list[Query] = []
    by_track: dict[str, Query] = {}
    texts: list[tuple[Query, str]] = []
    for i, seed in enumerate(args.seeds):
        q = Query(i, float(seed.weight), seed_reason(seed.source))
        if seed.embedding is not None:
            q.vector = decode_vector(seed.embedding)
            if seed.source in ("", "track"):
                q.reason = "seed:vector"
        elif seed.embeddings:
            q.per_model = {m: decode_vector(v) for m, v in seed.embeddings.items()}
            q.reason = seed_reason(seed.source or "file")
        elif seed.text is not None:
            q.reason = seed_reason(seed.source or "text")
            texts.append((q, seed.text))
        else:
            q.track_id = seed.track_id
            if seed.track_id in by_track:
                other = by_track[seed.track_id]
                other.weight = max(other.weight, q.weight)
                continue
            by_track[seed.track_id] = q
        queries.append(q)
    return queries, texts

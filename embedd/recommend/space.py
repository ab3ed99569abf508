"""Where the recommender compares one model's vectors: the in-memory index, or Milvus.

Owns the one seam between the ranking and the stores: a request asks a
:class:`Space` per model for vectors and nearest neighbours, and does not care
whether the in-memory index (:mod:`embedd.store.index`) or Milvus answers.
Kept apart from :mod:`embedd.recommend.engine` so that choice (and starting
the index builds a request found missing) lives in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from embedd.service import Service
    from embedd.store import VectorStore
    from embedd.store.model_index import ModelIndex

__all__ = ["Space", "kick_indexes", "model_spaces"]


class Space:
    """Where one request compares one model's vectors: the in-memory index, or Milvus.

    With the index (:mod:`embedd.store.index`), vectors are the index's unit
    rows (exact, or projected for a model wider than ``EXACT_MAX_DIM``) and a
    search is a matrix product; without it (not built yet, over the memory
    budget, disabled), vectors are the stored ones and searches go to Milvus,
    batched (one call per model for all the seeds). Cosines, the only thing
    the ranking uses, are the same either way (approximate for a projected model).
    One request keeps the spaces it started with.
    """

    __slots__ = ("index", "model")

    def __init__(self, model: str, index: ModelIndex | None) -> None:
        self.model, self.index = model, index

    def embed(self, vector: np.ndarray) -> np.ndarray:
        """A full-width query vector in this space (checked and projected with the index; as is for Milvus)."""
        return self.index.query(vector) if self.index is not None else np.asarray(vector, dtype=np.float32)

    def get(self, store: VectorStore, track_ids: Iterable[str]) -> dict[str, np.ndarray]:
        return self.index.get(track_ids) if self.index is not None else store.get_vectors(self.model, track_ids)

    def search(
        self, store: VectorStore, vectors: Sequence[np.ndarray], k: int, exclude: Iterable[str] = ()
    ) -> list[list[tuple[str, float]]]:
        if self.index is not None:
            return self.index.search(np.stack(vectors), k, exclude) if vectors else []
        return [[(h.track_id, h.score) for h in hs] for hs in store.search_many(self.model, list(vectors), k, exclude)]


def model_spaces(store: VectorStore, models: Iterable[str]) -> dict[str, Space]:
    """Each model's space for this request (after ``prepare``): its index when one serves the live set."""
    index = getattr(store, "index", None)
    out = {}
    for m in models:
        held = index.serving(m, store.collections.target(m, None)[1].physical) if index is not None else None
        out[m] = Space(m, held)
    return out


def kick_indexes(service: Service, dims: Mapping[str, int]) -> None:
    """Start building the indexes a request found missing (in the background)."""
    index = getattr(service.store_io.reader, "index", None)
    if index is not None:
        index.kick(service.store_io, dims)

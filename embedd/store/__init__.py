"""The Milvus store: per-model collections of track vectors, on Milvus Lite or a Milvus server.

- :mod:`embedd.store.layout`: names, the schema (fields the original system's
  readers use: ``embedding``, ``name``), rows — pure, no Milvus calls;
- :mod:`embedd.store.client`: the pymilvus client and the error mapping;
- :mod:`embedd.store.rows`: reading and writing rows of one collection;
- :mod:`embedd.store.indexes`: the vector and ``name`` indexes a new collection gets;
- :mod:`embedd.store.collections`: which collection serves each model, aliases,
  rebuilds, schema migration, the original system's collections;
- :mod:`embedd.store.vector_store`: :class:`VectorStore`, what the daemon calls.
"""

from embedd.store.layout import (
    MAX_LEN,
    Fingerprint,
    Hit,
    LegacyCollection,
    Move,
    RebuildHandle,
    TrackRow,
    display_name,
    truncate_utf8,
)
from embedd.store.vector_store import VectorStore

__all__ = [
    "MAX_LEN",
    "Fingerprint",
    "Hit",
    "LegacyCollection",
    "Move",
    "RebuildHandle",
    "TrackRow",
    "VectorStore",
    "display_name",
    "truncate_utf8",
]

"""The indexes a new collection gets: the best vector index the server accepts, and one on ``name``.

Milvus Lite and the server versions differ in what they build (HNSW with
COSINE, else AUTOINDEX, else FLAT for vectors; INVERTED or, on 2.3 servers,
Trie for ``name``), so each is tried in order of preference and the one
accepted is returned for the collection's record.
"""

from __future__ import annotations

import logging

from embedd.errors import Code, EmbeddError, Misuse
from embedd.store.client import Milvus
from embedd.store.layout import NAME_INDEX_CHOICES, VECTOR_FIELD, VECTOR_INDEX_CHOICES

log = logging.getLogger("embedd.store")


def vector_index(milvus: Milvus, physical: str) -> str:
    """Create the vector index; returns its type. Raises the last refusal when none is accepted."""
    from pymilvus import MilvusClient

    last: EmbeddError | None = None
    for choice in VECTOR_INDEX_CHOICES:
        params = MilvusClient.prepare_index_params()
        params.add_index(field_name=VECTOR_FIELD, index_name=VECTOR_FIELD, **choice)
        try:
            milvus.call(
                f"create a {choice['index_type']} index on {physical}",
                lambda c: c.create_index(physical, params, timeout=milvus.timeout_s),
            )
            return str(choice["index_type"])
        except EmbeddError as err:
            if err.code is Code.UNAVAILABLE:
                raise
            last = err
            log.warning("index %s refused on %s: %s", choice["index_type"], physical, err.message)
    if last is None:
        raise Misuse(f"no index to try on {physical}: the index choices are empty")
    raise last


def name_index(milvus: Milvus, physical: str) -> str:
    """The scalar index behind ``name in [...]``; returns its type, "" when none is accepted (filters then scan)."""
    from pymilvus import MilvusClient

    for kind in NAME_INDEX_CHOICES:
        params = MilvusClient.prepare_index_params()
        params.add_index(field_name="name", index_name="name", index_type=kind)
        try:
            milvus.call(
                f"create a {kind} index on {physical}.name",
                lambda c: c.create_index(physical, params, timeout=milvus.timeout_s),
            )
            return kind
        except EmbeddError as err:
            if err.code is Code.UNAVAILABLE:
                raise
            log.info("index %s on %s.name refused: %s", kind, physical, err.message)
    log.warning("no scalar index on %s.name: name filters will scan", physical)
    return ""

"""The system embedd replaces, as its Milvus readers and writers see it: for migration tests.

Its collections (one per model, under the public names ``embedding``, ...) have
the primary key ``name`` (VARCHAR 512, "Artist - Title"), a FLOAT_VECTOR
``embedding``, ``offset`` FLOAT and ``model_id`` VARCHAR 256, with an INVERTED
index on ``name`` (Trie on a 2.3 server, which has no INVERTED). Its
recommender reads them with ``anns_field="embedding"``, ``output_fields=["name"]``
and filters ``name in [...]`` / ``name not in [...]``: :func:`original_reads`
does exactly those reads, so a test can run them on whatever holds the name.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def create_original_collection(
    client: Any, name: str, vectors: np.ndarray, names: list[str], model_ids: list[str] | None = None
) -> None:
    """A collection of the original schema holding ``vectors`` under ``names`` (each row's ``model_id``
    from ``model_ids``; default ``original/model``)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
    schema.add_field("offset", DataType.FLOAT)
    schema.add_field("model_id", DataType.VARCHAR, max_length=256)
    client.create_collection(name, schema=schema, consistency_level="Strong")
    params = MilvusClient.prepare_index_params()
    params.add_index(field_name="embedding", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 64})
    client.create_index(name, params)
    for kind in ("INVERTED", "Trie"):
        params = MilvusClient.prepare_index_params()
        params.add_index(field_name="name", index_type=kind)
        try:
            client.create_index(name, params)
            break
        except Exception:  # a 2.3 server: Trie is its VARCHAR index
            continue
    client.load_collection(name)
    client.insert(
        name,
        [
            {"name": n, "embedding": v.tolist(), "offset": 0.0, "model_id": mid}
            for n, v, mid in zip(names, vectors, model_ids or ["original/model"] * len(names), strict=True)
        ],
    )


def original_reads(client: Any, collection: str, query: np.ndarray, names: list[str], limit: int = 10) -> dict[str, list[str]]:
    """The original recommender's three reads; each answer is the list of ``name`` values returned.

    Like the original at its start, it loads the collection first (a no-op when
    loaded; a restarted Milvus Lite comes back with every collection released).
    """
    client.load_collection(collection)

    def search(flt: str) -> list[str]:
        res = client.search(
            collection, data=[query.tolist()], anns_field="embedding", limit=limit, output_fields=["name"],
            filter=flt, search_params={"metric_type": "COSINE"}, consistency_level="Strong",
        )  # fmt: skip
        return [h["entity"]["name"] for h in res[0]]

    quoted = ", ".join(f'"{n}"' for n in names)
    return {"all": search(""), "in": search(f"name in [{quoted}]"), "not_in": search(f"name not in [{quoted}]")}

"""Reading and writing rows of one physical collection, either layout (plain or split).

Functions, not a class: the collection owner (migration copies) and the store
(the live set, rebuilds) both call them with a collection name and its layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embedd.store.client import STRONG, Milvus
from embedd.store.layout import Layout, in_list

UPSERT_BYTES = 16 * 1024 * 1024  # per scan page: well under the servers' gRPC message limits
#: Per upsert call. Small enough that a read given priority between upserts waits for at
#: most a fraction of a second (six MERT tracks on Milvus Lite, about 0.15 s on a
#: small CPU), large enough that the calls' overhead does not show (``bench/store_reads.py``).
WRITE_BYTES = 2 * 1024 * 1024
FETCH_TRACKS = 32  # full vectors fetched per query


def rows_per_call(layout: Layout, nbytes: int = UPSERT_BYTES) -> int:
    """Milvus rows per scan page (or upsert, with ``WRITE_BYTES``) that stay near ``nbytes``."""
    return max(1, nbytes // (layout.part_dim * 4 + 8 * 1024))


def write(milvus: Milvus, name: str, layout: Layout, entities: Sequence[dict[str, Any]]) -> None:
    """Upsert ready-made entities in calls of bounded size; returns once Milvus acknowledged all.

    Before each call, ``milvus.between_writes`` (when set) may hold the write
    while reads are in progress: reads go first, at every upsert boundary.
    """
    chunk = rows_per_call(layout, WRITE_BYTES)
    for start in range(0, len(entities), chunk):
        if milvus.between_writes is not None:
            milvus.between_writes()
        part = list(entities[start : start + chunk])
        milvus.call(f"upsert into {name}", lambda c: c.upsert(name, part, timeout=max(milvus.timeout_s, 30)))


def delete(milvus: Milvus, name: str, layout: Layout, ids: Sequence[str]) -> None:
    keys = list(ids) if not layout.split else [f"{t}#{i}" for t in ids for i in range(layout.parts)]
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        milvus.call(f"delete from {name}", lambda c: c.delete(name, ids=batch, timeout=milvus.timeout_s))


def fetch(
    milvus: Milvus, name: str, layout: Layout, track_ids: Sequence[str], extra: Sequence[str] = (), level: str = STRONG
) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Full vectors and the ``extra`` fields of the tracks that have them all."""
    vf = layout.vector_field
    fields = ["track_id", vf, *extra]
    out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    if not layout.split:
        for start in range(0, len(track_ids), FETCH_TRACKS):
            batch = list(track_ids[start : start + FETCH_TRACKS])
            rows = milvus.call(
                f"read vectors from {name}",
                lambda c: c.query(
                    name, filter=in_list("track_id", batch), output_fields=fields, consistency_level=level,
                    timeout=milvus.timeout_s,
                ),  # fmt: skip
                loads=name,
            )
            for r in rows:
                out[r["track_id"]] = (np.asarray(r[vf], dtype=np.float32), r)
        return out
    per = max(1, FETCH_TRACKS // 2)
    for start in range(0, len(track_ids), per):
        batch = track_ids[start : start + per]
        pks = [f"{t}#{i}" for t in batch for i in range(layout.parts)]
        rows = milvus.call(
            f"read vectors from {name}",
            lambda c: c.query(
                name, filter=in_list("pk", pks), output_fields=[*fields, "part"], consistency_level=level,
                timeout=max(milvus.timeout_s, 30),
            ),  # fmt: skip
            loads=name,
        )
        by_track: dict[str, dict[int, Any]] = {}
        for r in rows:
            by_track.setdefault(r["track_id"], {})[int(r["part"])] = r
        for tid, parts in by_track.items():
            if len(parts) != layout.parts:
                continue  # a partly written track cannot be scored; the batch job rewrites it
            full = np.concatenate([np.asarray(parts[i][vf], dtype=np.float32) for i in range(layout.parts)])
            out[tid] = (full[: layout.dim], parts[0])
    return out


def scan(
    milvus: Milvus, name: str, fields: Sequence[str], *, page_size: int = 1000, filter: str = ""
) -> Iterator[list[dict[str, Any]]]:
    """Every row's ``fields``, page by page (a Milvus query iterator: never the whole collection at once)."""
    it = milvus.call(
        f"scan {name}",
        lambda c: c.query_iterator(
            name, batch_size=page_size, filter=filter, output_fields=list(fields), consistency_level=STRONG,
            timeout=milvus.timeout_s,
        ),  # fmt: skip
        loads=name,
    )
    try:
        while True:
            page = milvus.call(f"scan {name}", lambda _c: it.next())
            if not page:
                return
            yield list(page)
    finally:
        try:
            it.close()
        except Exception:  # the server may be gone; the iterator holds nothing we must release
            pass

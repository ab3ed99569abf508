"""The store the daemon uses: per-model track vectors in Milvus (Lite file or server).

Threading. :class:`VectorStore` is synchronous and NOT thread-safe: the daemon
owns two instances, each called from its own thread off the event loop, one for
writes and one for reads (:mod:`embedd.store.io`; the reader, with a connection
of its own, follows what the writer opened). Every call blocks on the network
(or on the Milvus Lite server pymilvus runs in this process).

URI. A path (``<data_dir>/milvus.db``, the default) is Milvus Lite: pymilvus runs
it as a child process over that file. ``http://host:19530`` (or https) is a
server. The same code serves both; only the index and the dimension limit differ
and both are discovered, not assumed. Which collection serves a model, the
schema, migrations and rebuilds: :mod:`embedd.store.collections`.

Consistency. Counts and fingerprint scans read ``Strong`` (the batch job decides
from them). Searches and ``get_vector`` read ``Session``: they see every write
this process made through the same name (pymilvus tracks the last write time per
collection name, process-wide), so "store, then search" finds the track, without
paying ``Strong``'s wait for the server's time tick on every search (measured on
the 2.3.5 server: a split MERT search takes 1.85 s Strong vs 0.53 s Session).
Writes by other processes (another shard's daemon) become visible within the
server's staleness bound. Right after the live set of a model changed (a
committed rebuild, the public name taken over) the rows were written under
another name, so the next read of that model is ``Strong``.

Split search (MERT on a server, see :mod:`embedd.store.collections`): for each
part i, an ANN search of the query's part i restricted to ``part == i`` gives
candidates; a stored track's own vector has cosine 1 in every part, so it is a
top candidate of every part search; the union of candidates is fetched whole
and scored by the exact cosine of the full concatenated vectors. The exact
rescoring makes the split transparent: scores are true full-vector cosines and a
stored track ranks first for its own vector. The price is fetching the
candidates' full vectors (about ``k * (limit + 16)`` tracks at 300 KB each for
MERT): fine for recommendation-sized limits, heavy for ``limit=1000``.

Errors (:mod:`embedd.store.client`): Milvus down → ``UNAVAILABLE`` naming the
URI; a vector of the wrong size, non-finite or all zeros in a search →
``BAD_REQUEST``; a missing track in :meth:`VectorStore.get_vector` → ``None``;
any other Milvus refusal → ``INTERNAL`` naming the operation and the collection.

Long because: every Milvus operation of the store, each a few lines.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.store import rows
from embedd.store.client import SESSION, STRONG, Milvus
from embedd.store.collections import Collections
from embedd.store.layout import (
    META_FIELDS,
    ROW_FIELDS,
    VECTOR_FIELD,
    Fingerprint,
    Hit,
    Layout,
    LegacyCollection,
    Move,
    RebuildHandle,
    TrackRow,
    check_vector,
    entities,
    in_list,
)


class VectorStore:
    """Track vectors per model in Milvus (Lite or server); see the module docstrings for the design."""

    def __init__(self, uri: str, *, timeout_s: float = 10.0, dedicated: bool = False) -> None:
        self.milvus = Milvus(uri, timeout_s, dedicated=dedicated)
        self.collections = Collections(self.milvus)

    uri = property(lambda self: self.milvus.uri)
    timeout_s = property(lambda self: self.milvus.timeout_s)
    is_lite = property(lambda self: self.milvus.is_lite)

    def index_type(self, model: str) -> str:
        """The vector index type the live set of ``model`` got when this process created it ("" if it did not)."""
        known = self.collections.physical.get(self.collections.model(model).layout.physical)
        return known.vector_index if known is not None else ""

    def close(self) -> None:
        self.milvus.reset()

    def ping(self) -> bool:
        """True when Milvus answers a trivial request now."""
        try:
            self.milvus.names()
            return True
        except EmbeddError:
            return False

    # -- collections (the owner decides; see embedd.store.collections) ----------------------

    def ensure(self, model: str, collection: str, dim: int, *, for_rebuild: bool = False) -> None:
        self.collections.ensure(model, collection, dim, for_rebuild=for_rebuild)

    def layout(self, model: str) -> Layout:
        return self.collections.model(model).layout

    def pending(self, model: str) -> bool:
        """A foreign collection still holds the model's public name (embedd's set is not complete yet)."""
        return self.collections.model(model).pending

    def adopt_public_name(self, model: str) -> str | None:
        return self.collections.adopt_public_name(model)

    def legacy_collections(self, publics: dict[str, str]) -> list[LegacyCollection]:
        return self.collections.legacy_collections(publics)

    def drop_legacy(self, publics: dict[str, str], *, confirm: bool) -> list[LegacyCollection]:
        return self.collections.drop_legacy(publics, confirm=confirm)

    def begin_rebuild(self, model: str, tag: str, dim: int | None = None) -> RebuildHandle:
        return self.collections.begin_rebuild(model, tag, dim)

    def list_rebuilds(self, model: str) -> list[str]:
        return self.collections.list_rebuilds(model)

    def commit_rebuild(self, handle: RebuildHandle) -> None:
        self.collections.commit_rebuild(handle)

    def abort_rebuild(self, handle: RebuildHandle) -> bool:
        return self.collections.abort_rebuild(handle)

    # -- rows ------------------------------------------------------------------------------

    #: The daemon's in-memory vector index (:class:`embedd.store.index.VectorIndex`), told of
    #: every write this store makes; None (the default): no index.
    index: Any = None

    def upsert(self, model: str, track_rows: list[TrackRow], *, target: RebuildHandle | None = None) -> int:
        """Insert or replace the rows' vectors; returns the number of tracks written.

        Without ``target`` the live collection is written (and an open rebuild of
        the model in this process gets the same rows); with it, only the rebuild.
        Returns after Milvus acknowledged every row (the batch job's checkpoint
        condition).
        """
        if not track_rows:
            return 0
        name, layout = self.collections.target(model, target)
        self._write(model, name, layout, track_rows)
        if self.index is not None:  # the in-memory index of the live set learns the write at once
            self.index.upserted(model, layout.physical, [r.track_id for r in track_rows], [r.vector for r in track_rows])
        rebuild = self.collections.open_rebuild(model)
        if target is None and rebuild is not None:
            rb_name, rb_layout = self.collections.target(model, rebuild)
            if rb_layout.dim == layout.dim:
                self._write(model, rb_name, rb_layout, track_rows)
        return len(track_rows)

    def _write(self, model: str, name: str, layout: Layout, track_rows: list[TrackRow]) -> None:
        now = time.time()
        rows.write(self.milvus, name, layout, [e for row in track_rows for e in entities(model, layout, row, now)])

    def delete(self, model: str, track_ids: Iterable[str], *, target: RebuildHandle | None = None) -> None:
        """Remove the tracks' vectors (absent ones are ignored)."""
        ids = list(track_ids)
        if not ids:
            return
        name, layout = self.collections.target(model, target)
        rows.delete(self.milvus, name, layout, ids)
        if self.index is not None:
            self.index.deleted(model, layout.physical, ids)
        if target is None:
            # A Milvus 2.3 server answers a delete without a timestamp, so pymilvus's Session
            # read (guaranteed up to this client's last *upsert*) can still return the deleted
            # rows (measured: every one of 24); the next read of the live set waits for the tick.
            self.collections.model(model).changed = True
        rebuild = self.collections.open_rebuild(model)
        if target is None and rebuild is not None:
            rb_name, rb_layout = self.collections.target(model, rebuild)
            rows.delete(self.milvus, rb_name, rb_layout, ids)

    def rekey(self, model: str, moves: list[Move]) -> list[str]:
        """Move stored vectors to new track ids (same file, new id), no model run; returns the new ids moved.

        The new row gets the new id and display fields; the vector, duration,
        model id and embedding time stay. The new row is written before the old
        one is deleted, so a crash in between leaves both (the next incremental
        job deletes the old one as stale), never neither. A move whose old row is
        gone (another shard's job deleted it) is left out: that track is embedded.
        """
        name, layout = self.collections.target(model, None)
        # Session: the rows were written long ago (or by this process), so no wait for the server's time tick.
        found = rows.fetch(self.milvus, name, layout, [mv.old_id for mv in moves], extra=ROW_FIELDS, level=self._read_level(model))
        new_rows, moved = [], []
        for mv in moves:
            hit = found.get(mv.old_id)
            if hit is None:
                continue
            vector, old = hit
            new_rows.append(
                TrackRow(
                    track_id=mv.new_id, vector=vector, path=mv.path, title=mv.title, artist=mv.artist, album=mv.album,
                    duration_s=float(old.get("duration_s") or 0.0), model_id=str(old.get("model_id") or ""),
                    file_size=mv.file_size, file_mtime=mv.file_mtime, embedded_at=float(old.get("embedded_at") or 0.0),
                )  # fmt: skip
            )
            moved.append(mv)
        self.upsert(model, new_rows)
        self.delete(model, [mv.old_id for mv in moved if mv.old_id != mv.new_id])
        return [mv.new_id for mv in moved]

    def count(self, model: str, *, target: RebuildHandle | None = None) -> int:
        """Number of tracks stored (read-your-writes)."""
        name, layout = self.collections.target(model, target)
        flt = "part == 0" if layout.split else ""
        res = self.milvus.call(
            f"count {name}",
            lambda c: c.query(name, filter=flt, output_fields=["count(*)"], consistency_level=STRONG, timeout=self.timeout_s),
            loads=name,
        )
        return int(res[0]["count(*)"]) if res else 0

    def get_vector(self, model: str, track_id: str, *, target: RebuildHandle | None = None) -> np.ndarray | None:
        """The stored vector of ``track_id`` (float32), or None when the track has none."""
        name, layout = self.collections.target(model, target)
        level = STRONG if target is not None else self._read_level(model)
        hit = rows.fetch(self.milvus, name, layout, [track_id], level=level).get(track_id)
        return None if hit is None else hit[0]

    def fingerprints(self, model: str, *, page_size: int = 1000, target: RebuildHandle | None = None) -> Iterator[Fingerprint]:
        """Every stored track's (track_id, file_size, file_mtime, path), read page by page.

        Paged through a Milvus query iterator so a large library never sits in
        memory at once; the caller compares with the files on disk.
        """
        name, layout = self.collections.target(model, target)
        fields = ["track_id", "file_size", "file_mtime", "path"]
        for page in rows.scan(self.milvus, name, fields, page_size=page_size, filter="part == 0" if layout.split else ""):
            for r in page:
                yield Fingerprint(str(r["track_id"]), int(r["file_size"]), float(r["file_mtime"]), str(r["path"]))

    def fingerprints_of(self, model: str, track_ids: Iterable[str]) -> list[Fingerprint]:
        """The stored (track_id, file_size, file_mtime, path) of those of ``track_ids`` that have a row (Strong)."""
        ids = list(dict.fromkeys(track_ids))
        name, layout = self.collections.target(model, None)
        flt = " and part == 0" if layout.split else ""
        out: list[Fingerprint] = []
        for start in range(0, len(ids), 1000):
            batch = ids[start : start + 1000]
            res = self.milvus.call(
                f"read fingerprints from {name}",
                lambda c: c.query(
                    name, filter=in_list("track_id", batch) + flt, output_fields=["track_id", "file_size", "file_mtime", "path"],
                    consistency_level=STRONG, timeout=self.timeout_s,
                ),  # fmt: skip
                loads=name,
            )
            out.extend(Fingerprint(str(r["track_id"]), int(r["file_size"]), float(r["file_mtime"]), str(r["path"])) for r in res)
        return out

    def carry_over(self, handle: RebuildHandle, track_ids: Iterable[str]) -> int:
        """Copy the live rows of ``track_ids`` into the rebuild; returns how many had one.

        Tracks that failed during a rebuild keep the vectors they had, so that the
        switch loses nothing. Only possible while the rebuild keeps the live width
        (new weights of another width make the old vectors useless anyway).
        """
        name, layout = self.collections.target(handle.model, None)
        if layout.dim != handle.dim:
            return 0
        ids = list(dict.fromkeys(track_ids))
        copied = 0
        for start in range(0, len(ids), rows.FETCH_TRACKS):
            found = rows.fetch(self.milvus, name, layout, ids[start : start + rows.FETCH_TRACKS], extra=ROW_FIELDS)
            batch = [
                TrackRow(track_id=tid, vector=vector, **{f: row[f] for f in ROW_FIELDS if row.get(f) is not None})
                for tid, (vector, row) in found.items()
            ]
            if batch:
                self.upsert(handle.model, batch, target=handle)
                copied += len(batch)
        return copied

    def get_vectors(self, model: str, track_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors (float32) of those of ``track_ids`` that have one, in few queries.

        One Milvus query per batch of tracks sized to about 4 MiB of vectors
        (hundreds of MuQ or Music2Latent tracks, a dozen MERT ones), never one
        query per track.
        """
        ids = list(dict.fromkeys(track_ids))
        if not ids:
            return {}
        name, layout = self.collections.target(model, None)
        level = self._read_level(model)
        if layout.split:
            found = rows.fetch(self.milvus, name, layout, ids, level=level)
            return {tid: vector for tid, (vector, _) in found.items()}
        per = max(1, min(2000, (4 << 20) // (layout.dim * 4 + 64)))
        vf = layout.vector_field
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(ids), per):
            batch = ids[start : start + per]
            res = self.milvus.call(
                f"read vectors from {name}",
                lambda c: c.query(
                    name, filter=in_list("track_id", batch), output_fields=["track_id", vf], consistency_level=level,
                    timeout=self.timeout_s,
                ),  # fmt: skip
                loads=name,
            )
            for r in res:
                out[str(r["track_id"])] = np.asarray(r[vf], dtype=np.float32)
        return out

    def describe(self, model: str, track_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """The stored display fields (path, title, artist, album) of those of ``track_ids`` stored for ``model``."""
        ids = list(dict.fromkeys(track_ids))
        name, layout = self.collections.target(model, None)
        flt = " and part == 0" if layout.split else ""
        out: dict[str, dict[str, str]] = {}
        for start in range(0, len(ids), 1000):
            batch = ids[start : start + 1000]
            res = self.milvus.call(
                f"read tracks from {name}",
                lambda c: c.query(
                    name, filter=in_list("track_id", batch) + flt, output_fields=["track_id", *META_FIELDS],
                    consistency_level=self._read_level(model), timeout=self.timeout_s,
                ),  # fmt: skip
                loads=name,
            )
            for r in res:
                out[str(r["track_id"])] = {f: str(r.get(f, "")) for f in META_FIELDS}
        return out

    def search_many(
        self, model: str, vectors: list[np.ndarray], limit: int, exclude_track_ids: Iterable[str] = ()
    ) -> list[list[Hit]]:
        """:meth:`search` for many query vectors at once: one Milvus call (per 64 queries) for all of them.

        Hits carry the track id and the cosine score (display fields are left empty).
        """
        if not vectors or limit < 1:
            return [[] for _ in vectors]
        name, layout = self.collections.target(model, None)
        vecs = []
        for vector in vectors:
            vec = check_vector(model, vector, layout.dim, "the query vector")
            if not np.any(vec):
                raise EmbeddError(Code.BAD_REQUEST, f"the query vector for model {model} is all zeros.")
            vecs.append(vec)
        exclude = list(exclude_track_ids)
        level = self._read_level(model)
        out: list[list[Hit]] = []
        if layout.split:
            for vec in vecs:
                out.append(self._search_split(name, layout, vec, limit, exclude, level))
        else:
            flt = in_list("track_id", exclude, negate=True) if exclude else ""
            for start in range(0, len(vecs), 64):
                chunk = vecs[start : start + 64]
                res = self.milvus.call(
                    f"search {name}",
                    lambda c: c.search(
                        name, data=chunk, anns_field=VECTOR_FIELD, limit=limit, filter=flt, output_fields=["track_id"],
                        search_params={"metric_type": "COSINE", "params": {"ef": max(64, limit)}},
                        consistency_level=level, timeout=self.timeout_s,
                    ),  # fmt: skip
                    loads=name,
                )
                for per_query in res:
                    hits = [
                        Hit(track_id=str(h["entity"].get("track_id", h.get("id"))), score=float(h["distance"]),
                            path="", title="", artist="", album="")  # fmt: skip
                        for h in per_query
                    ]
                    hits.sort(key=lambda h: -h.score)
                    out.append(hits)
        self.collections.model(model).changed = False
        return out

    # -- search ----------------------------------------------------------------------------

    def search(self, model: str, vector: np.ndarray, limit: int, exclude_track_ids: Iterable[str] = ()) -> list[Hit]:
        """The ``limit`` stored tracks closest (cosine) to ``vector``, best first."""
        name, layout = self.collections.target(model, None)
        vec = check_vector(model, vector, layout.dim, "the query vector")
        if not np.any(vec):
            raise EmbeddError(Code.BAD_REQUEST, f"the query vector for model {model} is all zeros.")
        exclude = list(exclude_track_ids)
        if limit < 1:
            return []
        level = self._read_level(model)
        if layout.split:
            hits = self._search_split(name, layout, vec, limit, exclude, level)
        else:
            res = self.milvus.call(
                f"search {name}",
                lambda c: c.search(
                    name, data=[vec], anns_field=VECTOR_FIELD, limit=limit,
                    filter=in_list("track_id", exclude, negate=True) if exclude else "",
                    output_fields=list(META_FIELDS), search_params={"metric_type": "COSINE", "params": {"ef": max(64, limit)}},
                    consistency_level=level, timeout=self.timeout_s,
                ),  # fmt: skip
                loads=name,
            )
            hits = [self._hit(h.get("track_id", h.get("id")), float(h["distance"]), h["entity"]) for h in res[0]]
            hits.sort(key=lambda h: -h.score)
        self.collections.model(model).changed = False
        return hits

    def _read_level(self, model: str) -> str:
        return STRONG if self.collections.model(model).changed else SESSION

    @staticmethod
    def _hit(track_id: Any, score: float, entity: dict[str, Any]) -> Hit:
        return Hit(
            track_id=str(track_id), score=score, path=str(entity.get("path", "")), title=str(entity.get("title", "")),
            artist=str(entity.get("artist", "")), album=str(entity.get("album", "")),
        )  # fmt: skip

    def _search_split(self, name: str, layout: Layout, vec: np.ndarray, limit: int, exclude: list[str], level: str) -> list[Hit]:
        padded = np.zeros(layout.parts * layout.part_dim, dtype=np.float32)
        padded[: layout.dim] = vec
        per_part = min(16_384, limit + 16)
        ex = (" and " + in_list("track_id", exclude, negate=True)) if exclude else ""
        candidates: dict[str, None] = {}  # ordered set
        for i in range(layout.parts):
            q = padded[i * layout.part_dim : (i + 1) * layout.part_dim]
            if not np.any(q):
                continue  # cosine with a zero part is undefined; the other parts find the candidates
            res = self.milvus.call(
                f"search {name}",
                lambda c: c.search(
                    name, data=[q], anns_field=VECTOR_FIELD, limit=per_part, filter=f"part == {i}{ex}",
                    output_fields=["track_id"], search_params={"metric_type": "COSINE", "params": {"ef": max(64, per_part)}},
                    consistency_level=level, timeout=self.timeout_s,
                ),  # fmt: skip
                loads=name,
            )
            for h in res[0]:
                candidates[str(h["entity"]["track_id"])] = None
        if not candidates:
            return []
        full = rows.fetch(self.milvus, name, layout, list(candidates), extra=META_FIELDS, level=level)
        q64 = vec.astype(np.float64)
        qn = float(np.linalg.norm(q64))
        scored = []
        for tid, (v, meta) in full.items():
            v64 = v.astype(np.float64)
            vn = float(np.linalg.norm(v64))
            scored.append(self._hit(tid, float(np.dot(q64, v64) / (qn * vn)) if vn > 0 else 0.0, meta))
        scored.sort(key=lambda h: -h.score)
        return scored[:limit]

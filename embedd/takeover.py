"""Taking over the original system's vectors (the ``take_over`` op, ``embedd take-over``).

embedd's vectors equal the original system's for the same audio and weights
(parity, ``docs/operations.md``), so a user switching over can keep the
vectors the original already computed instead of re-embedding the library.
The original's collections (one per model, found under the public names
``embedding``, ... or already moved aside as ``<public>__legacy``; schema:
primary key ``name`` = "Artist - Title", ``embedding``, ``offset``,
``model_id``) are read page by page, and each row is resolved to the
Navidrome tracks its name names -- ``"<artist> - <title>"`` of the library's
tracks, exactly, the way the original wrote it:

- one track: the row's vector is stored for that track in embedd's own
  collection, with the track's fingerprint (file size and mtime), so the next
  incremental job counts it as up to date and skips it. Its ``model_id`` is the
  configured model's, marked ``?adopted`` (a ``clear_existing`` rebuild
  replaces such rows like any other). A track that already has a vector of
  embedd's own keeps it;
- no track, or several (the same "Artist - Title" on two albums: which file
  the original embedded is unknown): nothing is stored, the name is reported
  (``unresolved``, ``ambiguous``); never guessed;
- a row whose ``model_id`` is not the model embedd is configured with (or
  whose width is not the model's) is refused and counted by its ``model_id``:
  its vector means something else. ``model_id`` in the request names the id
  the original's rows carry when embedd loads the same weights from elsewhere
  (a local directory instead of the hub id, say).

Rows are only ever read from the original's collections; nothing there is
changed. A model whose vectors embedd makes with a knob that changes them
(``mert_hop_s``, ``quantize``) is refused as a whole: those are not the
original's vectors.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG
from embedd.store import TrackRow
from embedd.store import rows as store_rows
from embedd.store.client import STRONG
from embedd.store.layout import display_name, in_list, truncate_utf8

if TYPE_CHECKING:
    from embedd.service import Service
    from embedd.store import VectorStore

__all__ = ["ADOPTED", "adopted_model_id", "take_over"]

#: The mark of an adopted row's ``model_id``: ``<model id>?adopted``.
ADOPTED = "adopted"
#: Names listed in the answer per kind (the counts are always complete).
LISTED = 100
#: Rows read (vectors) and stored per store call.
FETCH_ROWS = 64
_ORIGINAL_FIELDS = ("name", "embedding", "model_id")


def adopted_model_id(model_id: str) -> str:
    return f"{model_id}{'&' if '?' in model_id else '?'}{ADOPTED}"


def _name_of(artist: str, title: str) -> str | None:
    """The "Artist - Title" the original keyed a track by; None when the track lacks either."""
    artist, title = artist.strip(), title.strip()
    if not artist or not title:
        return None
    return truncate_utf8(display_name(artist, title), 512)


def _is_original(described: dict[str, Any]) -> bool:
    fields = {f.get("name") for f in described.get("fields", [])}
    return set(_ORIGINAL_FIELDS) <= fields and "track_id" not in fields


async def take_over(service: "Service", model: str | None, *, model_id: str | None, dry_run: bool) -> dict[str, Any]:
    settings = service.settings
    library = service.require_library()
    job = service.batch.progress.job
    if job is not None and job.active:
        raise EmbeddError(Code.BUSY, f"batch job {job.job_id} is {job.status.value}; take over before a job starts or after it ends.")
    models = [model] if model else list(CATALOG)
    if model_id is not None and len(models) != 1:
        raise EmbeddError(Code.BAD_REQUEST, "take_over: 'model_id' needs 'model' (it names one model's original rows)")
    publics = service.store_io.public_names()
    legacy = await service.store_io.read(lambda store: store.legacy_collections(publics))

    # The library's tracks by the name the original gave them (only the names: ids of the rest).
    by_name: dict[str, list[Any]] = {}
    async for track in library.iter_tracks(None):
        name = _name_of(track.artist, track.title)
        if name is not None:
            by_name.setdefault(name, []).append(track)

    out: dict[str, Any] = {}
    for m in models:
        collections = [c.collection for c in legacy if c.model == m]
        report: dict[str, Any] = {
            "collections": collections, "rows": 0, "adopted": 0, "already_stored": 0, "unresolved": 0,
            "ambiguous": 0, "other_model_id": {}, "other_dim": 0, "unresolved_names": [], "ambiguous_names": [],
        }  # fmt: skip
        out[m] = report
        if not collections:
            continue
        expected_id = settings.model_source(m)
        if settings.model_id(m) != expected_id:
            report["refused"] = (
                f"embedd makes {m} vectors with a setting that changes them ({settings.model_id(m)}); "
                "they would not equal the original's"
            )
            continue
        wanted_id = model_id if model_id is not None else expected_id
        await service.executor.described()  # the model's width from its config, not the catalogue's guess
        dim = service.executor.model_dim(m)
        seen: set[str] = set()
        chosen: dict[str, list[tuple[str, Any]]] = {}  # collection -> (name, track) to adopt from it
        for collection in collections:
            described = await service.store_io.read(lambda store, c=collection: store.milvus.describe(c))
            if not _is_original(described):
                report.setdefault("skipped_collections", []).append(collection)
                continue
            # names and ids first (small); vectors only of the rows adopted, a page at a time
            names = await service.store_io.read(lambda store, c=collection: _names_of(store, c))
            for name, row_id in names:
                if name in seen:
                    continue
                seen.add(name)
                report["rows"] += 1
                if row_id != wanted_id:
                    report["other_model_id"][row_id] = report["other_model_id"].get(row_id, 0) + 1
                    continue
                tracks = by_name.get(name, [])
                if not tracks:
                    report["unresolved"] += 1
                    if len(report["unresolved_names"]) < LISTED:
                        report["unresolved_names"].append(name)
                elif len(tracks) > 1:
                    report["ambiguous"] += 1
                    if len(report["ambiguous_names"]) < LISTED:
                        report["ambiguous_names"].append({"name": name, "tracks": sorted(t.track_id for t in tracks)})
                else:
                    chosen.setdefault(collection, []).append((name, tracks[0]))
        adopted_id = adopted_model_id(settings.model_id(m))

        def adopt(store: "VectorStore", collection: str, part: list[tuple[str, Any]]) -> tuple[int, int, int]:
            """Store the vectors of ``part``; (adopted, already stored, other width)."""
            vectors = _vectors_of(store, collection, [name for name, _ in part])
            now = time.time()
            fresh, wide = [], 0
            for name, t in part:
                vector = vectors.get(name)
                if vector is None or (dim is not None and vector.shape[-1] != dim):
                    wide += 1
                    continue
                fresh.append(TrackRow(
                    track_id=t.track_id, vector=vector, path=t.path, title=t.title, artist=t.artist,
                    album=t.album, duration_s=float(t.duration_s), model_id=adopted_id,
                    file_size=int(t.file_size), file_mtime=float(t.file_mtime or 0.0), embedded_at=now,
                ))  # fmt: skip
            if not fresh:
                return 0, 0, wide
            service.store_io.prepare(store, m, int(fresh[0].vector.shape[-1]))  # embedd's set (created if new)
            have = store.get_vectors(m, [r.track_id for r in fresh])
            kept = sum(1 for r in fresh if r.track_id in have)
            fresh = [r for r in fresh if r.track_id not in have]
            if fresh and not dry_run:
                store.upsert(m, fresh)
            return len(fresh), kept, wide

        for collection, picks in chosen.items():
            for start in range(0, len(picks), FETCH_ROWS):
                part = picks[start : start + FETCH_ROWS]
                adopted, kept, wide = await service.store_io.call(lambda store, c=collection, p=part: adopt(store, c, p))
                report["adopted"] += adopted
                report["already_stored"] += kept
                report["other_dim"] += wide
    return {"models": out, "dry_run": dry_run}


def _names_of(store: "VectorStore", collection: str) -> list[tuple[str, str]]:
    """Every row's (name, model_id) of an original collection, read page by page."""
    return [
        (str(r["name"]), str(r.get("model_id") or ""))
        for page in store_rows.scan(store.milvus, collection, ["name", "model_id"])
        for r in page
    ]


def _vectors_of(store: "VectorStore", collection: str, names: list[str]) -> dict[str, np.ndarray]:
    rows = store.milvus.call(
        f"read vectors from {collection}",
        lambda c: c.query(collection, filter=in_list("name", names), output_fields=["name", "embedding"],
                          consistency_level=STRONG, timeout=max(store.milvus.timeout_s, 30)),
        loads=collection,
    )  # fmt: skip
    return {str(r["name"]): np.asarray(r["embedding"], dtype=np.float32) for r in rows}

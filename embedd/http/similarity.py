"""AudioMuse-AI's similarity API over embedd's stored vectors.

Stock Navidrome plugins can only make HTTP calls; AudioMuse-AI's Navidrome
plugin calls ``/api/similar_tracks``, ``/api/find_path`` and
``/api/similar_artists`` and reads AudioMuse-AI's JSON. These routes answer
the same shapes, so that plugin works against embedd unchanged. Every
neighbour search is the ``search`` op itself (run through the raw op table:
the route is counted once, under its own name, and admitted once: one
permit of :mod:`embedd.admission` for the whole route); only ``find_path``
reads stored vectors (through the store's owner, :meth:`StoreIO.stored_vectors`), to walk
between two of them.

Distances are ``1 - cosine similarity`` (AudioMuse-AI's convention), best first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

import numpy as np
from aiohttp import web

from embedd.errors import Code, EmbeddError
from embedd.http import params
from embedd.http.context import HttpContext
from embedd.http.responses import json_response
from embedd.library import require_library
from embedd.metrics import outcome_code
from embedd.models import CATALOG
from embedd.protocol import encode_vector

__all__ = ["routes"]

log = logging.getLogger(__name__)

#: Seed tracks of an artist that similar_artists searches from.
ARTIST_SEEDS = 10
#: Representative (seed, track) pairs per similar artist in component_matches.
ARTIST_PAIRS = 3
#: Hits similar_tracks asks for per answer it must give when dropping duplicates.
DEDUPE_OVERFETCH = 3

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes(ctx: HttpContext) -> list[web.RouteDef]:
    def counted(op: str, fn: Route) -> Route:
        # One admission permit for the route, taken before any work: the searches it runs take none.
        hold = ctx.admission.hold if ctx.admission is not None else (lambda _what: contextlib.nullcontext())

        async def route(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            code = "ok"
            try:
                with hold(op):
                    return await fn(request)
            except (Exception, asyncio.CancelledError) as exc:
                code = outcome_code(exc)
                raise
            finally:
                ctx.metrics.observe(op, code, time.perf_counter() - start)

        return route

    async def similar_tracks(request: web.Request) -> web.Response:
        q = request.query
        item_id = params.required(q, "item_id")
        n = params.integer(q, "n", 10, 1, 1000)
        dedupe = params.boolean(q, "eliminate_duplicates", False)
        model = params.model(q)
        # The seed is asked for too (it comes first, score 1.0): its tags are what duplicates are judged by.
        limit = min(1000, (n * DEDUPE_OVERFETCH if dedupe else n) + 1)
        hits = await _current(ctx, await _search(ctx, model, track_id=item_id, limit=limit))
        seen: set[tuple[str, str]] = set()
        if dedupe:
            seed = next((h for h in hits if h["track_id"] == item_id), None)
            if seed is not None and (key := _duplicate_key(seed)):
                seen.add(key)
        answer = []
        for hit in hits:
            if hit["track_id"] == item_id:
                continue
            if dedupe and (key := _duplicate_key(hit)):
                if key in seen:
                    continue
                seen.add(key)
            answer.append(_track(hit, 1.0 - hit["score"]))
            if len(answer) == n:
                break
        return json_response(answer)

    async def find_path(request: web.Request) -> web.Response:
        q = request.query
        start_id = params.required(q, "start_song_id")
        end_id = params.required(q, "end_song_id")
        if start_id == end_id:
            raise EmbeddError(Code.BAD_REQUEST, "'start_song_id' and 'end_song_id' are the same track; a path needs two")
        count = params.integer(q, ("count", "max_steps"), 25, 2, 200)
        fix_size = params.boolean(q, "path_fix_size", False)
        model = params.model(q)
        ends = await _vectors(ctx, model, [start_id, end_id])
        for tid in (start_id, end_id):
            if tid not in ends:
                raise EmbeddError(Code.NOT_FOUND, f"track {tid!r} has no stored vector in {CATALOG[model].collection!r}")
        a, b = ends[start_id], ends[end_id]
        ids, used = [start_id], {start_id, end_id}
        hits: dict[str, dict] = {}
        for step in range(1, count - 1):
            t = step / (count - 1)
            point = (1.0 - t) * a + t * b
            norm = float(np.linalg.norm(point))
            if norm < 1e-6:
                continue  # the line passes through the origin: no direction to search
            point = (point / norm).astype(np.float32)
            if fix_size:  # the nearest track not yet on the path
                found = await _search(ctx, model, vector=point, limit=1, exclude=list(used))
            else:  # the nearest track, left out when it is already on the path
                found = [h for h in await _search(ctx, model, vector=point, limit=1) if h["track_id"] not in used]
            if found:
                hit = found[0]
                ids.append(hit["track_id"])
                used.add(hit["track_id"])
                hits[hit["track_id"]] = hit
        ids.append(end_id)
        for tid, vector in ((start_id, a), (end_id, b)):
            hits[tid] = await _describe(ctx, model, tid, vector)
        vectors = {**ends, **await _vectors(ctx, model, ids[1:-1])}
        named = dict(zip(ids, await _current(ctx, [hits[tid] for tid in ids], keep_all=True)))
        path, total, previous = [], 0.0, None
        for tid in ids:
            vector = vectors.get(tid)
            step_distance = 0.0 if previous is None or vector is None else 1.0 - _cosine(previous, vector)
            total += step_distance
            path.append(_track(named[tid], step_distance))
            previous = vector if vector is not None else previous
        return json_response({"path": path, "total_distance": total})

    async def similar_artists(request: web.Request) -> web.Response:
        q = request.query
        key = params.required(q, "artist", "artist_id")
        n = params.integer(q, "n", 10, 1, 100)
        with_matches = params.boolean(q, "include_component_matches", False)
        model = params.model(q)
        library = require_library(ctx.service.library)
        artist = (await library.find_artists([key])).get(key)
        if artist is None:
            raise EmbeddError(Code.NOT_FOUND, f"artist {key!r} is not in Navidrome's library (neither an id nor a name)")
        own = {tid for tid, _ in artist.tracks}
        per_seed = min(1000, max(50, 10 * n))
        seeds: list[tuple[str, str]] = []
        best: dict[str, dict[int, tuple[float, dict]]] = {}  # artist (casefolded) -> seed index -> best hit
        names: dict[str, str] = {}
        for tid, title in artist.tracks:
            if len(seeds) == ARTIST_SEEDS:
                break
            try:
                hits = await _search(ctx, model, track_id=tid, limit=per_seed)
            except EmbeddError as exc:
                if exc.code is Code.NOT_FOUND:
                    continue  # this track has no vector (yet): another seed
                raise
            index = len(seeds)
            seeds.append((tid, title))
            for hit in hits:
                name = hit["artist"].strip()
                folded = name.casefold()
                if not name or hit["track_id"] in own or folded == artist.name.casefold():
                    continue
                names.setdefault(folded, name)
                per = best.setdefault(folded, {})
                if index not in per or hit["score"] > per[index][0]:
                    per[index] = (hit["score"], hit)
        if not seeds:
            raise EmbeddError(
                Code.NOT_FOUND,
                f"none of {artist.name!r}'s tracks has a stored vector in {CATALOG[model].collection!r}; run a batch job",
            )
        ranked = sorted(best.items(), key=lambda item: -sum(s for s, _ in item[1].values()) / len(seeds))[:n]
        ids = await library.find_artists([names[folded] for folded, _ in ranked]) if ranked else {}
        answer = []
        for folded, per in ranked:
            name = names[folded]
            found = ids.get(name)
            entry: dict[str, Any] = {
                "artist": name,
                "artist_id": found.artist_id if found is not None else None,
                "divergence": 1.0 - sum(s for s, _ in per.values()) / len(seeds),
            }
            if with_matches:
                entry["component_matches"] = _component_matches(seeds, per)
            answer.append(entry)
        return json_response(answer)

    return [
        web.get("/api/similar_tracks", counted("similar_tracks", similar_tracks)),
        web.get("/api/find_path", counted("find_path", find_path)),
        web.get("/api/similar_artists", counted("similar_artists", similar_artists)),
    ]


# ---------------------------------------------------------------- helpers


async def _search(
    ctx: HttpContext,
    model: str,
    *,
    track_id: str | None = None,
    vector: np.ndarray | None = None,
    limit: int,
    exclude: list[str] | None = None,
) -> list[dict]:
    """The ``search`` op's hits (by stored track or by vector)."""
    fields: dict[str, Any] = {"model": model, "limit": limit}
    if track_id is not None:
        fields["track_id"] = track_id
    else:
        fields["vector"] = encode_vector(vector, "bin")
    if exclude:
        fields["exclude_track_ids"] = exclude
    return (await ctx.call("search", fields, counted=False))["hits"]


async def _vectors(ctx: HttpContext, model: str, track_ids: list[str]) -> dict[str, np.ndarray]:
    """The stored vectors of those tracks that have one, read on the store's read lane."""
    service = ctx.service
    await service.executor.described()
    dim = service.executor.model_dim(model)

    return await service.store_io.stored_vectors(model, dim, track_ids)


async def _describe(ctx: HttpContext, model: str, track_id: str, vector: np.ndarray) -> dict:
    """The stored tags of a track: it is its own nearest neighbour; Navidrome's row otherwise."""
    for hit in await _search(ctx, model, vector=vector, limit=3):
        if hit["track_id"] == track_id:
            return hit
    library = ctx.service.library
    track = await library.get_track(track_id) if library is not None else None
    return {
        "track_id": track_id,
        "title": track.title if track else "",
        "artist": track.artist if track else "",
        "album": track.album if track else "",
    }


async def _current(ctx: HttpContext, hits: list[dict], *, keep_all: bool = False) -> list[dict]:
    """The hits under the ids Navidrome has now, with their MusicBrainz ids where tagged.

    Navidrome resolves a suggestion by id, then MusicBrainz id, then title and
    artist. After its canonical-id migration the stored ids are stale until a
    batch job re-keys them; the library still knows each file by its path, so
    the answer names the current id (and the MusicBrainz id) right away. A hit
    that resolves to a track already answered (a crash between a re-key's write
    and delete leaves both rows) is dropped, unless ``keep_all`` (a path's steps
    are distinct tracks by construction). Without a library, or when it cannot
    be read, the hits go out as stored: the answer is still useful.
    """
    library = ctx.service.library
    if library is None or not hits:
        return hits
    try:
        known = await library.identify([(h["track_id"], h.get("path", "")) for h in hits])
    except EmbeddError as exc:
        log.warning("answering with stored track ids: %s", exc.message)
        return hits
    out, seen = [], set()
    for hit in hits:
        identity = known.get(hit["track_id"])
        if identity is not None:
            hit = {**hit, "track_id": identity.track_id, **({"mbid": identity.mbid} if identity.mbid else {})}
        if hit["track_id"] in seen and not keep_all:
            continue
        seen.add(hit["track_id"])
        out.append(hit)
    return out


def _track(hit: dict, distance: float) -> dict:
    """One track in AudioMuse-AI's shape (plus ``mbid`` when Navidrome has one: its matcher reads it)."""
    track = {
        "item_id": hit["track_id"],
        "title": hit["title"],
        "author": hit["artist"],
        "album": hit["album"],
        "distance": float(distance),
    }
    if hit.get("mbid"):
        track["mbid"] = hit["mbid"]
    return track


def _duplicate_key(hit: dict) -> tuple[str, str] | None:
    """(artist, title), normalised; None when the tags are too thin to call two tracks the same song."""
    title = " ".join(hit["title"].casefold().split())
    if not title:
        return None
    return (" ".join(hit["artist"].casefold().split()), title)


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    denominator = float(np.linalg.norm(u64) * np.linalg.norm(v64))
    return float(np.dot(u64, v64) / denominator) if denominator > 0 else 0.0


def _component_matches(seeds: list[tuple[str, str]], per: dict[int, tuple[float, dict]]) -> list[dict]:
    """The best (seed, track) pairs of one similar artist, in AudioMuse-AI's component-match shape."""
    pairs = sorted(per.items(), key=lambda item: -item[1][0])[:ARTIST_PAIRS]
    return [
        {
            "component1_index": seed_index,
            "component2_index": rank,
            "distance": 1.0 - score,
            "component1_weight": 1.0 / len(seeds),
            "component2_weight": 1.0 / len(pairs),
            "artist1_representative_songs": [
                {"item_id": seeds[seed_index][0], "title": seeds[seed_index][1], "distance_to_component": 0.0}
            ],
            "artist2_representative_songs": [
                {"item_id": hit["track_id"], "title": hit["title"], "distance_to_component": 1.0 - score}
            ],
        }
        for rank, (seed_index, (score, hit)) in enumerate(pairs)
    ]

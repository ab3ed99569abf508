"""The recommender's I/O: a request's seed vectors fetched, texts embedded, each model searched.

Owns :func:`recommend` (the ``recommend`` op, the fork's ``/playlist/{mode}``,
``embedd mix``) and :func:`bridged_text_vector`: the orchestration around the
pure ranking (:mod:`embedd.recommend.ranking`). It reads Milvus or the
in-memory index through ``store_io.read`` (:mod:`embedd.recommend.space`),
embeds texts with MuQ-MuLan on the executor's interactive lane, and asks
Navidrome's database for libraries and artists; every score it returns is
computed by the ranking functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG
from embedd.protocol import decode_vector
from embedd.recommend.ranking import (
    BRIDGE_TRACKS,
    NEGATIVE_POOL,
    TEXT_MODEL,
    SeedVector,
    bridge_seeds,
    bridged_vector,
    diversify,
    facet_filtered,
    merge,
    model_scores,
    negative_similarities,
    neighbours,
    penalised,
    pool,
)
from embedd.recommend.seeds import resolve_seeds
from embedd.recommend.space import Space, kick_indexes, model_spaces

if TYPE_CHECKING:
    from embedd.ops.recommend import RecommendArgs
    from embedd.service import Service
    from embedd.store import VectorStore

__all__ = ["bridged_text_vector", "recommend"]


async def recommend(service: Service, args: RecommendArgs) -> dict[str, Any]:
    """The ``recommend`` op: ``{"tracks": [...], "warnings": [...]}`` (see docs/protocol.md)."""
    from embedd.executor import Lane

    await service.executor.described()
    models = list(args.models)
    dims = {m: service.executor.model_dim(m) for m in {*models, TEXT_MODEL}}
    warnings: list[str] = []
    limit = args.limit
    if not args.seeds:
        return {"tracks": [], "warnings": ["no seeds given; nothing to recommend from"]}

    # Seeds, deduplicated by track (the highest weight wins); vectors decoded; texts embedded.
    queries, texts = resolve_seeds(args)
    seed_ids = {s.track_id for s in args.seeds if s.track_id}

    negatives_text: list[np.ndarray] = []
    if texts or args.negative_prompts:
        for q, text in texts:
            q.muq = (await service.executor.embed_text(Lane.INTERACTIVE, TEXT_MODEL, text)).vector
        given_muq = args.negative_embeddings.get(TEXT_MODEL)
        if args.negative_prompts and not given_muq:
            for text in args.negative_prompts:
                negatives_text.append((await service.executor.embed_text(Lane.INTERACTIVE, TEXT_MODEL, text)).vector)
    for q in queries:
        if q.vector is not None and q.vector.shape[-1] == dims[TEXT_MODEL]:
            q.muq = q.vector  # a MuQ-space vector: bridged into models of another width
    negatives_given = {m: [decode_vector(v) for v in vs] for m, vs in args.negative_embeddings.items()}
    negatives_muq = negatives_given.get(TEXT_MODEL) or negatives_text

    excluded = seed_ids | set(args.exclude_track_ids) | set(args.disliked_track_ids)
    k = neighbours(limit) * (3 if args.library_ids else 1)

    def search(store: VectorStore) -> tuple[dict, dict, dict, dict, dict[str, Space]]:
        for m in dims:
            service.store_io.prepare(store, m, dims[m], any_dim=True)
        spaces = model_spaces(store, dims)
        # MuQ-space queries that a model of another width needs bridged: one batched MuQ search.
        bridge_queries: list[np.ndarray] = []
        needs_bridge = any(m != TEXT_MODEL for m in models)
        text_qs = [q for q in queries if q.muq is not None]
        if needs_bridge and (text_qs or negatives_muq):
            bridge_queries = [spaces[TEXT_MODEL].embed(v) for v in [*(q.muq for q in text_qs), *negatives_muq]]
        bridge_hits = spaces[TEXT_MODEL].search(store, bridge_queries, BRIDGE_TRACKS) if bridge_queries else []
        bridge_ids = {t for hits in bridge_hits for t, _ in hits}
        track_ids = [q.track_id for q in queries if q.track_id is not None]
        per_model: dict[str, dict[str, tuple[float, str]]] = {}
        negs: dict[str, list[np.ndarray]] = {}
        notes: dict[str, list[str]] = {}
        found: set[str] = set()
        for m in models:
            space = spaces[m]
            stored = space.get(store, [*track_ids, *(bridge_ids if m != TEXT_MODEL else ())])
            found.update(t for t in track_ids if t in stored)
            seeds: list[SeedVector] = []
            bridged = 0
            for qi, q in enumerate(queries):
                if q.weight <= 0:
                    continue
                if q.per_model is not None:
                    if m in q.per_model:
                        seeds.append(SeedVector(space.embed(q.per_model[m]), q.weight, q.reason))
                elif q.track_id is not None:
                    if q.track_id in stored:
                        seeds.append(SeedVector(stored[q.track_id], q.weight, q.reason))
                elif q.vector is not None and q.vector.shape[-1] == dims[m]:
                    seeds.append(SeedVector(space.embed(q.vector), q.weight, q.reason))
                elif q.muq is not None and m != TEXT_MODEL:
                    hits = bridge_hits[text_qs.index(q)] if q in text_qs else []
                    got = bridge_seeds(hits, stored, q.weight, f"{q.reason} via muq")
                    seeds.extend(got)
                    bridged += bool(got)
                elif q.muq is not None:
                    seeds.append(SeedVector(space.embed(q.muq), q.weight, q.reason))
                elif q.vector is not None:
                    notes.setdefault(m, []).append(
                        f"seeds[{q.index}]: its embedding has {q.vector.shape[-1]} values; {m} vectors have "
                        f"{dims[m]} (and muq's {dims[TEXT_MODEL]}): not used for {m}"
                    )
            if bridged:
                notes.setdefault(m, []).append(
                    f"{m}: {bridged} text seed(s) bridged through MuQ-MuLan (the text's {BRIDGE_TRACKS} nearest muq "
                    f"tracks, their {m} vectors as seeds): {m} has no text tower"
                )
            if not seeds:
                continue
            hits = space.search(store, [s.vector for s in seeds], k, excluded)  # one batched search per model
            per_model[m] = model_scores(seeds, hits)
            # Negative vectors in this model: given, the MuQ ones themselves, or bridged.
            if m in negatives_given and m != TEXT_MODEL:
                negs[m] = [space.embed(v) for v in negatives_given[m] if v.shape[-1] == dims[m]]
            elif m == TEXT_MODEL:
                negs[m] = [space.embed(v) for v in negatives_muq if v.shape[-1] == dims[m]]
            elif negatives_muq:
                offset = len(text_qs)
                negs[m] = [
                    v
                    for j in range(len(negatives_muq))
                    if (v := bridged_vector(
                        bridge_seeds(bridge_hits[offset + j], stored, 1.0, "")
                    )) is not None
                ]  # fmt: skip
        return per_model, negs, notes, found, spaces

    per_model, negs, notes, found, spaces = await service.store_io.read(search)
    kick_indexes(service, dims)
    for m in models:
        warnings.extend(notes.get(m, []))
    missing = [q.track_id for q in queries if q.track_id is not None and q.track_id not in found]
    if missing and per_model:
        shown = ", ".join(repr(t) for t in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warnings.append(f"{len(missing)} seed track(s) have no stored vector in any of the models: {shown}")
    if not per_model:
        why = "none of the seeds has a stored vector in " + ", ".join(CATALOG[m].collection for m in models)
        if missing and len(missing) <= 10:
            why += f" ({', '.join(repr(t) for t in missing)})"
        return {"tracks": [], "warnings": [*warnings, f"{why}; returning an empty playlist"]}
    for m in models:
        if m not in per_model:
            warnings.append(f"{m}: no seed has a vector in {CATALOG[m].collection!r}; {m} left out of the merge")

    # Libraries and disliked artists: Navidrome's database knows each candidate's.
    candidates = {t for scores in per_model.values() for t in scores}
    library_of: dict[str, tuple[int | None, str]] = {}
    if args.library_ids or args.disliked_artist_ids:
        if service.library is None:
            warnings.append("library_ids and disliked_artist_ids need the Navidrome database (--navidrome-db); ignored")
        else:
            library_of = await service.library.facets(list(candidates))
    if library_of:
        per_model = facet_filtered(
            per_model, library_of, set(args.library_ids), set(args.disliked_artist_ids), args.dislike_strength
        )
    per_model = {m: {t: v for t, v in scores.items() if t not in excluded} for m, scores in per_model.items()}

    # Negative prompts: each model's candidates (its best NEGATIVE_POOL) against that model's negative vectors.
    negative: dict[str, float] = {}
    with_negs = {m: negs[m] for m in per_model if negs.get(m)}
    if with_negs:
        tops = {
            m: sorted(per_model[m], key=lambda t: (-per_model[m][t][0], t))[:NEGATIVE_POOL] for m in with_negs
        }
        held = await service.store_io.read(lambda store: {m: spaces[m].get(store, ids) for m, ids in tops.items()})
        for m, vs in with_negs.items():
            sims = negative_similarities(held[m], vs)
            per_model[m] = {
                t: (penalised(per_model[m][t][0], sims[t], args.negative_prompt_penalty), per_model[m][t][1])
                for t in tops[m]
                if t in sims
            }
            for t, sim in sims.items():
                negative[t] = max(negative.get(t, -1.0), sim)
    if args.negative_prompts and not with_negs:
        warnings.append("negative_prompts: no model had negative vectors (no stored muq tracks to bridge through)")

    ranked = merge(
        per_model,
        args.merge_strategy,
        priorities=args.model_priorities,
        min_agreement=args.min_model_agreement,
        top=pool(limit),
    )
    if args.min_model_agreement > len(per_model) and args.merge_strategy == "union":
        warnings.append(
            f"min_model_agreement {args.min_model_agreement} is more than the {len(per_model)} model(s) with seed "
            "vectors: nothing can agree"
        )
    vectors: dict[str, dict[str, np.ndarray]] = {}
    if args.diversity > 0 and len(ranked) > 1:
        top = ranked[: pool(limit)]
        wanted = {m: [c.track_id for c in top if m in c.models] for m in per_model}
        vectors = await service.store_io.read(lambda store: {m: spaces[m].get(store, ids) for m, ids in wanted.items()})
    chosen = diversify(ranked[: pool(limit)], vectors, args.diversity, limit)
    if len(chosen) < limit:
        warnings.append(f"{len(chosen)} of {limit} tracks: the seeds' neighbourhoods hold no more that pass the filters")
    def describe(store: VectorStore) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for m in per_model:
            out.update(store.describe(m, [c.track_id for c in chosen if m in c.models and c.track_id not in out]))
        return out

    shown = await service.store_io.read(describe) if chosen else {}
    tracks = []
    for c in chosen:
        entry: dict[str, Any] = {"track_id": c.track_id, "score": c.score, "reason": c.reason, "models": c.models}
        entry.update(shown.get(c.track_id, {}))
        if c.track_id in negative:
            entry["negative_similarity"] = negative[c.track_id]
        tracks.append(entry)
    return {"tracks": tracks, "warnings": warnings}


async def bridged_text_vector(service: Service, model: str, text: str) -> tuple[np.ndarray, list[str]]:
    """A text's vector in ``model``'s space, derived through MuQ-MuLan: the weighted mean of the
    ``model`` vectors of the text's nearest MuQ tracks. Returns the vector and those tracks.
    """
    from embedd.executor import Lane

    await service.executor.described()
    muq = (await service.executor.embed_text(Lane.INTERACTIVE, TEXT_MODEL, text)).vector
    dims = {m: service.executor.model_dim(m) for m in (model, TEXT_MODEL)}

    def read(store: VectorStore) -> tuple[np.ndarray | None, list[str]]:
        for m, dim in dims.items():
            service.store_io.prepare(store, m, dim, any_dim=True)
        # The stored vectors themselves (not the index's, which may be projected): the answer is a vector.
        spaces = model_spaces(store, [TEXT_MODEL])
        hits = spaces[TEXT_MODEL].search(store, [spaces[TEXT_MODEL].embed(muq)], BRIDGE_TRACKS)[0]
        stored = store.get_vectors(model, [t for t, _ in hits])
        seeds = bridge_seeds(hits, stored, 1.0, "")
        return bridged_vector(seeds), [t for t, _ in hits if t in stored]

    vector, ids = await service.store_io.read(read)
    kick_indexes(service, dims)
    if vector is None:
        raise EmbeddError(
            Code.UNSUPPORTED,
            f"model {model!r} has no text tower and no stored tracks with both muq and {model} vectors to derive "
            f"one through MuQ-MuLan; run a batch job with muq and {model}",
        )
    return vector, ids

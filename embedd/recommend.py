"""The recommender: playlists from seed tracks, texts and vectors, over every model's stored vectors.

One recommender for every face: the ``recommend`` op (socket, ``POST
/v1/recommend``), the Navidrome fork's ``POST /playlist/{mode}``, ``embedd
mix`` and the Go client all end in :func:`recommend`.

The ranking is pure (the functions above :func:`recommend`, over plain
vectors and neighbour lists, tested against brute-force cosine); the I/O
(Milvus through ``store_io.read``, MuQ-MuLan's text tower through the
executor's interactive lane, Navidrome's database for libraries and artists)
is :func:`recommend` and its helpers. How a request is answered:

1. **Seed vectors, per model.** A track seed uses its own stored vector in
   each model's collection (fetched in batches). A seed with an ``embedding``
   uses it in the model whose width it has. A text (a ``text`` seed, a
   negative prompt) is embedded by MuQ-MuLan. MERT and Music2Latent have no
   text tower: a MuQ-space query (text, or a MuQ-wide ``embedding``) is
   *bridged* — its ``BRIDGE_TRACKS`` nearest MuQ tracks stand in for it, their
   own MERT / latent vectors becoming seeds weighted by their MuQ similarity.
2. **Per model, per seed:** the seed's ``neighbours(limit)`` nearest stored
   tracks (one batched Milvus search per model), scored ``cosine x weight``; a
   candidate keeps its best score over the seeds (and that seed's reason).
3. **Negative prompts** (per model, over each model's best ``pool(limit)``
   candidates): ``score x (1 - max(0, sim) x (1 - penalty))``, ``sim`` the
   highest cosine to any negative vector in that model.
4. **Merge** the models: ``union`` (a track found by at least
   ``min_model_agreement`` models, scored by the mean of its per-model scores),
   ``intersection`` (found by every model that had seed vectors), ``priority``
   (the intersection first, then each model's own ranking in priority order).
5. **Dislikes and libraries:** disliked tracks (and seeds, excluded ids) are
   never returned; a disliked artist's tracks are scored ``x (1 -
   dislike_strength)``, left out at 1.0; ``library_ids`` keeps only tracks of
   those Navidrome libraries.
6. **Diversity** (maximal marginal relevance over the candidates' vectors):
   picks one at a time the candidate maximising ``(1 - d) x score / best -
   d x (its highest cosine to a track already picked)``; ``d = 0`` is the
   similarity ranking, ``d = 1`` spreads as widely as the pool allows.

Long because: the pure ranking (per-model scores, merge, penalties, MMR) beside its one
I/O function.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG
from embedd.protocol import DEFAULT_MODEL_PRIORITIES, RecommendArgs, decode_vector

if TYPE_CHECKING:
    from embedd.service import Service
    from embedd.store import VectorStore
    from embedd.store.model_index import ModelIndex

__all__ = [
    "BRIDGE_TRACKS",
    "Candidate",
    "SeedVector",
    "bridge_seeds",
    "bridged_text_vector",
    "diversify",
    "merge",
    "model_scores",
    "neighbours",
    "pool",
    "recommend",
]

log = logging.getLogger(__name__)

#: How many nearest MuQ tracks stand in for a text (or MuQ-space vector) in MERT / Music2Latent.
BRIDGE_TRACKS = 8
#: The text bridge's own model: the one model with a text tower.
TEXT_MODEL = "muq"


def neighbours(limit: int) -> int:
    """Nearest tracks searched per seed and model: about 3 x limit (the original's), at least 30."""
    return min(1000, max(30, 3 * limit))


def pool(limit: int) -> int:
    """The best merged candidates that diversification chooses among."""
    return max(100, 4 * limit)


#: Candidates per model checked against negative prompts (those beyond are left out).
NEGATIVE_POOL = 2000


# ---------------------------------------------------------------- pure ranking


@dataclasses.dataclass(frozen=True, slots=True)
class SeedVector:
    """One query vector in one model's space, with the weight and reason of the seed it stands for."""

    vector: np.ndarray
    weight: float
    reason: str


@dataclasses.dataclass(slots=True)
class Candidate:
    track_id: str
    score: float
    reason: str
    models: list[str]
    negative_similarity: float | None = None


def model_scores(seeds: Sequence[SeedVector], hits: Sequence[Sequence[tuple[str, float]]]) -> dict[str, tuple[float, str]]:
    """track -> (best ``cosine x weight`` over the seeds, that seed's reason); scores <= 0 are left out.

    ``hits[i]`` are seed i's neighbours as (track id, cosine). Ties keep the earlier seed.
    """
    best: dict[str, tuple[float, str]] = {}
    for seed, seed_hits in zip(seeds, hits):
        for track_id, cosine in seed_hits:
            score = float(cosine) * seed.weight
            if score <= 0.0:
                continue
            if track_id not in best or score > best[track_id][0]:
                best[track_id] = (score, seed.reason)
    return best


def cosines(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine of every row of ``matrix`` with every row of ``vectors`` (float64; zero rows give 0)."""
    a = np.asarray(matrix, dtype=np.float64)
    b = np.asarray(vectors, dtype=np.float64)
    an = np.linalg.norm(a, axis=1, keepdims=True)
    bn = np.linalg.norm(b, axis=1, keepdims=True)
    an[an == 0] = 1.0
    bn[bn == 0] = 1.0
    return (a / an) @ (b / bn).T


def negative_similarities(vectors: Mapping[str, np.ndarray], negatives: Sequence[np.ndarray]) -> dict[str, float]:
    """track -> its highest cosine to any negative vector."""
    if not vectors or not negatives:
        return {}
    ids = list(vectors)
    sims = cosines(np.stack([vectors[t] for t in ids]), np.stack(negatives))
    return {tid: float(row.max()) for tid, row in zip(ids, sims)}


def penalised(score: float, similarity: float, penalty: float) -> float:
    """The original's negative-prompt penalty: ``score x (1 - max(0, sim) x (1 - penalty))``."""
    return score * (1.0 - max(0.0, similarity) * (1.0 - penalty))


def merge(
    per_model: Mapping[str, Mapping[str, tuple[float, str]]],
    strategy: str,
    *,
    priorities: Mapping[str, int] | None = None,
    min_agreement: int = 1,
    top: int | None = None,
) -> list[Candidate]:
    """The models' candidates combined by ``strategy``, best first (ties by track id).

    ``per_model``: model -> track -> (score, reason), only for the models that had
    seed vectors, in the request's order. A candidate's reason is the one of its
    best per-model score; ``models`` lists the models that found it, in order.
    ``top``: only the first ``top`` of the ranking (a request holds about ten
    thousand candidates and uses a hundred: ranking them all cost 0.1 s).
    """
    models = list(per_model)
    if not models:
        return []
    if strategy not in ("union", "intersection", "priority"):
        raise ValueError(f"unknown merge strategy {strategy!r}")
    # Plain dicts of floats, one pass per model: no object per candidate until the best are known.
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for model in models:
        for tid, (score, _reason) in per_model[model].items():
            if tid in total:
                total[tid] += score  # sums in model order, as np.mean does
                count[tid] += 1
            else:
                total[tid] = score
                count[tid] = 1

    def best(scores: Mapping[str, float]) -> list[tuple[float, str]]:
        """(score, track), best first, ties by track id; only the first ``top`` when given."""
        items: Iterable[tuple[str, float]] = scores.items()
        if top is not None and 0 < top < len(scores):
            values = np.fromiter(scores.values(), np.float64, len(scores))
            cut = float(np.partition(values, len(values) - top)[len(values) - top])  # the top-th highest
            items = [(t, s) for t, s in items if s >= cut]  # ties at the cut included, then ordered
        ranked = sorted(((s, t) for t, s in items), key=lambda x: (-x[0], x[1]))
        return ranked if top is None else ranked[:top]

    def combined(score: float, tid: str, among: Sequence[str]) -> Candidate:
        held = [per_model[m][tid] for m in among]
        first_best = max(range(len(held)), key=lambda i: held[i][0])  # ties: the first
        return Candidate(tid, score, held[first_best][1], list(among))

    def found_by(tid: str) -> list[str]:
        return [m for m in models if tid in per_model[m]]

    need = len(models) if strategy != "union" else min_agreement
    means = {t: s / count[t] for t, s in total.items() if count[t] >= need}
    first = [combined(s, t, found_by(t)) for s, t in best(means)]
    if strategy != "priority":
        return first
    prio = {**DEFAULT_MODEL_PRIORITIES, **(priorities or {})}
    out, seen = first, set(means)
    for model in sorted(models, key=lambda m: (prio.get(m, 1 << 30), models.index(m))):
        if top is not None and len(out) >= top:
            break
        own = {t: s for t, (s, _r) in per_model[model].items() if t not in seen}
        rest = [combined(s, t, [model]) for s, t in best(own)]
        out = out + rest
        seen.update(c.track_id for c in rest)
    return out if top is None else out[:top]


def diversify(
    ranked: Sequence[Candidate], vectors: Mapping[str, Mapping[str, np.ndarray]], diversity: float, limit: int
) -> list[Candidate]:
    """Maximal marginal relevance: ``limit`` of ``ranked`` (best first) picked to spread.

    ``vectors``: model -> track -> vector; two candidates' similarity is the mean
    cosine over the models holding both (0 when none does). ``diversity`` 0
    returns the first ``limit`` unchanged.
    """
    if diversity <= 0.0 or len(ranked) <= 1:
        return list(ranked[:limit])
    ids = [c.track_id for c in ranked]
    n = len(ids)
    total = np.zeros((n, n))
    count = np.zeros((n, n))
    for per in vectors.values():
        have = [i for i, t in enumerate(ids) if t in per]
        if len(have) < 2:
            continue
        sims = cosines(np.stack([per[ids[i]] for i in have]), np.stack([per[ids[i]] for i in have]))
        idx = np.ix_(have, have)
        total[idx] += sims
        count[idx] += 1
    similarity = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    top = max(c.score for c in ranked) or 1.0
    relevance = np.array([c.score / top for c in ranked])
    chosen: list[int] = []
    closest = np.full(n, -np.inf)  # each candidate's highest similarity to a chosen one
    left = np.ones(n, dtype=bool)
    while len(chosen) < min(limit, n):
        redundancy = np.where(np.isfinite(closest), closest, 0.0)
        objective = (1.0 - diversity) * relevance - diversity * redundancy
        objective[~left] = -np.inf
        pick = int(np.argmax(objective))  # ties: the better-ranked one (argmax takes the first)
        chosen.append(pick)
        left[pick] = False
        closest = np.maximum(closest, similarity[pick])
    return [ranked[i] for i in chosen]


def bridge_seeds(
    hits: Sequence[tuple[str, float]], vectors: Mapping[str, np.ndarray], weight: float, reason: str
) -> list[SeedVector]:
    """A MuQ-space query's stand-ins in another model: its nearest MuQ tracks' own vectors there.

    Each bridge track weighs ``weight x sim / best sim`` (the nearest weighs the
    seed's weight); tracks at cosine <= 0 or without a vector in the model are left out.
    """
    positive = [(t, s) for t, s in hits if s > 0 and t in vectors]
    if not positive:
        return []
    best = max(s for _, s in positive)
    return [SeedVector(vectors[t], weight * s / best, reason) for t, s in positive]


def bridged_vector(seeds: Sequence[SeedVector]) -> np.ndarray | None:
    """One vector for bridged seeds: their weighted mean direction (unit length)."""
    if not seeds:
        return None
    acc = np.zeros(seeds[0].vector.shape, dtype=np.float64)
    for s in seeds:
        v = s.vector.astype(np.float64)
        n = float(np.linalg.norm(v))
        if n > 0:
            acc += s.weight * v / n
    norm = float(np.linalg.norm(acc))
    return (acc / norm).astype(np.float32) if norm > 0 else None


# ---------------------------------------------------------------- the I/O around it


class _Space:
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


def _spaces(store: VectorStore, models: Iterable[str]) -> dict[str, _Space]:
    """Each model's space for this request (after ``prepare``): its index when one serves the live set."""
    index = getattr(store, "index", None)
    out = {}
    for m in models:
        held = index.serving(m, store.collections.target(m, None)[1].physical) if index is not None else None
        out[m] = _Space(m, held)
    return out


def _kick(service: Service, dims: Mapping[str, int]) -> None:
    """Start building the indexes a request found missing (in the background)."""
    index = getattr(service.store_io.reader, "index", None)
    if index is not None:
        index.kick(service.store_io, dims)


@dataclasses.dataclass(eq=False)
class _Query:
    """A seed as the request gave it, resolved to what each model searches with."""

    index: int
    weight: float
    reason: str
    track_id: str | None = None  # a stored track to look up per model
    vector: np.ndarray | None = None  # a direct vector (any model whose width it has)
    muq: np.ndarray | None = None  # a MuQ-space vector (from a text), bridged into the other models
    per_model: dict[str, np.ndarray] | None = None  # a vector for each model (an audio file's)


def _reason(source: str) -> str:
    return f"seed:{source or 'track'}"


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
    queries: list[_Query] = []
    by_track: dict[str, _Query] = {}
    texts: list[tuple[_Query, str]] = []
    for i, seed in enumerate(args.seeds):
        q = _Query(i, float(seed.weight), _reason(seed.source))
        if seed.embedding is not None:
            q.vector = decode_vector(seed.embedding)
            if seed.source in ("", "track"):
                q.reason = "seed:vector"
        elif seed.embeddings:
            q.per_model = {m: decode_vector(v) for m, v in seed.embeddings.items()}
            q.reason = _reason(seed.source or "file")
        elif seed.text is not None:
            q.reason = _reason(seed.source or "text")
            texts.append((q, seed.text))
        else:
            q.track_id = seed.track_id
            if seed.track_id in by_track:
                other = by_track[seed.track_id]
                other.weight = max(other.weight, q.weight)
                continue
            by_track[seed.track_id] = q
        queries.append(q)
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

    def search(store: VectorStore) -> tuple[dict, dict, dict, dict, dict[str, _Space]]:
        for m in dims:
            service.store_io.prepare(store, m, dims[m], any_dim=True)
        spaces = _spaces(store, dims)
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
    _kick(service, dims)
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
    libraries = set(args.library_ids)
    disliked_artists = set(args.disliked_artist_ids)
    artist_factor: dict[str, float] = {}
    if library_of:
        for tid in candidates:
            lib_id, artist_id = library_of.get(tid, (None, ""))
            if libraries and lib_id not in libraries:
                artist_factor[tid] = 0.0
            elif artist_id and artist_id in disliked_artists:
                artist_factor[tid] = 1.0 - args.dislike_strength
        per_model = {
            m: {t: (s * artist_factor.get(t, 1.0), r) for t, (s, r) in scores.items() if artist_factor.get(t, 1.0) > 0}
            for m, scores in per_model.items()
        }
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
        spaces = _spaces(store, [TEXT_MODEL])
        hits = spaces[TEXT_MODEL].search(store, [spaces[TEXT_MODEL].embed(muq)], BRIDGE_TRACKS)[0]
        stored = store.get_vectors(model, [t for t, _ in hits])
        seeds = bridge_seeds(hits, stored, 1.0, "")
        return bridged_vector(seeds), [t for t, _ in hits if t in stored]

    vector, ids = await service.store_io.read(read)
    _kick(service, dims)
    if vector is None:
        raise EmbeddError(
            Code.UNSUPPORTED,
            f"model {model!r} has no text tower and no stored tracks with both muq and {model} vectors to derive "
            f"one through MuQ-MuLan; run a batch job with muq and {model}",
        )
    return vector, ids

"""The recommender's pure ranking: per-model scores, negative prompts, merge, dislikes, diversity.

Owns everything that turns neighbour lists and vectors into a ranked playlist,
with no I/O: plain numpy vectors and ``(track id, cosine)`` lists in, scores
and :class:`Candidate` lists out. Kept apart from the searching
(:mod:`embedd.recommend.engine`) so each step can be tested against
brute-force cosine and benchmarked on its own; the steps are described in
:mod:`embedd.recommend`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

#: Which model wins a tie under the ``priority`` strategy (lower first), unless the request says otherwise.
DEFAULT_MODEL_PRIORITIES = {"muq": 1, "mert": 2, "latent": 3}


__all__ = [
    "BRIDGE_TRACKS",
    "NEGATIVE_POOL",
    "TEXT_MODEL",
    "Candidate",
    "SeedVector",
    "bridge_seeds",
    "bridged_vector",
    "cosines",
    "diversify",
    "facet_filtered",
    "merge",
    "model_scores",
    "negative_similarities",
    "neighbours",
    "penalised",
    "pool",
]

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


def facet_filtered(
    per_model: Mapping[str, Mapping[str, tuple[float, str]]],
    facets: Mapping[str, tuple[int | None, str]],
    libraries: set[int],
    disliked_artists: set[str],
    dislike_strength: float,
) -> dict[str, dict[str, tuple[float, str]]]:
    """Libraries and disliked artists applied to every model's candidates.

    ``facets``: track -> (library id, artist id), from Navidrome's database. A
    track outside ``libraries`` (when any are given) is left out; a disliked
    artist's track is scored ``x (1 - dislike_strength)``, left out at 1.0.
    """
    candidates = {t for scores in per_model.values() for t in scores}
    artist_factor: dict[str, float] = {}
    for tid in candidates:
        lib_id, artist_id = facets.get(tid, (None, ""))
        if libraries and lib_id not in libraries:
            artist_factor[tid] = 0.0
        elif artist_id and artist_id in disliked_artists:
            artist_factor[tid] = 1.0 - dislike_strength
    return {
        m: {t: (s * artist_factor.get(t, 1.0), r) for t, (s, r) in scores.items() if artist_factor.get(t, 1.0) > 0}
        for m, scores in per_model.items()
    }


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


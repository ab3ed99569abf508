"""The recommender: playlists from seed tracks, texts and vectors, over every model's stored vectors.

One recommender for every face: the ``recommend`` op (socket, ``POST
/v1/recommend``), the Navidrome fork's ``POST /playlist/{mode}``, ``embedd
mix`` and the Go client all end in :func:`recommend`.

The ranking is pure (:mod:`embedd.recommend.ranking`, over plain vectors and
neighbour lists, tested against brute-force cosine); the I/O (Milvus through
``store_io.read``, MuQ-MuLan's text tower through the executor's interactive
lane, Navidrome's database for libraries and artists) is :func:`recommend`
and its helpers. How a request is answered:

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

The package, by concern:

- :mod:`embedd.recommend.ranking`: the pure ranking (steps 2 to 6 over plain
  vectors and neighbour lists: per-model scores, negative-prompt penalty,
  merge, dislikes and libraries, MMR diversity, the bridge's weights);
- :mod:`embedd.recommend.seeds`: the request's seeds resolved to queries (the
  request's shape and validation are :class:`embedd.ops.recommend.RecommendArgs`);
- :mod:`embedd.recommend.space`: where one model's vectors are compared, the
  in-memory index or Milvus;
- :mod:`embedd.recommend.engine`: the I/O, :func:`recommend` and
  :func:`bridged_text_vector`.

This module re-exports what the rest of embedd, the tests and the benchmarks use.
"""

from __future__ import annotations

from embedd.recommend.engine import bridged_text_vector, recommend
from embedd.recommend.ranking import (
    BRIDGE_TRACKS,
    Candidate,
    SeedVector,
    bridge_seeds,
    bridged_vector,
    diversify,
    merge,
    model_scores,
    neighbours,
    penalised,
    pool,
)

__all__ = [
    "BRIDGE_TRACKS",
    "Candidate",
    "SeedVector",
    "bridge_seeds",
    "bridged_text_vector",
    "bridged_vector",
    "diversify",
    "merge",
    "model_scores",
    "neighbours",
    "penalised",
    "pool",
    "recommend",
]

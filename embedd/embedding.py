"""Embedding one decoded track with a set of models: what ``embed_file`` and the batch run share.

Both decode a track once, at every rate its models want (:func:`decode_targets`),
run one executor job per model at the same time (the executor coalesces them
with other tracks' jobs into forward batches), and give the decoded audio back
to the decoder's budget as soon as the last model is done with it, so that the
next track's audio can come in. What differs stays with the caller, passed in as
``embed``: the lane, and for the batch the backpressure on its share of it.

Audio that a model maps to no direction -- the enrichment's all-zero vector
(:mod:`embedd.models.enrich`), e.g. digital silence through a model that sends it
to the origin -- is that model's ``unsupported`` error for the track, the same for
every model: cosine similarity is undefined on a zero vector, so none is stored
or returned. Checked here, per track, after the forward pass: raising inside
the shared pass would fail every track coalesced with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal, overload

import numpy as np

from embedd.audio import DecodedAudio, Target
from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding

__all__ = ["EmbedAudio", "decode_targets", "embed_decoded"]

#: One executor job: ``(model, waveform, the track's seconds)`` → that model's embedding of the track.
EmbedAudio = Callable[[str, np.ndarray, float], Awaitable[AudioEmbedding]]


def decode_targets(models: Iterable[str]) -> set[Target]:
    """The ``(sample_rate, channels)`` each model wants; models that agree share one waveform.

    A ``native_rate`` model (Music2Latent) takes the file's own rate (rate 0, no resampling).
    """
    return {CATALOG[m].decode_target for m in models}


@overload
async def embed_decoded(
    audio: DecodedAudio, models: Sequence[str], embed: EmbedAudio, *, return_exceptions: Literal[False] = False
) -> dict[str, AudioEmbedding]: ...


@overload
async def embed_decoded(
    audio: DecodedAudio, models: Sequence[str], embed: EmbedAudio, *, return_exceptions: Literal[True]
) -> dict[str, AudioEmbedding | BaseException]: ...


async def embed_decoded(
    audio: DecodedAudio, models: Sequence[str], embed: EmbedAudio, *, return_exceptions: bool = False
) -> dict[str, AudioEmbedding] | dict[str, AudioEmbedding | BaseException]:
    """Every model's embedding of ``audio``, in the order of ``models``; ``audio`` is released on return.

    Without ``return_exceptions`` the first failure is raised as soon as it
    happens (a request fails as a whole); with it, each model's error is its
    value, after every model has finished (a batch track records which model
    failed and keeps the others).
    """

    async def one(model: str) -> AudioEmbedding:
        info = CATALOG[model]
        return _with_direction(model, await embed(model, audio.waveform(*info.decode_target), audio.duration_s))

    try:
        outcomes = await asyncio.gather(*(one(m) for m in models), return_exceptions=return_exceptions)
    finally:
        audio.release()  # the waveforms are done with: let the next track's audio in
    return dict(zip(models, outcomes, strict=True))


def _with_direction(model: str, embedding: AudioEmbedding) -> AudioEmbedding:
    if not np.any(embedding.vector):
        raise EmbeddError(
            Code.UNSUPPORTED,
            f"model {model!r} gives this audio an all-zero embedding (digital silence?), which has no "
            "direction for cosine similarity; no vector is returned or stored",
        )
    return embedding

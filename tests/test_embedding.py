"""embedd.embedding: one decoded track through a set of models, as embed_file and the batch run do it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedd.audio import DecodedAudio
from embedd.embedding import decode_targets, embed_decoded
from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding


def _track(released: list[int]) -> DecodedAudio:
    waves = {
        (24_000, 1): np.zeros((1, 24_000), np.float32),
        (0, 2): np.zeros((2, 44_100), np.float32),  # Music2Latent: the file's own rate (issue 23)
    }
    return DecodedAudio(1.0, waves, 44_100, 2, lambda: released.append(1))


def test_models_that_want_the_same_waveform_share_one_decode_target():
    # Music2Latent takes the file's samples at the file's own rate (rate 0), as the original did
    assert decode_targets(["muq", "mert", "latent"]) == {(24_000, 1), (0, 2)}
    assert decode_targets(["mert"]) == {(CATALOG["mert"].sample_rate, CATALOG["mert"].channels)}


async def test_each_model_gets_its_waveform_results_keep_the_models_order_and_the_audio_is_released():
    released: list[int] = []
    audio = _track(released)
    seen: dict[str, tuple[int, ...]] = {}

    async def embed(model: str, wave: np.ndarray, seconds: float) -> AudioEmbedding:
        seen[model] = wave.shape
        if model == "latent":
            await asyncio.sleep(0)  # finishes last: the order still follows the request
        return AudioEmbedding(np.full(4, len(model), np.float32), windows=len(model))

    out = await embed_decoded(audio, ["latent", "muq"], embed)
    assert list(out) == ["latent", "muq"]
    assert [e.windows for e in out.values()] == [6, 3]
    assert seen == {"latent": (2, 44_100), "muq": (1, 24_000)}
    assert released == [1]


async def test_a_failing_model_fails_the_track_or_is_its_value_and_the_audio_is_released_either_way():
    async def embed(model: str, wave: np.ndarray, seconds: float) -> AudioEmbedding:
        if model == "mert":
            raise EmbeddError(Code.INTERNAL, "mert broke")
        return AudioEmbedding(np.ones(4, np.float32), windows=1)

    released: list[int] = []
    with pytest.raises(EmbeddError, match="mert broke"):
        await embed_decoded(_track(released), ["muq", "mert"], embed)
    assert released == [1]

    released.clear()
    out = await embed_decoded(_track(released), ["muq", "mert"], embed, return_exceptions=True)
    assert isinstance(out["muq"], AudioEmbedding)
    assert isinstance(out["mert"], EmbeddError) and out["mert"].message == "mert broke"
    assert released == [1]


async def test_a_cancelled_track_releases_its_audio():
    started = asyncio.Event()

    async def embed(model: str, wave: np.ndarray, seconds: float) -> AudioEmbedding:
        started.set()
        await asyncio.Event().wait()  # the executor never answers
        raise AssertionError("unreachable")

    released: list[int] = []
    task = asyncio.ensure_future(embed_decoded(_track(released), ["muq"], embed))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert released == [1]


async def test_an_all_zero_embedding_is_that_models_unsupported_error_not_a_vector():
    """No direction, no vector: the same rule for every model, the track's other models kept."""

    async def embed(model: str, wave: np.ndarray, seconds: float) -> AudioEmbedding:
        return AudioEmbedding(np.zeros(4, np.float32) if model == "mert" else np.full(4, 0.5, np.float32), windows=2)

    released: list[int] = []
    out = await embed_decoded(_track(released), ["muq", "mert"], embed, return_exceptions=True)
    assert isinstance(out["muq"], AudioEmbedding)
    assert isinstance(out["mert"], EmbeddError) and out["mert"].code is Code.UNSUPPORTED
    assert out["mert"].message.startswith("model 'mert' gives this audio an all-zero embedding")
    with pytest.raises(EmbeddError, match="all-zero"):
        await embed_decoded(_track(released), ["mert"], embed)
    assert released == [1, 1]

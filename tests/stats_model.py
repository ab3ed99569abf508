"""A fourth backend from one module: log-mel band statistics, for tests/test_catalog.py.

Not a stand-in for any of embedd's models: a real (if simple) embedder of its
own. The track's log-mel spectrogram is computed by a torch module; its vector
is every band's mean and standard deviation over time, L2-normalised, so tracks
of different pitch get different vectors. It has no weights to download: its
"source" names the number of mel bands (``log-mel-64``), which is how the test
shows that the backend's ``--stats-model`` setting reaches it.

``INFO`` is the catalogue entry; an ``embedd.models`` entry point naming it
(``stats = tests.stats_model:INFO``) is all embedd is told. torch is imported
only on the executor thread, when the model loads: the entry is read whenever
``embedd.models`` is imported, the decoder processes included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from embedd.models import ModelInfo
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = ["INFO", "LogMelStatsModel"]

SOURCE_PREFIX = "log-mel-"

INFO = ModelInfo(
    name="stats",
    collection="stats_embedding",
    sample_rate=16_000,
    channels=1,
    text=False,
    nominal_dim=128,
    default_source=f"{SOURCE_PREFIX}64",
    backend="tests.stats_model:LogMelStatsModel",
    source_help="Log-mel statistics: log-mel-N for N mel bands.",
)


class LogMelStatsModel(EmbeddingModel):
    info = INFO

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._mel: torch.nn.Module | None = None
        self._bands: int | None = None

    def _load(self) -> None:
        import torchaudio

        bands = self._bands_of(self.spec.source)
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.info.sample_rate, n_fft=1024, hop_length=320, n_mels=bands
        )
        self._mel = mel.eval().to(self.device)
        self._bands = bands

    def _unload(self) -> None:
        self._mel = None
        self._bands = None

    @staticmethod
    def _bands_of(source: str) -> int:
        count = source.removeprefix(SOURCE_PREFIX)
        if source == count or not count.isdigit() or not 8 <= int(count) <= 256:
            raise ValueError(f"{source!r} is not {SOURCE_PREFIX}N with 8 <= N <= 256")
        return int(count)

    @property
    def dim(self) -> int:
        if self._bands is None:
            raise RuntimeError("model 'stats' is not loaded")
        return 2 * self._bands

    def expected_dim(self) -> int | None:
        try:
            return 2 * self._bands_of(self.spec.source)
        except ValueError:
            return None

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        import torch

        assert self._mel is not None
        results = []
        with torch.inference_mode():
            for waveform in waveforms:  # tracks differ in length: one pass each
                mono = torch.from_numpy(np.ascontiguousarray(waveform[0], dtype=np.float32)).to(self.device)
                log_mel = torch.log(self._mel(mono) + 1e-6)  # [bands, frames]
                vector = torch.cat([log_mel.mean(dim=1), log_mel.std(dim=1, unbiased=False)])
                vector = torch.nn.functional.normalize(vector, dim=0)
                results.append(AudioEmbedding(vector=vector.cpu().numpy().astype(np.float32), windows=log_mel.shape[1]))
        return results

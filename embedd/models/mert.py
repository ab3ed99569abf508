"""The ``mert`` backend: MERT-v1-330M through transformers' ``AutoModel``.

Loading: ``AutoModel.from_pretrained(source, trust_remote_code=True)`` and
``Wav2Vec2FeatureExtractor.from_pretrained(source)``, exactly as the MERT model
card does. ``source`` is a local directory or a hub id; a hub id found in the
hub cache is loaded from its snapshot directory with ``local_files_only``, so a
filled cache needs no network (see :mod:`embedd.models.runtime`). The remote
code of the real model (``MERTModel``) is copied by transformers into its
modules cache (``HF_MODULES_CACHE``) on first load; that directory must be
writable. Any model the same call can load works: the tests use a tiny
HuBERT-architecture directory, which ``AutoModel`` resolves to ``HubertModel``.

Windows: 30 s with a 5 s hop at 24 kHz; a track up to 30 s is one window of the
whole track; the tail of a longer track is covered by one more window aligned
to the track's end, so every window of a long track has the same length and
all of them -- across the tracks of one call -- batch together. Each window goes
through the feature extractor (MERT's per-window normalisation) and the model
with ``output_hidden_states=True``; its embedding is the time-mean of every
hidden state (the CNN projection plus each transformer layer: 25 x 1024 for the
real model), concatenated. Counts come from the loaded model's config.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec
from embedd.models.enrich import enrich
from embedd.models.runtime import (
    autocast,
    group_by,
    local_config,
    mono_waveform,
    resolve_repo,
    run_batched,
    window_spans,
)

__all__ = ["HOP_S", "MertModel", "WINDOW_S"]

WINDOW_S = 30
HOP_S = 5
# MERT's CNN front end needs 400 samples for one frame; shorter tracks are tiled up to this
_MIN_SAMPLES = 24_000


class MertModel(EmbeddingModel):
    info = CATALOG["mert"]

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._model: torch.nn.Module | None = None
        self._extractor: Any = None
        self._layers: int | None = None  # hidden states per forward (25 for MERT-v1-330M)
        self._hidden: int | None = None  # width of each (1024)

    # -- lifecycle ---------------------------------------------------------
    def _load(self) -> None:
        from transformers import AutoModel, Wav2Vec2FeatureExtractor

        where, local = resolve_repo(self.spec.source, self.spec.cache_dir)
        common = {"cache_dir": self.spec.cache_dir, "local_files_only": local}
        model = AutoModel.from_pretrained(where, trust_remote_code=True, **common)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(where, trust_remote_code=True, **common)
        if int(extractor.sampling_rate) != self.info.sample_rate:
            raise ValueError(
                f"feature extractor expects {extractor.sampling_rate} Hz, embedd feeds {self.info.sample_rate} Hz"
            )
        model.eval().to(self.device)
        self._model = model
        self._extractor = extractor
        # count the hidden states the model really returns (remote code may differ from its config)
        probe = self._forward([np.zeros(self.info.sample_rate, dtype=np.float32)])
        self._hidden = int(model.config.hidden_size)
        self._layers = int(probe.shape[1]) // self._hidden

    def _unload(self) -> None:
        self._model = None
        self._extractor = None

    @property
    def dim(self) -> int:
        if self._layers is None or self._hidden is None:
            raise RuntimeError("model 'mert' is not loaded")
        return 3 * self._layers * self._hidden

    def expected_dim(self) -> int | None:
        if self._loaded:
            return self.dim
        config = local_config(self.spec.source, self.spec.cache_dir)
        try:
            return 3 * (int(config["num_hidden_layers"]) + 1) * int(config["hidden_size"]) if config else None
        except (KeyError, TypeError, ValueError):
            return None

    # -- work ----------------------------------------------------------------
    def _forward(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """``[B, layers * hidden]``: per window, the time-mean of every hidden state."""
        assert self._model is not None
        inputs = self._extractor(
            list(windows), sampling_rate=self.info.sample_rate, return_tensors="pt", padding=False
        )
        values = inputs["input_values"].to(self.device)
        with torch.inference_mode():
            hidden = self._model(values, output_hidden_states=True).hidden_states
        means = torch.stack([h.float().mean(dim=1) for h in hidden], dim=1)  # [B, layers, hidden]
        return means.reshape(means.shape[0], -1)

    def window_latents(self, waveforms: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each track's window embeddings ``[layers * hidden, windows]`` on the model's device."""
        if self._model is None:
            raise RuntimeError("model 'mert' is not loaded")
        sr = self.info.sample_rate
        windows: list[np.ndarray] = []
        per_track: list[list[int]] = []  # indices into windows
        for n, wave in enumerate(waveforms):
            mono = mono_waveform(wave, index=n, model_name=self.name, min_samples=_MIN_SAMPLES)
            spans = window_spans(mono.size, WINDOW_S * sr, HOP_S * sr, align_last_to_end=True)
            per_track.append(list(range(len(windows), len(windows) + len(spans))))
            windows.extend(mono[start:end] for start, end in spans)
        rows: list[torch.Tensor | None] = [None] * len(windows)
        with autocast(self.device, self.spec.half):
            for _, idx in group_by(windows, len).items():
                out = run_batched(
                    [windows[i] for i in idx], self._forward, self.spec.batch_size, model_name=self.name, interrupt=self.interrupt
                )
                for i, row in zip(idx, out):
                    rows[i] = row
        return [torch.stack([rows[i] for i in mine], dim=1) for mine in per_track]  # type: ignore[misc]

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        return [
            AudioEmbedding(vector=enrich(lat), windows=int(lat.shape[1])) for lat in self.window_latents(waveforms)
        ]

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

Windows: 30 s with a 5 s hop at 24 kHz (the contract; ``mert_hop_s`` may widen
the hop -- a third of the work at 15 s -- and flags the rows' ``model_id``); a
track shorter than 30 s is padded with digital silence to one full window, as
the original system does (parity, ``docs/operations.md``); the tail of a longer
track is covered by one more window aligned to the track's end, so every window
has the same length and all of them -- across the tracks of one call -- batch
together. Each window goes
through the feature extractor (MERT's per-window normalisation) and the model
with ``output_hidden_states=True``; its embedding is the time-mean of every
hidden state (the CNN projection plus each transformer layer: 25 x 1024 for the
real model), concatenated. Counts come from the loaded model's config.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from embedd.errors import Misuse
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec
from embedd.models.enrich import enrich
from embedd.models.layout import channels_last_feature_encoder
from embedd.models.quantize import quantize_model
from embedd.models.runtime import (
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
        channels_last_feature_encoder(model)  # same sums, no transposes (embedd.models.layout)
        quantize_model(model, self.spec.quantize, self.device)
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
    def item_bytes(self, samples: int) -> int:
        """Activation bytes of one ``samples``-long window in one forward pass, from the config.

        The two peaks of a HuBERT-style model: the first CNN layer's output (and
        the norm copy beside it, ×2) at 1/``conv_stride[0]`` of the sample rate,
        and the transformer at one frame per 320 samples: every hidden state kept
        for the time-means, one ``heads × T²`` attention matrix, the feed-forward
        and a few ``T × hidden`` temporaries. fp32 sizes (autocast only lowers
        them). For the real size and a 30 s window this gives 1.25 GB; measured
        (``bench/memory.py``, CPU, fp32, one window per pass): 0.98 GB.
        """
        if self._model is None:
            raise Misuse("MERT used before load(): the model registry loads a backend first")
        config = self._model.config
        strides = list(getattr(config, "conv_stride", (5, 2, 2, 2, 2, 2, 2)))
        conv_dims = list(getattr(config, "conv_dim", (512,)))
        frames = max(1, samples // int(np.prod(strides)))
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers) + 1
        heads = int(config.num_attention_heads)
        inter = int(getattr(config, "intermediate_size", 4 * hidden))
        conv = 2 * int(conv_dims[0]) * (samples // int(strides[0])) * 4
        transformer = (layers + 4) * frames * hidden * 4 + heads * frames * frames * 4 + 2 * frames * inter * 4
        return int(conv + transformer)

    def _forward(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """``[B, layers * hidden]``: per window, the time-mean of every hidden state."""
        if self._model is None:
            raise Misuse("MERT used before load(): the model registry loads a backend first")
        inputs = self._extractor(
            list(windows), sampling_rate=self.info.sample_rate, return_tensors="pt", padding=False
        )
        values = inputs["input_values"].to(self.device)
        with torch.inference_mode():
            means = self._fast(self._hidden_means, values)  # [B, layers, hidden]
        return means.reshape(means.shape[0], -1)

    def _hidden_means(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, layers, hidden]``: the time-mean of every hidden state of the model on ``values``."""
        hidden = self._model(values, output_hidden_states=True).hidden_states  # type: ignore[misc]
        return torch.stack([h.float().mean(dim=1) for h in hidden], dim=1)

    def _compile_target(self) -> tuple[Any, torch.Tensor] | None:
        """The model on one 30 s window: every window MERT cuts has that length (short tracks are padded)."""
        if self._model is None:
            return None
        return self._hidden_means, torch.zeros(1, WINDOW_S * self.info.sample_rate, device=self.device)

    def window_latents(self, waveforms: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each track's window embeddings ``[layers * hidden, windows]`` on the model's device."""
        if self._model is None:
            raise RuntimeError("model 'mert' is not loaded")
        sr = self.info.sample_rate
        windows: list[np.ndarray] = []
        per_track: list[list[int]] = []  # indices into windows
        for n, wave in enumerate(waveforms):
            mono = mono_waveform(wave, index=n, model_name=self.name, min_samples=1)
            if mono.size < WINDOW_S * sr:  # the original's padding: digital silence up to one full window
                mono = np.concatenate([mono, np.zeros(WINDOW_S * sr - mono.size, np.float32)])
            hop = int(round((self.spec.hop_s or HOP_S) * sr))
            spans = window_spans(mono.size, WINDOW_S * sr, hop, align_last_to_end=True)
            per_track.append(list(range(len(windows), len(windows) + len(spans))))
            windows.extend(mono[start:end] for start, end in spans)
        rows: list[torch.Tensor | None] = [None] * len(windows)
        with self.forward_context():
            for length, idx in group_by(windows, len).items():
                per_pass = self.items_per_pass(self.item_bytes(int(length)))  # type: ignore[arg-type]
                out = run_batched(
                    [windows[i] for i in idx], self._forward, per_pass, model_name=self.name, interrupt=self.interrupt
                )
                for i, row in zip(idx, out):
                    rows[i] = row
        return [torch.stack([rows[i] for i in mine], dim=1) for mine in per_track]  # type: ignore[misc]

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        return [
            AudioEmbedding(vector=enrich(lat), windows=int(lat.shape[1])) for lat in self.window_latents(waveforms)
        ]

"""The ``muq`` backend: MuQ-MuLan, audio and text in one joint space.

Loading
-------
Through the official loader, ``muq.MuQMuLan.from_pretrained``. Its
``config.json`` names two sub-models by hub id -- the audio tower
(``OpenMuQ/MuQ-large-msd-iter``) and the text tower (``xlm-roberta-base``) --
and the constructor loads them by that name (and the text tower's tokenizer
later, on first use). To run without a network, embedd resolves each sub-model
name to a local directory *before* construction and hands the loader a config
naming those directories. For a sub-model name ``N``, the first that exists wins:

1. ``<muq-mulan dir>/N`` -- a path relative to the MuQ-MuLan directory;
2. ``<muq-mulan dir>/<last part of N>`` -- e.g. ``MuQ-large-msd-iter/`` and
   ``xlm-roberta-base/`` placed next to ``config.json``; no config edit needed;
3. ``N`` itself as an existing directory (an absolute path in the config);
4. ``N`` in the hub cache (``cache_dir`` / ``HF_HUB_CACHE``): its snapshot directory;
5. ``N`` unchanged, for the library to download (fails when offline).

The MuQ-MuLan model itself is a local directory or a hub id looked up the same
way (steps 3-5). So an offline install is either a filled hub cache holding all
three repos, or one directory::

    muq-mulan/config.json, model.safetensors      (OpenMuQ/MuQ-MuLan-large)
    muq-mulan/MuQ-large-msd-iter/...              (OpenMuQ/MuQ-large-msd-iter)
    muq-mulan/xlm-roberta-base/...                (xlm-roberta-base, with its tokenizer)

MuQ-MuLan picks the audio tower's implementation by name ("muq" in it) and the
text tower's by name ("xlm-roberta" in it): local directories must keep those
words in their paths, as the repo names above do. No environment variable is
set; when everything is local the loader is never handed a hub id.

Audio
-----
24 kHz mono; windows of 120 s, as the original system lays them out (parity,
``docs/operations.md``): a track shorter than one window is padded with
digital silence to one full window (so MuQ-MuLan averages over all twelve of
its 10 s clips, the silent ones included); a longer one has windows every
15 s from 0 while a whole window fits, then, when the grid leaves a tail, one
more window aligned to the track's end (it starts at length - 120 s). Every
window is 120 s long. MuQ-MuLan embeds a window as the mean of the
L2-normalised latents of its consecutive 10 s clips, the last partial clip
completed with the window's own beginning (``MuQMuLan._get_all_clips``; with
120 s windows there is none). Grid windows overlap 8-fold and their clips start
on a 5 s grid, so each distinct clip is embedded once (keyed by its start
sample) and every window averages the clip latents it contains; a clip wholly
inside the padding is digital silence, embedded once per call whatever its
track. Clips of all tracks of one call are batched by length. The result
equals calling ``MuQMuLan(wavs=window)`` per window (tested).

Text
----
``embed_text`` runs the same model's text tower: ``raw`` is the joint-space
latent (512 for the real model, taken from the model). ``vector`` is that query
in the stored layout: the enrichment of a one-window sequence whose window is
``raw`` -- ``[raw, 0, 0]`` normalised, because a constant sequence has zero
spread and zero drift. Its cosine with a stored track vector
``[m, s, d] / |[m, s, d]|`` is ``raw . m / (|raw| |[m, s, d]|)``: the
text/audio similarity of the track's mean window latent, which is what MuLan
was trained to score, discounted for tracks that vary a lot -- a text query
describes a track that sounds the same throughout.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from embedd.errors import Code, EmbeddError, Misuse
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec, TextEmbedding
from embedd.models.enrich import enrich
from embedd.models.layout import channels_last
from embedd.models.quantize import quantize_model
from embedd.models.runtime import (
    group_by,
    local_config,
    mono_waveform,
    resolve_repo,
    run_batched,
    window_spans,
)

__all__ = ["HOP_S", "MuQMuLanModel", "WINDOW_S", "resolve_submodel"]

WINDOW_S = 120
HOP_S = 15
#: Activation bytes per clip sample for MuQ-large's audio tower (``encoder_dim`` 1024): measured
#: 289 MB for one 10 s clip (1,204 B/sample; ``bench/memory.py``, CPU, fp32), rounded up;
#: narrower towers scale with their width.
BYTES_PER_SAMPLE_STOCK = 1_500
_STOCK_WIDTH = 1024
#: The key of a clip of the padding (digital silence): one forward pass for all of them in a call.
_SILENCE = "silence"


def resolve_submodel(name: str, base_dir: Path | None, cache_dir: str | None) -> str:
    """The directory (or, failing that, hub id) a MuQ-MuLan sub-model name stands for."""
    candidates = []
    if base_dir is not None:
        candidates += [base_dir / name, base_dir / Path(name).name]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve())
    where, _ = resolve_repo(name, cache_dir)
    return where


class MuQMuLanModel(EmbeddingModel):
    info = CATALOG["muq"]

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._model: Any = None  # muq.MuQMuLan
        self._latent_dim: int | None = None
        self._sr: int = self.info.sample_rate
        self._clip: int = 10 * self.info.sample_rate

    # -- lifecycle ---------------------------------------------------------
    def _read_config(self) -> tuple[str, bool, dict[str, Any]]:
        where, local = resolve_repo(self.spec.source, self.spec.cache_dir)
        if local:
            config_path = Path(where) / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_path = Path(hf_hub_download(where, "config.json", cache_dir=self.spec.cache_dir))
        return where, local, json.loads(config_path.read_text(encoding="utf-8"))

    def _load(self) -> None:
        from muq import MuQMuLan

        where, local, config = self._read_config()
        base = Path(where) if local else None
        config = copy.deepcopy(config)
        for key in ("audio_model", "text_model"):
            config[key]["name"] = resolve_submodel(config[key]["name"], base, self.spec.cache_dir)
        model = MuQMuLan.from_pretrained(
            where, config=config, cache_dir=self.spec.cache_dir, local_files_only=local
        )
        channels_last(model.eval().to(self.device))  # NHWC convolutions (embedd.models.layout)
        # the audio tower only: text queries stay exact (they are cheap, and shared by every row)
        quantize_model(model.mulan_module.audio, self.spec.quantize, self.device)
        sr = int(model.sr)
        if sr != self.info.sample_rate:
            raise ValueError(f"MuQ-MuLan expects {sr} Hz, embedd feeds {self.info.sample_rate} Hz")
        # the tokenizer is otherwise loaded on the first text query; load it now so that a
        # broken text tower is a load error, not a failed request
        _ = model.mulan_module.text.tokenizer
        self._model = model
        self._sr = sr
        self._clip = int(round(sr * float(model.clip_secs)))
        self._latent_dim = int(model.mulan_module.dim_latent)

    def _unload(self) -> None:
        self._model = None

    @property
    def dim(self) -> int:
        if self._latent_dim is None:
            raise RuntimeError("model 'muq' is not loaded")
        return 3 * self._latent_dim

    @property
    def text_dim(self) -> int:
        """The joint-space latent dimension (``raw`` of ``embed_text``)."""
        return self.dim // 3

    def expected_dim(self) -> int | None:
        if self._loaded:
            return self.dim
        config = local_config(self.spec.source, self.spec.cache_dir)
        try:
            return 3 * int(config["mulan"]["dim_latent"]) if config else None
        except (KeyError, TypeError, ValueError):
            return None

    # -- audio ---------------------------------------------------------------
    def item_bytes(self, samples: int) -> int:
        """Activation bytes of one ``samples``-long clip in one forward pass.

        Scales with the clip's length and the audio tower's width; the constant
        was measured at real size (MuQ-large, 1024 wide) on CPU in fp32 with
        ``bench/memory.py`` (one 10 s clip per pass), rounded up.
        """
        if self._model is None:
            raise Misuse("MuQ-MuLan used before load(): the model registry loads a backend first")
        width = int(getattr(self._model.mulan_module.audio.model.config, "encoder_dim", _STOCK_WIDTH))  # type: ignore[union-attr]
        return int(samples * BYTES_PER_SAMPLE_STOCK * width / _STOCK_WIDTH)

    def _forward(self, clips: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, D]``: the normalised latent of each clip (MuLan's ``get_audio_latents``)."""
        return self._fast(self._model.mulan_module.get_audio_latents, torch.stack(list(clips))).float()

    def _compile_target(self) -> tuple[Any, torch.Tensor] | None:
        """MuLan's audio tower on one 10 s clip: every clip MuQ cuts has that length."""
        if self._model is None:
            return None
        return self._model.mulan_module.get_audio_latents, torch.zeros(1, self._clip, device=self.device)

    def _window_clips(
        self, audio: torch.Tensor, start: int, end: int, content: int
    ) -> list[tuple[object, torch.Tensor]]:
        """``(key, clip)`` of one window, exactly as ``MuQMuLan._get_all_clips`` cuts it.

        A full clip's key is its absolute start sample (shared between windows),
        or ``"silence"`` when it starts at or after ``content`` (the padding: the
        same zeros for every track); the wrapped partial clip is keyed by its window.
        """
        delta = self._clip
        length = end - start
        clips: list[tuple[object, torch.Tensor]] = []
        accum = 0
        while accum + delta <= length:
            at = start + accum
            clips.append((_SILENCE if at >= content else at, audio[at : at + delta]))
            accum += delta
        if accum < length:
            window = audio[start:end]
            partial = torch.cat([window[accum:], window[0 : delta - (length - accum)]])
            clips.append((("partial", start, end), partial))
        return clips

    def window_latents(self, waveforms: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each track's window latents ``[D, windows]`` on the model's device, clips computed once."""
        if self._model is None:
            raise RuntimeError("model 'muq' is not loaded")
        clip_keys: list[tuple[int, object]] = []  # (track, key) of each distinct clip
        clip_data: list[torch.Tensor] = []
        seen: dict[tuple[int, object], int] = {}
        windows: list[list[list[int]]] = []  # per track, per window: indices into clip_data
        window = WINDOW_S * self._sr
        for n, wave in enumerate(waveforms):
            mono = mono_waveform(wave, index=n, model_name=self.name, min_samples=1)
            content = mono.size
            if content < window:  # the original's padding: digital silence up to one full window
                mono = np.concatenate([mono, np.zeros(window - content, np.float32)])
            audio = torch.from_numpy(np.ascontiguousarray(mono)).to(self.device)
            track_windows = []
            for start, end in window_spans(audio.shape[0], window, HOP_S * self._sr, align_last_to_end=True):
                members = []
                for key, clip in self._window_clips(audio, start, end, content):
                    k: tuple[int, object] = (-1, key) if key is _SILENCE else (n, key)
                    if k not in seen:
                        seen[k] = len(clip_data)
                        clip_keys.append(k)
                        clip_data.append(clip)
                    members.append(seen[k])
                track_windows.append(members)
            windows.append(track_windows)
        latents: list[torch.Tensor | None] = [None] * len(clip_data)
        with self.forward_context():
            for length, idx in group_by(clip_data, lambda t: t.shape[0]).items():
                per_pass = self.items_per_pass(self.item_bytes(int(length)))  # type: ignore[arg-type]
                out = run_batched([clip_data[i] for i in idx], self._forward, per_pass,
                                  model_name=self.name, interrupt=self.interrupt)
                for i, row in zip(idx, out):
                    latents[i] = row
        result = []
        for track_windows in windows:
            cols = [torch.stack([latents[i] for i in members]).mean(dim=0) for members in track_windows]  # type: ignore[misc]
            result.append(torch.stack(cols, dim=1))
        return result

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        return [
            AudioEmbedding(vector=enrich(lat), windows=int(lat.shape[1])) for lat in self.window_latents(waveforms)
        ]

    # -- text ------------------------------------------------------------------
    def embed_text(self, text: str) -> TextEmbedding:
        if self._model is None:
            raise RuntimeError("model 'muq' is not loaded")
        if not text or not text.strip():
            raise EmbeddError(Code.BAD_REQUEST, "argument 'text' is empty")
        tower = self._model.mulan_module.text
        limit = int(tower.model.config.max_position_embeddings) - int(tower.model.config.pad_token_id) - 1
        tokens = len(tower.tokenizer(text)["input_ids"])
        if tokens > limit:
            raise EmbeddError(
                Code.TOO_LARGE, f"argument 'text' is {tokens} tokens long; model 'muq' reads at most {limit}"
            )
        with self.forward_context():
            raw = self._model.mulan_module.get_text_latents(raw_texts=[text])[0].float()
            vector = enrich(raw.unsqueeze(1))
        return TextEmbedding(raw=raw.cpu().numpy().astype(np.float32), vector=vector)

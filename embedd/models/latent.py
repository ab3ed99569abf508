"""The ``latent`` backend: Music2Latent's encoder over the whole stereo track.

Loading. Music2Latent's own ``EncoderDecoder()`` downloads its checkpoint from
the hub inside its constructor, into the package directory, whatever it is
given. So we use the package's model classes directly: the ``source`` is a
checkpoint file (``music2latent.pt``), a directory holding one, or a hub repo
id resolved to that file (``SonyCSLParis/music2latent``; cache first, network
only when it is not cached). Only the ``Encoder`` half of its ``UNet`` is built
and loaded (the decoder is two thirds of the weights and never used for
embedding). ``torch.load`` runs with ``weights_only=False``, as the official
loader does: the checkpoint is chosen by the operator, like any model code.

Architecture sizes. The package reads its architecture from module-level
hyper-parameters (``music2latent.hparams``), so the stock checkpoint always
builds the stock architecture. A checkpoint may carry an ``embedd_hparams``
dict overriding the size parameters (channel counts, block counts, heads,
latent channels -- never the signal representation: hop, frequency layout);
the tests' tiny random-weight checkpoints use it to stay small. The official
checkpoint has no such key.

Encoding reproduces ``music2latent.inference.encode_audio_inference`` with its
own functions (``to_representation_encoder``) and constants, called with a
``max_waveform_length`` chosen per track (:func:`chunk_frames`): as many chunks
as :data:`CHUNK_S`-second pieces the track needs, of near-equal length. The
waveform is cropped to a whole number of latent frames, its encoder
representation is cut into those chunks (the last one padded with the
representation of the track's start, by less than a latent frame per chunk),
every channel of every chunk is one batch item, and the latents are stitched
back, cropped, and divided by ``sigma_rescale``.

Why at most 10 s chunks and not the package's 60 s: one 60 s chunk channel costs
about 7 GB of activations in one forward pass on a CPU (≈1.3 MB per
representation frame, 5,160 frames), a 10 s one about 1.1 GB. Why near-equal
chunks: cutting at exactly 10 s padded the last chunk to full length, so a
30 s track cost four 10 s chunks (25 % of the work on padding, ``bench/latent.py``);
four 7.5 s chunks cost its length. The stored vectors stay within cosine ≈0.9993
of 60 s chunks. How many chunk channels share a pass comes from the memory
budget (:meth:`item_bytes`). The representation is computed per batch from each chunk's
own samples (the STFT frames are independent), so a long track's whole
representation -- 1.4 GB a minute -- is never on the GPU at once. Batch items
of all tracks of a call run together (grouped by length), with the
OOM-splitting batcher. The waveforms stay on the host until their chunk runs.

Per latent frame the two channels and their magnitude ``sqrt(c0^2 + c1^2)``
give ``3 x C`` values (192 for the real model), enriched over the frames.
Tracks too short for a single latent frame are tiled (repeated) up to one frame,
the same way the package pads its last chunk.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec
from embedd.models.enrich import enrich
from embedd.models.layout import channels_last
from embedd.models.quantize import quantize_model
from embedd.models.runtime import autocast, group_by, resolve_file, run_batched

__all__ = ["CHECKPOINT_FILENAME", "Music2LatentModel", "build_encoder", "build_unet", "chunk_frames"]

CHECKPOINT_FILENAME = "music2latent.pt"
#: Seconds of audio per encoder chunk (the package's ``max_waveform_length`` argument).
CHUNK_S = 10
#: Activation bytes per representation frame of one chunk channel in one forward pass, for the
#: stock architecture (``base_channels`` 64); measured at real size on CPU in fp32 (1.23-1.31 MB
#: for 5-20 s chunks, ``bench/memory.py``), rounded up. Narrower checkpoints scale with their width.
BYTES_PER_FRAME_STOCK = 1_400_000
_STOCK_BASE_CHANNELS = 64
HPARAMS_KEY = "embedd_hparams"
# the size parameters a checkpoint may override; anything else would change the representation
OVERRIDABLE = frozenset(
    {
        "base_channels",
        "multipliers_list",
        "layers_list",
        "layers_list_encoder",
        "attention_list",
        "attention_list_encoder",
        "bottleneck_base_channels",
        "num_bottleneck_layers",
        "heads",
        "cond_channels",
        "bottleneck_channels",
    }
)
_HPARAMS_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, slots=True)
class _Chunk:
    """One batch item: representation frames ``[start, start + frames)`` of one channel, then ``pad``
    frames from the channel's start (the package's padding of a long track's last chunk)."""

    audio: np.ndarray  # the channel's samples, on the host
    start: int
    frames: int
    pad: int


def _with_hparams(hparams: Mapping[str, Any] | None, build: Any) -> Any:
    """Call ``build()`` with music2latent's module-level sizes temporarily overridden."""
    import music2latent.models as m2l_models

    hparams = dict(hparams or {})
    unknown = set(hparams) - OVERRIDABLE
    if unknown:
        raise ValueError(f"checkpoint overrides unsupported Music2Latent hparams: {sorted(unknown)}")
    with _HPARAMS_LOCK:
        saved = {k: getattr(m2l_models, k) for k in hparams}
        try:
            for k, v in hparams.items():
                setattr(m2l_models, k, v)
            return build()
        finally:
            for k, v in saved.items():
                setattr(m2l_models, k, v)


def build_unet(hparams: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Music2Latent's ``UNet`` (what its checkpoints hold), optionally with overridden sizes."""
    from music2latent.models import UNet

    return _with_hparams(hparams, UNet)


def build_encoder(hparams: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Music2Latent's ``Encoder`` (the ``encoder`` of its ``UNet``), optionally with overridden sizes."""
    from music2latent.models import Encoder

    return _with_hparams(hparams, Encoder)


def chunk_frames(frames: int, max_frames: int, down: int) -> int:
    """Representation frames per chunk of a ``frames``-long track: near-equal chunks, none longer
    than ``max_frames``.

    Cutting at ``max_frames`` and padding the last chunk up to it made a 30 s track cost four
    10 s chunks (a third more than its length); the same number of chunks of equal length pads
    less than one latent frame per chunk. ``frames`` and ``max_frames`` are whole latent frames
    (multiples of ``down``), and so is the result.
    """
    if frames <= max_frames:
        return frames
    chunks = -(-frames // max_frames)
    return -(-(frames // down) // chunks) * down


class Music2LatentModel(EmbeddingModel):
    info = CATALOG["latent"]

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._encoder: torch.nn.Module | None = None
        self._channels: int | None = None  # latent channels C (64 for the real model)
        from music2latent.hparams import hop

        self._hop = int(hop)
        self._width_scale = 1.0  # base_channels / stock, set at load
        # CHUNK_S, not the package's 60 s (see the module docstring); an attribute so that
        # tests can exercise chunking cheaply
        self.max_waveform_length = int(CHUNK_S * self.info.sample_rate)

    # -- lifecycle ---------------------------------------------------------
    def _checkpoint_path(self) -> str:
        return resolve_file(self.spec.source, CHECKPOINT_FILENAME, self.spec.cache_dir)

    def _load(self) -> None:
        path = self._checkpoint_path()
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict) or "gen_state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Music2Latent checkpoint (no 'gen_state_dict')")
        state = checkpoint["gen_state_dict"]
        hparams = checkpoint.get(HPARAMS_KEY) or {}
        encoder = build_encoder(hparams)
        self._width_scale = float(hparams.get("base_channels", _STOCK_BASE_CHANNELS)) / _STOCK_BASE_CHANNELS
        prefix = "encoder."
        enc_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = encoder.load_state_dict(enc_state, strict=False)
        if missing:
            raise ValueError(f"{path} lacks encoder weights: {', '.join(missing[:5])}")
        del checkpoint, state, enc_state
        channels_last(encoder.eval().to(self.device))  # NHWC convolutions (embedd.models.layout)
        quantize_model(encoder, self.spec.quantize, self.device)
        self._encoder = encoder
        self._channels = int(encoder.conv_out.out_channels)

    def _unload(self) -> None:
        self._encoder = None

    @property
    def dim(self) -> int:
        if self._channels is None:
            raise RuntimeError("model 'latent' is not loaded")
        return 3 * 3 * self._channels

    def expected_dim(self) -> int | None:
        if self._channels is not None:
            return self.dim
        try:
            path = self._checkpoint_path_cached()
        except Exception:
            return None
        if path is None:
            return None
        try:  # mmap: reads the pickle and one tensor's shape, not the weights
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            weight = checkpoint["gen_state_dict"]["encoder.conv_out.weight"]
            return 3 * 3 * int(weight.shape[0])
        except Exception:
            return None

    def _checkpoint_path_cached(self) -> str | None:
        """The checkpoint path if it is available without a download."""
        source = Path(self.spec.source).expanduser()
        if source.exists():
            return self._checkpoint_path()
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.spec.source, CHECKPOINT_FILENAME, cache_dir=self.spec.cache_dir)
        return found if isinstance(found, str) else None

    # -- work ----------------------------------------------------------------
    def _constants(self) -> tuple[int, int, int, float]:
        from music2latent.hparams import freq_downsample_list, hop
        from music2latent.hparams_inference import sigma_rescale

        downscaling = 2 ** freq_downsample_list.count(0)
        max_frames = (int(self.max_waveform_length / hop) // downscaling) * downscaling
        return int(hop), int(downscaling), int(max_frames), float(sigma_rescale)

    def item_bytes(self, frames: int) -> int:
        """Activation bytes of one chunk channel of ``frames`` representation frames in one pass."""
        return int(frames * BYTES_PER_FRAME_STOCK * self._width_scale)

    def _forward(self, items: Sequence[_Chunk]) -> torch.Tensor:
        """``[B, C, frames / downscaling]``: the encoder on each chunk's representation.

        The representation is computed here, per batch, from the chunk's samples:
        the encoder STFT frames are independent of each other (no padding, stride
        ``hop``), so a chunk's representation is that of its own samples, and a
        long track never has its whole representation (~1.4 GB/min) on the GPU.
        """
        assert self._encoder is not None
        from music2latent.audio import to_representation_encoder

        reps = []
        for chunk in items:
            parts = [to_representation_encoder(self._samples(chunk.audio, chunk.start, chunk.frames))]
            if chunk.pad:
                parts.append(to_representation_encoder(self._samples(chunk.audio, 0, chunk.pad)))
            reps.append(torch.cat(parts, dim=-1)[0])  # [2 (re, im), hop*2, frames]
        return self._encoder(torch.stack(reps)).float()

    def _samples(self, audio: np.ndarray, first_frame: int, frames: int) -> torch.Tensor:
        """The samples behind representation frames ``[first_frame, first_frame + frames)``, on the device."""
        hop = self._hop
        begin = first_frame * hop
        piece = audio[begin : begin + (frames - 1) * hop + 4 * hop]  # frames of 4 hops, stride 1 hop
        return torch.from_numpy(np.ascontiguousarray(piece)).to(self.device).unsqueeze(0)

    def track_latents(self, waveforms: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each track's Music2Latent latents ``[2, C, T]`` (on the model's device).

        The same numbers as ``music2latent``'s ``encode`` of the track with these weights.
        """
        if self._encoder is None:
            raise RuntimeError("model 'latent' is not loaded")
        hop, down, max_frames, sigma_rescale = self._constants()
        min_samples = 3 * hop + down * hop  # one latent frame
        items: list[_Chunk] = []
        layout: list[list[list[int]]] = []  # per track, per channel: item indices in time order
        for n, wave in enumerate(waveforms):
            audio = np.asarray(wave, dtype=np.float32)
            if audio.ndim == 1:
                audio = audio[None, :]
            if audio.shape[-1] == 0:
                raise EmbeddError(Code.DECODE_ERROR, f"track {n} has no audio samples for model 'latent'")
            if audio.shape[0] == 1:
                audio = np.concatenate([audio, audio])
            if audio.shape[-1] < min_samples:
                audio = np.tile(audio, (1, -(-min_samples // audio.shape[-1])))
            cropped = ((((audio.shape[-1] - 3 * hop) // hop) // down) * hop * down) + 3 * hop
            frames = (cropped - 4 * hop) // hop + 1
            size = chunk_frames(frames, max_frames, down)
            # the package pads the last chunk with the track's first frames (and, when the length
            # divides evenly, adds a whole chunk of them that it then drops: we skip that one)
            pad = (size - frames % size) % size if frames > size else 0
            channels = []
            for ch in range(audio.shape[0]):
                mono = audio[ch]
                indices = []
                for first in range(0, frames, size):
                    count = min(size, frames - first)
                    last = first + count >= frames
                    indices.append(len(items))
                    items.append(_Chunk(mono, first, count, pad if last else 0))
                channels.append(indices)
            layout.append(channels)
        outputs: list[torch.Tensor | None] = [None] * len(items)
        with autocast(self.device, self.spec.precision):
            for length, idx in group_by(items, lambda c: c.frames + c.pad).items():
                per_pass = self.items_per_pass(self.item_bytes(int(length)))  # type: ignore[arg-type]
                rows = run_batched([items[i] for i in idx], self._forward, per_pass,
                                   model_name=self.name, interrupt=self.interrupt)
                for i, row in zip(idx, rows):
                    outputs[i] = row
        result = []
        for channels in layout:
            per_channel = []
            for indices in channels:
                pieces = []
                for i in indices:
                    out = outputs[i]
                    assert out is not None
                    pieces.append(out[:, : items[i].frames // down])  # drop the padding's latents
                per_channel.append(torch.cat(pieces, dim=-1))
            result.append(torch.stack(per_channel) / sigma_rescale)
        return result

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        out = []
        for latent in self.track_latents(waveforms):
            c0, c1 = latent[0], latent[1]
            frames = torch.cat([c0, c1, torch.sqrt(c0 * c0 + c1 * c1)], dim=0)  # [3C, T]
            out.append(AudioEmbedding(vector=enrich(frames), windows=int(frames.shape[-1])))
        return out

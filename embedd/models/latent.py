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

Encoding reproduces ``music2latent.inference.encode_audio_inference`` -- what
the original system ran, through the package's ``encode`` -- with its own
functions (``to_representation_encoder``) and constants, including its chunking:
the waveform is cropped to a whole number of latent frames, its encoder
representation is cut into chunks of the package's ``max_waveform_length_encode``
(60 s of 44.1 kHz samples), the last one padded with the representation of the
track's start, every channel of every chunk is one batch item, and the latents
are stitched back, cropped, and divided by ``sigma_rescale``. The chunk length
is part of the result, not only of the cost: the encoder attends over a whole
chunk, so other chunks give other latents near every cut, and the drift part
of the stored vector (the mean first difference is the last frame minus the
first, over the frame count) follows them: 10 s chunks, which embedd used
before, left the drift at cosine 0.989 to the original's on a 95 s track.

Memory: a 60 s chunk channel costs about 7 GB of activations in one forward pass
at real size on a CPU (≈1.4 MB per representation frame, 5,168 frames); how many
share a pass comes from the memory budget (:meth:`item_bytes`), one at least.
The representation is computed per batch from each chunk's own samples (the
STFT frames are independent), so a long track's whole representation -- 1.4 GB
a minute -- is never on the GPU at once. Batch items of all tracks of a call run
together (grouped by length), with the OOM-splitting batcher. The waveforms stay
on the host until their chunk runs. A track whose two channels are the same (a
mono file, duplicated by the decoder) is encoded once and its latents used for
both channels: the same numbers for half the work.

Sample rate: the original handed the file's path to the package's ``encode``,
whose loader (``soundfile.read``) does not resample: a 48 kHz file is encoded at
48 kHz, its samples taken as they are. The catalogue marks this model
``native_rate``, so the decoder hands it the file's own samples (no resampling)
and the vectors are the original's.

Per latent frame the original stores ``3 x C`` values (192 for the real model):
the two channels interleaved per latent dimension, ``[c0_0, c1_0, c0_1, c1_1,
..., c0_{C-1}, c1_{C-1}]``, then the ``C`` magnitudes ``sqrt(c0^2 + c1^2 +
1e-12)``; embedd lays them out the same way, enriched over the frames. A mono
file (on which the original's own code failed) goes through as dual mono, its
one channel as both: the representation a mono recording has when played as
stereo, and what the original would store for that stereo file.
Tracks too short for a single latent frame are tiled (repeated) up to one frame,
the same way the package pads its last chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from embedd.errors import Code, EmbeddError, Misuse
from embedd.models import CATALOG
from embedd.models.base import AudioEmbedding, EmbeddingModel, ModelSpec
from embedd.models.enrich import enrich
from embedd.models.layout import channels_last
from embedd.models.quantize import quantize_model
from embedd.models.runtime import autocast, group_by, resolve_file, run_batched

__all__ = ["CHECKPOINT_FILENAME", "Music2LatentModel", "build_encoder", "build_unet", "chunk_frames", "frame_features"]

CHECKPOINT_FILENAME = "music2latent.pt"
#: Seconds of 44.1 kHz audio per encoder chunk: the package's ``max_waveform_length_encode``
#: (60 s), which the original system used; a part of the result (see the module docstring).
CHUNK_S = 60
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
    """Representation frames per chunk of a ``frames``-long track, as the package cuts them.

    A track up to ``max_frames`` is one chunk; a longer one is cut every ``max_frames``, the last
    chunk padded up to it (``encode_audio_inference``). Equal chunks of less than ``max_frames``
    would pad less, but the encoder attends over a whole chunk, so they give other latents than
    the original's (see the module docstring). ``frames`` and ``max_frames`` are whole latent
    frames (multiples of ``down``), and so is the result.
    """
    del down  # the package's cut needs no rounding: both are whole latent frames
    return frames if frames <= max_frames else max_frames


class Music2LatentModel(EmbeddingModel):
    info = CATALOG["latent"]

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._encoder: torch.nn.Module | None = None
        self._channels: int | None = None  # latent channels C (64 for the real model)
        from music2latent.hparams import hop

        self._hop = int(hop)
        self._width_scale = 1.0  # base_channels / stock, set at load
        # the package's 60 s (see the module docstring) unless ``latent_chunk_s`` asks for less
        # memory per pass; an attribute so that tests can exercise chunking cheaply
        self.max_waveform_length = int((spec.chunk_s or CHUNK_S) * 44_100)

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
        if self._dtype == torch.bfloat16:
            # bf16 weights and activations, not autocast: most of this encoder's pass is memory-bound
            # GroupNorm, SiLU and residual adds, which autocast runs in fp32 with a cast on each side.
            # In bf16 throughout, the activations take half the memory (3.6 instead of 7.2 GB for a
            # 60 s chunk), and on glibc's malloc a chunk runs 1.64x faster on an AMX CPU (on tcmalloc
            # both run alike), at the cosine to fp32 of autocast (0.99929 against 0.99931 over a chunk;
            # PyTorch's bf16 norms accumulate in fp32): bench/latent_bf16.py, BENCHMARKS.md.
            encoder.to(torch.bfloat16)
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
        if self._encoder is None:
            raise Misuse("Music2Latent used before load(): the model registry loads a backend first")
        from music2latent.audio import to_representation_encoder

        reps = []
        for chunk in items:
            parts = [to_representation_encoder(self._samples(chunk.audio, chunk.start, chunk.frames))]
            if chunk.pad:
                parts.append(to_representation_encoder(self._samples(chunk.audio, 0, chunk.pad)))
            reps.append(torch.cat(parts, dim=-1)[0])  # [2 (re, im), hop*2, frames]
        return self._fast(self._encoder, torch.stack(reps).to(self._dtype)).float()

    def _compile_target(self) -> tuple[torch.nn.Module, torch.Tensor] | None:
        """The encoder, on one full chunk of one channel: the shape of every item of a track longer than a chunk."""
        if self._encoder is None:
            return None
        from music2latent.audio import to_representation_encoder

        max_frames = self._constants()[2]
        silence = np.zeros((max_frames - 1) * self._hop + 4 * self._hop, np.float32)
        with torch.inference_mode():
            example = torch.stack([to_representation_encoder(self._samples(silence, 0, max_frames))[0]])
        return self._encoder, example.to(self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        """The encoder's weights and activations: bf16 when the precision is bf16 (unquantised), see :meth:`_load`."""
        return torch.bfloat16 if self.spec.precision == "bf16" and self.spec.quantize == "none" else torch.float32

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        """bf16 weights run as they are (inference mode only): autocast would cast around every norm again."""
        return autocast(self.device, "fp32") if self._dtype == torch.bfloat16 else super().forward_context()

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
            if audio.shape[0] == 2 and np.array_equal(audio[0], audio[1]):
                audio = audio[:1]  # dual mono: one channel encoded, its latents used for both
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
        with self.forward_context():
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
                    if out is None:
                        raise Misuse(f"Music2Latent: chunk {i} of this pass has no output (every chunk runs once)")
                    pieces.append(out[:, : items[i].frames // down])  # drop the padding's latents
                per_channel.append(torch.cat(pieces, dim=-1))
            if len(per_channel) == 1:
                per_channel = per_channel * 2
            result.append(torch.stack(per_channel) / sigma_rescale)
        return result

    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        out = []
        for latent in self.track_latents(waveforms):
            frames = frame_features(latent)
            out.append(AudioEmbedding(vector=enrich(frames), windows=int(frames.shape[-1])))
        return out


def frame_features(latent: torch.Tensor) -> torch.Tensor:
    """``[3C, T]``: per latent frame the original's 192 values (real model) from ``[2, C, T]`` latents.

    The two channels interleaved per latent dimension (``c0_0, c1_0, c0_1, c1_1, ...``), then the
    magnitudes ``sqrt(c0^2 + c1^2 + 1e-12)``.
    """
    c0, c1 = latent[0], latent[1]
    interleaved = torch.stack([c0, c1], dim=1).reshape(2 * c0.shape[0], c0.shape[-1])  # [2C, T]
    return torch.cat([interleaved, torch.sqrt(c0 * c0 + c1 * c1 + 1e-12)], dim=0)

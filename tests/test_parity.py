"""Parity with the original system (issue 23): embedd's stored vectors equal the original's.

Each reference vector is built here from the original's rules, by code of this
test and the official models' own entry points, never by embedd's:

- the loaders: for MuQ-MuLan and MERT the file read with ``soundfile``,
  averaged to mono and resampled to 24 kHz with soxr (HQ) in one call (embedd
  decodes with PyAV and resamples in a stream); for Music2Latent the package's own
  ``encode_audio_inference`` handed the file's *path* (its ``soundfile`` loader,
  no resampling: a 48 kHz file is encoded at 48 kHz) with its default 60 s
  chunks;
- MuQ-MuLan: a track shorter than 120 s padded with zeros to 120 s; windows
  every 15 s while a whole one fits, then one aligned to the end; each window
  through ``MuQMuLan(wavs=window)``;
- MERT: padded with zeros to 30 s; windows every 5 s, the last aligned to the
  end; each window through the feature extractor and the model, the time-mean
  of every hidden state;
- Music2Latent: per latent frame the two channels interleaved per dimension,
  then ``sqrt(c0^2 + c1^2 + 1e-12)``; a mono file (the original failed on it)
  as dual mono, its latents as both channels;
- enrichment in float64 numpy: mean, ``IQR / 1.3489795003921634``, mean first
  difference.

embedd's side is what a batch job stores: the file decoded by embedd's decoder
for the models' targets, then :func:`embedd.embedding.embed_decoded` over the
backends, called in-process. Each of the three parts of the vector is held to
the reference at cosine >= 0.9999.

Cost. The tiny models still take ~0.1 s per second of audio per model on a
CPU, and the reference costs as much again, so the default run covers every
rule, every duration up to 130 s and every format (stereo/mono, 44.1/48 kHz)
in a covering design of six files (about a minute on 2 cores);
``EMBEDD_PARITY_FULL=1`` runs the whole matrix -- 0.4, 8, 30, 95, 130 and 240 s,
each stereo and mono at 44.1 and 48 kHz, all three models (several minutes).
"""

from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from embedd.audio import decode_file
from embedd.embedding import decode_targets, embed_decoded
from embedd.models import backend_class
from embedd.models.base import EmbeddingModel, ModelSpec

IQR = 1.3489795003921634
MIN_COSINE = 0.9999
MODELS = ("muq", "mert", "latent")
FULL = os.environ.get("EMBEDD_PARITY_FULL") == "1"

# (seconds, channels, rate, models): the default covering design
CASES: list[tuple[float, int, int, tuple[str, ...]]] = [
    (0.4, 2, 48_000, MODELS),
    (8.0, 1, 44_100, MODELS),
    (30.0, 2, 44_100, MODELS),
    (30.0, 1, 48_000, ("latent",)),
    (95.0, 1, 48_000, MODELS),  # Music2Latent: two 60 s chunks of a mono 48 kHz file
    (130.0, 2, 48_000, ("muq", "mert")),  # MuQ: a grid window and one aligned to the end
]
if FULL:
    CASES = [(s, c, r, MODELS) for s in (0.4, 8.0, 30.0, 95.0, 130.0, 240.0) for c in (2, 1) for r in (44_100, 48_000)]


# -- the models (in-process; one of each for the module) -------------------------------
@pytest.fixture(scope="module")
def backends(tiny_models: dict[str, str]) -> Iterator[dict[str, EmbeddingModel]]:
    torch.manual_seed(0)
    out = {}
    for name in MODELS:
        model = backend_class(name)(ModelSpec(source=tiny_models[name], device="cpu", precision="fp32"))
        model.load()
        out[name] = model
    yield out
    for model in out.values():
        model.unload()


@pytest.fixture(scope="module")
def music2latent_trainer(tiny_models: dict[str, str]) -> types.SimpleNamespace:
    """What the package's ``encode`` needs: an object holding the whole UNet of the checkpoint."""
    from embedd.models.latent import build_unet

    checkpoint = torch.load(tiny_models["latent"], map_location="cpu", weights_only=False)
    unet = build_unet(checkpoint.get("embedd_hparams"))
    unet.load_state_dict(checkpoint["gen_state_dict"])
    return types.SimpleNamespace(gen=unet.eval())


def write_track(path: Path, seconds: float, channels: int, rate: int, seed: int) -> Path:
    """A FLAC (16 bit) whose content changes over the track: windows differ, it drifts."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    chans = []
    for c in range(channels):
        f = 180 + 60 * c + 50 * np.sin(2 * np.pi * t / (23 + 7 * c)) + 40 * t / max(seconds, 1.0)
        phase = 2 * np.pi * np.cumsum(f) / rate
        level = 0.02 + 0.08 * (t / max(seconds, 1.0))  # noise grows: the track drifts
        chans.append(0.3 * np.sin(phase) + 0.15 * np.sin(3.1 * phase) + level * rng.standard_normal(n))
    data = np.stack(chans, axis=1).astype(np.float32)
    sf.write(str(path), data if channels > 1 else data[:, 0], rate, subtype="PCM_16", format="FLAC")
    return path


# -- the reference: the original's rules, written out here ---------------------------
def spans(n: int, window: int, hop: int) -> list[tuple[int, int]]:
    """Windows every ``hop`` from 0 while a whole one fits, then one aligned to the end (n >= window)."""
    starts = list(range(0, n - window + 1, hop))
    if starts[-1] + window < n:
        starts.append(n - window)
    return [(s, s + window) for s in starts]


def padded(x: np.ndarray, window: int) -> np.ndarray:
    return np.concatenate([x, np.zeros(window - x.size, x.dtype)]) if x.size < window else x


def reference_stats(windows: np.ndarray) -> np.ndarray:
    """``[mean, IQR / 1.3489795003921634, mean first difference]`` of ``[D, T]``, unnormalised."""
    x = windows.astype(np.float64)
    mean = x.mean(axis=1)
    if x.shape[1] == 1:
        return np.concatenate([mean, np.zeros_like(mean), np.zeros_like(mean)])
    q75, q25 = np.percentile(x, [75, 25], axis=1)
    return np.concatenate([mean, (q75 - q25) / IQR, np.diff(x, axis=1).mean(axis=1)])


def load_24k_mono(path: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return soxr.resample(data.mean(axis=1), rate, 24_000, quality="HQ").astype(np.float32)


def reference_muq(model: EmbeddingModel, path: Path) -> np.ndarray:
    sr = 24_000
    audio = padded(load_24k_mono(path), 120 * sr)
    mulan = model._model  # type: ignore[attr-defined]  # the official MuQMuLan object
    cols = []
    with torch.inference_mode():
        for s, e in spans(audio.size, 120 * sr, 15 * sr):
            cols.append(mulan(wavs=torch.from_numpy(audio[s:e]).unsqueeze(0))[0].float().numpy())
    return np.stack(cols, axis=1)


def reference_mert(model: EmbeddingModel, path: Path) -> np.ndarray:
    sr = 24_000
    audio = padded(load_24k_mono(path), 30 * sr)
    net, extractor = model._model, model._extractor  # type: ignore[attr-defined]
    cols = []
    with torch.inference_mode():
        for s, e in spans(audio.size, 30 * sr, 5 * sr):
            inputs = extractor(audio[s:e], sampling_rate=sr, return_tensors="pt")
            states = net(inputs["input_values"], output_hidden_states=True).hidden_states
            cols.append(torch.cat([h[0].float().mean(dim=0) for h in states]).numpy())
    return np.stack(cols, axis=1)


def reference_latent(trainer: types.SimpleNamespace, path: Path) -> np.ndarray:
    from music2latent.hparams_inference import max_waveform_length_encode
    from music2latent.inference import encode_audio_inference

    with torch.inference_mode():
        lat = encode_audio_inference(str(path), trainer, max_waveform_length_encode, 1, device="cpu").numpy()
    if lat.shape[0] == 1:  # a mono file: the original failed; embedd takes it as dual mono
        lat = np.concatenate([lat, lat])
    c0, c1 = lat[0].astype(np.float64), lat[1].astype(np.float64)
    rows = []
    for k in range(c0.shape[0]):  # c0_0, c1_0, c0_1, c1_1, ...
        rows += [c0[k], c1[k]]
    rows += list(np.sqrt(c0 * c0 + c1 * c1 + 1e-12))
    return np.stack(rows)


# -- embedd's side: decode, then what the batch job stores -----------------------------
def embedd_vectors(backends: dict[str, EmbeddingModel], path: Path, models: tuple[str, ...]) -> dict:
    audio = decode_file(path, decode_targets(models))

    async def embed(model: str, wave: np.ndarray, seconds: float):
        return backends[model].embed_audio_many([wave])[0]

    return asyncio.run(embed_decoded(audio, list(models), embed))


def part_cosines(stored: np.ndarray, ref: np.ndarray) -> list[float]:
    """Cosine per part (mean, spread, drift); a part that is zero in both counts as 1."""
    d = ref.size // 3
    out = []
    for i in range(3):
        a, b = stored[i * d : (i + 1) * d].astype(np.float64), ref[i * d : (i + 1) * d]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if nb <= 1e-12 * np.linalg.norm(ref):
            out.append(1.0 if na <= 1e-6 else 0.0)
        else:
            out.append(float(a @ b / (na * nb)))
    return out


@pytest.mark.timeout(1800 if FULL else 300)
@pytest.mark.parametrize(("seconds", "channels", "rate", "models"), CASES,
                         ids=[f"{s:g}s-{'stereo' if c == 2 else 'mono'}-{r // 1000}k" for s, c, r, _ in CASES])
def test_stored_vectors_equal_the_originals(
    backends, music2latent_trainer, tmp_path: Path, seconds: float, channels: int, rate: int, models: tuple[str, ...]
) -> None:
    path = write_track(tmp_path / "track.flac", seconds, channels, rate, seed=int(seconds * 10) + channels + rate)
    got = embedd_vectors(backends, path, models)
    refs = {}
    for name in models:
        if name == "muq":
            refs[name] = reference_muq(backends["muq"], path)
        elif name == "mert":
            refs[name] = reference_mert(backends["mert"], path)
        else:
            refs[name] = reference_latent(music2latent_trainer, path)
    report = []
    for name in models:
        windows = refs[name]
        stats = reference_stats(windows)
        stored = got[name].vector
        cosines = part_cosines(stored, stats)
        whole = float(stored.astype(np.float64) @ stats / (np.linalg.norm(stored) * np.linalg.norm(stats)))
        report.append(f"{name}: windows {got[name].windows}/{windows.shape[1]} whole {whole:.7f} parts "
                      + " ".join(f"{c:.7f}" for c in cosines))
        assert got[name].windows == windows.shape[1], report[-1]
        assert whole >= MIN_COSINE and min(cosines) >= MIN_COSINE, report[-1]
    print(f"{seconds:g} s, {channels} ch, {rate} Hz: " + "; ".join(report))


def test_the_layout_rules_themselves() -> None:
    """The three rules that need no audio: the spread constant, the window grid, the latent frame layout."""
    from embedd.models.enrich import IQR_TO_SIGMA
    from embedd.models.latent import CHUNK_S, frame_features
    from embedd.models.runtime import window_spans
    from music2latent.hparams_inference import max_waveform_length_encode

    assert IQR_TO_SIGMA == IQR
    assert CHUNK_S * 44_100 == max_waveform_length_encode
    sr = 24_000
    n = 130 * sr
    assert window_spans(n, 120 * sr, 15 * sr, align_last_to_end=True) == spans(n, 120 * sr, 15 * sr) == [
        (0, 120 * sr), (10 * sr, 130 * sr)]  # fmt: skip
    lat = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [channels, C=3, T=2]
    frames = frame_features(lat).numpy()
    c0, c1 = lat[0].numpy(), lat[1].numpy()
    want = np.stack([c0[0], c1[0], c0[1], c1[1], c0[2], c1[2], *np.sqrt(c0**2 + c1**2 + 1e-12)])
    np.testing.assert_allclose(frames, want, rtol=1e-6)

"""Audio fixtures, generated with PyAV's bundled encoders (no ffmpeg binary needed).

Every fixture is a short tone of known frequency and per-channel amplitude, so
tests can check lengths, downmixing and resampling against what was written.
Encoders used from the av wheel: libmp3lame, the native (experimental, stereo
only) vorbis encoder, libopus, aac, flac, alac and pcm_*; mpeg4 for the
video-only container.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import av
import numpy as np

__all__ = [
    "TONE_HZ",
    "Fixture",
    "amplitudes",
    "encode",
    "make_broken_fixtures",
    "make_damaged_adts",
    "make_format_fixtures",
    "make_long_wav",
    "make_lying_flac",
    "make_video_with_audio",
    "make_surround_lfe_wav",
    "make_video_only",
    "tone",
]

TONE_HZ = 440.0
DURATION_S = 1.5


@dataclasses.dataclass(frozen=True)
class Fixture:
    path: Path
    rate: int  # rate written (what the decoder should report)
    channels: int
    duration_s: float
    lossless: bool


def amplitudes(channels: int) -> np.ndarray:
    """Distinct per-channel amplitudes so that downmix errors show up."""
    return np.array([0.5, 0.25, 0.4, 0.2, 0.3, 0.1, 0.35, 0.15][:channels] + [0.2] * max(0, channels - 8), np.float32)


def tone(rate: int, channels: int, duration_s: float, freq: float = TONE_HZ) -> np.ndarray:
    t = np.arange(round(rate * duration_s)) / rate
    wave = np.sin(2 * np.pi * freq * t).astype(np.float32)
    return amplitudes(channels)[:, None] * wave[None, :]


_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def encode(
    samples: np.ndarray,
    rate: int,
    *,
    container_format: str,
    codec: str,
    layout: str | None = None,
    options: dict[str, str] | None = None,
    codec_rate: int | None = None,
) -> bytes:
    """Encode a float ``[channels, n]`` array; returns the file's bytes."""
    layout = layout or _LAYOUTS[samples.shape[0]]
    out_rate = codec_rate or rate
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as c:
        s = c.add_stream(codec, rate=out_rate, options=options or {})
        s.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        rs = av.AudioResampler(format=s.codec_context.format, layout=layout, rate=out_rate)
        for f in rs.resample(frame) + rs.resample(None):
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


# name → (extension, container, codec, rate, channels, lossless, extra options)
FORMATS: dict[str, tuple[str, str, str, int, int, bool, dict[str, str]]] = {
    "mp3_44k_stereo": ("mp3", "mp3", "libmp3lame", 44_100, 2, False, {}),
    "mp3_22k_mono": ("mp3", "mp3", "libmp3lame", 22_050, 1, False, {}),
    "mp3_8k_mono": ("mp3", "mp3", "libmp3lame", 8_000, 1, False, {}),
    "mp3_48k_stereo": ("mp3", "mp3", "libmp3lame", 48_000, 2, False, {}),
    "flac_44k_stereo": ("flac", "flac", "flac", 44_100, 2, True, {}),
    "flac_96k_51": ("flac", "flac", "flac", 96_000, 6, True, {}),
    "flac_192k_stereo": ("flac", "flac", "flac", 192_000, 2, True, {}),
    "flac_8k_mono": ("flac", "flac", "flac", 8_000, 1, True, {}),
    "vorbis_44k_stereo": ("ogg", "ogg", "vorbis", 44_100, 2, False, {"strict": "experimental"}),
    "opus_48k_stereo": ("opus", "ogg", "libopus", 48_000, 2, False, {}),
    "opus_48k_51": ("ogg", "ogg", "libopus", 48_000, 6, False, {}),
    "opus_from_22k_mono": ("opus", "ogg", "libopus", 48_000, 1, False, {}),
    "aac_44k_stereo": ("m4a", "ipod", "aac", 44_100, 2, False, {}),
    "aac_48k_51": ("m4a", "ipod", "aac", 48_000, 6, False, {}),
    "aac_22k_mono": ("m4a", "ipod", "aac", 22_050, 1, False, {}),
    "alac_44k_stereo": ("m4a", "ipod", "alac", 44_100, 2, True, {}),
    "wav_u8_8k_mono": ("wav", "wav", "pcm_u8", 8_000, 1, True, {}),
    "wav_s16_22k_stereo": ("wav", "wav", "pcm_s16le", 22_050, 2, True, {}),
    "wav_s24_96k_stereo": ("wav", "wav", "pcm_s24le", 96_000, 2, True, {}),
    "wav_s32_48k_51": ("wav", "wav", "pcm_s32le", 48_000, 6, True, {}),
    "wav_f32_192k_mono": ("wav", "wav", "pcm_f32le", 192_000, 1, True, {}),
    "wav_f64_44k_stereo": ("wav", "wav", "pcm_f64le", 44_100, 2, True, {}),
}


def make_format_fixtures(directory: Path, duration_s: float = DURATION_S) -> dict[str, Fixture]:
    """Write one tone file per entry of :data:`FORMATS`; returns name → fixture."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (ext, container, codec, rate, channels, lossless, options) in FORMATS.items():
        source_rate = 22_050 if name == "opus_from_22k_mono" else rate  # opus resamples internally to 48k
        data = encode(
            tone(source_rate, channels, duration_s),
            source_rate,
            container_format=container,
            codec=codec,
            options=options,
            codec_rate=rate,
        )
        path = directory / f"{name}.{ext}"
        path.write_bytes(data)
        out[name] = Fixture(path, rate, channels, duration_s, lossless)
    return out


def make_surround_lfe_wav(path: Path, rate: int = 48_000, duration_s: float = 1.0) -> Path:
    """5.1 wav: 440 Hz on the five full-range channels, 100 Hz only on LFE (which downmix must drop)."""
    t = np.arange(round(rate * duration_s)) / rate
    main = 0.4 * np.sin(2 * np.pi * 440 * t)
    lfe = 0.8 * np.sin(2 * np.pi * 100 * t)
    x = np.stack([main, main, main, lfe, main, main]).astype(np.float32)  # FL FR FC LFE BL BR
    path.write_bytes(encode(x, rate, container_format="wav", codec="pcm_s16le", layout="5.1"))
    return path


def make_long_wav(path: Path, duration_s: float = 3.0, rate: int = 8_000) -> Path:
    path.write_bytes(encode(tone(rate, 1, duration_s), rate, container_format="wav", codec="pcm_s16le"))
    return path


def make_lying_flac(path: Path, *, declared_s: float = 0.5, real_s: float = 3.0, rate: int = 8_000) -> Path:
    """A flac whose STREAMINFO declares ``declared_s`` but whose frames hold ``real_s``.

    The decoder must enforce ``max_audio_s`` on what it decodes, not only on
    what the header says.
    """
    data = bytearray(encode(tone(rate, 1, real_s), rate, container_format="flac", codec="flac"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    # STREAMINFO: 10 bytes of block/frame sizes, then 64 bits = rate(20) ch(3) bps(5) total_samples(36).
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | round(declared_s * rate)
    data[18:26] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def make_video_only(path: Path) -> Path:
    """An mp4 holding one video stream and no audio."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            img = np.full((48, 64, 3), i * 20, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def make_video_with_audio(path: Path, rate: int = 44_100, duration_s: float = 1.0) -> Path:
    """An mp4 whose first stream is video and second is AAC audio: the decoder must find the audio."""
    with av.open(str(path), "w", format="mp4") as c:
        v = c.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("aac", rate=rate)
        a.layout = "stereo"
        for i in range(int(10 * duration_s)):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 9 * i, np.uint8), format="rgb24")):
                c.mux(p)
        frame = av.AudioFrame.from_ndarray(tone(rate, 2, duration_s), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for p in a.encode(frame):
            c.mux(p)
        for s in (v, a):
            for p in s.encode(None):
                c.mux(p)
    return path


def make_damaged_adts(path: Path, *, damage_every: int, damage_of: int, seed: int = 7) -> Path:
    """Raw AAC (ADTS) with the payload of ``damage_every`` out of each ``damage_of`` frames overwritten.

    Frame headers stay intact so the demuxer still splits packets and only the
    decoder sees the damage: a file mostly damaged must be a ``decode_error``,
    a file lightly damaged must decode with the bad packets skipped.
    """
    rng = np.random.default_rng(seed)
    data = bytearray(encode(tone(44_100, 2, 3.0), 44_100, container_format="adts", codec="aac"))
    pos = index = 0
    while pos + 7 <= len(data):
        assert data[pos] == 0xFF and data[pos + 1] & 0xF0 == 0xF0, "lost ADTS sync"
        length = ((data[pos + 3] & 3) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
        if index % damage_of < damage_every:
            data[pos + 7 : pos + length] = rng.integers(0, 256, length - 7, dtype=np.uint8).tobytes()
        pos += length
        index += 1
    path.write_bytes(bytes(data))
    return path


def make_broken_fixtures(directory: Path, *, seed: int = 1234) -> dict[str, Path]:
    """Inputs that must each end in a contract error (or, for a truncated file, its prefix)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    flac = encode(tone(44_100, 2, 2.0), 44_100, container_format="flac", codec="flac")
    files = {
        "random.mp3": rng.integers(0, 256, 64_000, dtype=np.uint8).tobytes(),
        "text.flac": b"This is not audio at all, just a text file with a .flac name.\n" * 50,
        "empty.wav": b"",
        "truncated.flac": flac[: len(flac) // 2],
        "header_only.flac": flac[:100],
    }
    out = {}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        out[name] = directory / name
    out["video_only.mp4"] = make_video_only(directory / "video_only.mp4")
    return out


def distinct_signal(index: int, rate: int = 44_100, duration_s: float = 2.0, channels: int = 2) -> np.ndarray:
    """Audio that differs clearly from track to track: seeded noise under a chord of its own.

    Format fixtures are all the same tone, which every model embeds alike; search
    tests need tracks whose nearest neighbour is unambiguous.
    """
    rng = np.random.default_rng(10_000 + index)
    n = round(rate * duration_s)
    t = np.arange(n) / rate
    freqs = rng.uniform(80, 4000, size=3)
    chord = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) for f in freqs) / 3
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 3) * t)
    noise = rng.standard_normal(n) * rng.uniform(0.05, 0.4)
    mono = (0.5 * chord * envelope + noise).astype(np.float32)
    mono /= max(1e-6, float(np.abs(mono).max())) * 1.25
    return np.stack([mono * (1 - 0.2 * c) for c in range(channels)])


def make_distinct_tracks(directory: Path, count: int, *, duration_s: float = 2.0, start: int = 0) -> list[Path]:
    """``count`` FLAC files of :func:`distinct_signal`, named track-<index>.flac."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = directory / f"track-{i:04d}.flac"
        path.write_bytes(encode(distinct_signal(i, duration_s=duration_s), 44_100, container_format="flac", codec="flac"))
        paths.append(path)
    return paths

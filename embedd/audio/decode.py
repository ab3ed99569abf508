"""Decoding one file or upload, in whatever process calls it: container → waveforms.

Robustness policy (the daemon decodes files a client names, so every input is
hostile until proven otherwise):

* A missing, empty, non-audio or undecodable file is an :class:`EmbeddError`
  with one sentence naming it; no other exception escapes for bad input.
* Corrupt packets are skipped the way the ``ffmpeg`` command line skips them,
  and a truncated file yields the audio before the cut. A file is a
  ``decode_error`` when it yields no samples at all, or when more packets fail
  than decode (it is more garbage than audio).
* ``max_audio_s`` is checked against the container's declared duration before
  decoding and again against the samples actually decoded, so a header that
  lies cannot make the decoder hold more than the limit.

Each file is demuxed and decoded exactly once; :mod:`embedd.audio.resample`
turns the frames into every target at once. The ``*_into`` functions take the
allocator of the result arrays, so the worker pool can place them in shared
memory (:mod:`embedd.audio.shm`).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import av

from embedd.audio.paths import reason, resolve_allowed_path
from embedd.audio.resample import Pipeline
from embedd.audio.track import DEFAULT_MAX_AUDIO_S, Allocator, DecodedAudio, Target, alloc_heap, check_targets
from embedd.errors import Code, EmbeddError

__all__ = ["decode_bytes", "decode_file", "decode_memory_into", "decode_path_into"]


def decode_file(
    path: str | os.PathLike[str],
    targets: Iterable[Target],
    *,
    max_audio_s: float = DEFAULT_MAX_AUDIO_S,
    roots: Sequence[Path] | None = None,
) -> DecodedAudio:
    """Decode a file in this process. ``roots=None`` skips the root check (tests, benchmarks)."""
    return decode_path_into(path, check_targets(targets), max_audio_s, roots, alloc_heap)


def decode_bytes(
    data: bytes | bytearray | memoryview,
    filename: str,
    targets: Iterable[Target],
    *,
    max_audio_s: float = DEFAULT_MAX_AUDIO_S,
) -> DecodedAudio:
    """Decode uploaded bytes from memory; ``filename`` only names the upload in errors."""
    return decode_memory_into(data, filename, check_targets(targets), max_audio_s, alloc_heap)



def decode_path_into(
    path: str | os.PathLike[str],
    targets: frozenset[Target],
    max_audio_s: float,
    roots: Sequence[Path] | None,
    alloc: Allocator,
) -> DecodedAudio:
    display = os.fspath(path)
    if roots is not None:
        real = resolve_allowed_path(path, roots)
    else:
        real = Path(display)
        try:
            st = real.stat()
        except FileNotFoundError:
            raise EmbeddError(Code.NOT_FOUND, f"The file '{display}' does not exist.") from None
        except OSError as e:
            raise EmbeddError(Code.NOT_FOUND, f"The file '{display}' cannot be read ({reason(e)}).") from None
        if not stat.S_ISREG(st.st_mode):
            raise EmbeddError(Code.BAD_REQUEST, f"The path '{display}' is not a regular file.")
    try:
        size = real.stat().st_size
    except OSError as e:
        raise EmbeddError(Code.NOT_FOUND, f"The file '{display}' cannot be read ({reason(e)}).") from None
    if size == 0:
        raise EmbeddError(Code.DECODE_ERROR, f"The file '{display}' is empty.")
    return _decode(str(real), display, targets, max_audio_s, alloc)


def decode_memory_into(
    data: bytes | bytearray | memoryview,
    filename: str,
    targets: frozenset[Target],
    max_audio_s: float,
    alloc: Allocator,
) -> DecodedAudio:
    if len(data) == 0:
        raise EmbeddError(Code.DECODE_ERROR, f"The upload '{filename}' is empty.")
    return _decode(io.BytesIO(data), filename, targets, max_audio_s, alloc)


def _decode(
    source: str | BinaryIO,
    display: str,
    targets: frozenset[Target],
    max_audio_s: float,
    alloc: Allocator,
) -> DecodedAudio:
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except PermissionError:
        raise EmbeddError(Code.FORBIDDEN, f"The daemon has no permission to read '{display}'.") from None
    except FileNotFoundError:
        raise EmbeddError(Code.NOT_FOUND, f"The file '{display}' does not exist.") from None
    except Exception as e:  # noqa: BLE001 - any failure to open hostile input is a decode error
        raise EmbeddError(Code.DECODE_ERROR, f"'{display}' could not be decoded: it is not audio or is corrupt ({reason(e)}).") from None
    try:
        with container:
            return _decode_container(container, display, targets, max_audio_s, alloc)
    except EmbeddError:
        raise
    except MemoryError:
        raise EmbeddError(Code.TOO_LARGE, f"'{display}' needs more memory to decode than is available.") from None
    except Exception as e:  # noqa: BLE001
        raise EmbeddError(Code.DECODE_ERROR, f"'{display}' could not be decoded ({reason(e)}).") from None


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _decode_container(
    container: Any, display: str, targets: frozenset[Target], max_audio_s: float, alloc: Allocator
) -> DecodedAudio:
    if not container.streams.audio:
        raise EmbeddError(Code.DECODE_ERROR, f"'{display}' has no audio stream.")
    stream = container.streams.best("audio") or container.streams.audio[0]
    declared = _declared_duration(container, stream)
    if declared is not None and declared > max_audio_s:
        raise EmbeddError(Code.TOO_LARGE, _too_long(display, declared, max_audio_s))
    ctx = stream.codec_context
    pipe = Pipeline(targets, display, max_audio_s)
    ok_packets = bad_packets = 0
    last_error: Exception | None = None

    def take(frames: Iterable[Any]) -> None:
        for frame in frames:
            pipe.push(frame)

    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            break
        except av.FFmpegError as e:  # unreadable tail: keep what came before, like ffmpeg
            last_error = e
            take(_flush(ctx))
            break
        try:
            take(ctx.decode(packet))
            if packet.size:
                ok_packets += 1
        except EmbeddError:
            raise
        except (av.FFmpegError, ValueError) as e:  # one corrupt packet: skip it
            bad_packets += 1
            last_error = e
    waves = pipe.finish(alloc)
    if pipe.samples == 0:
        why = f" ({reason(last_error)})" if last_error is not None else ""
        raise EmbeddError(Code.DECODE_ERROR, f"'{display}' contains no decodable audio{why}.")
    if bad_packets > ok_packets:
        raise EmbeddError(Code.DECODE_ERROR, f"'{display}' is corrupt: {bad_packets} of {bad_packets + ok_packets} audio packets failed to decode.")
    return DecodedAudio(
        duration_s=pipe.duration_s,
        waveforms=waves,
        source_rate=pipe.source_rate,
        source_channels=pipe.source_channels,
    )


def _flush(ctx: Any) -> list[Any]:
    try:
        return list(ctx.decode(None))
    except (av.FFmpegError, ValueError):
        return []


def _too_long(display: str, seconds: float, max_audio_s: float) -> str:
    return f"'{display}' is {seconds:.0f} s long, over the {max_audio_s:.0f} s limit."


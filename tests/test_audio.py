"""embedd.audio: every format decodes to the right shapes and rates, bad input gets its contract error."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.audio_fixtures import (
    FORMATS,
    TONE_HZ,
    amplitudes,
    encode,
    make_broken_fixtures,
    make_damaged_adts,
    make_format_fixtures,
    make_long_wav,
    make_lying_flac,
    make_surround_lfe_wav,
    make_video_with_audio,
    tone,
)
from embedd.audio import AudioDecoder, DecodedAudio, decode_bytes, decode_file, resolve_allowed_path
from embedd.audio.budget import HeldAudioGate
from embedd.audio.pool import job_path
from embedd.audio.shm import SHM_PREFIX
from embedd.audio.track import check_targets
from embedd.errors import Code, EmbeddError

TARGETS = {(24_000, 1), (44_100, 2)}


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory):
    return make_format_fixtures(tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_broken_fixtures(tmp_path_factory.mktemp("broken"))


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_decodes_to_every_target(fx, name: str) -> None:
    f = fx[name]
    got = decode_file(f.path, TARGETS)
    assert got.source_rate == f.rate
    assert got.source_channels == f.channels
    # Lossless: exact; lossy codecs add at most a frame or two of padding.
    slack = 0.002 if f.lossless else 0.1
    assert f.duration_s - 0.002 <= got.duration_s <= f.duration_s + slack
    assert set(got.waveforms) == TARGETS
    for rate, channels in TARGETS:
        w = got.waveform(rate, channels)
        assert w.dtype == np.float32 and w.flags.c_contiguous
        assert w.shape[0] == channels
        assert abs(w.shape[1] - got.duration_s * rate) <= 2
        assert np.isfinite(w).all() and np.abs(w).max() <= 1.0
        assert abs(peak_hz(w[0], rate) - TONE_HZ) < 3.0


def test_waveform_lookup_names_what_exists(fx) -> None:
    got = decode_file(fx["flac_8k_mono"].path, {(24_000, 1)})
    with pytest.raises(KeyError, match="24000"):
        got.waveform(44_100, 2)


def test_empty_target_set_still_measures_duration(fx) -> None:
    got = decode_file(fx["flac_44k_stereo"].path, set())
    assert got.waveforms == {} and got.duration_s == pytest.approx(1.5)


def test_bad_target_is_a_bug_not_a_client_error(fx) -> None:
    with pytest.raises(ValueError):
        decode_file(fx["flac_44k_stereo"].path, {(24_000, 3)})


# --------------------------------------------------------------------------- channels


def test_stereo_keeps_channels_and_mono_is_their_mean(fx) -> None:
    f = fx["flac_44k_stereo"]
    got = decode_file(f.path, {(44_100, 2), (44_100, 1)})
    want = tone(44_100, 2, 1.5)
    np.testing.assert_allclose(got.waveform(44_100, 2), want, atol=1e-4)  # s16 quantisation
    np.testing.assert_allclose(got.waveform(44_100, 1)[0], want.mean(axis=0), atol=1e-4)


def test_wav_without_channel_mask_is_read_as_left_right(fx) -> None:
    got = decode_file(fx["wav_s16_22k_stereo"].path, {(22_050, 2)})
    np.testing.assert_allclose(np.abs(got.waveform(22_050, 2)).max(axis=1), amplitudes(2), atol=1e-3)


@pytest.mark.parametrize("name", ["flac_8k_mono", "wav_f32_192k_mono", "opus_from_22k_mono"])
def test_mono_is_duplicated_to_stereo(fx, name: str) -> None:
    got = decode_file(fx[name].path, {(44_100, 2)})
    w = got.waveform(44_100, 2)
    np.testing.assert_array_equal(w[0], w[1])


@pytest.mark.parametrize("name", ["wav_s32_48k_51", "flac_96k_51"])
def test_surround_folds_to_stereo_itu_style(fx, name: str) -> None:
    fl, fr, fc, _lfe, bl, br = amplitudes(6)
    h = math.sqrt(0.5)
    left = (fl + h * fc + h * bl) / (1 + 2 * h)
    right = (fr + h * fc + h * br) / (1 + 2 * h)
    rate = fx[name].rate
    got = decode_file(fx[name].path, {(rate, 2), (rate, 1)})
    np.testing.assert_allclose(np.abs(got.waveform(rate, 2)).max(axis=1), [left, right], rtol=2e-3)
    np.testing.assert_allclose(np.abs(got.waveform(rate, 1)).max(), (left + right) / 2, rtol=2e-3)


def test_surround_downmix_drops_lfe(tmp_path: Path) -> None:
    got = decode_file(make_surround_lfe_wav(tmp_path / "lfe.wav"), {(48_000, 1)})
    spectrum = np.abs(np.fft.rfft(got.waveform(48_000, 1)[0]))  # 1 s → 1 Hz bins
    assert spectrum[100] < 1e-3 * spectrum[440]


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(
    ("name", "rate", "amplitude"),
    [("wav_f32_192k_mono", 24_000, 0.5), ("wav_u8_8k_mono", 44_100, 0.5), ("flac_96k_51", 24_000, 0.33107)],
)
def test_resampling_keeps_frequency_amplitude_and_length(fx, name: str, rate: int, amplitude: float) -> None:
    got = decode_file(fx[name].path, {(rate, 1)})
    w = got.waveform(rate, 1)[0]
    assert abs(len(w) - 1.5 * rate) <= 1
    assert abs(peak_hz(w, rate) - TONE_HZ) < 1.0
    mid = w[len(w) // 4 : -len(w) // 4]  # away from the filter's edge effects
    assert np.abs(mid).max() == pytest.approx(amplitude, rel=0.02)


def test_downsampling_removes_what_is_above_the_new_nyquist(tmp_path: Path) -> None:
    rate = 48_000
    t = np.arange(rate) / rate
    x = (0.25 * np.sin(2 * np.pi * 440 * t) + 0.25 * np.sin(2 * np.pi * 15_000 * t)).astype(np.float32)[None]
    path = tmp_path / "hi.wav"
    path.write_bytes(encode(x, rate, container_format="wav", codec="pcm_f32le"))
    w = decode_file(path, {(24_000, 1)}).waveform(24_000, 1)[0]
    spectrum = np.abs(np.fft.rfft(w))  # 1 Hz bins; 15 kHz would alias to 9 kHz
    assert spectrum[9_000] < 1e-3 * spectrum[440]


def test_audio_is_found_behind_a_video_stream(tmp_path: Path) -> None:
    got = decode_file(make_video_with_audio(tmp_path / "av.mp4"), {(24_000, 1)})
    assert got.duration_s == pytest.approx(1.0, abs=0.1)
    assert abs(peak_hz(got.waveform(24_000, 1)[0], 24_000) - TONE_HZ) < 3


# --------------------------------------------------------------------------- limits and errors


def test_declared_duration_over_limit_is_too_large(tmp_path: Path) -> None:
    path = make_long_wav(tmp_path / "long.wav", duration_s=3.0)
    with pytest.raises(EmbeddError) as e:
        decode_file(path, {(24_000, 1)}, max_audio_s=1.0)
    assert e.value.code is Code.TOO_LARGE and "long.wav" in e.value.message
    assert decode_file(path, {(24_000, 1)}, max_audio_s=3.5).duration_s == pytest.approx(3.0)


def test_a_header_that_lies_about_duration_cannot_beat_the_limit(tmp_path: Path) -> None:
    path = make_lying_flac(tmp_path / "lying.flac", declared_s=0.5, real_s=3.0)
    assert decode_file(path, set()).duration_s == pytest.approx(3.0)
    with pytest.raises(EmbeddError) as e:
        decode_file(path, {(24_000, 1)}, max_audio_s=1.0)
    assert e.value.code is Code.TOO_LARGE


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("random.mp3", Code.DECODE_ERROR),
        ("text.flac", Code.DECODE_ERROR),
        ("empty.wav", Code.DECODE_ERROR),
        ("header_only.flac", Code.DECODE_ERROR),
        ("video_only.mp4", Code.DECODE_ERROR),
    ],
)
def test_broken_input_gets_its_contract_error(broken, name: str, code: Code) -> None:
    with pytest.raises(EmbeddError) as e:
        decode_file(broken[name], TARGETS)
    assert e.value.code is code
    assert name in e.value.message and "\n" not in e.value.message
    with pytest.raises(EmbeddError) as e2:  # same answer for the same bytes uploaded
        decode_bytes(broken[name].read_bytes(), name, TARGETS)
    assert e2.value.code is code and name in e2.value.message


def test_truncated_file_yields_the_audio_before_the_cut(broken) -> None:
    got = decode_file(broken["truncated.flac"], TARGETS)  # documented policy: like ffmpeg
    assert 0.3 < got.duration_s < 2.0
    assert abs(got.waveform(24_000, 1).shape[1] - got.duration_s * 24_000) <= 2


def test_a_few_corrupt_packets_are_skipped(tmp_path: Path) -> None:
    got = decode_file(make_damaged_adts(tmp_path / "light.aac", damage_every=1, damage_of=8), {(24_000, 1)})
    assert got.duration_s > 2.0  # most of the 3 s survive
    assert abs(peak_hz(got.waveform(24_000, 1)[0], 24_000) - TONE_HZ) < 3


def test_a_mostly_corrupt_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddError) as e:
        decode_file(make_damaged_adts(tmp_path / "heavy.aac", damage_every=7, damage_of=8), {(24_000, 1)})
    assert e.value.code is Code.DECODE_ERROR and "heavy.aac" in e.value.message and "corrupt" in e.value.message


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(EmbeddError) as e:
        decode_file(tmp_path / "nope.mp3", TARGETS)
    assert e.value.code is Code.NOT_FOUND and "nope.mp3" in e.value.message


def test_directory_is_a_bad_request(tmp_path: Path) -> None:
    with pytest.raises(EmbeddError) as e:
        decode_file(tmp_path, TARGETS)
    assert e.value.code is Code.BAD_REQUEST


# --------------------------------------------------------------------------- uploads


def test_decode_bytes_matches_decoding_the_file(fx, tmp_path: Path) -> None:
    f = fx["mp3_44k_stereo"]
    from_file = decode_file(f.path, TARGETS)
    before = set(tmp_path.iterdir())
    from_memory = decode_bytes(f.path.read_bytes(), "/no/such/dir/upload.mp3", TARGETS)
    assert set(tmp_path.iterdir()) == before
    assert from_memory.duration_s == from_file.duration_s
    for t in TARGETS:
        np.testing.assert_array_equal(from_memory.waveform(*t), from_file.waveform(*t))


def test_empty_upload_is_a_decode_error() -> None:
    with pytest.raises(EmbeddError) as e:
        decode_bytes(b"", "nothing.flac", TARGETS)
    assert e.value.code is Code.DECODE_ERROR and "nothing.flac" in e.value.message


_SEEDS: dict[str, bytes] = {}


def _seed_files() -> dict[str, bytes]:
    if not _SEEDS:
        x = tone(8_000, 2, 0.3)
        _SEEDS["wav"] = encode(x, 8_000, container_format="wav", codec="pcm_s16le")
        _SEEDS["flac"] = encode(x, 8_000, container_format="flac", codec="flac")
        _SEEDS["mp3"] = encode(x, 8_000, container_format="mp3", codec="libmp3lame")
        _SEEDS["ogg"] = encode(x, 8_000, container_format="ogg", codec="libopus", codec_rate=48_000)
        _SEEDS["m4a"] = encode(x, 8_000, container_format="ipod", codec="aac")
    return _SEEDS


@st.composite
def mangled_audio(draw: st.DrawFn) -> bytes:
    """Valid files with bytes overwritten, cut, or spliced: the inputs a parser actually meets."""
    data = bytearray(_seed_files()[draw(st.sampled_from(sorted(_seed_files())))])
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        data[pos : pos + len(patch)] = patch
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut or len(data)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=4096), mangled_audio()))
def test_any_bytes_give_audio_or_a_contract_error(data: bytes) -> None:
    try:
        got = decode_bytes(data, "upload.bin", TARGETS, max_audio_s=60)
    except EmbeddError as e:
        assert e.code in {Code.DECODE_ERROR, Code.TOO_LARGE}
        assert "upload.bin" in e.message
        return
    assert isinstance(got, DecodedAudio) and got.duration_s > 0
    for (rate, channels), w in got.waveforms.items():
        assert w.shape[0] == channels and w.dtype == np.float32
        assert abs(w.shape[1] - got.duration_s * rate) <= 2 + 1e-3 * w.shape[1]


# --------------------------------------------------------------------------- paths


@pytest.fixture
def tree(tmp_path: Path, fx) -> dict[str, Path]:
    root = tmp_path / "music"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    song = root / "song.flac"
    song.write_bytes(fx["flac_8k_mono"].path.read_bytes())
    secret = outside / "secret.flac"
    secret.write_bytes(song.read_bytes())
    (root / "escape.flac").symlink_to(secret)
    (root / "alias.flac").symlink_to(song)
    (root / "dir.flac").mkdir()
    os.mkfifo(root / "pipe.flac")
    (tmp_path / "link_root").symlink_to(root)
    return {"root": root, "outside": outside, "song": song, "secret": secret, "tmp": tmp_path}


def test_file_under_root_resolves(tree) -> None:
    assert resolve_allowed_path(str(tree["song"]), [tree["root"]]) == tree["song"].resolve()


def test_symlink_inside_root_to_inside_is_allowed(tree) -> None:
    assert resolve_allowed_path(str(tree["root"] / "alias.flac"), [tree["root"]]) == tree["song"].resolve()


def test_root_given_through_a_symlink_still_matches(tree) -> None:
    assert resolve_allowed_path(str(tree["song"]), [tree["tmp"] / "link_root"]) == tree["song"].resolve()


@pytest.mark.parametrize(
    ("rel", "code"),
    [
        ("music/escape.flac", Code.FORBIDDEN),  # symlink pointing out
        ("outside/secret.flac", Code.FORBIDDEN),
        ("music/../outside/secret.flac", Code.FORBIDDEN),
        ("outside/missing.flac", Code.FORBIDDEN),  # no probing outside the roots
        ("music/missing.flac", Code.NOT_FOUND),
        ("music/dir.flac", Code.BAD_REQUEST),
        ("music/pipe.flac", Code.BAD_REQUEST),  # would block a reader forever
    ],
)
def test_path_checks(tree, rel: str, code: Code) -> None:
    path = str(tree["tmp"]) + "/" + rel
    with pytest.raises(EmbeddError) as e:
        resolve_allowed_path(path, [tree["root"]])
    assert e.value.code is code and path in e.value.message
    with pytest.raises(EmbeddError) as e2:
        decode_file(path, TARGETS, roots=[tree["root"]])
    assert e2.value.code is code


@pytest.mark.parametrize("bad", ["", "relative/song.flac", "/music/a\x00b.flac"])
def test_malformed_paths_are_bad_requests(tree, bad: str) -> None:
    with pytest.raises(EmbeddError) as e:
        resolve_allowed_path(bad, [tree["root"]])
    assert e.value.code is Code.BAD_REQUEST


def test_no_roots_forbids_everything(tree) -> None:
    with pytest.raises(EmbeddError) as e:
        resolve_allowed_path(str(tree["song"]), [])
    assert e.value.code is Code.FORBIDDEN


# --------------------------------------------------------------------------- worker processes


def _die_now(*_args: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _decode_when_released(started: str, release: str, *args: object):
    """A decode that says it started (a file) and then waits for the test's word (another file)."""
    import time

    Path(started).touch()
    deadline = time.monotonic() + 60
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return job_path(*args)


async def _exists(path: Path, within_s: float = 60.0) -> None:
    """Wait (polling the loop) until ``path`` exists."""
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.01)


def _shm_files(decoder: AudioDecoder) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"{SHM_PREFIX}{decoder._tag}-*"))


@pytest.fixture(scope="module")
def big_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 s stereo: ~5 MB of results at 44.1 kHz, over the shm threshold."""
    path = tmp_path_factory.mktemp("big") / "big.wav"
    path.write_bytes(encode(tone(22_050, 2, 20.0), 22_050, container_format="wav", codec="pcm_s16le"))
    return path


def test_decoder_pool(fx, tree, big_wav: Path) -> None:
    """One pool for all the worker checks: starting processes is the slow part."""

    async def main() -> None:
        decoder = AudioDecoder(roots=[tree["root"], big_wav.parent], workers=2, max_audio_s=10.0)
        try:
            await decoder.warm_up()
            # small result: pickled; equals the in-process decode
            got = await decoder.decode_path(str(tree["song"]), TARGETS)
            want = decode_file(tree["song"], TARGETS)
            for t in TARGETS:
                np.testing.assert_array_equal(got.waveform(*t), want.waveform(*t))

            # contract errors cross the process boundary intact
            for path, code in [
                (str(tree["root"] / "escape.flac"), Code.FORBIDDEN),
                (str(tree["root"] / "missing.flac"), Code.NOT_FOUND),
                (str(big_wav), Code.TOO_LARGE),
            ]:
                with pytest.raises(EmbeddError) as e:
                    await decoder.decode_path(path, TARGETS)
                assert e.value.code is code and path in e.value.message

            # uploads, concurrently
            data = fx["mp3_44k_stereo"].path.read_bytes()
            results = await asyncio.gather(*(decoder.decode_bytes(data, f"up{i}.mp3", TARGETS) for i in range(4)))
            assert all(r.duration_s == pytest.approx(1.5, abs=0.1) for r in results)
            with pytest.raises(EmbeddError) as e:
                await decoder.decode_bytes(b"\x00" * 1000, "zeros.mp3", TARGETS)
            assert e.value.code is Code.DECODE_ERROR and "zeros.mp3" in e.value.message

            # a killed worker: that request gets a contract error, the next one works
            with pytest.raises(EmbeddError) as e:
                await decoder._run("crash.flac", _die_now)
            assert e.value.code is Code.DECODE_ERROR and "crash.flac" in e.value.message
            again = await decoder.decode_path(str(tree["song"]), TARGETS)
            assert again.duration_s == pytest.approx(1.5)

            # an innocent request in flight when another one kills its worker is retried, not failed
            started, release = tree["root"] / "innocent-started", tree["root"] / "innocent-release"
            innocent = asyncio.ensure_future(
                decoder._run("slow.flac", _decode_when_released, str(started), str(release), str(tree["song"]),
                             decoder.roots, check_targets(TARGETS), decoder.max_audio_s, decoder._tag)
            )  # fmt: skip
            await _exists(started)  # on a worker, and held there until released
            with pytest.raises(EmbeddError):
                await decoder._run("crash.flac", _die_now)
            release.touch()
            assert (await innocent).duration_s == pytest.approx(1.5)
        finally:
            decoder.close()
        with pytest.raises(EmbeddError) as e:
            await decoder.decode_path(str(tree["song"]), TARGETS)
        assert e.value.code is Code.CANCELLED

        # big results come back through /dev/shm and leave nothing behind
        decoder = AudioDecoder(roots=[big_wav.parent], workers=1, max_audio_s=60.0)
        try:
            big = await decoder.decode_path(str(big_wav), TARGETS)
            want = decode_file(big_wav, TARGETS)
            for t in TARGETS:
                np.testing.assert_array_equal(big.waveform(*t), want.waveform(*t))
            assert _shm_files(decoder) == []
            # a request cancelled while its worker runs: the orphaned result is freed
            task = asyncio.ensure_future(decoder.decode_path(str(big_wav), TARGETS))
            await asyncio.sleep(0)  # submitted and awaiting, not yet decoded
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await decoder.decode_path(str(big_wav), set())  # one worker: runs after the cancelled job
            deadline = time.monotonic() + 30
            while _shm_files(decoder):  # the orphan is freed when its result arrives, a loop turn or so later
                assert time.monotonic() < deadline, _shm_files(decoder)
                await asyncio.sleep(0.01)
        finally:
            decoder.close()

    asyncio.run(main())


def test_fork_start_method_is_refused(tree) -> None:
    with pytest.raises(ValueError, match="fork"):
        AudioDecoder(roots=[tree["root"]], start_method="fork")


# ---- the decoded-audio budget


async def test_held_audio_gate_admits_within_the_budget_and_one_oversized_track_alone():
    import asyncio

    gate = HeldAudioGate(100)
    loop = asyncio.get_running_loop()
    await gate.acquire(60)
    first = gate.releaser(60, loop)
    second = asyncio.ensure_future(gate.acquire(60))  # 120 > 100: waits
    await asyncio.sleep(0)
    assert not second.done() and gate.held == 60
    first()
    first()  # idempotent
    await asyncio.wait_for(second, 5)
    assert gate.held == 60
    big = asyncio.ensure_future(gate.acquire(500))  # larger than the whole budget: waits until alone
    await asyncio.sleep(0)
    assert not big.done()
    gate.releaser(60, loop)()
    await asyncio.wait_for(big, 5)
    assert gate.held == 500


async def test_decoded_audio_counts_until_released(tmp_path):
    from embedd.audio import AudioDecoder

    path = make_long_wav(tmp_path / "long.wav", duration_s=3.0)
    with AudioDecoder(roots=[tmp_path], workers=1, held_bytes=1 << 30) as decoder:
        audio = await decoder.decode_path(str(path), {(24_000, 1)})
        assert decoder.held_bytes == audio.nbytes == 3 * 24_000 * 4
        audio.release()
        await _until(lambda: decoder.held_bytes == 0)
        again = await decoder.decode_path(str(path), {(24_000, 1)})
        assert decoder.held_bytes == again.nbytes
        del again  # dropped without release(): the finalizer gives it back
        await _until(lambda: decoder.held_bytes == 0)


async def _until(predicate, timeout: float = 5.0) -> None:
    import asyncio

    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)

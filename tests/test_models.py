"""The three model backends, on tiny random-weight models of the real architectures.

Every model is loaded the way the daemon loads it -- ``backend_class(name)(ModelSpec(...))``
then ``load()`` -- from directories in the official on-disk formats built by
``tests/tiny_models.py``. Nothing here replaces a model with a stand-in: the OOM
tests make the real forward pass raise for large batches to exercise the retry
policy, and compare against unpatched results.
"""

from __future__ import annotations

import socket
import types
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.errors import Code, EmbeddError
from embedd.models import CATALOG, backend_class
from embedd.models.base import EmbeddingModel, ModelSpec
from embedd.models.latent import CHUNK_S, chunk_frames
from embedd.models.enrich import IQR_TO_SIGMA, enrich, enrich_stats
from embedd.models.runtime import run_batched, window_spans
from tests.tiny_models import build_tiny_models

TOL = dict(rtol=1e-4, atol=1e-5)


# -- fixtures ------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fail (and record) any attempt to open an IP connection while the test runs."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network disabled in this test (tried {address!r})")
        return real_connect(self, address)

    def getaddrinfo(*args: object, **kwargs: object) -> list[object]:
        attempts.append(args)
        raise socket.gaierror(f"network disabled in this test (resolving {args[0]!r})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def make(name: str, source: str, *, batch_size: int = 4, cache_dir: str | None = None) -> EmbeddingModel:
    spec = ModelSpec(source=source, device="cpu", precision="fp32", batch_size=batch_size, cache_dir=cache_dir)
    return backend_class(name)(spec)


def loaded(name: str, source: str, **kw: object) -> Iterator[EmbeddingModel]:
    model = make(name, source, **kw)  # type: ignore[arg-type]
    model.load()
    yield model
    model.unload()


@pytest.fixture(scope="module")
def muq(tiny: dict[str, str]) -> Iterator[EmbeddingModel]:
    yield from loaded("muq", tiny["muq"])


@pytest.fixture(scope="module")
def mert(tiny: dict[str, str]) -> Iterator[EmbeddingModel]:
    yield from loaded("mert", tiny["mert"])


@pytest.fixture(scope="module")
def latent(tiny: dict[str, str]) -> Iterator[EmbeddingModel]:
    yield from loaded("latent", tiny["latent"])


def signal(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Noise plus a wandering tone: windows differ, so the statistics are non-trivial."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * np.sin(2 * np.pi * t / 17)) * t)
    chans = [tone + 0.05 * rng.standard_normal(n) for _ in range(channels)]
    return np.stack(chans).astype(np.float32)


# -- enrichment ------------------------------------------------------------------
def numpy_enrich(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(axis=1)
    if x.shape[1] == 1:
        sigma = np.zeros_like(mean)
        drift = np.zeros_like(mean)
    else:
        q75, q25 = np.percentile(x, [75, 25], axis=1)  # numpy's default 'linear' method
        sigma = (q75 - q25) / 1.3489795003921634  # the original's constant (issue 23)
        drift = np.diff(x, axis=1).mean(axis=1)
    v = np.concatenate([mean, sigma, drift])
    return v / np.linalg.norm(v)


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 12),
    t=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_enrich_matches_numpy(d: int, t: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((d, t)).astype(np.float32)
    got = enrich(torch.from_numpy(x))
    assert got.dtype == np.float32 and got.shape == (3 * d,)
    np.testing.assert_allclose(got, numpy_enrich(x), rtol=1e-5, atol=1e-6)
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_enrich_quantiles_interpolate_like_numpy() -> None:
    # 5 values: q25 sits exactly on the 2nd order statistic, q75 on the 4th; 6 values: both between
    for row in ([3.0, 1.0, 4.0, 1.5, 9.0], [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]):
        x = torch.tensor([row])
        stats = enrich_stats(x)
        q75, q25 = np.percentile(row, [75, 25])
        assert float(stats[1]) == pytest.approx((q75 - q25) / IQR_TO_SIGMA, rel=1e-6)


def test_enrich_single_window_is_mean_then_zeros() -> None:
    x = torch.tensor([[3.0], [4.0]])
    np.testing.assert_allclose(enrich(x), [0.6, 0.8, 0, 0, 0, 0], atol=1e-7)


def test_enrich_all_zero_stays_zero_and_rejects_bad_shapes() -> None:
    assert not enrich(torch.zeros(4, 3)).any()
    with pytest.raises(ValueError):
        enrich(torch.zeros(4))
    with pytest.raises(ValueError):
        enrich(torch.zeros(4, 0))


def test_enrich_drift_is_mean_first_difference() -> None:
    x = torch.tensor([[0.0, 1.0, 3.0, 6.0]])  # differences 1, 2, 3
    assert float(enrich_stats(x)[2]) == pytest.approx(2.0)


# -- windows ----------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), window=st.integers(1, 400), hop_frac=st.integers(1, 8), end=st.booleans())
def test_window_spans_cover_the_signal(n: int, window: int, hop_frac: int, end: bool) -> None:
    hop = max(1, window // hop_frac)
    spans = window_spans(n, window, hop, align_last_to_end=end)
    assert spans[0][0] == 0 and spans[-1][1] == n
    if n <= window:
        assert spans == [(0, n)]
        return
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and s1 <= e0  # increasing, no gaps
    for s, e in spans:
        assert 0 <= s < e <= n and e - s <= window
        if end:
            assert e - s == window
        else:
            assert s % hop == 0  # every window on the hop grid
            assert e - s > window - hop


def test_window_spans_examples() -> None:
    assert window_spans(0, 10, 5, align_last_to_end=True) == []
    assert window_spans(7, 10, 5, align_last_to_end=True) == [(0, 7)]
    assert window_spans(22, 10, 5, align_last_to_end=True) == [(0, 10), (5, 15), (10, 20), (12, 22)]
    assert window_spans(22, 10, 5, align_last_to_end=False) == [(0, 10), (5, 15), (10, 20), (15, 22)]


# -- shared behaviour of all three backends ------------------------------------------
@pytest.mark.parametrize("name", ["muq", "mert", "latent"])
def test_local_directory_loads_without_network(name: str, tiny: dict[str, str], no_network: list[object]) -> None:
    model = make(name, tiny[name])
    expected = model.expected_dim()
    model.load()
    try:
        assert model.loaded and model.dim == expected
        assert no_network == []
    finally:
        model.unload()
    assert not model.loaded


@pytest.mark.parametrize("name", ["muq", "mert", "latent"])
def test_hub_cache_loads_default_ids_without_network(
    name: str, tiny: dict[str, str], no_network: list[object]
) -> None:
    source = CATALOG[name].default_source
    model = make(name, source, cache_dir=tiny["hub_cache"])
    expected = model.expected_dim()
    model.load()
    try:
        assert model.dim == expected
        sr, ch = model.info.sample_rate, model.info.channels
        [emb] = model.embed_audio_many([signal(2.0, sr, ch)])
        assert emb.vector.shape == (model.dim,)
        assert no_network == []
    finally:
        model.unload()


@pytest.mark.parametrize("name", ["muq", "mert", "latent"])
def test_missing_source_is_unavailable(name: str, tmp_path: Path, no_network: list[object]) -> None:
    model = make(name, str(tmp_path / "nowhere"))
    assert model.expected_dim() is None
    with pytest.raises(EmbeddError) as err:
        model.load()
    assert err.value.code is Code.UNAVAILABLE and name in err.value.message
    assert not model.loaded


@pytest.mark.parametrize("name", ["muq", "mert", "latent"])
def test_uncached_hub_id_offline_is_unavailable(
    name: str, tmp_path: Path, no_network: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HF_HUB_OFFLINE=1 (read by huggingface_hub at import) an uncached id fails at once.

    Without it, huggingface_hub retries the unreachable hub with backoff for ~45 s first.
    """
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = make(name, "someone/not-cached", cache_dir=str(tmp_path))
    with pytest.raises(EmbeddError) as err:
        model.load()
    assert err.value.code is Code.UNAVAILABLE and "someone/not-cached" in err.value.message
    assert no_network == []


@pytest.mark.parametrize("name", ["mert", "latent"])
def test_text_is_unsupported(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    with pytest.raises(EmbeddError) as err:
        model.embed_text("calm piano")
    assert err.value.code is Code.UNSUPPORTED


@pytest.mark.parametrize("name", ["muq", "mert", "latent"])
def test_embeddings_are_normalised_deterministic_and_batch_independent(
    name: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(name)
    sr, ch = model.info.sample_rate, model.info.channels
    long = {"muq": 140.0, "mert": 41.0, "latent": 6.0}[name]
    tracks = [signal(0.5, sr, ch, 1), signal(7.0, sr, ch, 2), signal(long, sr, ch, 3)]
    together = model.embed_audio_many(tracks)
    alone = [model.embed_audio_many([t])[0] for t in tracks]
    for a, b in zip(together, alone):
        assert a.vector.dtype == np.float32 and a.vector.shape == (model.dim,)
        assert float(np.linalg.norm(a.vector)) == pytest.approx(1.0, abs=1e-5)
        assert a.windows == b.windows
        np.testing.assert_allclose(a.vector, b.vector, **TOL)
    again = model.embed_audio_many(tracks)
    for a, b in zip(together, again):
        np.testing.assert_array_equal(a.vector, b.vector)
    # different audio, different vectors
    assert not np.allclose(together[1].vector, together[2].vector, atol=1e-3)


@pytest.mark.parametrize("name", ["muq", "mert", "latent"])
def test_empty_waveform_is_a_decode_error(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    with pytest.raises(EmbeddError) as err:
        model.embed_audio_many([np.zeros((model.info.channels, 0), np.float32)])
    assert err.value.code is Code.DECODE_ERROR


# -- OOM policy ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["muq", "mert", "latent"])
def test_oom_splits_the_batch_and_gives_the_same_result(
    name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = request.getfixturevalue(name)
    sr, ch = model.info.sample_rate, model.info.channels
    seconds = {"muq": 60.0, "mert": 40.0, "latent": 3.0}[name]
    tracks = [signal(seconds, sr, ch, 4), signal(seconds, sr, ch, 5)]
    want = model.embed_audio_many(tracks)

    sizes: list[int] = []
    real_forward = model._forward  # type: ignore[attr-defined]

    def forward(items):  # the real forward pass, refusing batches over 2 like a full GPU would
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real_forward(items)

    monkeypatch.setattr(model, "_forward", forward)
    monkeypatch.setattr(model, "spec", ModelSpec(**{**_spec_dict(model.spec), "batch_size": 8}))
    got = model.embed_audio_many(tracks)
    last_refused = max(i for i, s in enumerate(sizes) if s > 2)
    assert sizes[0] > 2 and len(sizes) > last_refused + 1
    assert all(s <= 2 for s in sizes[last_refused + 1 :])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.vector, b.vector, **TOL)


def _spec_dict(spec: ModelSpec) -> dict[str, object]:
    return {f: getattr(spec, f) for f in ("source", "device", "precision", "batch_size", "cache_dir", "memory_budget")}


def test_run_batched_halves_down_to_one_then_gives_up() -> None:
    sizes: list[int] = []

    def forward(items):
        sizes.append(len(items))
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return torch.tensor([[float(items[0])]])

    out = run_batched(list(range(5)), forward, 8, model_name="x")
    assert [float(o) for o in out] == [0, 1, 2, 3, 4]
    assert sizes == [5, 4, 2, 1, 1, 1, 1, 1]  # 8 -> 4 -> 2 -> 1, then 1 for the rest of the call

    def always_oom(items):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    with pytest.raises(EmbeddError) as err:
        run_batched([1, 2], always_oom, 2, model_name="x")
    assert err.value.code is Code.UNAVAILABLE and "'x'" in err.value.message


# -- muq ----------------------------------------------------------------------------------
def test_muq_clip_reuse_equals_naive_per_window(muq: EmbeddingModel) -> None:
    """Each distinct clip once, windows from clip latents == MuQMuLan on every window.

    The windows are the original system's (issue 23, tests/test_parity.py): a short track padded
    with digital silence to one 120 s window, the last window of a long one aligned to its end.
    """
    sr = muq.info.sample_rate
    # 3 s and 47.5 s: one window each, padded with silence to 120 s; 143.7 s: two windows on
    # the grid (0, 15 s) and one aligned to the end (23.7 s)
    tracks = [signal(3.0, sr, seed=6), signal(47.5, sr, seed=7), signal(143.7, sr, seed=8)]
    ours = muq.window_latents(tracks)  # type: ignore[attr-defined]
    mulan = muq._model  # type: ignore[attr-defined]
    for track, lat in zip(tracks, ours):
        track = np.pad(track, ((0, 0), (0, max(0, 120 * sr - track.shape[1]))))
        spans = window_spans(track.shape[1], 120 * sr, 15 * sr, align_last_to_end=True)
        assert lat.shape == (muq.dim // 3, len(spans))
        with torch.inference_mode():
            naive = torch.stack(
                [mulan(wavs=torch.from_numpy(track[0, s:e]).unsqueeze(0))[0] for s, e in spans], dim=1
            )
        torch.testing.assert_close(lat, naive, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(enrich(lat), enrich(naive), **TOL)
    assert [lat.shape[1] for lat in ours] == [1, 1, 3]


def test_muq_embeds_the_padding_once_per_call(muq: EmbeddingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clips wholly in the padding are the same zeros in every short track: one forward pass for all."""
    sr = muq.info.sample_rate
    clips: list[int] = []
    real_forward = muq._forward  # type: ignore[attr-defined]
    monkeypatch.setattr(muq, "_forward", lambda items: (clips.append(len(items)), real_forward(items))[1])
    # 3 s and 25 s: 1 and 3 clips of their own, the other 11 and 9 clips silence
    embs = muq.embed_audio_many([signal(3.0, sr, seed=1), signal(25.0, sr, seed=2)])
    assert [e.windows for e in embs] == [1, 1]
    assert sum(clips) == 1 + 3 + 1


def test_muq_computes_each_distinct_clip_once(muq: EmbeddingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    sr = muq.info.sample_rate
    clips: list[int] = []
    real_forward = muq._forward  # type: ignore[attr-defined]
    monkeypatch.setattr(muq, "_forward", lambda items: (clips.append(len(items)), real_forward(items))[1])
    # 165 s: windows start at 0, 15, 30, 45 (45+120 = 165): all full, clips on a 5 s grid
    [emb] = muq.embed_audio_many([signal(165.0, sr, seed=9)])
    assert emb.windows == 4
    distinct = len({s + 10 * k for s in (0, 15, 30, 45) for k in range(12)})  # 0, 5, ..., 155
    assert sum(clips) == distinct == 30  # not 4 x 12 = 48


def test_muq_text(muq: EmbeddingModel) -> None:
    a = muq.embed_text("calm piano music for a rainy evening")
    b = muq.embed_text("heavy metal, fast tempo, screaming vocals")
    d = muq.dim // 3
    assert a.raw.shape == (d,) and a.vector.shape == (muq.dim,)
    assert a.raw.dtype == np.float32 and a.vector.dtype == np.float32
    assert float(np.linalg.norm(a.vector)) == pytest.approx(1.0, abs=1e-5)
    # the stored layout of a one-window sequence: [raw, 0, 0], normalised
    np.testing.assert_allclose(a.vector[:d], a.raw / np.linalg.norm(a.raw), **TOL)
    assert not a.vector[d:].any()
    assert not np.allclose(a.raw, b.raw)
    np.testing.assert_array_equal(muq.embed_text("calm piano music for a rainy evening").raw, a.raw)
    # the raw latent is MuQ-MuLan's own text latent
    with torch.inference_mode():
        own = muq._model(texts=["calm piano music for a rainy evening"])[0].numpy()  # type: ignore[attr-defined]
    np.testing.assert_allclose(a.raw, own, **TOL)


def test_muq_text_is_searchable_against_track_vectors(muq: EmbeddingModel) -> None:
    """Cosine of the text vector with a stored track vector is the MuLan score scaled per track."""
    sr = muq.info.sample_rate
    track = signal(30.0, sr, seed=10)
    [emb] = muq.embed_audio_many([track])
    text = muq.embed_text("upbeat electronic dance music with heavy bass")
    [lat] = muq.window_latents([track])  # type: ignore[attr-defined]
    mean = lat.mean(dim=1).numpy()
    raw = text.raw / np.linalg.norm(text.raw)
    stats = enrich_stats(lat).numpy()
    assert float(text.vector @ emb.vector) == pytest.approx(float(raw @ mean) / np.linalg.norm(stats), rel=1e-4)


def test_muq_text_errors(muq: EmbeddingModel) -> None:
    with pytest.raises(EmbeddError) as err:
        muq.embed_text("   ")
    assert err.value.code is Code.BAD_REQUEST
    with pytest.raises(EmbeddError) as err:
        muq.embed_text("piano " * 2000)
    assert err.value.code is Code.TOO_LARGE and "text" in err.value.message


def test_muq_subdirectories_may_be_named_by_relative_path(tiny: dict[str, str], tmp_path: Path) -> None:
    """A config naming its sub-models by paths relative to the MuQ-MuLan directory also loads."""
    import json
    import shutil

    root = tmp_path / "mulan"
    shutil.copytree(tiny["muq"], root)
    (root / "towers").mkdir()
    shutil.move(str(root / "MuQ-large-msd-iter"), str(root / "towers" / "muq-audio"))
    shutil.move(str(root / "xlm-roberta-base"), str(root / "towers" / "xlm-roberta-text"))
    config = json.loads((root / "config.json").read_text())
    config["audio_model"]["name"] = "towers/muq-audio"
    config["text_model"]["name"] = "towers/xlm-roberta-text"
    (root / "config.json").write_text(json.dumps(config))
    for model in loaded("muq", str(root)):
        assert model.dim == make("muq", tiny["muq"]).expected_dim()


# -- mert -------------------------------------------------------------------------------------
def test_mert_window_is_time_mean_of_every_hidden_state(mert: EmbeddingModel) -> None:
    sr = mert.info.sample_rate
    track = signal(41.0, sr, seed=11)
    [lat] = mert.window_latents([track])  # type: ignore[attr-defined]
    [short] = mert.window_latents([signal(4.0, sr, seed=12)])  # type: ignore[attr-defined]
    assert short.shape[1] == 1  # padded with silence to one 30 s window (the original's rule)
    spans = window_spans(track.shape[1], 30 * sr, 5 * sr, align_last_to_end=True)
    assert spans[-1] == (11 * sr, 41 * sr) and lat.shape[1] == len(spans) == 4
    model, extractor = mert._model, mert._extractor  # type: ignore[attr-defined]
    layers, hidden = model.config.num_hidden_layers + 1, model.config.hidden_size
    assert mert.dim == 3 * layers * hidden
    for w, (s, e) in enumerate(spans):
        inputs = extractor(track[0, s:e], sampling_rate=sr, return_tensors="pt")
        with torch.inference_mode():
            states = model(inputs["input_values"], output_hidden_states=True).hidden_states
        assert len(states) == layers
        want = torch.cat([h[0].mean(dim=0) for h in states])
        torch.testing.assert_close(lat[:, w], want, rtol=1e-4, atol=1e-5)


# -- latent ---------------------------------------------------------------------------------
def test_latent_matches_music2latent_encode_including_chunking(
    latent: EmbeddingModel, tiny: dict[str, str]
) -> None:
    from music2latent.inference import encode_audio_inference

    from embedd.models.latent import build_unet

    sr = latent.info.sample_rate
    # the package's own encode, on the whole UNet of the same checkpoint (its EncoderDecoder
    # would download the stock weights first; encode only needs an object holding ``gen``)
    checkpoint = torch.load(tiny["latent"], map_location="cpu", weights_only=False)
    unet = build_unet(checkpoint.get("embedd_hparams"))
    unet.load_state_dict(checkpoint["gen_state_dict"])
    trainer = types.SimpleNamespace(gen=unet.eval())
    tracks = [signal(0.3, sr, 2, 12), signal(2.5, sr, 2, 13), signal(5.2, sr, 2, 14)]
    latent.max_waveform_length = sr * 2  # type: ignore[attr-defined]  # force 2 s chunks
    try:
        ours = latent.track_latents(tracks)  # type: ignore[attr-defined]
        embs = latent.embed_audio_many(tracks)
    finally:
        latent.max_waveform_length = sr * CHUNK_S  # type: ignore[attr-defined]
    from music2latent.hparams import hop

    down = 8  # 2 ** freq_downsample_list.count(0)
    for track, lat, emb in zip(tracks, ours, embs):
        # the package's encode with the same (2 s) chunk length: its chunks are the original's
        want = encode_audio_inference(track, trainer, sr * 2, 1, device="cpu")
        # oneDNN's channels-last kernels sum in another order than the package's NCHW run:
        # rounding of ~1e-5 of the latents' norm (values up to ~15), so the tolerance scales
        assert float((lat - want).norm() / want.norm()) < 1e-4
        torch.testing.assert_close(lat, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert emb.windows == lat.shape[-1]
    c = latent.dim // 9
    assert ours[2].shape[:2] == (2, c)
    # per frame: the two channels interleaved per dimension, then their magnitude (the original's)
    lat = ours[2]
    interleaved = torch.stack([lat[0], lat[1]], dim=1).reshape(2 * c, -1)
    frames = torch.cat([interleaved, torch.sqrt(lat[0] ** 2 + lat[1] ** 2 + 1e-12)])
    np.testing.assert_allclose(embs[2].vector, enrich(frames), **TOL)
    # shorter than one latent frame: tiled, still embedded
    [tiny_track] = latent.track_latents([signal(0.05, sr, 2, 16)])  # type: ignore[attr-defined]
    assert tiny_track.shape == (2, c, 1)


@pytest.mark.parametrize("frames", [8, 5168, 5176, 10336, 12000])
def test_latent_chunks_are_the_packages(frames: int) -> None:
    """Cut every 60 s of representation frames, as ``encode_audio_inference`` cuts (the original's)."""
    max_frames, down = 5168, 8  # 60 s chunks of the real hop
    size = chunk_frames(frames, max_frames, down)
    assert size == (frames if frames <= max_frames else max_frames)


def test_latent_mono_is_duplicated(latent: EmbeddingModel) -> None:
    sr = latent.info.sample_rate
    stereo = signal(1.5, sr, 1, 15).repeat(2, axis=0)
    [a, b] = latent.embed_audio_many([stereo[:1], stereo])
    np.testing.assert_allclose(a.vector, b.vector, **TOL)


# -- quantize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["muq", "mert"])
def test_int8_quantize_setting_reaches_the_loaded_model(
    name: str, tiny: dict[str, str], tmp_path: Path
) -> None:
    """``quantize=int8`` in the settings: the daemon's registry loads the model with int8 Linears,
    which run under bf16 autocast too and give vectors close to, but not the same as, the default."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from embedd.executor.build import build_registry
    from embedd.settings import build_settings

    def registry_model(quantize: str, precision: str) -> EmbeddingModel:
        settings = build_settings({
            "socket": str(tmp_path / "s.sock"), "data_dir": str(tmp_path / "data"),
            f"{name}_model": tiny[name], "quantize": quantize, "precision": precision, "device": "cpu",
        })
        return build_registry(settings, "cpu").get(name)

    wave = signal(12.0, CATALOG[name].sample_rate, CATALOG[name].channels, 21)
    [default] = registry_model("none", "fp32").embed_audio_many([wave])
    for precision in ("fp32", "bf16"):
        model = registry_model("int8", precision)
        assert model.spec.quantize == "int8"
        assert any(isinstance(m, DynamicLinear) for m in model._model.modules())  # type: ignore[attr-defined]
        [got] = model.embed_audio_many([wave])
        cos = float(np.dot(default.vector, got.vector))
        assert 0.9 < cos < 1.0 - 1e-7
        model.unload()


def test_int8_quantize_is_refused_off_cpu() -> None:
    from embedd.models.quantize import quantize_model

    with pytest.raises(ValueError, match="CPU only"):
        quantize_model(torch.nn.Linear(2, 2), "int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown quantize"):
        quantize_model(torch.nn.Linear(2, 2), "int4", torch.device("cpu"))


def test_latent_chunk_setting_sets_the_encoders_pass_length():
    latent = backend_class("latent")
    assert latent(ModelSpec(source="x", device="cpu")).max_waveform_length == CHUNK_S * 44_100
    assert latent(ModelSpec(source="x", device="cpu", chunk_s=10.0)).max_waveform_length == 10 * 44_100


def test_latent_in_bf16_runs_on_bf16_weights_at_the_fp32_direction(tiny: dict[str, str]) -> None:
    """precision=bf16: Music2Latent converts its weights to bf16 and runs them without autocast (no fp32
    round trip around each norm); its vectors keep the contract's cosine to fp32 (>= 0.999)."""
    latent = backend_class("latent")
    wave = signal(20.0, CATALOG["latent"].sample_rate, CATALOG["latent"].channels, 5)
    vectors = {}
    for precision in ("fp32", "bf16"):
        model = latent(ModelSpec(source=tiny["latent"], device="cpu", precision=precision))
        model.load()
        dtypes = {p.dtype for p in model._encoder.parameters()}  # type: ignore[attr-defined]
        assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}, dtypes
        [vectors[precision]] = model.embed_audio_many([wave])
        model.unload()
    assert vectors["bf16"].vector.dtype == np.float32
    assert float(np.dot(vectors["fp32"].vector, vectors["bf16"].vector)) >= 0.999

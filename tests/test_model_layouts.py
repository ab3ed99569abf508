"""The layout changes of ``embedd.models.layout`` compute what the stock modules compute.

They exist for speed only (BENCHMARKS.md), so the one thing to hold them to is
equality with the stock modules: same outputs within float rounding, same state
dict, and the stock module kept wherever the fast one does not apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from embedd.models import backend_class
from embedd.models.base import ModelSpec
from embedd.models.layout import ChannelsLastFeatureEncoder, channels_last, channels_last_feature_encoder
from tests.tiny_models import build_tiny_models


def _hubert(norm: str = "layer", conv_dim: int = 32):
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(conv_dim,) * 7,
        feat_extract_norm=norm,
        do_stable_layer_norm=norm == "layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(3)
    return HubertModel(config).eval()


@pytest.fixture(scope="module")
def hubert_pair():
    """A stock HuBERT and a copy of it with the channels-last encoder installed."""
    stock = _hubert()
    fast = _hubert()
    fast.load_state_dict(stock.state_dict())
    assert channels_last_feature_encoder(fast)
    return stock, fast


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), samples=st.integers(400, 24_000), seed=st.integers(0, 2**16))
def test_feature_encoder_equals_the_stock_one(hubert_pair, batch: int, samples: int, seed: int) -> None:
    stock, fast = hubert_pair
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, samples)).astype(np.float32))
    with torch.inference_mode():
        want = stock.feature_extractor(x)
        got = fast.feature_extractor(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # and the whole model around it
        torch.testing.assert_close(fast(x).last_hidden_state, stock(x).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_feature_encoder_keeps_the_state_dict(hubert_pair) -> None:
    stock, fast = hubert_pair
    want = {k: v.shape for k, v in stock.state_dict().items()}
    assert {k: v.shape for k, v in fast.state_dict().items()} == want
    assert isinstance(fast.feature_extractor, ChannelsLastFeatureEncoder)
    assert not channels_last_feature_encoder(fast), "installing twice is a no-op"


def test_group_norm_feature_encoder_is_left_alone() -> None:
    model = _hubert("group")
    stock = model.feature_extractor
    assert not ChannelsLastFeatureEncoder.applies_to(stock)
    assert not channels_last_feature_encoder(model)
    assert model.feature_extractor is stock


def test_channels_last_keeps_a_conv_stack_output() -> None:
    torch.manual_seed(5)
    stack = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, (3, 1), stride=2))
    x = torch.randn(2, 2, 17, 33)
    with torch.inference_mode():
        want = stack(x)
        channels_last(stack)
        assert stack[0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(stack(x), want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("layout-models"))


def _loaded(name: str, source: str):
    model = backend_class(name)(ModelSpec(source=source, device="cpu", precision="fp32", batch_size=4))
    model.load()
    return model


def test_mert_backend_runs_the_channels_last_encoder_and_matches_stock_hubert(tiny: dict[str, str]) -> None:
    from transformers import AutoModel

    mert = _loaded("mert", tiny["mert"])
    try:
        assert isinstance(mert._model.feature_extractor, ChannelsLastFeatureEncoder)  # type: ignore[attr-defined]
        stock = AutoModel.from_pretrained(tiny["mert"], local_files_only=True).eval()
        sr = mert.info.sample_rate
        track = np.random.default_rng(2).standard_normal((1, 7 * sr)).astype(np.float32)
        [lat] = mert.window_latents([track])  # type: ignore[attr-defined]
        # a track shorter than one window is padded with silence to a whole window (parity, issue 23)
        padded = np.pad(track[0], (0, 30 * sr - track.shape[-1]))
        inputs = mert._extractor(padded, sampling_rate=sr, return_tensors="pt")  # type: ignore[attr-defined]
        with torch.inference_mode():
            states = stock(inputs["input_values"], output_hidden_states=True).hidden_states
        torch.testing.assert_close(lat[:, 0], torch.cat([h[0].mean(dim=0) for h in states]), rtol=1e-4, atol=1e-5)
    finally:
        mert.unload()


@pytest.mark.parametrize("name", ["muq", "latent"])
def test_conv_backends_store_their_convolutions_channels_last(name: str, tiny: dict[str, str]) -> None:
    model = _loaded(name, tiny[name])
    try:
        module = model._model if name == "muq" else model._encoder  # type: ignore[attr-defined]
        weights = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d)]
        assert weights, f"{name} has no 2-d convolution to lay out"
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    finally:
        model.unload()

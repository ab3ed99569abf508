"""Memory layouts that let oneDNN run the convolutions without reordering every tensor.

Why this exists: profiling the stock models in bf16 on a CPU showed layout copies
(``aten::copy_``) taking 29-40 % of a forward pass. oneDNN's fast convolution
kernels work on channels-last (NHWC) data; a model stored NCHW pays a reorder of
its input, weights and output around every convolution. HuBERT's feature encoder
(MERT's front end) pays twice more per layer: it keeps ``[B, C, T]`` and
transposes to ``[B, T, C]`` and back around each LayerNorm.

Neither fix changes a weight or a vector beyond rounding: :func:`channels_last`
only changes how 4-d weights are strided, and :class:`ChannelsLastFeatureEncoder`
computes the same convolutions, LayerNorms and activations on ``[B, T, C]``
(``tests/test_model_layouts.py`` holds them equal to the stock modules). The state
dict keeps its keys and shapes, so checkpoints load as before. Measured gains are
in BENCHMARKS.md (``bench/flops.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelsLastFeatureEncoder", "channels_last", "channels_last_feature_encoder"]


def channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-d weights stored channels-last (in place).

    A convolution whose weight is channels-last returns a channels-last output,
    and the ops after it keep that layout, so the whole convolutional stack runs
    NHWC from the first layer on without a reorder per layer.
    """
    return model.to(memory_format=torch.channels_last)


def _plain_conv1d(conv: object) -> bool:
    return (
        isinstance(conv, nn.Conv1d)
        and conv.padding == (0,)
        and conv.dilation == (1,)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _is_layer_norm_conv(layer: nn.Module) -> bool:
    """A HuBERT-style ``conv -> LayerNorm over channels -> activation`` layer."""
    conv = getattr(layer, "conv", None)
    norm = getattr(layer, "layer_norm", None)
    return (
        _plain_conv1d(conv)
        and isinstance(norm, nn.LayerNorm)
        and tuple(norm.normalized_shape) == (conv.out_channels,)  # type: ignore[union-attr]
        and callable(getattr(layer, "activation", None))
    )


class ChannelsLastFeatureEncoder(nn.Module):
    """HuBERT's convolutional feature encoder, computed on ``[B, T, C]``.

    The stock encoder keeps ``[B, C, T]`` and transposes around each LayerNorm.
    Here the activations stay ``[B, T, C]`` (LayerNorm's own layout), which is a
    ``[B, C, 1, T]`` channels-last tensor for ``conv2d``, so no layer copies its
    input. Layer 0, with a single input channel, is a strided window
    (``unfold``) times the kernel: one matrix product instead of a convolution
    that oneDNN runs poorly with one channel. ``forward`` returns ``[B, C, T]``
    (a transposed view), as the stock module does, so the model around it is
    unchanged.
    """

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self.conv_layers = stock.conv_layers  # same submodules, same state-dict keys
        self.gradient_checkpointing = False
        self._requires_grad = False

    @staticmethod
    def applies_to(stock: nn.Module) -> bool:
        """Whether ``stock`` is a layer-norm feature encoder this class computes exactly."""
        layers = getattr(stock, "conv_layers", None)
        return (
            isinstance(layers, nn.ModuleList)
            and len(layers) > 0
            and all(_is_layer_norm_conv(layer) for layer in layers)
            and layers[0].conv.in_channels == 1
        )

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        first = self.conv_layers[0]
        conv = first.conv
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        windows = input_values.unfold(-1, kernel, stride)  # [B, T, kernel]
        hidden = F.linear(windows, conv.weight.reshape(conv.out_channels, kernel), conv.bias)
        hidden = first.activation(first.layer_norm(hidden))
        for layer in self.conv_layers[1:]:
            conv = layer.conv
            as_image = hidden.transpose(1, 2).unsqueeze(2)  # [B, C, 1, T], channels-last strides
            weight = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
            out = F.conv2d(as_image, weight, conv.bias, stride=(1, conv.stride[0]))
            hidden = out.squeeze(2).transpose(1, 2).contiguous()  # [B, T, C]; a no-op when channels-last
            hidden = layer.activation(layer.layer_norm(hidden))
        return hidden.transpose(1, 2)


def channels_last_feature_encoder(model: nn.Module) -> bool:
    """Put a :class:`ChannelsLastFeatureEncoder` in ``model.feature_extractor``; whether it did.

    Only a layer-norm encoder (``feat_extract_norm="layer"``, MERT's) is replaced;
    a group-norm one, or remote code of another shape, keeps its stock module.
    """
    stock = getattr(model, "feature_extractor", None)
    if stock is None or isinstance(stock, ChannelsLastFeatureEncoder):
        return False
    if not ChannelsLastFeatureEncoder.applies_to(stock):
        return False
    model.feature_extractor = ChannelsLastFeatureEncoder(stock)
    return True

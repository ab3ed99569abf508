"""The ``quantize`` knob: int8 dynamic quantisation of a model's Linear layers on a CPU.

Why dynamic int8 and only Linear: the weights of every ``nn.Linear`` are stored
as int8 once at load, and each call quantises its input on the fly, so no
calibration data is needed and the rest of the model (convolutions, norms,
attention's matrix products) is untouched. It speeds up what is mostly Linear
work (MERT's transformer) and barely touches convolution-heavy models
(Music2Latent: its only Linears are inside ``nn.MultiheadAttention``, which
dynamic quantisation leaves alone). It changes the vectors (cosine figures in
BENCHMARKS.md), so it is off by default and flagged in the rows' ``model_id``.

Under bf16 autocast a quantised Linear may receive a bf16 input (autocast does
not cover quantised ops, which take fp32 only); a pre-forward hook casts it to
fp32, the dtype an autocast Linear would have widened to anyway.

``torch.ao.quantization.quantize_dynamic`` is deprecated in favour of torchao
but still present in torch 2.11; it needs no further dependency.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["QUANTIZE_MODES", "quantize_model"]

QUANTIZE_MODES = ("none", "int8")


def _float_input(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def quantize_model(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """``model`` with its Linear layers int8-quantised when ``mode`` is ``int8`` (in place)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return model
    if device.type != "cpu":
        raise ValueError(f"quantize={mode} runs on a CPU only (device is {device}); use quantize=none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice, once per load
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    for module in quantized.modules():
        if isinstance(module, DynamicLinear):
            module.register_forward_pre_hook(_float_input)
    return quantized

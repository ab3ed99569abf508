"""Which arithmetic the models run in: the ``precision`` setting resolved for a device.

``auto`` is the fastest precision that keeps every model's stored vectors at a
cosine of at least 0.999 to fp32 on the same weights and input (measured per
model by ``bench/precision.py``; figures in BENCHMARKS.md):

- CUDA: fp16 autocast (tensor cores on every card embedd targets);
- a CPU with native bf16 (AVX-512 BF16 or AMX, read from ``/proc/cpuinfo``):
  bf16 autocast -- its matmuls run about 4x fp32 there;
- any other CPU: fp32 (bf16 emulated in software is slower than fp32).

Precision is autocast, not converted weights: autocast keeps the reductions
and norms that overflow in 16 bits (softmax, layer/group norm, the spectrogram
front ends) in fp32, as the model authors' own mixed-precision inference does.
One exception, measured: Music2Latent's encoder in bf16 converts its weights
(``Music2LatentModel.forward_context``), because its pass is mostly
memory-bound norms and activations, where autocast's casts cost more than the
convolutions; bf16 keeps fp32's exponent range and PyTorch's bf16 norms
accumulate in fp32, so its vectors stay as close to fp32 as under autocast
(``bench/latent_bf16.py``). The spectrogram front end and the enrichment always
run in fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

__all__ = ["Precision", "cpu_has_native_bf16", "resolve_precision"]

Precision = Literal["fp32", "bf16", "fp16"]
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_NATIVE_BF16_FLAGS & set(line.partition(":")[2].split()))
    return False


def resolve_precision(setting: str, device: str) -> Precision:
    """The precision a model on ``device`` runs in for the ``precision`` setting."""
    if setting in ("fp32", "bf16", "fp16"):
        return setting  # type: ignore[return-value]
    if setting != "auto":
        raise ValueError(f"unknown precision {setting!r}; choose auto, fp32, bf16 or fp16")
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"

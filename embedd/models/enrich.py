"""Enrichment: how a sequence of per-window embeddings becomes one stored vector.

The contract (``docs/protocol.md``) stores, per track and model, the
concatenation of three per-dimension statistics of the window embeddings
``[D, T]`` over ``T``:

- the mean (what the track sounds like on average),
- a robust spread, ``IQR / 1.3489795003921634`` (how much it varies; the IQR of
  a normal distribution is 1.3489795... sigma, so this estimates sigma without
  letting one odd window dominate; the constant to full double precision, as
  the original system divides by it),
- the mean first difference (where it drifts from start to end),

L2-normalised as a whole, so ``3 * D`` values.

It runs in torch on the model's device, in float32 whatever the model's
precision, and only the final vector goes to the host: a MERT track is
``25 600 x T`` floats on the GPU but 76 800 on the wire.

Edge cases, defined here once:

- ``T == 1`` (a track shorter than one window, or a text query): the spread and
  the drift are 0 -- one observation has no spread and no change -- so the
  vector is ``[mean / |mean|, 0, 0]``.
- A vector whose statistics are all zero (digital silence through a model that
  maps it to the origin, as MERT's architecture does with zero biases) has no
  direction: it stays all zero instead of dividing by zero, and means "no
  vector". Cosine similarity is undefined on it, so it is never stored or
  returned: :func:`embedd.embedding.embed_decoded` makes it that model's
  ``unsupported`` error for the track, the same for every model (checked per
  track there, since one forward pass serves several tracks).
- Quantiles use linear interpolation between order statistics, which is
  numpy's default (``np.percentile(..., method="linear")``) and torch's
  default; we compute them from one sort instead of ``torch.quantile`` because
  the latter refuses inputs over 2**24 elements, which a long MERT track
  exceeds.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["IQR_TO_SIGMA", "enrich", "enrich_stats"]

IQR_TO_SIGMA = 1.3489795003921634  # IQR of the standard normal distribution (2 * 0.6744897501960817)
_EPS = 1e-12


def _quantiles_linear(sorted_x: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """Quantiles along the last axis of an already sorted tensor, numpy 'linear' method."""
    n = sorted_x.shape[-1]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        a = sorted_x[..., lo]
        b = sorted_x[..., hi]
        out.append(a + (b - a) * frac)
    return out


def enrich_stats(latents: torch.Tensor) -> torch.Tensor:
    """The un-normalised ``[3 * D]`` statistics of ``latents`` ``[D, T]`` (float32, same device)."""
    if latents.ndim != 2:
        raise ValueError(f"enrich expects [D, T] window embeddings, got shape {tuple(latents.shape)}")
    d, t = latents.shape
    if t < 1 or d < 1:
        raise ValueError(f"enrich needs at least one window of at least one dimension, got {d}x{t}")
    x = latents.detach().to(torch.float32)
    mean = x.mean(dim=1)
    if t == 1:
        sigma = torch.zeros_like(mean)
        drift = torch.zeros_like(mean)
    else:
        q25, q75 = _quantiles_linear(torch.sort(x, dim=1).values, (0.25, 0.75))
        sigma = (q75 - q25) / IQR_TO_SIGMA
        drift = torch.diff(x, dim=1).mean(dim=1)
    return torch.cat([mean, sigma, drift])


def enrich(latents: torch.Tensor) -> np.ndarray:
    """The stored vector of one track: its enriched, L2-normalised ``[3 * D]`` float32 array."""
    v = enrich_stats(latents)
    norm = torch.linalg.vector_norm(v)
    if float(norm) > _EPS:
        v = v / norm
    else:
        v = torch.zeros_like(v)
    return v.cpu().numpy().astype(np.float32, copy=False)

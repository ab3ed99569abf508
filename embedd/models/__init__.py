"""The model catalogue: which backends exist and what the contract says of each.

The catalogue is plain data so that the daemon can describe its models (for
``status`` and request validation) without importing torch; the backend class
named in ``backend`` is imported on the executor thread when the model is first
needed.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedd.models.base import EmbeddingModel

__all__ = ["CATALOG", "MODEL_NAMES", "ModelInfo", "backend_class"]


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # wire name
    collection: str  # Milvus collection (alias) of the stored vectors
    sample_rate: int  # Hz the backend wants its waveform at
    channels: int  # 1 = mono downmix, 2 = stereo (mono duplicated)
    text: bool  # can embed text queries
    nominal_dim: int  # the contract's stored dim for the official weights; used only until loaded
    default_source: str  # official hub id
    backend: str  # "module:Class", imported lazily on the executor thread


CATALOG: dict[str, ModelInfo] = {
    "muq": ModelInfo(
        name="muq",
        collection="embedding",
        sample_rate=24_000,
        channels=1,
        text=True,
        nominal_dim=1536,
        default_source="OpenMuQ/MuQ-MuLan-large",
        backend="embedd.models.muq:MuQMuLanModel",
    ),
    "mert": ModelInfo(
        name="mert",
        collection="mert_embedding",
        sample_rate=24_000,
        channels=1,
        text=False,
        nominal_dim=76_800,
        default_source="m-a-p/MERT-v1-330M",
        backend="embedd.models.mert:MertModel",
    ),
    "latent": ModelInfo(
        name="latent",
        collection="latent_embedding",
        sample_rate=44_100,
        channels=2,
        text=False,
        nominal_dim=576,
        default_source="SonyCSLParis/music2latent",
        backend="embedd.models.latent:Music2LatentModel",
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(CATALOG)


def backend_class(name: str) -> type[EmbeddingModel]:
    """Import and return the backend class of a catalogued model (executor thread only)."""
    module_name, _, class_name = CATALOG[name].backend.partition(":")
    return getattr(importlib.import_module(module_name), class_name)

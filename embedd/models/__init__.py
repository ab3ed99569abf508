"""The model catalogue: the one place that names the models embedd serves.

Everything else that needs a model's name derives it from :data:`CATALOG`: the
protocol's model type, the per-model settings (``--muq-model`` ...), which models
a default batch job embeds, the hints for text-capable models, and the Go
client's constants (checked by ``tests/test_catalog.py``).

The catalogue is plain data so that the daemon can describe its models (for
``status`` and request validation) without importing torch; the backend class
named in ``backend`` is imported on the executor thread when the model is first
needed.

Backends outside embedd join the catalogue through the ``embedd.models``
entry-point group: each entry point names a :class:`ModelInfo` (the entry
point's name must be the model's name), and the backend class it names follows
the :class:`~embedd.models.base.EmbeddingModel` contract. Such a model gets its
own ``--NAME-model`` setting, is accepted by every op that takes a model, and is
embedded by a batch job when asked for (``in_default_job`` is off unless the
entry says otherwise). Entries are read once, when this module is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedd.models.base import EmbeddingModel

__all__ = [
    "CATALOG",
    "DEFAULT_JOB_MODELS",
    "ENTRY_POINT_GROUP",
    "MODEL_NAMES",
    "TEXT_MODELS",
    "ModelInfo",
    "backend_class",
    "text_model_hint",
]

ENTRY_POINT_GROUP = "embedd.models"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the contract says of one model; everything else that names models reads it."""

    name: str  # wire name
    collection: str  # Milvus collection (alias) of the stored vectors
    sample_rate: int  # Hz the backend wants its waveform at
    channels: int  # 1 = mono downmix, 2 = stereo (mono duplicated)
    text: bool  # can embed text queries
    nominal_dim: int  # the contract's stored dim for the official weights; used only until loaded
    default_source: str  # official hub id
    backend: str  # "module:Class", imported lazily on the executor thread
    source_help: str = ""  # the help of its --NAME-model setting ("" = a generic sentence)
    # Whether a batch job that names no models embeds this one. Off by default, so
    # a new model never silently joins (and slows) every default job.
    in_default_job: bool = False
    # Whether the backend takes each file's samples at the file's own rate (no resampling;
    # ``sample_rate`` is then the rate it was trained at). Music2Latent: the original system
    # let the package's loader read the file, which does not resample (parity).
    native_rate: bool = False

    @property
    def decode_target(self) -> tuple[int, int]:
        """The decoder's ``(rate, channels)`` for this model; rate 0 = the file's own rate."""
        return (0 if self.native_rate else self.sample_rate, self.channels)


_BUILT_IN = (
    ModelInfo(
        name="muq",
        collection="embedding",
        sample_rate=24_000,
        channels=1,
        text=True,
        nominal_dim=1536,
        default_source="OpenMuQ/MuQ-MuLan-large",
        backend="embedd.models.muq:MuQMuLanModel",
        source_help="MuQ-MuLan weights: hub id or local directory.",
        in_default_job=True,
    ),
    ModelInfo(
        name="mert",
        collection="mert_embedding",
        sample_rate=24_000,
        channels=1,
        text=False,
        nominal_dim=76_800,
        default_source="m-a-p/MERT-v1-330M",
        backend="embedd.models.mert:MertModel",
        source_help="MERT weights: hub id or local directory.",
        in_default_job=True,
    ),
    ModelInfo(
        name="latent",
        collection="latent_embedding",
        sample_rate=44_100,
        channels=2,
        text=False,
        nominal_dim=576,
        default_source="SonyCSLParis/music2latent",
        backend="embedd.models.latent:Music2LatentModel",
        source_help="Music2Latent checkpoint: hub id or local file.",
        in_default_job=True,
        native_rate=True,
    ),
)


def _catalogue() -> dict[str, ModelInfo]:
    """The built-in models, then those that installed packages register as entry points."""
    catalog = {info.name: info for info in _BUILT_IN}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        info = entry.load()
        if not isinstance(info, ModelInfo) or info.name != entry.name:
            raise RuntimeError(
                f"entry point {entry.name!r} of {ENTRY_POINT_GROUP!r} ({entry.value}) "
                f"must name a ModelInfo whose name is {entry.name!r}"
            )
        taken = [other for other in catalog.values() if entry.name == other.name or info.collection == other.collection]
        if taken:
            raise RuntimeError(
                f"entry point {entry.name!r} of {ENTRY_POINT_GROUP!r} clashes with model "
                f"{taken[0].name!r} (same name or collection)"
            )
        catalog[info.name] = info
    return catalog


def text_model_hint() -> str:
    """Where to turn instead of a model that cannot embed text: "use 'muq'"."""
    names = [repr(name) for name in TEXT_MODELS]
    if len(names) == 1:
        return f"use {names[0]}"
    return f"use one of {', '.join(names)}" if names else "no model here embeds text"


def backend_class(name: str) -> type[EmbeddingModel]:
    """Import and return the backend class of a catalogued model (executor thread only)."""
    module_name, _, class_name = CATALOG[name].backend.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


# Last: an entry point's module imports this package (ModelInfo, and through
# embedd.models.base text_model_hint) while _catalogue() runs, so every name it
# may import must be defined above this line.
CATALOG: dict[str, ModelInfo] = _catalogue()

MODEL_NAMES: tuple[str, ...] = tuple(CATALOG)
TEXT_MODELS: tuple[str, ...] = tuple(name for name, info in CATALOG.items() if info.text)
DEFAULT_JOB_MODELS: tuple[str, ...] = tuple(name for name, info in CATALOG.items() if info.in_default_job)

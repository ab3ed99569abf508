"""What every embedding model backend looks like to the executor.

A backend object lives on the executor thread and is only ever touched there:
the registry creates it, loads it on first use, calls it, and unloads it when it
has been idle too long. Subclasses describe themselves in class attributes and
fill in the ``_load``/``_unload`` hooks plus the embedding methods; the public
``load``/``unload`` are idempotent wrappers so that the registry never has to
know a model's state.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import ModelInfo, text_model_hint

if TYPE_CHECKING:  # torch is heavy; only the model modules import it at run time
    import torch

    from embedd.models.compiled import CompiledForward

__all__ = ["AudioEmbedding", "EmbeddingModel", "ModelSpec", "TextEmbedding"]


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """How the daemon was told to build one model (from the settings)."""

    source: str  # hub id or local directory/file
    device: str  # "cpu", "cuda", "cuda:1" (already resolved from "auto")
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" autocast (resolved from "auto"; see models.precision)
    batch_size: int = 32  # most items per forward pass; the memory budget usually allows fewer
    cache_dir: str | None = None  # hub cache; None = library default
    memory_budget: int = 2048 << 20  # bytes of activations one forward pass may use (see models.memory)
    hop_s: float | None = None  # windows' hop when not the model's contract (MERT's speed knob)
    quantize: str = "none"  # "none" | "int8": int8 dynamic quantisation of Linear layers (CPU; models.quantize)
    chunk_s: float | None = None  # Music2Latent's encoder chunk when not the package's 60 s (a memory knob)
    compile: str = "off"  # "off" | "if_faster" | "always": the common item's forward (models.compiled.compile_mode)


@dataclasses.dataclass(frozen=True, slots=True)
class AudioEmbedding:
    """One track's stored vector: the enrichment of its per-window embeddings."""

    vector: np.ndarray  # float32, shape [dim], L2-normalised
    windows: int  # T, the number of windows (frames for latent) enriched


@dataclasses.dataclass(frozen=True, slots=True)
class TextEmbedding:
    raw: np.ndarray  # the model's joint-space text latent (512 for muq)
    vector: np.ndarray  # the same query laid out in the stored collection's dim


class EmbeddingModel(abc.ABC):
    """Base class of the backends; one instance per model name per daemon."""

    info: ClassVar[ModelInfo]  # the catalogue entry: name, collection, sample rate, channels, text

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._loaded = False
        self._compiled: CompiledForward | None = None  # with spec.compile, from each load on
        # Set by the executor at shutdown; backends check it between forward batches.
        self.interrupt: threading.Event = threading.Event()

    @property
    def name(self) -> str:
        return self.info.name

    # -- lifecycle -------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Load the weights if they are not loaded; ``unavailable`` on failure.

        The message gives the loader's reason, the setting that says where the
        weights are, and the docs section on getting them.
        """
        if self._loaded:
            return
        try:
            self._load()
        except EmbeddError:
            raise
        except Exception as exc:  # the loader's own reason goes to the client, as one line
            # the setting that names the weights (embedd.settings.source_field), spelt out here:
            # the models layer sits below the settings
            field = f"{self.name}_model"
            reason = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
            raise EmbeddError(
                Code.UNAVAILABLE,
                f"model {self.name!r} could not be loaded from {self.spec.source!r}: "
                f"{type(exc).__name__}: {reason}; point EMBEDD_{field.upper()} (--{field.replace('_', '-')}) "
                "at a local copy of the weights or a hub id in the hub cache (docs/operations.md §3 Model weights)",
            ) from exc
        self._loaded = True
        if self.spec.compile != "off":
            target = self._compile_target()
            if target is not None:
                from embedd.models.compiled import CompiledForward

                fn, example = target
                self._compiled = CompiledForward(
                    self.name, fn, example, context=self.forward_context,
                    if_faster=self.spec.compile == "if_faster",
                )  # fmt: skip

    def unload(self) -> None:
        """Drop the weights. The registry empties the CUDA cache afterwards."""
        if not self._loaded:
            return
        self._loaded = False
        if self._compiled is not None:
            self._compiled.stop()
            self._compiled = None
        self._unload()

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        """What every forward pass runs in: inference mode, and autocast for the precision.

        A backend that converts its weights to the precision itself (Music2Latent
        in bf16) runs them without autocast: it overrides this.
        """
        from embedd.models.runtime import autocast

        return autocast(self.device, self.spec.precision)

    # -- compilation (embedd.models.compiled) ----------------------------------
    def _compile_target(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | None:
        """The function to compile and one example item (batch 1) of the shape most of its calls have.

        The backend calls it through :meth:`_fast`; None: nothing to compile.
        """
        return None

    def _fast(self, fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """``fn(batch)``: through the compiled code where it is ready and fits, else ``fn`` itself."""
        compiled = self._compiled
        return compiled(batch) if compiled is not None else fn(batch)

    @property
    def compile_due(self) -> bool:
        """Loaded, to be compiled, not compiled yet: the batch lane's next chore."""
        compiled = self._compiled
        return compiled is not None and compiled.due

    def compile_now(self) -> None:
        """Compile now, on the calling thread (the batch lane's); never raises."""
        compiled = self._compiled
        if compiled is not None:
            compiled.compile_now()

    def compile_view(self) -> dict[str, Any] | None:
        """The compilation's state for ``status`` (None: not compiled by the settings)."""
        compiled = self._compiled
        return compiled.view() if compiled is not None else None

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _unload(self) -> None: ...

    # -- description -----------------------------------------------------
    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The stored vector's dimension, read from the loaded model."""

    def expected_dim(self) -> int | None:
        """The stored dimension without loading weights (e.g. from a config file), if known."""
        return self.dim if self._loaded else None

    @property
    def device(self) -> "torch.device":
        import torch

        return torch.device(self.spec.device)

    # -- work ------------------------------------------------------------
    def items_per_pass(self, item_bytes: int) -> int:
        """How many batch items of ``item_bytes`` activations one forward pass may take."""
        from embedd.models.memory import items_per_pass

        return items_per_pass(item_bytes, self.spec.memory_budget, self.spec.batch_size)

    @abc.abstractmethod
    def embed_audio_many(self, waveforms: Sequence[np.ndarray]) -> list[AudioEmbedding]:
        """Embed several tracks at once, batching their windows together.

        Each waveform is float32 ``[info.channels, samples]`` at ``info.sample_rate``.
        """

    def embed_text(self, text: str) -> TextEmbedding:
        raise EmbeddError(Code.UNSUPPORTED, f"model {self.name!r} cannot embed text; {text_model_hint()}")

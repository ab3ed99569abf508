"""``embed_text``: a text query in a model's joint audio-text space (MuQ-MuLan)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec

from embedd.errors import Code, EmbeddError
from embedd.executor import Lane
from embedd.models import CATALOG, text_model_hint
from embedd.ops.op import Op, Result
from embedd.protocol import DEFAULT_MODEL, Args, ModelName, VectorFormat, WireVector, encode_vector

if TYPE_CHECKING:
    from embedd.service import Service


class EmbedTextArgs(Args):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=10_000)]
    model: ModelName = DEFAULT_MODEL
    vector_format: VectorFormat = "bin"

    def check(self) -> None:
        if not self.text.strip():
            raise ValueError("'text' is blank")


class EmbedTextResult(Result):
    model: str
    dim: int
    vector: WireVector  # laid out like the model's stored vectors: ready for search
    raw: WireVector  # the model's own joint-space text embedding


async def embed_text(service: Service, args: EmbedTextArgs) -> EmbedTextResult:
    """A text's vector, on the interactive lane (never behind the batch job)."""
    if not CATALOG[args.model].text:
        raise EmbeddError(Code.UNSUPPORTED, f"model {args.model!r} cannot embed text; {text_model_hint()}")
    text = await service.executor.embed_text(Lane.INTERACTIVE, args.model, args.text)
    return EmbedTextResult(
        model=args.model,
        dim=int(text.vector.shape[-1]),
        vector=encode_vector(text.vector, args.vector_format),
        raw=encode_vector(text.raw, args.vector_format),
    )


OPS = (Op("embed_text", EmbedTextArgs, EmbedTextResult, embed_text, admitted=True),)

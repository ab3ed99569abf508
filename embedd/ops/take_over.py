"""``take_over``: adopt the vectors the original system already computed, instead of re-embedding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from embedd.ops.op import Op, Result
from embedd.protocol import Args, ModelName
from embedd.takeover import take_over as take_over_vectors

if TYPE_CHECKING:
    from embedd.service import Service


class TakeOverArgs(Args):
    model: ModelName | None = None  # None: every model
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None  # the original rows' id
    dry_run: bool = False  # True: only say what would be adopted


class TakeOverResult(Result):
    models: dict[str, dict[str, Any]]  # per model: what was found, adopted, already stored, skipped and why
    dry_run: bool


async def take_over(service: Service, args: TakeOverArgs) -> TakeOverResult:
    """Copy the original collections' rows into embedd's, for tracks whose weights match (see docs)."""
    return TakeOverResult.of(
        await take_over_vectors(service, args.model, model_id=args.model_id, dry_run=args.dry_run)
    )


OPS = (Op("take_over", TakeOverArgs, TakeOverResult, take_over),)

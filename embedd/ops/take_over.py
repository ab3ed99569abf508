"""``take_over``: adopt the vectors the original system already computed, instead of re-embedding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

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


class AmbiguousName(Result):
    """An original row's "Artist - Title" that names several of the library's tracks: not adopted."""

    name: str
    tracks: list[str]  # the track ids it names


class TakeOverModel(Result):
    """One model's take-over: the original rows found, adopted, already stored, skipped and why."""

    collections: list[str]  # the original's collections of this model
    rows: int  # distinct names read from them
    adopted: int  # vectors stored (or, with dry_run, that would be)
    already_stored: int  # tracks that keep a vector of embedd's own
    unresolved: int  # names that name no track of the library
    ambiguous: int  # names that name several tracks
    # rows refused because they carry another model_id than the configured model's: their count, by model_id
    other_model_id: dict[str, int]
    other_dim: int  # rows refused because their width is not the model's (or their vector was gone)
    unresolved_names: list[str]  # the first 100 of them
    ambiguous_names: list[AmbiguousName]  # the first 100 of them
    refused: str | msgspec.UnsetType = msgspec.UNSET  # why the whole model was refused (a setting that changes vectors)
    skipped_collections: list[str] | msgspec.UnsetType = msgspec.UNSET  # collections without the original's schema


class TakeOverResult(Result):
    """What was (or, with dry_run, would be) adopted, per model."""

    models: dict[str, TakeOverModel]
    dry_run: bool


async def take_over(service: Service, args: TakeOverArgs) -> TakeOverResult:
    """Copy the original collections' rows into embedd's, for tracks whose weights match (see docs)."""
    return TakeOverResult.of(
        await take_over_vectors(service, args.model, model_id=args.model_id, dry_run=args.dry_run)
    )


OPS = (Op("take_over", TakeOverArgs, TakeOverResult, take_over),)

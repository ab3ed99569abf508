"""``drop_legacy``: the collections the original system left behind, listed, and dropped on confirmation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedd.ops.op import Op, Result
from embedd.ops.views import LegacyCollection
from embedd.protocol import Args, ModelName

if TYPE_CHECKING:
    from embedd.service import Service


class DropLegacyArgs(Args):
    model: ModelName | None = None  # None: every model
    confirm: bool = False  # False: only say what would be dropped


class DropLegacyResult(Result):
    """The legacy collections found (each as status's legacy_collections lists it), and whether they were dropped."""

    collections: list[LegacyCollection]
    dropped: bool


async def drop_legacy(service: Service, args: DropLegacyArgs) -> DropLegacyResult:
    """The moved-aside legacy collections of one model (or all); dropped only with ``confirm``."""
    return DropLegacyResult.of(await service.store_io.drop_legacy(args.model, confirm=args.confirm))


OPS = (Op("drop_legacy", DropLegacyArgs, DropLegacyResult, drop_legacy),)

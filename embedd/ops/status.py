"""``status``: the whole daemon at a glance (models, lanes, the batch job, Milvus, the watcher)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedd.ops.batch import Progress
from embedd.ops.op import Op, Result
from embedd.protocol import NoArgs

if TYPE_CHECKING:
    from embedd.service import Service


class MilvusStatus(Result):
    uri: str
    ok: bool


class StatusResult(Result):
    """The parts are the subsystems' own views (their keys: docs/protocol.md, the Go client's StatusResult)."""

    version: str
    device: str
    models: dict[str, dict[str, Any]]
    batch: Progress | None
    queue: dict[str, int]
    executor: dict[str, Any]
    decoder: dict[str, dict[str, Any]] | None
    store: dict[str, dict[str, Any]]
    admission: dict[str, Any]
    milvus: MilvusStatus
    legacy_collections: list[dict[str, Any]] | None
    library_watch: dict[str, Any] | None


async def status(service: Service, _: NoArgs) -> StatusResult:
    """Models (loaded, device, precision, compile), lanes, the batch job, Milvus and the library watcher."""
    await service.executor.described()
    return StatusResult.of(
        {
            "version": service.version,
            "device": service.executor.device,
            "models": service.models_view(),
            "batch": service.batch.progress.view(),
            "queue": service.executor.queue_depths,
            "executor": service.executor.lanes_view(),
            "decoder": service.decoder.lanes_view() if service.decoder is not None else None,
            "store": service.store_io.lanes_view(),
            "admission": service.admission.view(),
            "milvus": {"uri": service.settings.resolved_milvus_uri, "ok": await service.store_io.ok()},
            "legacy_collections": await service.store_io.legacy_view(),
            "library_watch": service.watch_view(),
        }
    )


OPS = (Op("status", NoArgs, StatusResult, status),)

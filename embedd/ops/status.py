"""``status``: the whole daemon at a glance (models, lanes, the batch job, Milvus, the watcher)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedd import allocator
from embedd.ops.batch import Progress
from embedd.ops.op import Op, Result
from embedd.ops.views import (
    AdmissionStatus,
    DecoderLaneStatus,
    ExecutorStatus,
    LegacyCollection,
    LibraryWatchStatus,
    ModelStatus,
    QueueStatus,
    StoreLaneStatus,
)
from embedd.protocol import NoArgs

if TYPE_CHECKING:
    from embedd.service import Service


class MilvusStatus(Result):
    """Which vector store the daemon uses and whether it answers."""

    uri: str
    ok: bool


class StatusResult(Result):
    """The daemon at a glance: each part is a subsystem's own view (embedd.ops.views)."""

    version: str
    device: str
    allocator: str  # the memory allocator the daemon runs on: "tcmalloc", "jemalloc" or "system"
    models: dict[str, ModelStatus]  # every model of the catalogue, by name
    batch: Progress | None
    queue: QueueStatus
    executor: ExecutorStatus
    decoder: dict[str, DecoderLaneStatus] | None  # by lane ("interactive", "batch"); None before the pool started
    store: dict[str, StoreLaneStatus]  # by lane ("read", "write")
    admission: AdmissionStatus
    milvus: MilvusStatus
    legacy_collections: list[LegacyCollection] | None  # None when Milvus did not answer in time
    library_watch: LibraryWatchStatus | None  # None without a Navidrome database (no watcher)


async def status(service: Service, _: NoArgs) -> StatusResult:
    """Models (loaded, device, precision, compile), lanes, the batch job, Milvus and the library watcher."""
    await service.executor.described()
    return StatusResult.of(
        {
            "version": service.version,
            "device": service.executor.device,
            "allocator": allocator.running(),
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

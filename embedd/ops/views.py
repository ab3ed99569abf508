"""The subsystems' views as Structs: the typed parts of ``status`` and of a batch job's progress.

Each Struct is exactly the plain map a subsystem's ``view()`` builds (named
where it is built, below), so :meth:`~embedd.ops.op.Result.of` refuses a key
or a type that drifted from it, and each bears the name of the Go client's
struct that decodes it (``clients/go/embedd/types.go``; ``tests/test_go_types.py``
compares the two). Shared by several ops: ``status`` (:mod:`embedd.ops.status`),
the ``batch_*`` ops (:mod:`embedd.ops.batch`) and ``drop_legacy``. This module
declares no op.
"""

from __future__ import annotations

import msgspec

from embedd.ops.op import Result

__all__ = [
    "AdmissionStatus",
    "ClusterStatus",
    "ClusterWorker",
    "CompileStatus",
    "DecoderLaneStatus",
    "ExecutorJob",
    "ExecutorRecent",
    "ExecutorStatus",
    "LaneStatus",
    "LegacyCollection",
    "LibraryWatchPoll",
    "LibraryWatchStatus",
    "ModelStatus",
    "PassStatus",
    "QueueStatus",
    "StoreLaneStatus",
]


# ---------------------------------------------------------------------------- models (Service.models_view)


class CompileStatus(Result):
    """A loaded model's compilation (embedd.models.compiled.CompiledForward.view)."""

    state: str  # waiting | compiling | ready | slower | failed | stopped
    shape: list[int]  # the one item shape that runs compiled
    compile_s: float | None
    eager_s: float | None
    compiled_s: float | None
    cache: dict[str, int] | None  # inductor cache "hits" and "misses" during this load; None until compiled
    items: int  # items run through the compiled code
    error: str | None


class ModelStatus(Result):
    """One model of the catalogue: loaded or not, what runs in it, its collection."""

    loaded: bool
    state: str  # unloaded | loading | idle | running
    running: list[str]  # the lanes ("interactive", "batch") inside the model now
    pinned: bool  # the running batch job uses it: never idle-unloaded
    idle_s: float | None  # None unless loaded and idle
    dim: int
    collection: str
    text: bool  # it embeds text queries too
    error: str | None  # the last load error, while the model cannot be loaded
    compile: CompileStatus | None  # None unless loaded and compiled by the compile setting


# ---------------------------------------------------------------------------- the executor (lanes_view)


class PassStatus(Result):
    """One forward pass of a lane: in flight (``age_s`` set) or done (``seconds`` set)."""

    lane: str
    model: str
    items: int
    age_s: float | None
    seconds: float | None
    started_seq: int
    ended_seq: int | None


#: One executor lane: its queue, its pass in flight, how it shares the CPU. Made with ``defstruct``
#: because one of its keys, ``pass``, is a Python keyword (a renamed ``pass_`` would show as such in
#: the generated protocol reference).
LaneStatus = msgspec.defstruct(
    "LaneStatus",
    [
        ("depth", int),
        ("oldest_wait_s", float | None),
        ("pass", PassStatus | None),  # the pass in flight, if any
        ("yielding", bool),  # waiting at a pass boundary for interactive work
        ("threads", int | None),  # compute threads (None before the lane's thread started)
        ("nice", int),
        ("pass_budget_s", float | None),  # the batch lane's seconds per pass (None: sized by memory alone)
        ("dropped", int),  # jobs stopped because nobody waited for them any more
        ("overloaded", int),  # jobs refused because the lane was full
    ],
    bases=(Result,),
    module=__name__,
    namespace={"__doc__": "One executor lane: its queue, its pass in flight, how it shares the CPU."},
)


class ExecutorJob(Result):
    """One job the executor ran, in its sequence of events."""

    lane: str  # control | interactive | batch
    kind: str  # audio | text | call
    model: str | None  # None for a job that needs no model
    queued_seq: int
    started_seq: int
    done_seq: int


class ExecutorRecent(Result):
    """The executor's last passes and jobs (64 of each at most)."""

    passes: list[PassStatus]
    jobs: list[ExecutorJob]


class ExecutorStatus(Result):
    """The model executor's two lanes ("interactive", "batch") and what they ran last."""

    lanes: dict[str, LaneStatus]
    recent: ExecutorRecent
    seq: int  # this answer's place in the executor's sequence of events


class QueueStatus(Result):
    """The depth of the executor's work queues."""

    interactive: int
    batch: int


# ---------------------------------------------------------------------------- the decoder, the store, admission


class DecoderLaneStatus(Result):
    """One lane ("interactive", "batch") of the audio decoder pool."""

    depth: int  # decodes waiting for a worker
    oldest_wait_s: float | None
    running: int  # decodes in the workers now


class StoreLaneStatus(Result):
    """One lane ("read", "write") of the vector store's threads."""

    depth: int
    oldest_wait_s: float | None
    running_s: float | None  # how long the call in progress has run; None when idle


class AdmissionStatus(Result):
    """The bound on work admitted, socket and HTTP together."""

    in_flight: int
    limit: int  # max_inflight_requests
    bytes_held: int
    bytes_limit: int  # max_inflight_mb, in bytes
    overloaded_total: int
    overloaded: dict[str, int]  # refusals per bound ("requests", "bytes")


class LegacyCollection(Result):
    """A collection of the system embedd replaces, under or beside a public name (store.layout.LegacyCollection)."""

    collection: str  # its name now
    public: str  # the public name it belongs to
    model: str
    rows: int | None  # None when Milvus would not count them
    serving: bool  # it still holds its public name


# ---------------------------------------------------------------------------- the library watcher (batch.watch)


class LibraryWatchPoll(Result):
    """The cost of the library watcher's last poll."""

    rows_read: int
    diff_rows_read: int
    duration_s: float


class LibraryWatchStatus(Result):
    """The library watcher, which starts automatic batch jobs when Navidrome's library changes."""

    enabled: bool
    last_seen_at: float | None  # the last poll that read the database
    last_scan_at: float | None  # Navidrome's last scan
    scan_in_progress: bool
    pending: dict[str, int]  # changed tracks waiting for an automatic job, by kind (added, changed, removed)
    held_missing: int
    next_job_at: float | None
    waiting: str | None  # why pending tracks wait (quiet_period, job_running, off, ...)
    last_activity_at: float | None
    quiet_s: float
    poll_s: float
    models: list[str] | None  # None: the models whose collections hold vectors
    last_job_id: str | None
    auto_jobs: int
    polls: int
    last_poll: LibraryWatchPoll
    error: str | None


# ---------------------------------------------------------------------------- the Ray cluster (cluster.client)


class ClusterWorker(Result):
    """One Ray model worker: where it runs and what it did."""

    name: str
    state: str  # starting | ready | dead | stopped
    host: str
    device: str
    pid: int
    allocator: str  # the memory allocator its process runs on (tcmalloc | jemalloc | system), "" until ready
    models: list[str]
    in_flight: int
    tracks_done: int
    tracks_failed: int
    tracks_per_hour: float | None
    restarts: int
    last_error: str | None


class ClusterStatus(Result):
    """The Ray cluster a library job runs on (ray_address), and its model workers."""

    address: str
    state: str  # closed | connecting | up | down | fallback (the job went on in the daemon)
    error: str | None
    down_since: float | None
    fallback: str  # ray_fallback: wait | local
    workers: list[ClusterWorker]

"""The Milvus store: per-model collections of track vectors, on Milvus Lite or a Milvus server.

Threading. :class:`VectorStore` is synchronous and NOT thread-safe: the daemon
owns one instance and calls it from one dedicated I/O thread, off the event loop.
Every call blocks on the network (or on the Milvus Lite child process).

URI. A path (``<data_dir>/milvus.db``, the default) is Milvus Lite: pymilvus runs
it as a child process over that file. ``http://host:19530`` (or https) is a
server. The same code serves both; only the index and the dimension limit differ
and both are discovered, not assumed (see below).

Collections and aliases. The public name of a model's collection (``embedding``,
``mert_embedding``, ``latent_embedding``: the catalogue's, passed in by the
caller) is a Milvus ALIAS pointing at a physical collection named
``<public>__<suffix>``: ``__base`` for the first one, ``__r_<tag>`` for one built
by a ``clear_existing`` rebuild, ``__legacy`` for a migrated pre-existing one.
Reads and writes go through the alias, so whoever switches it (this daemon, or
another shard's) is followed at once. A rebuild (:meth:`VectorStore.begin_rebuild`)
writes into a fresh physical collection whose name is derived from a caller-given
tag (the batch job id, which the job keeps in its own state DB), so after a crash
``begin_rebuild(model, same_tag)`` reopens the same collection with the rows
already written; :meth:`VectorStore.commit_rebuild` switches the alias in one
``alter_alias`` call (atomic in Milvus: a search sees either the old or the new
set, never a mix or nothing) and then drops every other ``<public>__*`` physical
collection no alias points at (the old set, stale aborted rebuilds, a migrated
legacy collection); :meth:`VectorStore.abort_rebuild` drops the new one. Until the
commit, search answers from the old vectors. Writes made through the public name
while a rebuild of that model is open in this process (interactive ``store``) are
mirrored into the rebuild, so the switch does not lose them.

Migration of a plain collection. The system embedd replaces created REAL
collections under the public names. On first use (:meth:`VectorStore.ensure`) such
a collection is renamed to ``<public>__legacy`` and the alias is created on it.
If its schema is ours (``track_id`` VARCHAR primary key, a ``vector`` of the
model's dim and our scalar fields) its vectors stay searchable and incremental
runs keep them. If it is not (another schema, another dim), a fresh
``<public>__base`` is created and aliased instead, and the legacy data is kept
untouched until the first committed rebuild cleans it up. The rename and the
alias creation are two calls; a crash between them is repaired by the next
``ensure`` (an unaliased ``__legacy``/``__base`` is aliased again). For a few
milliseconds during that one-time migration the public name does not resolve.

Consistency. Counts and fingerprint scans read ``Strong`` (the batch job decides
from them). Searches and ``get_vector`` read ``Session``: they see every write
this process made through the same name (pymilvus tracks the last write time per
collection name, process-wide), so "store, then search" finds the track, without
paying ``Strong``'s wait for the server's time tick on every search (measured on
the 2.3.5 server: a split MERT search takes 1.85 s Strong vs 0.53 s Session).
Writes by other processes (another shard's daemon) become visible within the
server's staleness bound. Right after :meth:`VectorStore.commit_rebuild` the rows
were written under the physical name, so the next read of that model is
``Strong``. Milvus Lite reads its own writes anyway.

Index. HNSW (M=50, efConstruction=250) with the COSINE metric is requested; a
server or Lite build that rejects it gets AUTOINDEX, then FLAT.
:attr:`VectorStore.index_types` records what each physical collection got.
(Measured: Milvus Lite 3.2.2 and the Milvus 2.3.5 standalone server both accept
HNSW.)

Vectors wider than the server allows (MERT: 76,800 dims; Milvus servers reject
more than ``proxy.maxDimension`` = 32,768). Milvus Lite accepts them, so there a
``mert`` collection is plain. A server rejects the creation, and the collection is
created SPLIT instead: the vector is cut into ``k`` equal parts (``k =
ceil(dim / 32768)``, the last part zero-padded when ``dim`` is not a multiple of
``k``, which changes no dot product and no norm), and each track is stored as
``k`` rows of ONE collection, primary key ``"<track_id>#<i>"`` with scalar fields
``track_id`` and ``part`` = i. Why one collection with a part field, not ``k``
collections or ``k`` vector fields: a rebuild switches one alias atomically (``k``
aliases cannot be switched together), a track's parts are upserted and deleted in
one call, and Milvus 2.3 servers allow one vector field per collection. Search:
for each part i, an ANN search of the query's part i restricted to ``part == i``
(COSINE, HNSW) gives candidates; a stored track's own vector has cosine 1 in every
part, so it is a top candidate of every part search; the union of candidates is
fetched whole (all parts), and scored by the exact cosine of the full
concatenated vectors; the best ``limit`` are returned. The exact rescoring is what
makes the split transparent: scores are true full-vector cosines, comparable to
the plain layout's, and a stored track ranks first for its own vector. The price
is fetching the candidates' full vectors (about ``k * (limit + 16)`` tracks at
300 KB each for MERT): fine for recommendation-sized limits, heavy for
``limit=1000``. The layout is recorded in the collection's description and read
back from its schema, so callers never see it; when the server is configured with
a higher ``maxDimension`` the plain layout simply succeeds.

Errors. Milvus unreachable, timing out, or not ready → ``EmbeddError(UNAVAILABLE)``
naming the URI; the client is rebuilt on the next call, so a restarted server is
picked up. A vector of the wrong size, non-finite or all zeros in a search →
``BAD_REQUEST``. A missing track in :meth:`VectorStore.get_vector` → ``None``.
Any other Milvus refusal is a bug and raises ``EmbeddError(INTERNAL)`` naming the
operation and the collection.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from embedd.errors import Code, EmbeddError

__all__ = [
    "MAX_LEN",
    "Fingerprint",
    "Hit",
    "RebuildHandle",
    "TrackRow",
    "VectorStore",
    "truncate_utf8",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# VARCHAR limits, in bytes (Milvus counts bytes in 2.3 and characters later: bytes are safe for both).
MAX_LEN: dict[str, int] = {
    "track_id": 256,
    "path": 4096,
    "title": 1024,
    "artist": 1024,
    "album": 1024,
    "model_id": 512,
}
_META_FIELDS = ("path", "title", "artist", "album")
_ROW_FIELDS = (*_META_FIELDS, "duration_s", "model_id", "file_size", "file_mtime", "embedded_at")
SERVER_MAX_DIM = 32_768  # Milvus servers' default proxy.maxDimension
_HNSW = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 50, "efConstruction": 250}}
_INDEX_CHOICES: tuple[dict[str, Any], ...] = (
    _HNSW,
    {"index_type": "AUTOINDEX", "metric_type": "COSINE", "params": {}},
    {"index_type": "FLAT", "metric_type": "COSINE", "params": {}},
)
_UPSERT_BYTES = 16 * 1024 * 1024  # per upsert call: well under the servers' gRPC message limits
_FETCH_TRACKS = 32  # full vectors fetched per query during split rescoring
_STRONG = "Strong"
_SESSION = "Session"
_UNAVAILABLE_HINTS = (
    "fail connecting",
    "connect",
    "unavailable",
    "deadline",
    "timeout",
    "timed out",
    "retry",
    "not ready",
    "not healthy",
    "stopping",
    "closed channel",
    "socket closed",
    "server is not",
)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes without splitting a character."""
    # Lone surrogates (file names decoded with surrogateescape) become "?": Milvus wants valid UTF-8.
    raw = text.encode("utf-8", errors="replace")
    return raw[:max_bytes].decode("utf-8", errors="ignore")


@dataclasses.dataclass(slots=True)
class TrackRow:
    """One track's vector and the metadata stored beside it."""

    track_id: str
    vector: np.ndarray  # float32, the model's stored dim
    path: str = ""
    title: str = ""
    artist: str = ""
    album: str = ""
    duration_s: float = 0.0
    model_id: str = ""  # the model source (hub id or local path) that produced the vector
    file_size: int = 0
    file_mtime: float = 0.0
    embedded_at: float = 0.0  # Unix seconds; 0 means "now" at upsert


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    track_id: str
    score: float  # cosine similarity, higher is closer
    path: str
    title: str
    artist: str
    album: str


class Fingerprint(NamedTuple):
    """What an incremental run compares with the file on disk to decide a vector is up to date."""

    track_id: str
    file_size: int
    file_mtime: float


@dataclasses.dataclass(frozen=True, slots=True)
class RebuildHandle:
    """A rebuild in progress: writes with ``target=handle`` go to ``physical``, searches stay on the alias."""

    model: str
    public: str  # the alias, e.g. "embedding"
    physical: str  # e.g. "embedding__r_<tag>"
    tag: str
    dim: int
    resumed: bool  # the collection already existed (a resumed rebuild)
    committed: bool  # the alias already points at it (a commit that was interrupted before cleanup)


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """How a physical collection stores a model's vectors."""

    physical: str
    dim: int  # the model's full vector dim
    parts: int  # 1 = plain (track_id primary key); >1 = split rows "<track_id>#<i>"
    part_dim: int  # the vector field's dim

    @property
    def split(self) -> bool:
        return self.parts > 1


@dataclasses.dataclass(slots=True)
class _Model:
    name: str
    public: str
    layout: _Layout


def _quote(value: str) -> str:
    """A Milvus expression string literal (JSON escaping is a subset Milvus parses)."""
    return json.dumps(value, ensure_ascii=False)


def _in_list(field: str, values: Iterable[str], negate: bool = False) -> str:
    items = ", ".join(_quote(v) for v in values)
    return f"{field} {'not in' if negate else 'in'} [{items}]"


def _not_loaded(exc: BaseException) -> bool:
    from pymilvus.exceptions import MilvusException

    return isinstance(exc, MilvusException) and (
        exc.code == 101 or "not loaded" in (exc.message or "").lower() or "released" in (exc.message or "").lower()
    )


def _sanitize_tag(tag: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_]", "_", tag)
    if not clean:
        raise EmbeddError(Code.INTERNAL, f"rebuild tag {tag!r} has no usable characters for a Milvus name.")
    return clean[:120]


class VectorStore:
    """Track vectors per model in Milvus (Lite or server); see the module docstring for the design."""

    def __init__(self, uri: str, *, timeout_s: float = 10.0) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "grpc://"))
        self._client_obj: Any = None
        self._models: dict[str, _Model] = {}
        self._rebuilds: dict[str, RebuildHandle] = {}  # open rebuilds in this process, for mirroring
        self.index_types: dict[str, str] = {}  # physical collection -> index type it got
        self._rebuild_layouts: dict[str, _Layout] = {}
        self._strong_next: set[str] = set()  # models whose next search must be Strong (after a commit)

    # -- plumbing --------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._client_obj is None:
            from pymilvus import MilvusClient

            if self.is_lite:
                Path(self.uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
            try:
                self._client_obj = MilvusClient(uri=self.uri, timeout=self.timeout_s)
            except Exception as exc:  # any failure to connect is "the dependency is down"
                raise self._unavailable(exc) from exc
        return self._client_obj

    def _unavailable(self, exc: BaseException) -> EmbeddError:
        detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return EmbeddError(Code.UNAVAILABLE, f"Milvus at {self.uri} is unreachable or not ready ({detail}).")

    def _is_unavailable(self, exc: BaseException) -> bool:
        import grpc

        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return True
        if isinstance(exc, grpc.RpcError):
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            return code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN,
            )
        from pymilvus.exceptions import MilvusException, MilvusUnavailableException

        if isinstance(exc, MilvusUnavailableException):
            return True
        if isinstance(exc, MilvusException):
            if exc.code == 2:  # pymilvus: cannot connect
                return True
            msg = (exc.message or "").lower()
            return any(h in msg for h in _UNAVAILABLE_HINTS)
        return False

    def _call(self, what: str, fn: Callable[[Any], T], *, loads: str | None = None) -> T:
        """Run one Milvus operation, mapping failures to contract errors.

        ``loads``: the collection a read needs loaded. A restarted server may
        come back with collections released; such a read loads it and retries once.
        """
        client = self._client()
        try:
            try:
                return fn(client)
            except Exception as exc:
                if loads is None or not _not_loaded(exc):
                    raise
                log.info("Milvus collection %s was not loaded; loading it", loads)
                client.load_collection(loads, timeout=max(self.timeout_s, 60))
                return fn(client)
        except EmbeddError:
            raise
        except Exception as exc:
            if self._is_unavailable(exc):
                self._reset_client()
                raise self._unavailable(exc) from exc
            detail = getattr(exc, "message", None) or str(exc)
            raise EmbeddError(Code.INTERNAL, f"Milvus at {self.uri} refused to {what} ({detail}).") from exc

    def _reset_client(self) -> None:
        client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken channel may fail; it is being dropped anyway
                pass

    def close(self) -> None:
        self._reset_client()

    def ping(self) -> bool:
        """True when Milvus answers a trivial request now."""
        try:
            self._call("list collections", lambda c: c.list_collections(timeout=self.timeout_s))
            return True
        except EmbeddError:
            return False

    # -- collections -----------------------------------------------------------------------

    def _list(self) -> list[str]:
        return list(self._call("list collections", lambda c: c.list_collections(timeout=self.timeout_s)))

    def _alias_target(self, public: str, names: list[str]) -> str | None:
        """The physical collection the alias ``public`` points at; None if no such alias."""
        if public in names:
            return None  # a real collection holds the name
        if not self._call(f"look up {public}", lambda c: c.has_collection(public, timeout=self.timeout_s)):
            return None
        desc = self._call(f"describe {public}", lambda c: c.describe_collection(public, timeout=self.timeout_s))
        return str(desc["collection_name"])

    def _describe_layout(self, physical: str) -> tuple[_Layout, dict[str, Any]]:
        desc = self._call(
            f"describe collection {physical}", lambda c: c.describe_collection(physical, timeout=self.timeout_s)
        )
        fields = {f["name"]: f for f in desc["fields"]}
        vec = fields.get("vector")
        part_dim = int(vec["params"]["dim"]) if vec is not None and "dim" in vec.get("params", {}) else 0
        parts, dim = 1, part_dim
        m = re.search(r"dim=(\d+);parts=(\d+)", desc.get("description") or "")
        if "part" in fields and m:
            dim, parts = int(m.group(1)), int(m.group(2))
        return _Layout(physical=physical, dim=dim, parts=parts, part_dim=part_dim), fields

    @staticmethod
    def _compatible(fields: dict[str, Any], layout: _Layout, dim: int) -> bool:
        from pymilvus import DataType

        tid = fields.get("track_id")
        key_ok = tid is not None and tid.get("type") == DataType.VARCHAR and (
            tid.get("is_primary") or ("pk" in fields and fields["pk"].get("is_primary"))
        )
        return bool(key_ok) and layout.dim == dim and all(f in fields for f in _ROW_FIELDS)

    def _create(self, model: str, physical: str, dim: int) -> _Layout:
        """Create a physical collection for ``dim``-wide vectors: plain if the server allows, else split."""
        from pymilvus import DataType, MilvusClient
        from pymilvus.exceptions import MilvusException

        parts = 1
        while True:
            part_dim = math.ceil(dim / parts)
            schema = MilvusClient.create_schema(
                auto_id=False,
                enable_dynamic_field=False,
                description=f"embedd v1 model={model};dim={dim};parts={parts}",
            )
            if parts == 1:
                schema.add_field("track_id", DataType.VARCHAR, is_primary=True, max_length=MAX_LEN["track_id"])
            else:
                schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=MAX_LEN["track_id"] + 8)
                schema.add_field("track_id", DataType.VARCHAR, max_length=MAX_LEN["track_id"])
                schema.add_field("part", DataType.INT64)
            for name in _META_FIELDS + ("model_id",):
                schema.add_field(name, DataType.VARCHAR, max_length=MAX_LEN[name])
            schema.add_field("duration_s", DataType.DOUBLE)
            schema.add_field("file_size", DataType.INT64)
            schema.add_field("file_mtime", DataType.DOUBLE)
            schema.add_field("embedded_at", DataType.DOUBLE)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=part_dim)
            try:
                self._call(
                    f"create collection {physical}",
                    lambda c: self._raw_create(c, physical, schema),
                )
                break
            except EmbeddError as err:
                cause = err.__cause__
                too_wide = isinstance(cause, MilvusException) and "dimension" in (cause.message or "").lower()
                if err.code is not Code.INTERNAL or not too_wide or part_dim <= 1:
                    raise
                # The server's maxDimension is below part_dim: split (further).
                parts = max(parts + 1, math.ceil(dim / SERVER_MAX_DIM))
        self._create_index(physical)
        self._call(f"load {physical}", lambda c: c.load_collection(physical, timeout=max(self.timeout_s, 60)))
        if parts > 1:
            log.info("collection %s stores %d-dim vectors split in %d parts of %d", physical, dim, parts, part_dim)
        return _Layout(physical=physical, dim=dim, parts=parts, part_dim=part_dim)

    def _raw_create(self, client: Any, physical: str, schema: Any) -> None:
        client.create_collection(physical, schema=schema, consistency_level=_STRONG, timeout=self.timeout_s)

    def _create_index(self, physical: str) -> None:
        from pymilvus import MilvusClient

        last: EmbeddError | None = None
        for choice in _INDEX_CHOICES:
            params = MilvusClient.prepare_index_params()
            params.add_index(field_name="vector", index_name="vector", **choice)
            try:
                self._call(
                    f"create a {choice['index_type']} index on {physical}",
                    lambda c: c.create_index(physical, params, timeout=self.timeout_s),
                )
                self.index_types[physical] = choice["index_type"]
                return
            except EmbeddError as err:
                if err.code is Code.UNAVAILABLE:
                    raise
                last = err
                log.warning("index %s refused on %s: %s", choice["index_type"], physical, err.message)
        assert last is not None
        raise last

    def _open(self, physical: str) -> _Layout:
        layout, _ = self._describe_layout(physical)
        indexes = self._call(f"list indexes of {physical}", lambda c: c.list_indexes(physical))
        if not indexes:  # created just before a crash: finish the job
            self._create_index(physical)
        self._call(f"load {physical}", lambda c: c.load_collection(physical, timeout=max(self.timeout_s, 60)))
        return layout

    def ensure(self, model: str, collection: str, dim: int, *, for_rebuild: bool = False) -> None:
        """Make ``collection`` (the public alias) usable for ``model``'s ``dim``-wide vectors.

        Idempotent; migrates a pre-existing real collection of that name (module
        docstring). A collection holding vectors of another dim raises
        ``UNAVAILABLE``: those vectors came from another model, and only a
        ``clear_existing`` rebuild can replace them. That rebuild passes
        ``for_rebuild=True``: the old set is then opened as it is (it keeps
        answering searches by stored track) and the rebuild gets the new dim.
        """
        names = self._list()
        physical = self._alias_target(collection, names)
        if physical is None and collection in names:
            physical = self._migrate(model, collection, dim)
        if physical is None:
            for candidate in (f"{collection}__legacy", f"{collection}__base"):
                if candidate in names:  # an interrupted migration or first creation
                    layout, fields = self._describe_layout(candidate)
                    if self._compatible(fields, layout, dim):
                        physical = candidate
            if physical is None:
                physical = f"{collection}__base"
                if physical not in names:
                    self._create(model, physical, dim)
            self._call(
                f"create alias {collection}", lambda c: c.create_alias(physical, collection, timeout=self.timeout_s)
            )
        layout = self._open(physical)
        # The live set stays registered even when its width is wrong for this model:
        # searches by stored track and an open rebuild still use it, and every write
        # checks the vector's width anyway.
        self._models[model] = _Model(name=model, public=collection, layout=layout)
        if layout.dim != dim and not for_rebuild:
            raise EmbeddError(
                Code.UNAVAILABLE,
                f"Milvus collection {collection} holds {layout.dim}-dim vectors but model {model} produces "
                f"{dim}-dim ones; run a clear_existing batch to rebuild it.",
            )

    def _migrate(self, model: str, public: str, dim: int) -> str:
        """Turn a real collection named ``public`` into ``<public>__legacy`` behind the alias ``public``."""
        layout, fields = self._describe_layout(public)
        legacy = f"{public}__legacy"
        self._call(
            f"rename {public} to {legacy}",
            lambda c: c.rename_collection(public, legacy, timeout=self.timeout_s),
        )
        if self._compatible(fields, layout, dim):
            target = legacy
            log.warning("migrated real Milvus collection %s to %s behind alias %s", public, legacy, public)
        else:
            target = f"{public}__base"
            self._create(model, target, dim)
            log.warning(
                "real Milvus collection %s has a foreign schema; kept as %s, new vectors go to %s",
                public,
                legacy,
                target,
            )
        self._call(f"create alias {public}", lambda c: c.create_alias(target, public, timeout=self.timeout_s))
        return target

    def _model(self, model: str) -> _Model:
        try:
            return self._models[model]
        except KeyError:
            raise EmbeddError(Code.INTERNAL, f"the store was not prepared for model {model} (call ensure).") from None

    def _target(self, model: str, target: RebuildHandle | None) -> tuple[str, _Layout]:
        """(collection name to address, its layout): the alias for live data, the physical one for a rebuild."""
        m = self._model(model)
        if target is None:
            return m.public, m.layout
        if target.model != model:
            raise EmbeddError(Code.INTERNAL, f"rebuild handle for {target.model} used with model {model}.")
        layout = self._rebuild_layouts.get(target.physical)
        if layout is None:
            layout = self._open(target.physical)
            self._rebuild_layouts[target.physical] = layout
        return target.physical, layout

    # -- rows ------------------------------------------------------------------------------

    def _check_vector(self, model: str, vector: np.ndarray, dim: int, what: str) -> np.ndarray:
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != dim:
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"{what} has {vec.shape[0]} dimensions but model {model} stores {dim}-dim vectors.",
            )
        if not np.isfinite(vec).all():
            raise EmbeddError(Code.BAD_REQUEST, f"{what} for model {model} contains NaN or infinite values.")
        return vec

    def _entities(self, model: str, layout: _Layout, row: TrackRow, now: float) -> list[dict[str, Any]]:
        tid = row.track_id
        if not tid or len(tid.encode("utf-8")) > MAX_LEN["track_id"]:
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"track_id {tid[:40]!r} must be 1 to {MAX_LEN['track_id']} bytes of UTF-8.",
            )
        vec = self._check_vector(model, row.vector, layout.dim, f"the vector of track {tid}")
        base: dict[str, Any] = {
            "path": truncate_utf8(row.path, MAX_LEN["path"]),
            "title": truncate_utf8(row.title, MAX_LEN["title"]),
            "artist": truncate_utf8(row.artist, MAX_LEN["artist"]),
            "album": truncate_utf8(row.album, MAX_LEN["album"]),
            "model_id": truncate_utf8(row.model_id, MAX_LEN["model_id"]),
            "duration_s": float(row.duration_s),
            "file_size": int(row.file_size),
            "file_mtime": float(row.file_mtime),
            "embedded_at": float(row.embedded_at or now),
        }
        if not layout.split:
            return [{"track_id": tid, **base, "vector": vec}]
        padded = np.zeros(layout.parts * layout.part_dim, dtype=np.float32)
        padded[: layout.dim] = vec
        return [
            {
                "pk": f"{tid}#{i}",
                "track_id": tid,
                "part": i,
                **base,
                "vector": padded[i * layout.part_dim : (i + 1) * layout.part_dim],
            }
            for i in range(layout.parts)
        ]

    def upsert(self, model: str, rows: list[TrackRow], *, target: RebuildHandle | None = None) -> int:
        """Insert or replace the rows' vectors; returns the number of tracks written.

        Without ``target`` the live collection is written (and an open rebuild of
        the model in this process gets the same rows); with it, only the rebuild.
        Returns after Milvus acknowledged every row (the batch job's checkpoint
        condition).
        """
        if not rows:
            return 0
        name, layout = self._target(model, target)
        self._write(model, name, layout, rows)
        if target is None and model in self._rebuilds:
            rb = self._rebuilds[model]
            rb_name, rb_layout = self._target(model, rb)
            if rb_layout.dim == layout.dim:
                self._write(model, rb_name, rb_layout, rows)
        return len(rows)

    def _write(self, model: str, name: str, layout: _Layout, rows: list[TrackRow]) -> None:
        now = time.time()
        entities = [e for row in rows for e in self._entities(model, layout, row, now)]
        per_entity = layout.part_dim * 4 + 8 * 1024
        chunk = max(1, _UPSERT_BYTES // per_entity)
        for start in range(0, len(entities), chunk):
            part = entities[start : start + chunk]
            self._call(f"upsert into {name}", lambda c: c.upsert(name, part, timeout=max(self.timeout_s, 30)))

    def delete(self, model: str, track_ids: Iterable[str], *, target: RebuildHandle | None = None) -> None:
        """Remove the tracks' vectors (absent ones are ignored)."""
        ids = list(track_ids)
        if not ids:
            return
        name, layout = self._target(model, target)
        self._delete(name, layout, ids)
        if target is None and model in self._rebuilds:
            rb_name, rb_layout = self._target(model, self._rebuilds[model])
            self._delete(rb_name, rb_layout, ids)

    def _delete(self, name: str, layout: _Layout, ids: list[str]) -> None:
        keys = ids if not layout.split else [f"{t}#{i}" for t in ids for i in range(layout.parts)]
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            self._call(f"delete from {name}", lambda c: c.delete(name, ids=batch, timeout=self.timeout_s))

    def count(self, model: str, *, target: RebuildHandle | None = None) -> int:
        """Number of tracks stored (read-your-writes)."""
        name, layout = self._target(model, target)
        flt = "part == 0" if layout.split else ""
        res = self._call(
            f"count {name}",
            lambda c: c.query(
                name, filter=flt, output_fields=["count(*)"], consistency_level=_STRONG, timeout=self.timeout_s
            ),
            loads=name,
        )
        return int(res[0]["count(*)"]) if res else 0

    def get_vector(self, model: str, track_id: str, *, target: RebuildHandle | None = None) -> np.ndarray | None:
        """The stored vector of ``track_id`` (float32), or None when the track has none."""
        name, layout = self._target(model, target)
        level = _STRONG if target is not None else self._read_level(model)
        vectors = self._fetch_vectors(name, layout, [track_id], level=level)
        hit = vectors.get(track_id)
        return None if hit is None else hit[0]

    def _fetch_vectors(
        self,
        name: str,
        layout: _Layout,
        track_ids: list[str],
        meta: bool = False,
        level: str = _STRONG,
        *,
        whole_rows: bool = False,
    ) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """Full vectors (and metadata, or every stored field) of the tracks that have them all."""
        extra = _ROW_FIELDS if whole_rows else (_META_FIELDS if meta else ())
        fields = ["track_id", "vector", *extra]
        out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        if not layout.split:
            for start in range(0, len(track_ids), _FETCH_TRACKS):
                batch = track_ids[start : start + _FETCH_TRACKS]
                rows = self._call(
                    f"read vectors from {name}",
                    lambda c: c.query(
                        name,
                        filter=_in_list("track_id", batch),
                        output_fields=fields,
                        consistency_level=level,
                        timeout=self.timeout_s,
                    ),
                    loads=name,
                )
                for r in rows:
                    out[r["track_id"]] = (np.asarray(r["vector"], dtype=np.float32), r)
            return out
        per = max(1, _FETCH_TRACKS // 2)
        for start in range(0, len(track_ids), per):
            batch = track_ids[start : start + per]
            pks = [f"{t}#{i}" for t in batch for i in range(layout.parts)]
            rows = self._call(
                f"read vectors from {name}",
                lambda c: c.query(
                    name,
                    filter=_in_list("pk", pks),
                    output_fields=[*fields, "part"],
                    consistency_level=level,
                    timeout=max(self.timeout_s, 30),
                ),
                loads=name,
            )
            by_track: dict[str, dict[int, Any]] = {}
            for r in rows:
                by_track.setdefault(r["track_id"], {})[int(r["part"])] = r
            for tid, parts in by_track.items():
                if len(parts) != layout.parts:
                    continue  # a partly written track cannot be scored; the batch job rewrites it
                full = np.concatenate([np.asarray(parts[i]["vector"], dtype=np.float32) for i in range(layout.parts)])
                out[tid] = (full[: layout.dim], parts[0])
        return out

    def fingerprints(
        self, model: str, *, page_size: int = 1000, target: RebuildHandle | None = None
    ) -> Iterator[Fingerprint]:
        """Every stored track's (track_id, file_size, file_mtime), read page by page.

        Paged through a Milvus query iterator so a large library never sits in
        memory at once; the caller compares with the files on disk.
        """
        name, layout = self._target(model, target)
        flt = "part == 0" if layout.split else ""
        it = self._call(
            f"scan {name}",
            lambda c: c.query_iterator(
                name,
                batch_size=page_size,
                filter=flt,
                output_fields=["track_id", "file_size", "file_mtime"],
                consistency_level=_STRONG,
                timeout=self.timeout_s,
            ),
            loads=name,
        )
        try:
            while True:
                page = self._call(f"scan {name}", lambda _c: it.next())
                if not page:
                    break
                for r in page:
                    yield Fingerprint(str(r["track_id"]), int(r["file_size"]), float(r["file_mtime"]))
        finally:
            try:
                it.close()
            except Exception:  # the server may be gone; the iterator holds nothing we must release
                pass

    # -- search ----------------------------------------------------------------------------

    def search(
        self,
        model: str,
        vector: np.ndarray,
        limit: int,
        exclude_track_ids: Iterable[str] = (),
    ) -> list[Hit]:
        """The ``limit`` stored tracks closest (cosine) to ``vector``, best first."""
        m = self._model(model)
        layout = m.layout
        vec = self._check_vector(model, vector, layout.dim, "the query vector")
        if not np.any(vec):
            raise EmbeddError(Code.BAD_REQUEST, f"the query vector for model {model} is all zeros.")
        exclude = [t for t in exclude_track_ids]
        if limit < 1:
            return []
        if layout.split:
            hits = self._search_split(m.public, layout, vec, limit, exclude, self._read_level(model))
            self._strong_next.discard(model)
            return hits
        flt = _in_list("track_id", exclude, negate=True) if exclude else ""
        level = self._read_level(model)
        res = self._call(
            f"search {m.public}",
            lambda c: c.search(
                m.public,
                data=[vec],
                limit=limit,
                filter=flt,
                output_fields=list(_META_FIELDS),
                search_params={"metric_type": "COSINE", "params": {"ef": max(64, limit)}},
                consistency_level=level,
                timeout=self.timeout_s,
            ),
            loads=m.public,
        )
        hits = [self._hit(h.get("track_id", h.get("id")), float(h["distance"]), h["entity"]) for h in res[0]]
        hits.sort(key=lambda h: -h.score)
        self._strong_next.discard(model)
        return hits

    def _read_level(self, model: str) -> str:
        return _STRONG if model in self._strong_next else _SESSION

    @staticmethod
    def _hit(track_id: Any, score: float, entity: dict[str, Any]) -> Hit:
        return Hit(
            track_id=str(track_id),
            score=score,
            path=str(entity.get("path", "")),
            title=str(entity.get("title", "")),
            artist=str(entity.get("artist", "")),
            album=str(entity.get("album", "")),
        )

    def _search_split(
        self, name: str, layout: _Layout, vec: np.ndarray, limit: int, exclude: list[str], level: str
    ) -> list[Hit]:
        padded = np.zeros(layout.parts * layout.part_dim, dtype=np.float32)
        padded[: layout.dim] = vec
        per_part = min(16_384, limit + 16)
        ex = (" and " + _in_list("track_id", exclude, negate=True)) if exclude else ""
        candidates: dict[str, None] = {}  # ordered set
        for i in range(layout.parts):
            q = padded[i * layout.part_dim : (i + 1) * layout.part_dim]
            if not np.any(q):
                continue  # cosine with a zero part is undefined; the other parts find the candidates
            res = self._call(
                f"search {name}",
                lambda c: c.search(
                    name,
                    data=[q],
                    limit=per_part,
                    filter=f"part == {i}{ex}",
                    output_fields=["track_id"],
                    search_params={"metric_type": "COSINE", "params": {"ef": max(64, per_part)}},
                    consistency_level=level,
                    timeout=self.timeout_s,
                ),
                loads=name,
            )
            for h in res[0]:
                candidates[str(h["entity"]["track_id"])] = None
        if not candidates:
            return []
        full = self._fetch_vectors(name, layout, list(candidates), meta=True, level=level)
        qn = float(np.linalg.norm(vec.astype(np.float64)))
        scored = []
        for tid, (v, meta) in full.items():
            vn = float(np.linalg.norm(v.astype(np.float64)))
            score = float(np.dot(vec.astype(np.float64), v.astype(np.float64)) / (qn * vn)) if vn > 0 else 0.0
            scored.append(self._hit(tid, score, meta))
        scored.sort(key=lambda h: -h.score)
        return scored[:limit]

    # -- rebuilds --------------------------------------------------------------------------

    def begin_rebuild(self, model: str, tag: str, dim: int | None = None) -> RebuildHandle:
        """Open (create, or reopen after a crash) the rebuild collection of ``model`` named by ``tag``.

        ``tag`` must be stable across restarts of the job (its job id). ``dim``
        defaults to the model's current dim; a new model may bring another one.
        """
        m = self._model(model)
        dim = dim or m.layout.dim
        physical = f"{m.public}__r_{_sanitize_tag(tag)}"
        names = self._list()
        committed = self._alias_target(m.public, names) == physical
        resumed = physical in names
        if resumed:
            layout = self._open(physical)
            if layout.dim != dim:
                raise EmbeddError(
                    Code.INTERNAL,
                    f"rebuild collection {physical} holds {layout.dim}-dim vectors, not {dim}.",
                )
        else:
            layout = self._create(model, physical, dim)
        self._rebuild_layouts[physical] = layout
        handle = RebuildHandle(
            model=model, public=m.public, physical=physical, tag=tag, dim=dim, resumed=resumed, committed=committed
        )
        if not committed:
            self._rebuilds[model] = handle
        return handle

    def carry_over(self, handle: RebuildHandle, track_ids: Iterable[str]) -> int:
        """Copy the live rows of ``track_ids`` into the rebuild; returns how many had one.

        Tracks that failed during a rebuild keep the vectors they had, so that the
        switch loses nothing. Only possible while the rebuild keeps the live width
        (new weights of another width make the old vectors useless anyway).
        """
        m = self._model(handle.model)
        if m.layout.dim != handle.dim:
            return 0
        ids = list(dict.fromkeys(track_ids))
        copied = 0
        for start in range(0, len(ids), _FETCH_TRACKS):
            found = self._fetch_vectors(m.public, m.layout, ids[start : start + _FETCH_TRACKS], whole_rows=True)
            rows = [
                TrackRow(track_id=tid, vector=vector, **{f: row[f] for f in _ROW_FIELDS if row.get(f) is not None})
                for tid, (vector, row) in found.items()
            ]
            if rows:
                self.upsert(handle.model, rows, target=handle)
                copied += len(rows)
        return copied

    def list_rebuilds(self, model: str) -> list[str]:
        """Physical rebuild collections of ``model`` that no alias points at (pending or stale)."""
        m = self._model(model)
        names = self._list()
        live = self._alias_target(m.public, names)
        prefix = f"{m.public}__r_"
        return sorted(n for n in names if n.startswith(prefix) and n != live)

    def commit_rebuild(self, handle: RebuildHandle) -> None:
        """Point the public alias at the rebuilt collection, then drop the old ones. Idempotent."""
        m = self._model(handle.model)
        self._call(
            f"switch alias {handle.public} to {handle.physical}",
            lambda c: c.alter_alias(handle.physical, handle.public, timeout=self.timeout_s),
        )
        layout = self._rebuild_layouts.get(handle.physical) or self._open(handle.physical)
        m.layout = layout
        self._strong_next.add(handle.model)
        self._rebuilds.pop(handle.model, None)
        prefix = f"{handle.public}__"
        for name in self._list():
            if name.startswith(prefix) and name != handle.physical:
                self._call(f"drop {name}", lambda c: c.drop_collection(name, timeout=self.timeout_s))
                self._rebuild_layouts.pop(name, None)

    def abort_rebuild(self, handle: RebuildHandle) -> bool:
        """Drop the rebuild collection (the live one is untouched); False if it was already live or gone."""
        self._rebuilds.pop(handle.model, None)
        self._rebuild_layouts.pop(handle.physical, None)
        names = self._list()
        if handle.physical not in names or self._alias_target(handle.public, names) == handle.physical:
            return False
        self._call(f"drop {handle.physical}", lambda c: c.drop_collection(handle.physical, timeout=self.timeout_s))
        return True

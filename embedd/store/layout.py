"""What embedd's Milvus collections look like: names, schema, rows. Pure: no Milvus calls.

Schema (one per physical collection; "schema 2", the current one). The field
names are the original system's where it had one, so that its readers work on
embedd's collections unchanged (``anns_field="embedding"``,
``output_fields=["name"]``, filters ``name in [...]`` / ``name not in [...]``):

=============== ================================================================
``track_id``    VARCHAR(256), the primary key (plain layout): Navidrome's media_file id
``pk``, ``part`` split layout only: primary key ``"<track_id>#<i>"`` and part number i
``name``        VARCHAR(512), "Artist - Title", with a scalar index (INVERTED, or
                Trie on servers before 2.4) that serves ``name in [...]`` filters
``path`` ...    path, title, artist, album, model_id (VARCHAR), duration_s,
                file_size, file_mtime, embedded_at
``embedding``   FLOAT_VECTOR, the model's vector (split layout: one part of it)
=============== ================================================================

Schema 1 (embedd before the rename: the vector field was ``vector``, no
``name``) is recognised and copied into schema 2 without re-embedding (see
:mod:`embedd.store.collections`). Anything else is *foreign*: embedd reads none
of it and never writes to or drops it.

Physical names, all derived from the public name ``P`` (the catalogue's
``embedding``, ``mert_embedding``, ``latent_embedding``):

- ``P__base``: embedd's first set; ``P__r_<tag>``: a ``clear_existing`` rebuild;
  ``P__m_<suffix>``: a schema-1 collection ``P__<suffix>`` copied to schema 2.
  These are embedd's *own* collections, the only ones it ever drops itself.
- ``P__legacy`` (``P__legacy_2``, ...): a foreign collection that held the public
  name, moved aside when embedd's set took the name over. Kept until the
  operator drops it (``drop_legacy``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from embedd.errors import Code, EmbeddError

# VARCHAR limits, in bytes (Milvus counts bytes in 2.3 and characters later: bytes are safe for both).
MAX_LEN: dict[str, int] = {
    "track_id": 256,
    "name": 512,
    "path": 4096,
    "title": 1024,
    "artist": 1024,
    "album": 1024,
    "model_id": 512,
}
VECTOR_FIELD = "embedding"
PREVIOUS_VECTOR_FIELD = "vector"  # schema 1
META_FIELDS = ("path", "title", "artist", "album")
ROW_FIELDS = (*META_FIELDS, "duration_s", "model_id", "file_size", "file_mtime", "embedded_at")
SCHEMA_VERSION = 2
SERVER_MAX_DIM = 32_768  # Milvus servers' default proxy.maxDimension
HNSW = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 50, "efConstruction": 250}}
VECTOR_INDEX_CHOICES: tuple[dict[str, Any], ...] = (
    HNSW,
    {"index_type": "AUTOINDEX", "metric_type": "COSINE", "params": {}},
    {"index_type": "FLAT", "metric_type": "COSINE", "params": {}},
)
# INVERTED: Milvus Lite and servers from 2.4; Trie: the only VARCHAR index of 2.3 servers.
NAME_INDEX_CHOICES = ("INVERTED", "Trie")


class Kind(enum.Enum):
    """Whose a physical collection is, read from its schema."""

    CURRENT = "current"  # embedd, schema 2
    PREVIOUS = "previous"  # embedd, schema 1: copied to schema 2 on first use
    FOREIGN = "foreign"  # anything else (the original system's collections)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes without splitting a character."""
    # Lone surrogates (file names decoded with surrogateescape) become "?": Milvus wants valid UTF-8.
    raw = text.encode("utf-8", errors="replace")
    return raw[:max_bytes].decode("utf-8", errors="ignore")


def display_name(artist: str, title: str, path: str = "", track_id: str = "") -> str:
    """The ``name`` field: "Artist - Title" as the original system wrote it, else what is known."""
    artist, title = artist.strip(), title.strip()
    if artist and title:
        return f"{artist} - {title}"
    return title or artist or os.path.splitext(os.path.basename(path))[0] or track_id


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
    path: str = ""  # the file the vector was made from: finds a track again under a new id


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """A stored vector that belongs to ``new`` now (same file, new media_file id): the new display fields."""

    old_id: str
    new_id: str
    path: str
    title: str
    artist: str
    album: str
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
class LegacyCollection:
    """A foreign collection under or beside a public name: the original system's data, kept."""

    collection: str  # its name now
    public: str  # the public name it belongs to
    model: str
    rows: int | None  # None when Milvus would not say
    serving: bool  # it still holds the public name (embedd's own set is not complete yet)

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """How a physical collection stores a model's vectors."""

    physical: str
    dim: int  # the model's full vector dim
    parts: int  # 1 = plain (track_id primary key); >1 = split rows "<track_id>#<i>"
    part_dim: int  # the vector field's dim
    kind: Kind = Kind.CURRENT

    @property
    def split(self) -> bool:
        return self.parts > 1

    @property
    def vector_field(self) -> str:
        return PREVIOUS_VECTOR_FIELD if self.kind is Kind.PREVIOUS else VECTOR_FIELD


# ---------------------------------------------------------------- names


def base_name(public: str) -> str:
    return f"{public}__base"


def rebuild_name(public: str, tag: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_]", "_", tag)
    if not clean:
        raise EmbeddError(Code.INTERNAL, f"rebuild tag {tag!r} has no usable characters for a Milvus name.")
    return f"{public}__r_{clean[:120]}"


def migrated_name(public: str, physical: str) -> str:
    """Where the schema-1 collection ``physical`` (``<public>__<suffix>``) is copied to."""
    return f"{public}__m_{physical[len(public) + 2 :]}"


def is_own(public: str, name: str) -> bool:
    """One of embedd's own physical collections for ``public`` (the only ones it drops by itself)."""
    return name == base_name(public) or name.startswith((f"{public}__r_", f"{public}__m_"))


def is_legacy(public: str, name: str) -> bool:
    return re.fullmatch(re.escape(public) + r"__legacy(_[0-9]+)?", name) is not None


def free_legacy_name(public: str, names: Iterable[str]) -> str:
    taken = set(names)
    name, n = f"{public}__legacy", 1
    while name in taken:
        n += 1
        name = f"{public}__legacy_{n}"
    return name


# ---------------------------------------------------------------- schema


def describe(physical: str, desc: dict[str, Any]) -> Layout:
    """The layout of a collection from ``describe_collection``; foreign ones get ``Kind.FOREIGN``."""
    from pymilvus import DataType

    fields = {f["name"]: f for f in desc["fields"]}
    kind = Kind.FOREIGN
    tid = fields.get("track_id")
    key_ok = tid is not None and tid.get("type") == DataType.VARCHAR and (
        tid.get("is_primary") or ("pk" in fields and fields["pk"].get("is_primary"))
    )
    if key_ok and all(f in fields for f in ROW_FIELDS):
        if VECTOR_FIELD in fields and "name" in fields:
            kind = Kind.CURRENT
        elif PREVIOUS_VECTOR_FIELD in fields:
            kind = Kind.PREVIOUS
    vec = fields.get(PREVIOUS_VECTOR_FIELD if kind is Kind.PREVIOUS else VECTOR_FIELD) or {}
    part_dim = int(vec.get("params", {}).get("dim", 0))
    parts, dim = 1, part_dim
    m = re.search(r"dim=(\d+);parts=(\d+)", desc.get("description") or "")
    if "part" in fields and m:
        dim, parts = int(m.group(1)), int(m.group(2))
    return Layout(physical=physical, dim=dim, parts=parts, part_dim=part_dim, kind=kind)


def schema_for(model: str, dim: int, parts: int) -> Any:
    """A pymilvus schema of the current version for ``dim``-wide vectors in ``parts`` parts."""
    from pymilvus import DataType, MilvusClient

    part_dim = -(-dim // parts)
    schema = MilvusClient.create_schema(
        auto_id=False,
        enable_dynamic_field=False,
        description=f"embedd schema {SCHEMA_VERSION} model={model};dim={dim};parts={parts}",
    )
    if parts == 1:
        schema.add_field("track_id", DataType.VARCHAR, is_primary=True, max_length=MAX_LEN["track_id"])
    else:
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=MAX_LEN["track_id"] + 8)
        schema.add_field("track_id", DataType.VARCHAR, max_length=MAX_LEN["track_id"])
        schema.add_field("part", DataType.INT64)
    schema.add_field("name", DataType.VARCHAR, max_length=MAX_LEN["name"])
    for field in (*META_FIELDS, "model_id"):
        schema.add_field(field, DataType.VARCHAR, max_length=MAX_LEN[field])
    schema.add_field("duration_s", DataType.DOUBLE)
    schema.add_field("file_size", DataType.INT64)
    schema.add_field("file_mtime", DataType.DOUBLE)
    schema.add_field("embedded_at", DataType.DOUBLE)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=part_dim)
    return schema


# ---------------------------------------------------------------- rows


def quote(value: str) -> str:
    """A Milvus expression string literal (JSON escaping is a subset Milvus parses)."""
    return json.dumps(value, ensure_ascii=False)


def in_list(field: str, values: Iterable[str], negate: bool = False) -> str:
    items = ", ".join(quote(v) for v in values)
    return f"{field} {'not in' if negate else 'in'} [{items}]"


def check_vector(model: str, vector: np.ndarray, dim: int, what: str) -> np.ndarray:
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vec.shape[0] != dim:
        raise EmbeddError(
            Code.BAD_REQUEST,
            f"{what} has {vec.shape[0]} dimensions but model {model} stores {dim}-dim vectors.",
        )
    if not np.isfinite(vec).all():
        raise EmbeddError(Code.BAD_REQUEST, f"{what} for model {model} contains NaN or infinite values.")
    return vec


def entities(model: str, layout: Layout, row: TrackRow, now: float) -> list[dict[str, Any]]:
    """The Milvus rows of one track: one (plain) or ``layout.parts`` (split)."""
    tid = row.track_id
    if not tid or len(tid.encode("utf-8")) > MAX_LEN["track_id"]:
        raise EmbeddError(
            Code.BAD_REQUEST,
            f"track_id {tid[:40]!r} must be 1 to {MAX_LEN['track_id']} bytes of UTF-8.",
        )
    vec = check_vector(model, row.vector, layout.dim, f"the vector of track {tid}")
    base: dict[str, Any] = {
        "name": truncate_utf8(display_name(row.artist, row.title, row.path, tid), MAX_LEN["name"]),
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
        return [{"track_id": tid, **base, VECTOR_FIELD: vec}]
    padded = np.zeros(layout.parts * layout.part_dim, dtype=np.float32)
    padded[: layout.dim] = vec
    return [
        {
            "pk": f"{tid}#{i}",
            "track_id": tid,
            "part": i,
            **base,
            VECTOR_FIELD: padded[i * layout.part_dim : (i + 1) * layout.part_dim],
        }
        for i in range(layout.parts)
    ]


def upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 Milvus row as a schema-2 one: the vector field renamed, ``name`` added."""
    out = {k: v for k, v in record.items() if k != PREVIOUS_VECTOR_FIELD}
    out[VECTOR_FIELD] = np.asarray(record[PREVIOUS_VECTOR_FIELD], dtype=np.float32)
    name = display_name(str(record.get("artist", "")), str(record.get("title", "")), str(record.get("path", "")),
                        str(record.get("track_id", "")))  # fmt: skip
    out["name"] = truncate_utf8(name, MAX_LEN["name"])
    return out

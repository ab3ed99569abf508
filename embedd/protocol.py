"""Protocol v1 on the wire: frames, request schemas, responses, vectors.

Everything a client can get wrong about the *shape* of a request is decided
here, in one place, so a handler receives valid, typed arguments or never runs.
What the arguments *mean* (does the file exist, is the model loaded) is the
handlers' business.

Frames are a 4-byte big-endian length and one msgpack map. The decoder checks
the length before it buffers a single byte of the body, so a hostile length
prefix costs nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import struct
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal

import msgpack
import msgspec
import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import DEFAULT_JOB_MODELS, MODEL_NAMES

__all__ = [
    "FrameDecoder",
    "Handler",
    "OP_SCHEMAS",
    "Request",
    "encode_frame",
    "encode_vector",
    "error_response",
    "parse_request",
    "success_response",
]

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_ID_LENGTH = 256



def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def encode_frame(message: dict[str, Any]) -> bytes:
    """One complete frame (length prefix + msgpack map)."""
    body = _pack(message)
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies, rejecting bad lengths up front.

    ``feed`` only buffers; ``next_body`` hands out one complete body at a time,
    so the server takes exactly as many requests as it is willing to run and
    leaves the rest in the buffer (and stops reading the socket). Consumed bytes
    are cut from the buffer once per ``feed``, so a burst of thousands of
    pipelined frames costs linear time.
    """

    __slots__ = ("_buffer", "_max_frame", "_offset")

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self._offset = 0
        self._max_frame = max_frame

    @property
    def pending(self) -> int:
        """Bytes received and not yet handed out as a body."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def _next_length(self) -> int | None:
        if len(self._buffer) - self._offset < HEADER_SIZE:
            return None
        (length,) = HEADER.unpack_from(self._buffer, self._offset)
        if length == 0 or length > self._max_frame:
            raise EmbeddError(Code.BAD_FRAME, f"frame length {length} is outside 1..{self._max_frame} bytes")
        return length

    def next_body(self) -> bytes | None:
        """The next complete frame's body, or None; raises bad_frame on a bad length."""
        length = self._next_length()
        if length is None or self.pending - HEADER_SIZE < length:
            return None
        start = self._offset + HEADER_SIZE
        self._offset = start + length
        return bytes(self._buffer[start : self._offset])

    def incomplete(self) -> bool:
        """Whether the buffer ends inside a frame (what EOF must not cut)."""
        if not self.pending:
            return False
        try:
            length = self._next_length()
        except EmbeddError:
            return True
        return length is None or self.pending - HEADER_SIZE < length


def decode_body(body: bytes) -> dict[str, Any]:
    """The msgpack map in a frame body; bad_frame for anything else."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for malformed input
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise EmbeddError(Code.BAD_FRAME, f"frame body is not one msgpack value ({detail})") from None
    if not isinstance(message, dict):
        raise EmbeddError(Code.BAD_FRAME, f"frame body is a msgpack {type(message).__name__}, not a map")
    for key in message:
        if not isinstance(key, str):
            raise EmbeddError(Code.BAD_FRAME, f"frame map has a non-string key {key!r:.60}")
    return message


# ---------------------------------------------------------------------------
# Request schemas. One msgspec Struct per op: unknown keys and wrong types are
# rejected by msgspec with a message naming the argument.
# ---------------------------------------------------------------------------

if TYPE_CHECKING:
    ModelName = str
else:
    # One literal per catalogued model: msgspec rejects any other name.
    ModelName = Literal[MODEL_NAMES]
VectorFormat = Literal["bin", "list"]
DEFAULT_MODEL = "muq"  # the contract's default for embed_file and embed_text


class Args(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every op's arguments."""

    streaming: ClassVar[bool] = False

    def check(self) -> None:
        """Cross-argument rules msgspec cannot express; raise ValueError naming the argument."""


class NoArgs(Args):
    pass


class UnloadArgs(Args):
    model: ModelName | None = None


class EmbedFileArgs(Args):
    path: str | None = None
    data: bytes | None = None
    filename: str | None = None
    models: Annotated[list[ModelName], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [DEFAULT_MODEL]
    )
    store: bool = False
    track_id: str | None = None
    name: str | None = None
    vector_format: VectorFormat = "bin"

    def check(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("give exactly one of 'path' or 'data'")
        if self.path is not None and not self.path:
            raise ValueError("'path' is empty")
        if self.data is not None and not self.filename:
            raise ValueError("'data' needs 'filename'")
        if self.path is not None and self.filename is not None:
            raise ValueError("'filename' goes with 'data', not with 'path'")
        if self.store and not self.track_id:
            raise ValueError("'store': true requires 'track_id'")
        if len(set(self.models)) != len(self.models):
            raise ValueError("'models' lists a model twice")


class EmbedTextArgs(Args):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=10_000)]
    model: ModelName = DEFAULT_MODEL
    vector_format: VectorFormat = "bin"

    def check(self) -> None:
        if not self.text.strip():
            raise ValueError("'text' is blank")


class SearchArgs(Args):
    model: ModelName
    vector: bytes | list[float] | None = None
    track_id: str | None = None
    text: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    exclude_track_ids: Annotated[list[str], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)

    def check(self) -> None:
        given = [k for k in ("vector", "track_id", "text") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'vector', 'track_id' or 'text'")
        if isinstance(self.vector, bytes) and (len(self.vector) == 0 or len(self.vector) % 4):
            raise ValueError("'vector' bin must hold a whole, non-zero number of float32 values")
        if isinstance(self.vector, list) and not self.vector:
            raise ValueError("'vector' is empty")
        if self.text is not None and not self.text.strip():
            raise ValueError("'text' is blank")


class BatchStartArgs(Args):
    models: Annotated[list[ModelName], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_JOB_MODELS)
    )
    clear_existing: bool = False
    shard: str | None = None

    def check(self) -> None:
        if len(set(self.models)) != len(self.models):
            raise ValueError("'models' lists a model twice")


class BatchWatchArgs(Args):
    streaming: ClassVar[bool] = True
    interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=3600)] = 1.0


class BatchFailuresArgs(Args):
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class DropLegacyArgs(Args):
    model: ModelName | None = None  # None: every model
    confirm: bool = False  # False: only say what would be dropped


class TakeOverArgs(Args):
    model: ModelName | None = None  # None: every model
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None  # the original rows' id
    dry_run: bool = False  # True: only say what would be adopted


class RecommendSeed(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One seed of ``recommend``: a stored track, a query vector, or a text (see docs/protocol.md)."""

    track_id: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    weight: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    source: Annotated[str, msgspec.Meta(max_length=100)] = ""
    played_at: str | None = None  # RFC 3339; accepted (the fork sends it), not used for ranking
    embedding: bytes | list[float] | None = None  # a query vector in one model's space (list or float32 bin)
    text: Annotated[str, msgspec.Meta(max_length=10_000)] | None = None  # embedded through MuQ-MuLan
    embeddings: dict[ModelName, bytes | list[float]] | None = None  # one vector per model (an audio file's)


MERGE_STRATEGIES = ("union", "intersection", "priority")
DEFAULT_MODEL_PRIORITIES = {"muq": 1, "mert": 2, "latent": 3}


class RecommendArgs(Args):
    seeds: Annotated[list[RecommendSeed], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 25
    models: Annotated[list[ModelName], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [DEFAULT_MODEL]
    )
    merge_strategy: Literal["union", "intersection", "priority"] = "union"
    model_priorities: dict[ModelName, int] = msgspec.field(default_factory=dict)
    min_model_agreement: Annotated[int, msgspec.Meta(ge=1)] = 1
    diversity: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    exclude_track_ids: Annotated[list[str], msgspec.Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    library_ids: Annotated[list[int], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)
    disliked_track_ids: Annotated[list[str], msgspec.Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    disliked_artist_ids: Annotated[list[str], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)
    dislike_strength: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    negative_prompts: Annotated[list[Annotated[str, msgspec.Meta(max_length=10_000)]], msgspec.Meta(max_length=64)] = (
        msgspec.field(default_factory=list)
    )
    negative_prompt_penalty: Annotated[float, msgspec.Meta(ge=0.3, le=1.0)] = 0.85
    negative_embeddings: dict[ModelName, Annotated[list[bytes | list[float]], msgspec.Meta(max_length=64)]] = (
        msgspec.field(default_factory=dict)
    )
    # The fork's request carries these; accepted, not used for ranking.
    mode: Annotated[str, msgspec.Meta(max_length=100)] = ""
    user_id: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    user_name: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    exclude_playlist_ids: Annotated[list[str], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)

    def check(self) -> None:
        if len(set(self.models)) != len(self.models):
            raise ValueError("'models' lists a model twice")
        for i, seed in enumerate(self.seeds):
            if seed.played_at is not None:
                try:
                    datetime.datetime.fromisoformat(seed.played_at.replace("Z", "+00:00").replace("z", "+00:00"))
                except ValueError:
                    raise ValueError(f"argument 'seeds[{i}].played_at': {seed.played_at[:60]!r} is not an RFC 3339 time") from None
            if isinstance(seed.embedding, bytes) and (len(seed.embedding) == 0 or len(seed.embedding) % 4):
                raise ValueError(f"argument 'seeds[{i}].embedding': a bin must hold a whole, non-zero number of float32 values")
            if isinstance(seed.embedding, list) and not seed.embedding:
                raise ValueError(f"argument 'seeds[{i}].embedding' is empty")
            if seed.text is not None and not seed.text.strip():
                raise ValueError(f"argument 'seeds[{i}].text' is blank")
            if sum(x is not None for x in (seed.embedding, seed.text, seed.embeddings)) > 1:
                raise ValueError(f"seeds[{i}]: give at most one of 'embedding', 'embeddings' or 'text'")
            if not seed.track_id and seed.embedding is None and seed.text is None and not seed.embeddings:
                raise ValueError(f"seeds[{i}] has neither 'track_id', 'embedding', 'embeddings' nor 'text'")
            for model, v in (seed.embeddings or {}).items():
                if (isinstance(v, bytes) and (not v or len(v) % 4)) or (isinstance(v, list) and not v):
                    raise ValueError(f"argument 'seeds[{i}].embeddings.{model}' is not a vector")
        for i, text in enumerate(self.negative_prompts):
            if not text.strip():
                raise ValueError(f"argument 'negative_prompts[{i}]' is blank")
        for model, vectors in self.negative_embeddings.items():
            for i, v in enumerate(vectors):
                if (isinstance(v, bytes) and (not v or len(v) % 4)) or (isinstance(v, list) and not v):
                    raise ValueError(f"argument 'negative_embeddings.{model}[{i}]' is not a vector")


OP_SCHEMAS: dict[str, type[Args]] = {
    "ping": NoArgs,
    "status": NoArgs,
    "unload": UnloadArgs,
    "embed_file": EmbedFileArgs,
    "embed_text": EmbedTextArgs,
    "search": SearchArgs,
    "batch_start": BatchStartArgs,
    "batch_progress": NoArgs,
    "batch_watch": BatchWatchArgs,
    "batch_cancel": NoArgs,
    "batch_pause": NoArgs,
    "batch_resume": NoArgs,
    "batch_failures": BatchFailuresArgs,
    "drop_legacy": DropLegacyArgs,
    "recommend": RecommendArgs,
    "take_over": TakeOverArgs,
}

_NO_ARGS = NoArgs()


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    """How the server runs an op: the function, and whether it is instant or streams."""

    fn: Callable[[Any], Any]
    inline: bool = False  # synchronous and instant: answered without a task
    streaming: bool = False  # an async generator of (result, more)


class Request(msgspec.Struct, frozen=True):
    id: int | str | None
    op: str
    args: Args


def request_id(message: dict[str, Any]) -> int | str | None:
    """The id to echo, even for a request we are about to reject; None if it is unusable."""
    rid = message.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return None
    if isinstance(rid, int) and not -(2**63) <= rid < 2**64:
        return None
    if isinstance(rid, str) and len(rid) > MAX_ID_LENGTH:
        return None
    return rid


def parse_request(message: dict[str, Any]) -> Request:
    """Validate a decoded frame map into a Request; bad_request / unknown_op otherwise."""
    rid = message.get("id")
    if rid is not None and request_id(message) is None:
        raise EmbeddError(
            Code.BAD_REQUEST,
            f"'id' must be an integer, a string of at most {MAX_ID_LENGTH} characters, or nil",
        )
    op = message.get("op")
    if not isinstance(op, str):
        raise EmbeddError(Code.BAD_REQUEST, "the request has no 'op' string")
    schema = OP_SCHEMAS.get(op)
    if schema is None:
        raise EmbeddError(Code.UNKNOWN_OP, f"there is no op {op[:80]!r}")
    if len(message) == (2 if "id" in message else 1):
        if schema is NoArgs:
            return Request(rid, op, _NO_ARGS)  # the hot path: ping, status, progress
        fields = {}
    else:
        fields = {k: v for k, v in message.items() if k != "id" and k != "op"}
    try:
        args = msgspec.convert(fields, schema, strict=True)
        args.check()
    except msgspec.ValidationError as exc:
        raise EmbeddError(Code.BAD_REQUEST, f"{op}: {_explain(str(exc))}") from None
    except ValueError as exc:
        raise EmbeddError(Code.BAD_REQUEST, f"{op}: {exc}") from None
    return Request(rid, op, args)


def _explain(msgspec_message: str) -> str:
    """Turn msgspec's '... - at `$.limit`' into a sentence naming the argument."""
    text, _, where = msgspec_message.partition(" - at `$")
    if text.startswith("Object contains unknown field "):
        return f"unknown argument {text.removeprefix('Object contains unknown field ').strip('`')!r}"
    if text.startswith("Object missing required field "):
        return f"missing argument {text.removeprefix('Object missing required field ').strip('`')!r}"
    if where:
        path = where.rstrip("`").lstrip(".")
        if text.startswith("Invalid enum value ") and path.split("[")[0] in _CHOICES:
            value = text.removeprefix("Invalid enum value ")
            return f"argument {path!r}: {value} is not one of {', '.join(_CHOICES[path.split('[')[0]])}"
        return f"argument {path!r}: {text[0].lower()}{text[1:]}"
    return text


_CHOICES = {
    "model": MODEL_NAMES, "models": MODEL_NAMES, "vector_format": ("bin", "list"), "merge_strategy": MERGE_STRATEGIES,
}  # fmt: skip


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


def success_response(rid: int | str | None, result: dict[str, Any], *, more: bool | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"id": rid, "ok": True, "result": result}
    if more is not None:
        response["more"] = more
    return response


def error_response(rid: int | str | None, error: EmbeddError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": error.to_wire()}


def encode_vector(vector: np.ndarray, vector_format: str) -> bytes | list[float]:
    """A vector as the contract wants it: little-endian float32 bin, or a list of floats."""
    flat = np.asarray(vector, dtype="<f4").reshape(-1)
    if vector_format == "list":
        return flat.tolist()
    return flat.tobytes()


def decode_vector(value: bytes | list[float]) -> np.ndarray:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(value, dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)

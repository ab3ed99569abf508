"""Protocol v1 on the wire: frames, the request envelope, responses, vectors.

Everything a client can get wrong about the *shape* of a request is decided
by :func:`parse_request`, in one place, against the op's own ``Args`` Struct
(declared beside the op in :mod:`embedd.ops`), so an op receives valid, typed
arguments or never runs. What the arguments *mean* (does the file exist, is
the model loaded) is the op's business.

Frames are a 4-byte big-endian length and one msgpack map. The decoder checks
the length before it buffers a single byte of the body, so a hostile length
prefix costs nothing.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import msgpack
import msgspec
import numpy as np

from embedd.errors import Code, EmbeddError
from embedd.models import MODEL_NAMES

__all__ = [
    "Args",
    "FrameDecoder",
    "Handler",
    "NoArgs",
    "Request",
    "WireVector",
    "check_models",
    "encode_frame",
    "encode_vector",
    "error_response",
    "is_vector",
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
# Request schemas: each op's own Struct (in its module of embedd.ops) derives
# from Args. Unknown keys and wrong types are rejected by msgspec with a
# message naming the argument.
# ---------------------------------------------------------------------------

if TYPE_CHECKING:
    ModelName = str
else:
    # One literal per catalogued model: msgspec rejects any other name.
    ModelName = Literal[MODEL_NAMES]
VectorFormat = Literal["bin", "list"]
#: A vector on the wire: little-endian float32 ``bin``, or a list of numbers.
WireVector = bytes | list[float]
DEFAULT_MODEL = "muq"  # the contract's default for embed_file and embed_text


class Args(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every op's arguments."""

    streaming: ClassVar[bool] = False

    def check(self) -> None:
        """Cross-argument rules msgspec cannot express; raise ValueError naming the argument."""


class NoArgs(Args):
    pass


def check_models(models: list[str]) -> None:
    """The rule every op's ``models`` argument keeps: each model at most once (ValueError naming it)."""
    if len(set(models)) != len(models):
        raise ValueError("'models' lists a model twice")


def is_vector(value: WireVector) -> bool:
    """A wire vector with something in it: a whole, non-zero number of float32 values, or a non-empty list."""
    if isinstance(value, bytes):
        return bool(value) and len(value) % 4 == 0
    return bool(value)


_NO_ARGS = NoArgs()


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    """How the server runs an op: the function, and whether it is instant or streams."""

    fn: Callable[[Any], Any]
    inline: bool = False  # synchronous and instant: answered without a task
    streaming: bool = False  # an async generator of (result, more)
    admitted: bool = False  # takes an admission permit first (embedd.admission); False: never refused


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


def parse_request(message: dict[str, Any], schemas: Mapping[str, type[Args]]) -> Request:
    """Validate a decoded frame map against ``schemas`` (op -> its Args, :data:`embedd.ops.SCHEMAS`).

    bad_request or unknown_op, naming the culprit, for anything else.
    """
    rid = message.get("id")
    if rid is not None and request_id(message) is None:
        raise EmbeddError(
            Code.BAD_REQUEST,
            f"'id' must be an integer, a string of at most {MAX_ID_LENGTH} characters, or nil",
        )
    op = message.get("op")
    if not isinstance(op, str):
        raise EmbeddError(Code.BAD_REQUEST, "the request has no 'op' string")
    schema = schemas.get(op)
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
        raise EmbeddError(Code.BAD_REQUEST, f"{op}: {_explain(str(exc), schema)}") from None
    except ValueError as exc:
        raise EmbeddError(Code.BAD_REQUEST, f"{op}: {exc}") from None
    return Request(rid, op, args)


def _explain(msgspec_message: str, schema: type[Args]) -> str:
    """Turn msgspec's '... - at `$.limit`' into a sentence naming the argument."""
    text, _, where = msgspec_message.partition(" - at `$")
    if text.startswith("Object contains unknown field "):
        return f"unknown argument {text.removeprefix('Object contains unknown field ').strip('`')!r}"
    if text.startswith("Object missing required field "):
        return f"missing argument {text.removeprefix('Object missing required field ').strip('`')!r}"
    if where:
        path = where.rstrip("`").lstrip(".")
        choices = _choices(schema, path.split("[")[0].split(".")[0])
        if text.startswith("Invalid enum value ") and choices:
            value = text.removeprefix("Invalid enum value ")
            return f"argument {path!r}: {value} is not one of {', '.join(choices)}"
        return f"argument {path!r}: {text[0].lower()}{text[1:]}"
    return text


def _choices(schema: type[Args], field: str) -> tuple[str, ...]:
    """The values a ``Literal`` argument takes (inside a list or an optional too), for the error sentence."""
    hint = typing.get_type_hints(schema, include_extras=True).get(field)
    found: list[str] = []

    def walk(t: Any) -> None:
        if typing.get_origin(t) is Literal:
            found.extend(str(v) for v in typing.get_args(t))
        else:
            for inner in typing.get_args(t):
                walk(inner)

    walk(hint)
    return tuple(found)


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

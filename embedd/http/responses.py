"""JSON in and out: error bodies, status codes, vectors as arrays.

Every answer the HTTP face gives is built here, so that an error always has
the same shape (``{"error": sentence, "code": wire code}``) and the status
follows from the contract's code in one table.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from embedd.errors import Code, EmbeddError, Misuse

__all__ = ["STATUS", "decode_object", "error_response", "json_response", "jsonable"]

#: The HTTP status of each contract error code.
STATUS: dict[Code, int] = {
    Code.BAD_FRAME: 400,
    Code.BAD_REQUEST: 400,
    Code.UNKNOWN_OP: 404,
    Code.NOT_FOUND: 404,
    Code.FORBIDDEN: 403,
    Code.UNSUPPORTED: 422,
    Code.DECODE_ERROR: 422,
    Code.TOO_LARGE: 413,
    Code.BUSY: 409,
    Code.OVERLOADED: 503,
    Code.UNAVAILABLE: 503,
    Code.CANCELLED: 503,
    Code.INTERNAL: 500,
}
if set(STATUS) != set(Code):
    raise Misuse(f"HTTP statuses missing for {sorted(c.value for c in set(Code) - set(STATUS))}: add them to STATUS")

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def jsonable(value: Any) -> Any:
    """``value`` with every vector (float32 ``bin``) turned into a list of floats."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) % 4 == 0:
            return np.frombuffer(raw, dtype="<f4").tolist()
        return raw.hex()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    return _ENCODER.encode(jsonable(value))


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=encode(value), status=status, content_type="application/json", headers=headers)


def error_response(
    exc: EmbeddError, *, http_status: int | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    """The error body; ``extra`` keys go before ``error`` and ``code`` (the original API's ``status``)."""
    if exc.code is Code.OVERLOADED:
        headers = {**(headers or {}), "Retry-After": "1"}
    body = {**extra, "error": exc.message, "code": exc.code.value}
    return json_response(body, http_status or STATUS[exc.code], headers)


def decode_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; empty means ``{}``; bad_request for anything else."""
    if not body.strip():
        return {}
    try:
        value = _DECODER.decode(body)
    except msgspec.DecodeError as exc:
        raise EmbeddError(Code.BAD_REQUEST, f"the request body is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise EmbeddError(Code.BAD_REQUEST, f"the request body must be a JSON object, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )

"""JSON ⇄ protocol frames, for debugging the daemon with socat.

    python -m embedd.frame encode '{"op": "status"}'   > request.bin
    python -m embedd.frame decode < response.bin

``encode`` writes one frame per JSON request (argument, or one JSON document per
line on stdin). JSON has no bytes, so a value ``{"$file": "PATH"}`` becomes the
file's bytes and ``{"$base64": "..."}`` the decoded bytes (for ``data``). A
request that is not a JSON object, a file that cannot be read, or a frame over
the daemon's limit (``max_frame``: ``$EMBEDD_MAX_FRAME``, else 64 MiB; the daemon
would close the connection on it) is refused in one line, before anything is sent.
``decode`` reads frames until EOF and prints each as one line of JSON, with
``bin`` values shortened to a summary (``--full`` prints vectors as float lists).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from embedd.protocol import HEADER, encode_frame

__all__ = ["main"]


class Refused(Exception):
    """A request ``encode`` will not send; the message is one line."""


def _bytes_values(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$file"}:
            try:
                return Path(value["$file"]).read_bytes()
            except (OSError, TypeError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise Refused(f"cannot read the file of {json.dumps(value)}: {reason}") from None
        if set(value) == {"$base64"}:
            try:
                return base64.b64decode(value["$base64"], validate=True)
            except (TypeError, ValueError) as exc:
                raise Refused(f"{json.dumps(value)[:60]} is not valid base64: {exc}") from None
        return {k: _bytes_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_values(v) for v in value]
    return value


def _printable(value: Any, full: bool) -> Any:
    if isinstance(value, bytes):
        if len(value) % 4 == 0 and value:
            floats = np.frombuffer(value, dtype="<f4")
            if full:
                return floats.tolist()
            head = ", ".join(f"{x:.4f}" for x in floats[:4])
            return f"<bin {len(value)} bytes = {len(floats)} float32: [{head}{', ...' if len(floats) > 4 else ''}]>"
        return f"<bin {len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _printable(v, full) for k, v in value.items()}
    if isinstance(value, list):
        if not full and len(value) > 8 and all(isinstance(x, float) for x in value):
            return [*value[:4], f"... {len(value)} floats"]
        return [_printable(v, full) for v in value]
    return value


def max_frame() -> int:
    """The daemon's frame limit as this host's environment says it (the setting's default otherwise)."""
    from embedd.settings import Settings

    default = int(Settings.model_fields["max_frame"].default)
    try:
        return int(os.environ.get("EMBEDD_MAX_FRAME") or default)
    except ValueError:
        return default


def encode(requests: list[str], out: BinaryIO, limit: int | None = None) -> None:
    """Frame every request, or refuse (:class:`Refused`) before writing any."""
    limit = max_frame() if limit is None else limit
    frames = []
    for n, text in enumerate(requests, 1):
        try:
            message = json.loads(text)
        except ValueError as exc:
            raise Refused(f"request {n} is not valid JSON: {exc}") from None
        if not isinstance(message, dict):
            raise Refused(f"request {n} must be a JSON object, got {type(message).__name__}")
        frame = encode_frame(_bytes_values(message))
        if len(frame) - HEADER.size > limit:
            raise Refused(
                f"request {n} is {len(frame) - HEADER.size} bytes, over the daemon's frame limit of {limit} bytes "
                "(max_frame, EMBEDD_MAX_FRAME); give embed_file the file's path instead of its bytes"
            )
        frames.append(frame)
    for frame in frames:
        out.write(frame)
    out.flush()


def decode(stream: BinaryIO, full: bool) -> int:
    count = 0
    while True:
        header = stream.read(HEADER.size)
        if not header:
            return count
        if len(header) < HEADER.size:
            raise SystemExit("embedd.frame: stream ends inside a frame header")
        (length,) = HEADER.unpack(header)
        body = stream.read(length)
        if len(body) < length:
            raise SystemExit(f"embedd.frame: stream ends inside a frame ({len(body)} of {length} bytes)")
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
        print(json.dumps(_printable(message, full), ensure_ascii=False), flush=True)
        count += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedd.frame", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    enc = sub.add_parser("encode", help="JSON request(s) → frames on stdout")
    enc.add_argument("request", nargs="*", help="JSON object(s); default: one per line on stdin")
    dec = sub.add_parser("decode", help="frames on stdin → JSON lines")
    dec.add_argument("--full", action="store_true", help="print vectors in full")
    args = parser.parse_args(argv)
    if args.action == "encode":
        requests = args.request or [line for line in sys.stdin if line.strip()]
        try:
            encode(requests, sys.stdout.buffer)
        except Refused as exc:
            print(f"embedd.frame: {exc}", file=sys.stderr)
            return 2
        return 0
    return 0 if decode(sys.stdin.buffer, args.full) else 1


if __name__ == "__main__":
    raise SystemExit(main())

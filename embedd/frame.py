"""JSON ⇄ protocol frames, for debugging the daemon with socat.

    python -m embedd.frame encode '{"op": "status"}'   > request.bin
    python -m embedd.frame decode < response.bin

``encode`` writes one frame per JSON request (argument, or one JSON document per
line on stdin). JSON has no bytes, so a value ``{"$file": "PATH"}`` becomes the
file's bytes and ``{"$base64": "..."}`` the decoded bytes (for ``data``).
``decode`` reads frames until EOF and prints each as one line of JSON, with
``bin`` values shortened to a summary (``--full`` prints vectors as float lists).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from embedd.protocol import HEADER, encode_frame

__all__ = ["main"]


def _bytes_values(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$file"}:
            return Path(value["$file"]).read_bytes()
        if set(value) == {"$base64"}:
            return base64.b64decode(value["$base64"])
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


def encode(requests: list[str], out: BinaryIO) -> None:
    for text in requests:
        message = json.loads(text)
        if not isinstance(message, dict):
            raise SystemExit("embedd.frame: a request must be a JSON object")
        out.write(encode_frame(_bytes_values(message)))
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
        encode(requests, sys.stdout.buffer)
        return 0
    return 0 if decode(sys.stdin.buffer, args.full) else 1


if __name__ == "__main__":
    raise SystemExit(main())

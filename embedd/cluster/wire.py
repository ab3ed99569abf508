"""The daemon ↔ bridge messages: an 8-byte length, then a pickle (parent and child trust each other)."""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

__all__ = ["read_message", "write_message"]

_LENGTH = struct.Struct("<Q")


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of file (the other side went away)."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        return pickle.loads(await reader.readexactly(_LENGTH.unpack(head)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    body = pickle.dumps(message, protocol=5)
    writer.write(_LENGTH.pack(len(body)) + body)
    await writer.drain()

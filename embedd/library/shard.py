"""Shards: which of n daemons that split one library owns a track (``--shard i/n``).

Track ``t`` belongs to shard ``i/n`` (0-based ``i``) when ``blake2b-64(t) mod
n == i``; see :func:`shard_of`. Its own module because both the reader (which
filters rows by shard inside SQLite) and the batch job (which checks tracks and
reports which shard it ran) need it, and because the hash is a contract between
daemons on different hosts and versions: it must never change by accident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from embedd.errors import Code, EmbeddError

__all__ = ["Shard", "parse_shard", "shard_of"]


def shard_of(track_id: str, n: int) -> int:
    """The shard (0..n-1) a track belongs to among ``n``.

    A stable hash (first 8 bytes of BLAKE2b over the UTF-8 id, big-endian, mod
    n), not Python's salted ``hash()``: daemons on different hosts, Python
    versions and restarts must agree on it, or a library split would overlap
    or leave holes.
    """
    digest = hashlib.blake2b(track_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): ``0/1`` is the whole library."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise EmbeddError(Code.BAD_REQUEST, f"shard {self.index}/{self.count} is out of range: 'i/n' needs n >= 1 and 0 <= i < n.")

    def contains(self, track_id: str) -> bool:
        return self.count == 1 or shard_of(track_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


_SHARD_RE = re.compile(r"([0-9]{1,9})/([0-9]{1,9})", re.ASCII)


def parse_shard(text: object, *, argument: str = "shard") -> Shard:
    """Parse the wire form ``"i/n"``: ``i`` is 0-based, ``0 <= i < n``, ``n >= 1``.

    ``argument`` names the request argument in the error sentence.
    """
    if not isinstance(text, str):
        raise EmbeddError(Code.BAD_REQUEST, f"argument {argument!r} must be a string like '0/2', not {type(text).__name__}.")
    m = _SHARD_RE.fullmatch(text)
    if m is None:
        raise EmbeddError(Code.BAD_REQUEST, f"argument {argument!r} must look like 'i/n' (e.g. '0/2'), got {text!r}.")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise EmbeddError(Code.BAD_REQUEST, f"argument {argument!r} is {text!r}, but the shard count n must be at least 1.")
    if index >= count:
        raise EmbeddError(
            Code.BAD_REQUEST, f"argument {argument!r} is {text!r}, but the shard index i is 0-based and must be below n ({count})."
        )
    return Shard(index, count)

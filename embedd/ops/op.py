"""What an op is: its name, its request and response Structs, and the function that does it.

Every op module of :mod:`embedd.ops` declares its ops as :class:`Op` values in
a module-level ``OPS`` tuple; :mod:`embedd.ops` collects them. The request
(:class:`~embedd.protocol.Args`) is validated before the op runs; the answer
is an instance of the op's :class:`Result`, which becomes the wire map in one
place (:func:`to_wire`), so what the daemon sends is what the Struct declares:
a key the Struct lacks cannot reach a client unnoticed (``Result`` forbids
unknown fields when built from a view, and says so in the log), and the
protocol reference and the Go client's types are checked against the same
Structs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from embedd.errors import Misuse
from embedd.protocol import Args

if TYPE_CHECKING:
    from embedd.service import Service

__all__ = ["Op", "Result", "to_wire"]

R = TypeVar("R", bound="Result")

log = logging.getLogger(__name__)

#: What the log says when a subsystem's view does not match its Struct (tests look for it).
DRIFT = "does not describe what the daemon sends"
_DRIFTED: set[type] = set()

#: Binary payloads (float32 vectors) stay bytes on the wire: msgpack ``bin``.
_KEEP = (bytes, bytearray, memoryview)


class Result(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every op's answer (and of the typed parts inside one)."""

    @classmethod
    def of(cls: type[R], view: Mapping[str, Any]) -> R:
        """This Struct from a plain view map (a subsystem's ``view()``), every key declared.

        A view that drifted from its Struct is the daemon's bug, not the client's:
        the answer still goes out (the view as it is, so that ``status`` keeps
        working for the operator), and the log says which Struct and key, once
        per Struct. The test daemons fail on that line (``tests/daemon.py``).
        """
        try:
            return msgspec.convert(view, cls, builtin_types=_KEEP)
        except msgspec.ValidationError as exc:
            if cls not in _DRIFTED:
                _DRIFTED.add(cls)
                log.error("%s %s: %s (sent as it is)", cls.__name__, DRIFT, exc)
            return view  # type: ignore[return-value]  # to_wire sends a map as it is


def to_wire(result: Result) -> dict[str, Any]:
    """The map a client receives (msgpack on the socket, JSON over HTTP): fields in declared order."""
    return msgspec.to_builtins(result, builtin_types=_KEEP)


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """One use case the daemon serves, on the socket and at ``POST /v1/<name>`` alike.

    ``run(service, args)`` returns the ``result`` Struct (or an awaitable of it;
    a streaming op returns an async iterator of ``(result, more)``). ``admitted``
    ops take an admission permit (:mod:`embedd.admission`) before they run; the
    operator's and status ops are never refused. ``inline`` ops are synchronous
    and instant: answered without a task.
    """

    name: str
    args: type[Args]
    result: type[Result]
    run: Callable[[Service, Any], Any]
    admitted: bool = False
    inline: bool = False
    streaming: bool = False

    def __post_init__(self) -> None:
        if self.inline and self.streaming:
            raise Misuse(f"op {self.name!r}: an op is inline or streaming, not both")
        if self.streaming != self.args.streaming:
            raise Misuse(f"op {self.name!r}: its Args say streaming={self.args.streaming}, the Op {self.streaming}")

    @property
    def summary(self) -> str:
        """The first line of the op function's docstring: what the reference says it does."""
        return (self.run.__doc__ or "").strip().splitlines()[0] if self.run.__doc__ else ""

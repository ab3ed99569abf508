"""Admission: one bound on the work the daemon takes in, for the socket and HTTP alike.

Every request that does work for a client (``embed_file``, ``embed_text``,
``search``, ``recommend``: decodes, model passes, Milvus reads and writes)
takes a permit before its handler runs and holds it until its answer is
ready, the way text-embeddings-inference admits a request: a try-acquire,
never a wait. Two bounds, both settings:

* requests in progress (``max_inflight_requests``);
* bytes they hold (``max_inflight_mb``): the binary payloads of their
  arguments, an ``embed_file`` upload's ``data`` above all. One request larger
  than the whole bound is still admitted when nothing else holds bytes, so
  the bound never refuses a request the frame limit accepted.

A request past either bound is answered ``overloaded``, naming the bound,
before any work is done: no decode started, no model or Milvus call queued.

Which ops are admitted is each op's declaration (``Op(..., admitted=True)``
in :mod:`embedd.ops`); the operator's and status ops (``ping``, ``status``,
``unload``, ``drop_legacy``, ``take_over``, every ``batch_*``) are never
refused: they are cheap, or are the operator's way out of an overload.

It sits where every request goes through: :meth:`Admission.wrap` wraps the op
table of :func:`embedd.ops.build_handlers` once (like
:meth:`embedd.metrics.Metrics.instrument`, which counts its refusals), and the
socket's connections and every HTTP route dispatch through that table. An
HTTP route that runs several ops for one request (the similarity routes)
takes one permit for the whole route (:meth:`Admission.hold`); the ops it
runs inside it take none of their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from embedd.errors import Code, EmbeddError
from embedd.protocol import Handler

__all__ = ["Admission", "held_bytes"]

MiB = 1024 * 1024

#: Set while a task runs under a permit: the ops it runs are part of the admitted request.
_admitted: contextvars.ContextVar[bool] = contextvars.ContextVar("embedd_admitted", default=False)


def held_bytes(args: Any) -> int:
    """Bytes a request's arguments hold: their binary payloads (an upload's ``data``, a ``bin`` vector)."""
    total = 0
    for name in getattr(args, "__struct_fields__", ()):
        value = getattr(args, name, None)
        if isinstance(value, (bytes, bytearray, memoryview)):
            total += len(value)
    return total


class Admission:
    """The permits: requests in progress and the bytes they hold (event loop only)."""

    __slots__ = ("bytes_held", "bytes_limit", "in_flight", "limit", "overloaded")

    def __init__(self, *, max_requests: int, max_bytes: int) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("admission bounds must be positive")
        self.limit = int(max_requests)
        self.bytes_limit = int(max_bytes)
        self.in_flight = 0
        self.bytes_held = 0
        self.overloaded = {"requests": 0, "bytes": 0}  # refusals, by the bound that refused

    @classmethod
    def from_settings(cls, settings: Any) -> Admission:
        return cls(max_requests=settings.max_inflight_requests, max_bytes=settings.max_inflight_mb * MiB)

    # -- permits -----------------------------------------------------------------------
    def _acquire(self, what: str, nbytes: int) -> None:
        if self.in_flight >= self.limit:
            self.overloaded["requests"] += 1
            raise EmbeddError(
                Code.OVERLOADED,
                f"{what} refused: the daemon already has {self.limit} requests in progress "
                "(max_inflight_requests); retry later",
            )
        if nbytes and self.bytes_held and self.bytes_held + nbytes > self.bytes_limit:
            self.overloaded["bytes"] += 1
            raise EmbeddError(
                Code.OVERLOADED,
                f"{what} refused: requests in progress already hold {_mib(self.bytes_held)} of request data "
                f"and this one brings {_mib(nbytes)}, over the {_mib(self.bytes_limit)} limit "
                "(max_inflight_mb); retry later",
            )
        self.in_flight += 1
        self.bytes_held += nbytes

    def _release(self, nbytes: int) -> None:
        self.in_flight -= 1
        self.bytes_held -= nbytes

    @contextlib.contextmanager
    def permit(self, what: str, nbytes: int = 0, *, nest: bool = True) -> Iterator[None]:
        """Hold a permit for the block (``overloaded`` at once if none is free).

        Inside a block that holds one (in this task, or a task it started), a
        permit is free: the work is part of the request already admitted.
        ``nest=False`` leaves that mark unset (an async generator, whose steps
        may run in other contexts).
        """
        if _admitted.get():
            yield
            return
        self._acquire(what, nbytes)
        token = _admitted.set(True) if nest else None
        try:
            yield
        finally:
            if token is not None:
                _admitted.reset(token)
            self._release(nbytes)

    def hold(self, what: str) -> contextlib.AbstractContextManager[None]:
        """One permit for a whole HTTP route that runs several ops; the ops inside take none."""
        return self.permit(what)

    # -- the op table ------------------------------------------------------------------
    def wrap(self, handlers: dict[str, Handler]) -> dict[str, Handler]:
        """The same op table, each admitted op (``Handler.admitted``) taking a permit first; the others as they are."""
        return {
            op: dataclasses.replace(h, fn=self._wrap(op, h)) if h.admitted else h
            for op, h in handlers.items()
        }

    def _wrap(self, op: str, handler: Handler) -> Callable[[Any], Any]:
        fn, permit = handler.fn, self.permit

        if handler.inline:

            def inline(args: Any) -> Any:
                with permit(op, held_bytes(args)):
                    return fn(args)

            return inline

        if handler.streaming:

            async def streaming(args: Any) -> AsyncIterator[Any]:
                with permit(op, held_bytes(args), nest=False):
                    async for item in fn(args):
                        yield item

            return streaming

        async def call(args: Any) -> Any:
            with permit(op, held_bytes(args)):
                return await fn(args)

        return call

    # -- status ------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """Plain data for status and metrics."""
        return {
            "in_flight": self.in_flight,
            "limit": self.limit,
            "bytes_held": self.bytes_held,
            "bytes_limit": self.bytes_limit,
            "overloaded_total": sum(self.overloaded.values()),
            "overloaded": dict(self.overloaded),
        }


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f} MiB"

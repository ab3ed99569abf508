"""The op table: every use case the daemon serves, one module each, and the one way a request reaches it.

Each module of this package declares its ops (``OPS``: :class:`~embedd.ops.op.Op`
values, each with a request and a response Struct and the function that does
the work); this package finds them, so a new op is one new module here and
nothing else: the socket (:mod:`embedd.server.connection`) and ``POST
/v1/<op>`` (:mod:`embedd.http.v1`) both dispatch through :func:`build_handlers`,
:mod:`embedd.admission` admits the ops that do work, the protocol reference in
``docs/protocol.md`` and the Go client's op list are generated from the table
(:mod:`embedd.ops.reference`), and the Go client's response types are checked
against the response Structs (``tests/test_go_types.py``).

The HTTP faces of other shapes (the original REST API, AudioMuse-AI's
similarity routes) translate their JSON to and from these ops.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from embedd.errors import Misuse
from embedd.ops.op import Op, Result, to_wire
from embedd.protocol import Args, Handler, Request
from embedd.protocol import parse_request as _parse_request

if TYPE_CHECKING:
    from embedd.service import Service

__all__ = ["OPS", "SCHEMAS", "Op", "Result", "build_handlers", "parse_request", "to_wire"]

#: Modules of this package that hold the machinery, not ops.
_FRAMEWORK = frozenset({"op", "reference", "views"})


def _discover() -> dict[str, Op]:
    table: dict[str, Op] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _FRAMEWORK or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        declared = getattr(module, "OPS", None)
        if not declared:
            raise Misuse(f"{module.__name__} declares no OPS; every module of embedd.ops holds at least one op")
        for op in declared:
            if op.name in table:
                raise Misuse(f"op {op.name!r} is declared twice ({module.__name__})")
            table[op.name] = op
    return table


#: Every op, by name.
OPS: Mapping[str, Op] = _discover()
#: Every op's request Struct, by name (what :func:`parse_request` validates against).
SCHEMAS: Mapping[str, type[Args]] = {name: op.args for name, op in OPS.items()}


def parse_request(message: dict[str, Any]) -> Request:
    """Validate a decoded frame map against the op table; bad_request / unknown_op otherwise."""
    return _parse_request(message, SCHEMAS)


def build_handlers(service: Service, ops: Mapping[str, Op] = OPS) -> dict[str, Handler]:
    """The op table bound to a service: what the socket and HTTP dispatch to (answers as wire maps)."""
    return {name: _bind(service, op) for name, op in ops.items()}


def _bind(service: Service, op: Op) -> Handler:
    run = functools.partial(op.run, service)
    if op.inline:

        def inline(args: Any) -> dict[str, Any]:
            return to_wire(run(args))

        fn: Any = inline
    elif op.streaming:

        async def streaming(args: Any) -> AsyncIterator[tuple[dict[str, Any], bool]]:
            frames = run(args)
            try:
                async for result, more in frames:
                    yield to_wire(result), more
            finally:
                await frames.aclose()

        fn = streaming
    else:

        async def call(args: Any) -> dict[str, Any]:
            return to_wire(await run(args))

        fn = call
    return Handler(fn, inline=op.inline, streaming=op.streaming, admitted=op.admitted)

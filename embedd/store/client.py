"""One pymilvus client, and the mapping of Milvus failures to contract errors.

Milvus unreachable, timing out, or not ready → ``EmbeddError(UNAVAILABLE)``
naming the URI; the client is rebuilt on the next call, so a restarted server is
picked up. A read of a collection a restarted server has not loaded yet loads it
and retries once. Any other Milvus refusal is a bug and raises
``EmbeddError(INTERNAL)`` naming the operation and the collection.

Failures are told apart by exception type and error code, never by message text
(it changes between Milvus and pymilvus versions). The codes come from three
places: gRPC status codes (a call that got no answer), pymilvus' own client
codes (:class:`pymilvus.client.types.Status`), and the server's error codes
(Milvus' ``merr`` package since 2.3, each sent with the legacy
``common_pb2.ErrorCode`` pymilvus keeps as ``compatible_code``, and a
``retriable`` flag). pymilvus wraps what it raises (a retry that gave up wraps
the last failure, an unexpected exception is wrapped as a ``MilvusException``),
so a failure is classified by its whole ``__cause__`` chain.

Not thread-safe, like the store that owns it: one thread calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from embedd.errors import Code, EmbeddError

log = logging.getLogger("embedd.store")

T = TypeVar("T")

STRONG = "Strong"
SESSION = "Session"

#: gRPC outcomes of a call that got no answer from Milvus (pymilvus raises them
#: bare, or wraps them as the code of a ``MilvusException`` when its retries ran out).
_GRPC_NO_ANSWER = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN"})
#: pymilvus ``Status.CONNECT_FAILED``, which is also the server's ``ErrServiceUnavailable``.
CONNECT_FAILED = 2
#: The server's ``ErrCollectionNotLoaded`` (Milvus Lite and servers alike).
COLLECTION_NOT_LOADED = 101
#: The server's ``ErrParameterInvalid`` and ``ErrParameterTooLarge``.
PARAMETER_INVALID = frozenset({1100, 1102})
#: The server's code for an error it has no code for: proxies before 2.5 send every
#: schema validation failure (a vector wider than ``proxy.maxDimension`` among them) so.
UNEXPECTED = 65535
#: Legacy codes of a server that is starting or stopping (the merr code is then 1,
#: which is also pymilvus' default for errors of its own, so the legacy code decides).
_LEGACY_NOT_READY = frozenset({56, 57})  # common_pb2.NotReadyServe, NotReadyCoordActivating
#: Legacy codes of a refused parameter.
_LEGACY_INVALID = frozenset({5, 7})  # common_pb2.IllegalArgument, IllegalDimension


def is_lite_uri(uri: str) -> bool:
    """A path is Milvus Lite (a child process over that file); http(s)/tcp/grpc URIs are servers."""
    return not uri.startswith(("http://", "https://", "tcp://", "grpc://"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes, each once (pymilvus raises ``e from e``: a cause may be itself)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _no_answer(exc: BaseException) -> bool:
    """This one exception (not its causes) says Milvus did not answer or is not ready to."""
    import grpc  # pymilvus and grpc load with the store's first failure, not with embedd.store
    from pymilvus.exceptions import ConnectError, ConnectionNotExistException, MilvusException, MilvusUnavailableException

    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return isinstance(code, grpc.StatusCode) and code.name in _GRPC_NO_ANSWER
    if isinstance(exc, (MilvusUnavailableException, ConnectError, ConnectionNotExistException)):
        return True
    if isinstance(exc, MilvusException):
        if isinstance(exc.code, grpc.StatusCode):  # pymilvus' retries gave up on a gRPC failure
            return exc.code.name in _GRPC_NO_ANSWER
        # ``retriable`` (pymilvus 2.6+): the server itself says the same request may
        # succeed later (not ready, a node or channel not available, rate limited).
        return exc.code == CONNECT_FAILED or exc.compatible_code in _LEGACY_NOT_READY or getattr(exc, "retriable", False)
    return False


def is_unavailable(exc: BaseException) -> bool:
    """Milvus is unreachable, timed out, or not ready: the dependency is down, not the request wrong."""
    return any(_no_answer(e) for e in _chain(exc))


def is_not_loaded(exc: BaseException) -> bool:
    """A read of a collection that is released (a restarted server, a rename on Milvus Lite)."""
    from pymilvus.exceptions import MilvusException

    return isinstance(exc, MilvusException) and exc.code == COLLECTION_NOT_LOADED


def is_refused_parameter(exc: BaseException) -> bool:
    """Milvus refused a request's parameters, the way it refuses a vector wider than it allows.

    No code names the width itself: recent servers answer ``ErrParameterInvalid``,
    servers before 2.5 their catch-all ``UNEXPECTED``; so a caller that can cure a
    width refusal (the split layout) can only try and see.
    """
    from pymilvus.exceptions import MilvusException

    return isinstance(exc, MilvusException) and (
        exc.code in PARAMETER_INVALID or exc.code == UNEXPECTED or exc.compatible_code in _LEGACY_INVALID
    )


class Milvus:
    """The connection to one Milvus (Lite file or server) with the error mapping of the contract."""

    def __init__(self, uri: str, timeout_s: float, *, dedicated: bool = False) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self.is_lite = is_lite_uri(uri)
        #: A connection of its own rather than pymilvus' shared one (one per address in the
        #: process): the store's read lane must not queue behind the write lane's large
        #: upserts on one gRPC connection. gRPC also pools sub-channels process-wide by
        #: address, hence the local sub-channel pool.
        self.dedicated = dedicated
        #: Called before each upsert call of a write (:func:`embedd.store.rows.write`), on
        #: this connection's thread: :class:`~embedd.store.io.StoreIO` makes a write wait
        #: there while reads are in progress (reads first, between upserts).
        self.between_writes: Callable[[], None] | None = None
        self._client_obj: Any = None

    def client(self) -> Any:
        if self._client_obj is None:
            from pymilvus import MilvusClient

            if self.is_lite:
                Path(self.uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
            options: dict[str, int] = {}
            if self.is_lite:
                # pymilvus pings an idle channel every 10 s; Milvus Lite's in-process server
                # answers that with GOAWAY "too_many_pings" (a log line each time, nothing else)
                options["grpc.keepalive_permit_without_calls"] = 0
            if self.dedicated:
                options["grpc.use_local_subchannel_pool"] = 1
            try:
                self._client_obj = MilvusClient(
                    uri=self.uri, timeout=self.timeout_s, **({"dedicated": True} if self.dedicated else {}),
                    **({"grpc_options": options} if options else {}),
                )  # fmt: skip
            except Exception as exc:  # any failure to connect is "the dependency is down"
                raise self._unavailable(exc) from exc
        return self._client_obj

    def _unavailable(self, exc: BaseException) -> EmbeddError:
        detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return EmbeddError(Code.UNAVAILABLE, f"Milvus at {self.uri} is unreachable or not ready ({detail}).")

    def call(self, what: str, fn: Callable[[Any], T], *, loads: str | None = None) -> T:
        """Run one Milvus operation, mapping failures to contract errors.

        ``loads``: the collection a read needs loaded. A restarted server may
        come back with collections released; such a read loads it and retries once.
        """
        client = self.client()
        try:
            try:
                return fn(client)
            except Exception as exc:
                if loads is None or not is_not_loaded(exc):
                    raise
                log.info("Milvus collection %s was not loaded; loading it", loads)
                client.load_collection(loads, timeout=max(self.timeout_s, 60))
                return fn(client)
        except EmbeddError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                self.reset()
                raise self._unavailable(exc) from exc
            detail = getattr(exc, "message", None) or str(exc)
            raise EmbeddError(Code.INTERNAL, f"Milvus at {self.uri} refused to {what} ({detail}).") from exc

    def reset(self) -> None:
        client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken channel may fail; it is being dropped anyway
                pass

    # -- the few calls everyone needs ------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.call("list collections", lambda c: c.list_collections(timeout=self.timeout_s)))

    def describe(self, name: str) -> dict[str, Any]:
        return self.call(f"describe collection {name}", lambda c: c.describe_collection(name, timeout=self.timeout_s))

    def alias_target(self, public: str, names: list[str]) -> str | None:
        """The physical collection the alias ``public`` points at; None if no such alias."""
        if public in names:
            return None  # a real collection holds the name
        if not self.call(f"look up {public}", lambda c: c.has_collection(public, timeout=self.timeout_s)):
            return None
        return str(self.describe(public)["collection_name"])

    def drop(self, name: str) -> None:
        self.call(f"drop {name}", lambda c: c.drop_collection(name, timeout=self.timeout_s))
        self.forget(name)

    def create_alias(self, physical: str, alias: str) -> None:
        self.call(f"create alias {alias}", lambda c: c.create_alias(physical, alias, timeout=self.timeout_s))
        self.forget(alias)

    def switch_alias(self, physical: str, alias: str) -> None:
        """Point ``alias`` at ``physical`` (atomic in Milvus)."""
        self.call(f"switch alias {alias} to {physical}", lambda c: c.alter_alias(physical, alias, timeout=self.timeout_s))
        self.forget(alias)

    def rename(self, old: str, new: str) -> None:
        self.call(f"rename {old} to {new}", lambda c: c.rename_collection(old, new, timeout=self.timeout_s))
        self.forget(old, new)

    def forget(self, *names: str) -> None:
        """Drop pymilvus' cached schemas of these names.

        pymilvus caches a collection's schema by name, process-wide, and keeps it
        across alias switches and renames: a query iterator or delete through an
        alias that now points at another collection would use the old primary key.
        """
        try:
            from pymilvus.client.cache import GlobalCache

            address = self.client()._get_connection().server_address
        except Exception:  # no connection (then nothing is cached for it) or another pymilvus
            return
        for name in names:
            GlobalCache.schema.invalidate(address, "", name)

    def load(self, name: str) -> None:
        self.call(f"load {name}", lambda c: c.load_collection(name, timeout=max(self.timeout_s, 60)))

    def row_count(self, name: str) -> int | None:
        """Rows of any collection, ours or not: ``count(*)`` when loaded, else Milvus' statistics."""
        try:
            res = self.call(
                f"count {name}",
                lambda c: c.query(
                    name, filter="", output_fields=["count(*)"], consistency_level=STRONG, timeout=self.timeout_s
                ),
            )
            return int(res[0]["count(*)"]) if res else 0
        except EmbeddError as err:
            if err.code is Code.UNAVAILABLE:
                raise
        try:  # not loaded (loading a foreign collection is not ours to do): the flushed-row statistics
            stats = self.call(f"read statistics of {name}", lambda c: c.get_collection_stats(name, timeout=self.timeout_s))
            return int(stats.get("row_count", 0))
        except EmbeddError as err:
            if err.code is Code.UNAVAILABLE:
                raise
            return None

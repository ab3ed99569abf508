"""``ping``: is the daemon there, and which version and protocol does it speak."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedd import PROTOCOL_VERSION
from embedd.ops.op import Op, Result
from embedd.protocol import NoArgs

if TYPE_CHECKING:
    from embedd.service import Service


class PingResult(Result):
    version: str
    protocol: int
    uptime_s: float


def ping(service: Service, _: NoArgs) -> PingResult:
    """Liveness: the daemon's version, protocol and uptime, answered at once."""
    return PingResult(version=service.version, protocol=PROTOCOL_VERSION, uptime_s=service.uptime_s)


OPS = (Op("ping", NoArgs, PingResult, ping, inline=True),)

"""Where ``--http`` listens: parsing ``HOST:PORT``, ``[IPv6]:PORT`` and ``unix:/path``.

Pure and strict, so that a bad address is a settings error with one sentence
before anything starts, and so that whether the address is reachable from
other hosts (and therefore needs a token) is decided in one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re

from embedd.errors import Misuse

__all__ = ["HttpAddress", "parse_http_address"]

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclasses.dataclass(frozen=True, slots=True)
class HttpAddress:
    """A TCP host and port, or a Unix socket path (``host`` None)."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect (no token is then required)."""
        if self.path is not None:
            return True
        if self.host is None:
            raise Misuse("an HttpAddress with neither a path nor a host: build it with parse_http_address()")
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: whatever it resolves to, assume others can reach it

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_http_address(text: str) -> HttpAddress:
    """``127.0.0.1:9002``, ``[::1]:9002``, ``localhost:9002`` or ``unix:/abs/path``; ValueError otherwise."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: the unix: socket path must be absolute")
        if len(os.fsencode(path)) > 107:
            raise ValueError(f"{text!r}: the socket path is longer than the 107 bytes a Unix socket allows")
        return HttpAddress(path=os.path.normpath(path))
    m = _HOST_PORT.match(text)
    if not m:
        raise ValueError(f"{text!r} is not HOST:PORT, [IPv6]:PORT or unix:/path")
    port = int(m["port"])
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is above 65535")
    if m["v6"] is not None:
        try:
            host = str(ipaddress.IPv6Address(m["v6"]))
        except ValueError:
            raise ValueError(f"{text!r}: {m['v6']!r} in brackets is not an IPv6 address") from None
        return HttpAddress(host=host, port=port)
    host = m["host"]
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
            raise ValueError(f"{text!r}: {host!r} is neither an IPv4 address nor a host name") from None
        host = host.lower()
    return HttpAddress(host=host, port=port)

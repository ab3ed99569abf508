"""The socket server: where the daemon listens, its connections, and its lifecycle.

The package is split along its concerns:

* :mod:`embedd.server.sites` — where we listen: our own socket path, sockets
  systemd passed us, the ``--http`` listener, all behind one interface, and the
  one way a socket path is claimed (lock file + stale-socket probe);
* :mod:`embedd.server.connection` — one msgpack client: framing, pipelining,
  backpressure;
* :mod:`embedd.server.core` — :class:`Server`: start-up, signals, shutdown in
  order under one deadline, and the op table every site serves.

Importers use only what is re-exported here.
"""

from __future__ import annotations

from embedd.errors import StartupError
from embedd.server.core import Server

__all__ = ["Server", "StartupError"]

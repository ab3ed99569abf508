"""Where the daemon's files live when nobody says: the socket and the data directory.

Owns the path defaults and the rules they follow, so the client (which has no
settings, only ``default_socket_path``) and the settings' defaults agree: systemd's
``RuntimeDirectory=`` / ``StateDirectory=`` win, then the XDG user directories,
then the system directories for root, else per-user fallbacks. Kept apart from
the settings model because these read the process's environment and identity,
not a setting.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_socket_path", "runtime_dir", "data_dir"]


def runtime_dir() -> Path:
    # systemd's RuntimeDirectory= wins; then the XDG user runtime dir; /run only for root.
    if d := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(d.split(":")[0])
    if d := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(d) / "embedd"
    if os.geteuid() == 0:
        return Path("/run/embedd")
    return Path(f"/tmp/embedd-{os.geteuid()}")


def data_dir() -> Path:
    """The default ``data_dir``: systemd's StateDirectory=, XDG_DATA_HOME, /var/lib for root, else ~/.local/share."""
    if d := os.environ.get("STATE_DIRECTORY"):
        return Path(d.split(":")[0])
    if d := os.environ.get("XDG_DATA_HOME"):
        return Path(d) / "embedd"
    if os.geteuid() == 0:
        return Path("/var/lib/embedd")
    return Path.home() / ".local" / "share" / "embedd"


def default_socket_path() -> Path:
    """Where client and daemon meet when neither is told otherwise."""
    return Path(os.environ.get("EMBEDD_SOCKET") or runtime_dir() / "embedd.sock")

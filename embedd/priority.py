"""Background threads at a lower CPU priority: the batch lane, graph builds, model compilation.

Linux gives each thread its own nice value, and threads (and OpenMP workers,
and compiler subprocesses) started from a thread inherit it. So a thread that
does background work lowers itself once, at its start, and everything it
spawns yields to the interactive work beside it. Elsewhere (no per-thread
nice value) the call does nothing but say why.
"""

from __future__ import annotations

import os
import threading

__all__ = ["lower_this_thread"]


def lower_this_thread(nice: int) -> str | None:
    """Run the calling thread at ``nice`` (0: leave it); None when done, else the reason it could not be."""
    if nice <= 0:
        return None
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:
        return str(exc)
    return None

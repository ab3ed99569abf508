"""Imported only by the decoder's forkserver (as its preload): die with the daemon.

Why: the decoder's worker processes are children of multiprocessing's
forkserver, which is a child of the daemon. A daemon that exits cleanly shuts
them down, but one that is SIGKILLed or OOM-killed cannot, and its forkserver
and workers used to live on as orphans holding memory (23 of them, 1.3 GB,
after a few kills). Linux's ``PR_SET_PDEATHSIG`` makes the kernel kill a
process when its parent dies, whatever the parent died of; the forkserver
asks for it here, as it starts, and each worker asks for it in
``embedd.audio.pool._worker_init``, so the chain ends with the daemon.
"""

from __future__ import annotations

import ctypes
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


die_with_parent()

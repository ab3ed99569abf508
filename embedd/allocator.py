"""The daemon's memory allocator: tcmalloc or jemalloc where the host has one, glibc's malloc otherwise.

Why it matters. A Music2Latent pass at real size makes activations of hundreds
of MB per operator (a 60 s chunk is 1024 x 5160 bins per channel). glibc's
malloc serves every block above 32 MiB with a fresh ``mmap`` and unmaps it when
it is freed, so every operator's output is new memory that the kernel faults in
and zeroes, page by page. Measured on the 2-core AVX-512 BF16 box: half the
CPU time of a bf16 pass was the kernel's (``sys`` 10 s against ``user`` 10 s,
3.8 million page faults). tcmalloc and jemalloc keep freed blocks for the next
operator: the same pass took 4.9 s instead of 11.5 s, with no faults
(``bench/allocator.py``; BENCHMARKS.md).

How. The allocator must be in place before the process's first ``malloc``, so
it cannot be switched from Python. ``embedd serve`` re-executes itself once
with the library in ``LD_PRELOAD`` (:func:`adopt`); PyTorch's own launcher
(``torch.backends.xeon.run_cpu --enable-tcmalloc``) does the same. The
re-executed daemon then restores the environment it was started with, so its
child processes (decoders, Milvus Lite, compilers) start as the operator
started the daemon: the choice is the daemon's own.

jemalloc serves blocks above 8 MiB from an arena that returns them to the
system at once (``oversize_threshold``), which is glibc's behaviour again; its
``MALLOC_CONF`` here turns that off and keeps freed memory until
:func:`release_free_memory` (called when models are unloaded) gives it back.
An operator's own ``MALLOC_CONF`` wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

__all__ = [
    "ALLOCATORS", "AllocatorMissing", "Plan", "adopt", "find_library", "in_use", "log_choice", "plan",
    "release_free_memory", "running", "worker_environment",
]  # fmt: skip

log = logging.getLogger(__name__)

Allocator = Literal["tcmalloc", "jemalloc", "system"]

#: The libraries each allocator is found as (``ctypes.util.find_library`` names), in order of preference.
ALLOCATORS: dict[str, tuple[str, ...]] = {
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "jemalloc": ("jemalloc",),
}
#: What ``auto`` tries, in order: both measured the same on a Music2Latent pass; tcmalloc needs no configuration.
AUTO_ORDER = ("tcmalloc", "jemalloc")
#: Set for the re-executed process: the environment as it was, which it restores (its child processes
#: run on what the operator chose); its presence also means "do not re-execute again".
REEXEC_MARK = "EMBEDD_ALLOCATOR_REEXEC"
#: Variables the re-execution sets, and restores after.
_SET = ("LD_PRELOAD", "MALLOC_CONF", "TCMALLOC_RELEASE_RATE", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: Where to get each one, for the message when it is asked for by name and missing.
INSTALL_HINT = {"tcmalloc": "Debian: apt install libtcmalloc-minimal4", "jemalloc": "Debian: apt install libjemalloc2"}


class AllocatorMissing(Exception):
    """``allocator`` names a library this host does not have."""


def find_library(name: str) -> str | None:
    """The shared library of allocator ``name`` on this host (a soname ld.so finds), or None."""
    for candidate in ALLOCATORS[name]:
        found = ctypes.util.find_library(candidate)
        if found:
            return found
    return None


@dataclass(frozen=True)
class Plan:
    """The allocator the daemon should run on, and the environment that gives it one."""

    name: Allocator
    library: str | None  # None for the system's malloc

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``environ`` with this allocator preloaded ahead of anything the operator preloads."""
        env = dict(environ)
        env[REEXEC_MARK] = json.dumps({k: environ.get(k) for k in _SET})
        if self.library is not None:
            env["LD_PRELOAD"] = " ".join(p for p in (self.library, environ.get("LD_PRELOAD", "")) if p)
        if self.name == "jemalloc":
            env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
        if self.name == "tcmalloc":
            # it gives freed pages back little by little (release rate 1), which a 60 s chunk's next layer faults
            # in again; kept instead, until release_free_memory
            env.setdefault("TCMALLOC_RELEASE_RATE", "0")
            # and it reports each block over 1 GiB on stderr (a 60 s fp32 chunk makes some)
            env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**62))
        return env


def plan(setting: str, find: Callable[[str], str | None] = find_library) -> Plan:
    """The allocator for ``setting`` (``auto``, ``system``, ``tcmalloc`` or ``jemalloc``).

    ``auto`` takes the first of :data:`AUTO_ORDER` the host has, else the system's.
    A name the host lacks raises :class:`AllocatorMissing` with how to install it.
    """
    if setting == "system":
        return Plan("system", None)
    names = AUTO_ORDER if setting == "auto" else (setting,)
    for name in names:
        library = find(name)
        if library is not None:
            return Plan(name, library)  # type: ignore[arg-type]
    if setting == "auto":
        return Plan("system", None)
    raise AllocatorMissing(
        f"allocator = {setting}: no lib{ALLOCATORS[setting][0]} on this host ({INSTALL_HINT[setting]}), "
        "or set allocator = auto to use it where present"
    )


def in_use(maps: str | None = None) -> Allocator:
    """The allocator this process runs on, from its memory map (``/proc/self/maps``)."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return "system"
    for line in maps.splitlines():
        path = line.rsplit(" ", 1)[-1]
        base = path.rsplit("/", 1)[-1]
        for name in AUTO_ORDER:
            if base.startswith(f"lib{name}"):
                return name  # type: ignore[return-value]
    return "system"


@functools.cache
def running() -> Allocator:
    """:func:`in_use`, read once: a process's allocator cannot change after its start."""
    return in_use()


def adopt(setting: str, argv: list[str] | None = None) -> Allocator:
    """Run this process on the allocator ``setting`` asks for; return the one it runs on.

    Re-executes the process (same pid, same arguments) when the allocator is not
    loaded yet. The re-executed process restores the environment it was given
    (:data:`REEXEC_MARK`), so that its child processes (decoders, Milvus Lite,
    compilers) start as the operator started the daemon. Raises
    :class:`AllocatorMissing` for a named allocator the host lacks.
    """
    current = in_use()
    restore = os.environ.pop(REEXEC_MARK, None)
    if restore is not None:
        for key, value in json.loads(restore).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return current  # what the preload gave: ld.so has said on stderr why, if it failed
    wanted = plan(setting)
    if current == wanted.name or current != "system":
        return current  # a preload the operator chose (another allocator than ours) is kept as it is
    os.execve(sys.executable, argv or sys.orig_argv, wanted.environment(os.environ))
    raise AssertionError("unreachable")  # pragma: no cover - execve does not return


def worker_environment(setting: str, find: Callable[[str], str | None] = find_library) -> dict[str, str]:
    """What a Ray model worker starts with (its ``runtime_env`` ``env_vars``) to run on ``setting``'s allocator.

    A worker is started by its node's raylet, not by the daemon, so :func:`adopt` cannot reach it; Ray
    sets these variables before it executes the worker's process, which is early enough for
    ``LD_PRELOAD``. The library is named by its soname as found on the daemon's host (Debian's on
    every Debian node); a node without it runs the worker on its system's malloc (ld.so says so in
    the worker's log, and the worker's ``allocator`` in ``batch progress`` shows it). The node's own
    ``LD_PRELOAD`` (Ray expands ``${LD_PRELOAD}`` on the node) comes after ours. Empty for ``system``,
    or where the daemon's host has none.
    """
    try:
        wanted = plan(setting, find)
    except AllocatorMissing:
        return {}
    if wanted.library is None:
        return {}
    env = wanted.environment({})
    del env[REEXEC_MARK]  # nothing to restore: the worker's children may run on it too
    env["LD_PRELOAD"] = f"{wanted.library} ${{LD_PRELOAD}}"
    return env


def log_choice(setting: str) -> None:
    """After the serving line (which names the allocator): what to do when it is the system's on a CPU host.

    Not before: a daemon refused at start says so in one line."""
    if running() != "system" or setting == "system":
        return
    if setting == "auto":
        log.info("no tcmalloc or jemalloc on this host: with tcmalloc (Debian: libtcmalloc-minimal4) "
                 "Music2Latent runs about 2.4x as fast on CPU")  # fmt: skip
    else:
        log.warning("allocator = %s could not be preloaded (ld.so said why above): the system's malloc it is", setting)


def release_free_memory() -> None:
    """Give the memory freed by an unloaded model back to the system, whichever allocator holds it."""
    process = ctypes.CDLL(None)
    name = running()
    try:
        if name == "tcmalloc":
            process.MallocExtension_ReleaseFreeMemory()
        elif name == "jemalloc":
            # MALLCTL_ARENAS_ALL (4096): every arena's freed pages
            process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        else:
            process.malloc_trim(ctypes.c_size_t(0))
    except AttributeError:  # a libc without malloc_trim (musl), an allocator build without the call
        log.debug("the %s allocator has no call to give memory back; it keeps it", name)

"""The hand-off of decoded audio from a worker process to the daemon through /dev/shm.

Large results come back through a ``/dev/shm`` file mapped by the parent
(zero-copy on the parent side) rather than through the pool's pipe: for a
30-minute 44.1 kHz stereo track (635 MB) this measured 0.40 s against 2.2-2.8 s
for pickling. Where /dev/shm is missing or full, or the result is small, it is
pickled instead. A file is named after the daemon that owns it (pid and a
per-decoder tag), so one a dead daemon left behind can be recognised and swept.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import mmap
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from embedd.audio.paths import reason
from embedd.audio.track import Allocator, DecodedAudio, Target, alloc_heap
from embedd.errors import Code, EmbeddError

__all__ = [
    "SHM_PREFIX",
    "ShmResult",
    "discard",
    "discard_orphan",
    "receive",
    "remove_owned",
    "run_in_worker",
    "sweep_stale",
]

# Results at least this big travel through /dev/shm instead of the pool's pipe.
_SHM_MIN_BYTES = 1 << 20
_SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "embedd-audio-"


@dataclasses.dataclass(frozen=True, slots=True)
class ShmResult:
    """A result whose waveforms lie in one /dev/shm file the parent maps and unlinks."""

    path: str
    nbytes: int
    layout: tuple[tuple[Target, tuple[int, int], int], ...]  # target, shape, byte offset
    duration_s: float
    source_rate: int
    source_channels: int


class _ShmAllocator:
    """Allocates the result arrays straight inside a /dev/shm file (no extra copy)."""

    def __init__(self, owner_tag: str) -> None:
        self.owner_tag = owner_tag
        self.path: str | None = None
        self.nbytes = 0
        self.layout: tuple[tuple[Target, tuple[int, int], int], ...] = ()
        self._map: mmap.mmap | None = None

    def __call__(self, shapes: list[tuple[Target, tuple[int, int]]]) -> dict[Target, np.ndarray]:
        total = sum(4 * s[0] * s[1] for _, s in shapes)
        if total < _SHM_MIN_BYTES or not _SHM_DIR.is_dir():
            return alloc_heap(shapes)
        path = str(_SHM_DIR / f"{SHM_PREFIX}{self.owner_tag}-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            return alloc_heap(shapes)
        try:
            # Reserve the pages now: a full tmpfs would otherwise SIGBUS us on first write.
            os.posix_fallocate(fd, 0, total)
            self._map = mmap.mmap(fd, total)
        except OSError:
            os.close(fd)
            os.unlink(path)
            return alloc_heap(shapes)
        os.close(fd)
        self.path, self.nbytes = path, total
        out, layout, offset = {}, [], 0
        for t, shape in shapes:
            out[t] = np.frombuffer(self._map, np.float32, shape[0] * shape[1], offset).reshape(shape)
            layout.append((t, shape, offset))
            offset += 4 * shape[0] * shape[1]
        self.layout = tuple(layout)
        return out

    def discard(self) -> None:
        if self.path is not None:
            _unlink_quietly(self.path)
            self.path = None


# ---- in the worker


def run_in_worker(decode: Callable[[Allocator], DecodedAudio], owner_tag: str) -> DecodedAudio | ShmResult:
    """Run ``decode`` with its arrays in /dev/shm when they are big; what to send the parent."""
    alloc = _ShmAllocator(owner_tag)
    try:
        result = decode(alloc)
    except BaseException:
        alloc.discard()
        raise
    if alloc.path is None:
        return result
    shm = ShmResult(alloc.path, alloc.nbytes, alloc.layout, result.duration_s, result.source_rate, result.source_channels)
    del result  # drop the array views so the mapping can close
    alloc._map = None
    return shm


# ---- in the daemon


def receive(result: DecodedAudio | ShmResult, release: Callable[[], None] | None = None) -> DecodedAudio:
    """The worker's result as a track of this process; a shm file is mapped and unlinked at once."""
    if isinstance(result, DecodedAudio):
        return dataclasses.replace(result, _release=release)
    try:
        fd = os.open(result.path, os.O_RDWR)
    except OSError as e:
        raise EmbeddError(Code.INTERNAL, f"The decoded audio vanished from shared memory ({reason(e)}).") from None
    try:
        m = mmap.mmap(fd, result.nbytes)
    finally:
        os.close(fd)
        _unlink_quietly(result.path)
    waves = {
        t: np.frombuffer(m, np.float32, shape[0] * shape[1], offset).reshape(shape)
        for t, shape, offset in result.layout
    }  # the arrays keep the mapping alive; it is unmapped when the last one goes
    return DecodedAudio(result.duration_s, waves, result.source_rate, result.source_channels, release)


def discard(result: DecodedAudio | ShmResult) -> None:
    """Free a result that will not be received (a pickled one needs nothing)."""
    if isinstance(result, ShmResult):
        _unlink_quietly(result.path)


def discard_orphan(cf: concurrent.futures.Future[Any]) -> None:
    """The awaiting request was cancelled: free a shm result nobody will receive."""
    if cf.cancelled() or cf.exception() is not None:
        return
    discard(cf.result())


def remove_owned(owner_tag: str) -> None:
    """Remove every result a decoder left (requests cancelled mid-flight that nobody received)."""
    for entry in _SHM_DIR.glob(f"{SHM_PREFIX}{owner_tag}-*") if _SHM_DIR.is_dir() else ():
        _unlink_quietly(str(entry))


def sweep_stale() -> None:
    """Remove shm results left by daemons that died between a worker's write and the read."""
    try:
        entries = list(_SHM_DIR.glob(f"{SHM_PREFIX}*"))
    except OSError:
        return
    for entry in entries:
        pid_text = entry.name[len(SHM_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            _unlink_quietly(str(entry))
        except OSError:
            pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

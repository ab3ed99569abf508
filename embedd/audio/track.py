"""What a decode produces: the targets a caller asks for and the decoded track.

Kept apart from the decoder and the worker pool because both build
:class:`DecodedAudio` (the pool rebuilds it from shared memory) and callers
only ever hold this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["DEFAULT_MAX_AUDIO_S", "NATIVE_RATE", "Allocator", "DecodedAudio", "Target", "alloc_heap", "check_targets"]

Target = tuple[int, int]  # (sample_rate Hz, channels 1|2); rate NATIVE_RATE = the file's own rate

#: The rate of a target that takes the file's samples as they are, at the file's own rate.
NATIVE_RATE = 0

DEFAULT_MAX_AUDIO_S = 30 * 60.0

#: Where the decoder puts the result arrays: ``[(target, (channels, samples))]`` → arrays.
#: The pool's allocator places them in /dev/shm, the in-process one on the heap.
Allocator = Callable[[list[tuple[Target, tuple[int, int]]]], dict[Target, np.ndarray]]


@dataclasses.dataclass(frozen=True, slots=True, weakref_slot=True)
class DecodedAudio:
    """One decoded track: its true duration and one waveform per requested target.

    ``waveforms[(rate, channels)]`` is float32, C-contiguous, shaped
    ``[channels, samples]``. ``duration_s`` counts the samples actually decoded
    (not what the header claims).

    From :class:`AudioDecoder`, the track counts against the decoder's budget
    of decoded audio held at once until :meth:`release` (or until the object is
    garbage), so callers release it as soon as the models are done with it.
    """

    duration_s: float
    waveforms: dict[Target, np.ndarray]
    source_rate: int
    source_channels: int
    _release: Callable[[], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(int(w.nbytes) for w in self.waveforms.values())

    def release(self) -> None:
        """Give this track's share of the decoded-audio budget back (idempotent)."""
        if self._release is not None:
            self._release()

    def waveform(self, sample_rate: int, channels: int) -> np.ndarray:
        try:
            return self.waveforms[(sample_rate, channels)]
        except KeyError:
            raise KeyError(
                f"no waveform at {sample_rate} Hz x {channels} ch was requested; "
                f"have {sorted(self.waveforms)}"
            ) from None


def check_targets(targets: Iterable[Target]) -> frozenset[Target]:
    """Targets come from the model catalogue, so a bad one is a bug, not a client error."""
    out = set()
    for t in targets:
        rate, channels = t
        if not (isinstance(rate, int) and (rate == NATIVE_RATE or 1_000 <= rate <= 1_000_000)) or channels not in (1, 2):
            raise ValueError(f"bad decode target {t!r}: want (rate 1000..1000000 Hz or 0 = native, channels 1|2)")
        out.add((int(rate), int(channels)))
    return frozenset(out)


def alloc_heap(shapes: list[tuple[Target, tuple[int, int]]]) -> dict[Target, np.ndarray]:
    return {t: np.empty(shape, np.float32) for t, shape in shapes}

"""Audio decoding: any file a music library holds → float32 waveforms at the models' rates.

Each file is demuxed and decoded exactly once, downmixed and resampled to
every requested ``(sample_rate, channels)`` target in one stream. In the
daemon, decoding runs in worker processes whose large results come back
through /dev/shm, under a budget of decoded audio held at once.

The package, one owner per module:

* :mod:`~embedd.audio.track`: the targets and the decoded track (:class:`DecodedAudio`);
* :mod:`~embedd.audio.paths`: which files may be read (:func:`resolve_allowed_path`);
* :mod:`~embedd.audio.decode`: container → waveforms, and the robustness policy for hostile input;
* :mod:`~embedd.audio.resample`: sample formats, downmixing and soxr resampling;
* :mod:`~embedd.audio.shm`: the /dev/shm hand-off from a worker to the daemon;
* :mod:`~embedd.audio.budget`: the gate on decoded audio held at once;
* :mod:`~embedd.audio.lanes`: which decode a free worker takes next (interactive first);
* :mod:`~embedd.audio.pool`: the worker processes (:class:`AudioDecoder`).
"""

from __future__ import annotations

from embedd.audio.budget import DEFAULT_HELD_BYTES, HeldAudioGate
from embedd.audio.decode import decode_bytes, decode_file
from embedd.audio.paths import resolve_allowed_path
from embedd.audio.pool import AudioDecoder, job_path
from embedd.audio.shm import SHM_PREFIX
from embedd.audio.track import DEFAULT_MAX_AUDIO_S, DecodedAudio, Target, check_targets

__all__ = [
    "DEFAULT_HELD_BYTES",
    "DEFAULT_MAX_AUDIO_S",
    "AudioDecoder",
    "DecodedAudio",
    "Target",
    "decode_bytes",
    "decode_file",
    "resolve_allowed_path",
]

# The names these had when the package was one module, for code written against it.
_HeldAudioGate = HeldAudioGate
_check_targets = check_targets
_job_path = job_path
_SHM_PREFIX = SHM_PREFIX

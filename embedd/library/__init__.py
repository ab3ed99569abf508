"""The track source: Navidrome's library, read from its own SQLite database, never in Navidrome's way.

One module per concern; this package re-exports what the rest of embedd uses:

* :mod:`~embedd.library.reader`: :class:`NavidromeLibrary`, the paged,
  read-only reader (keyset pages, one short connection each), and
  :func:`require_library`.
* :mod:`~embedd.library.database`: opening the database read-only (and
  without side files when Navidrome is stopped) and telling its schema apart.
* :mod:`~embedd.library.paths`: the two path layouts (relative to
  ``library.path`` since Navidrome 0.55, absolute before) and the operator's
  ``music_root`` remap.
* :mod:`~embedd.library.records`: :class:`Track`, :class:`Artist`, :class:`Identity`.
* :mod:`~embedd.library.shard`: ``--shard i/n``, the stable split of a library between daemons.
* :mod:`~embedd.library.timestamps`: Navidrome's timestamp columns as Unix seconds.
"""

from __future__ import annotations

from embedd.library.database import Layout, quiescent_wal
from embedd.library.reader import NavidromeLibrary, require_library
from embedd.library.records import Artist, Identity, Track
from embedd.library.shard import Shard, parse_shard, shard_of
from embedd.library.timestamps import parse_navidrome_time

__all__ = [
    "Artist",
    "Identity",
    "Layout",
    "NavidromeLibrary",
    "Shard",
    "Track",
    "parse_navidrome_time",
    "parse_shard",
    "require_library",
    "shard_of",
]

#: Not public: the library watcher (embedd.batch.watch) opens the database the same way.
_quiescent_wal = quiescent_wal

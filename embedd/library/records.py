"""What the library hands out: tracks, artists and identities, as plain frozen records.

Its own module so that the batch job, the writer and the similarity API can
name these types without caring how they are read.

Change detection uses the database, not ``stat()``: Navidrome's scanner sets
``media_file.updated_at`` to the file's modification time (``mf.UpdatedAt =
md.ModTime()``) and ``size`` to its size, so ``(file_size, file_mtime)`` of a
:class:`Track` tell whether the file changed since it was embedded without a
``stat()`` per row over a network mount. A file changed on disk but not yet
rescanned by Navidrome is picked up by the first job after Navidrome's scan.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["Artist", "Identity", "Track"]


@dataclasses.dataclass(frozen=True, slots=True)
class Artist:
    """An artist as Navidrome's tracks name it (for the similarity API), with its present tracks."""

    artist_id: str | None  # media_file.artist_id; None when the database has none
    name: str
    tracks: tuple[tuple[str, str], ...]  # (track id, title), by id


@dataclasses.dataclass(frozen=True, slots=True)
class Track:
    """One library track as the daemon sees it."""

    track_id: str  # media_file.id, the id Navidrome and the collections share
    path: str  # absolute, after the music-root remap
    title: str
    artist: str
    album: str
    duration_s: float
    file_size: int  # bytes, as Navidrome last scanned it
    file_mtime: float | None  # Unix seconds of the file's mtime as Navidrome last scanned it; None if unknown
    library_id: int | None = None

    @property
    def display_name(self) -> str:
        """"Artist - Title" for progress; falls back to whatever is known."""
        title = self.title.strip() or os.path.splitext(os.path.basename(self.path))[0] or self.track_id
        artist = self.artist.strip()
        return f"{artist} - {title}" if artist else title


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """Who a stored track is in Navidrome today: what its matcher needs to resolve a suggestion."""

    track_id: str  # the current media_file.id of the file (differs from the stored one after an id migration)
    mbid: str  # MusicBrainz recording id; "" when untagged or the schema has none

"""Navidrome's timestamp columns, read as Unix seconds.

Its own module because two readers need it: the track reader (a file's
``updated_at`` is its modification time, see :mod:`embedd.library.records`)
and the library watcher (when Navidrome's last scan began and ended).
"""

from __future__ import annotations

import datetime as _dt

__all__ = ["parse_navidrome_time"]


def parse_navidrome_time(value: object) -> float | None:
    """Unix seconds from a Navidrome timestamp column, or None when unset.

    Go's SQLite driver writes ``time.Time`` as ``2006-01-02 15:04:05.999999999-07:00``
    (nanoseconds: ``datetime.fromisoformat`` takes any number of fractional
    digits since Python 3.11 and keeps the first six); defaults and old rows
    hold ``0000-00-00 00:00:00`` or SQL ``current_timestamp`` (UTC, no zone).
    Numbers are taken as Unix seconds. Anything else unreadable is None.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    try:
        when = _dt.datetime.fromisoformat(value.strip())
    except ValueError:  # '0000-00-00', month 13, an offset of a day or more, not a date at all
        return None
    if when.year < 1971:  # Go's zero time '0001-01-01' means "unset"
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()

"""Navidrome's SQLite database: opened read-only without getting in its way, and its schema inspected.

Navidrome owns that database and keeps writing to it (WAL mode) while a batch
job reads it, so nothing here may ever hold it up:

* The file is opened through the URI ``file:...?mode=ro`` with
  ``PRAGMA query_only``: nothing here can write, create or lock it for writing.
* A WAL database no one has open is read with ``immutable=1`` (see
  :func:`quiescent_wal`), so a stopped Navidrome finds no side files of ours.
* Every read is a short autocommit statement whose cursor is exhausted at
  once (:func:`fetchall`): no read transaction outlives it.

What a schema is told apart by (``PRAGMA table_info``) is in :class:`Schema`;
the path layouts it selects are explained in :mod:`embedd.library.paths`.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import urllib.parse
from contextlib import asynccontextmanager
from typing import AsyncIterator, Literal

import aiosqlite

from embedd.errors import Code, EmbeddError

__all__ = ["Layout", "Schema", "connect", "fetchall", "quiescent_wal", "unavailable"]

Layout = Literal["relative", "absolute"]

# Columns every Navidrome schema since 2020 has; without them it is not Navidrome's.
_REQUIRED_COLUMNS = frozenset({"id", "path", "title", "artist", "album", "duration", "size", "updated_at"})
_BUSY_TIMEOUT_MS = 5_000  # a WAL reader only waits during WAL recovery


@dataclasses.dataclass(frozen=True, slots=True)
class Schema:
    """What one database's schema offers, read once per connection."""

    layout: Layout
    has_library_table: bool
    has_missing: bool
    #: the MusicBrainz recording id's column: mbz_track_id (2020), renamed mbz_recording_id in 2023; None before
    mbid_column: str | None = None
    #: whether media_file has artist_id (not in every schema)
    has_artist_id: bool = False


def unavailable(db_path: str, what: str, exc: BaseException | None = None) -> EmbeddError:
    """The contract error for a database that cannot serve: ``what`` completes "Navidrome database PATH ..."."""
    detail = f" ({exc})" if exc is not None else ""
    return EmbeddError(Code.UNAVAILABLE, f"Navidrome database {db_path} {what}{detail}.")


def quiescent_wal(path: str) -> bool:
    """A WAL database that no one has open: read it without creating its -wal/-shm.

    Even a read-only connection creates ``navidrome.db-wal`` and ``-shm`` when
    they are missing (Navidrome stopped), owned by the daemon's user: a
    Navidrome running as another user could then not open its own database.
    With no ``-wal`` file every row is in the main file, and ``immutable=1``
    reads it with no side files and no locks. Should Navidrome start during
    that one page, its writes go to its new WAL, not to the main file we read
    (until its first checkpoint, a thousand pages later). A rollback-journal
    database is never read this way: its writers change the main file in place.
    """
    if os.path.exists(path + "-wal"):
        return False
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[:16] == b"SQLite format 3\x00" and header[18] == 2 and header[19] == 2


@asynccontextmanager
async def connect(db_path: str) -> AsyncIterator[tuple[aiosqlite.Connection, Schema]]:
    """A read-only connection to the database at ``db_path`` (absolute) and its schema; closed on exit."""
    # UNAVAILABLE, not NOT_FOUND: the database is the daemon's configured
    # dependency, not something a client named; the operator fixes it and retries.
    if not os.path.exists(db_path):
        raise unavailable(db_path, "does not exist (check NAVIDROME_DB_PATH)")
    if not os.path.isfile(db_path):
        raise unavailable(db_path, "is not a file (check NAVIDROME_DB_PATH)")
    uri = "file:" + urllib.parse.quote(db_path) + "?mode=ro"
    if quiescent_wal(db_path):
        uri += "&immutable=1"
    try:
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise unavailable(db_path, "cannot be opened read-only", exc) from exc
    try:
        try:
            await db.execute("PRAGMA query_only = 1")
            schema = await inspect(db, db_path)
        except sqlite3.DatabaseError as exc:
            raise unavailable(db_path, "is not a readable SQLite database", exc) from exc
        yield db, schema
    finally:
        await db.close()


async def inspect(db: aiosqlite.Connection, db_path: str) -> Schema:
    """The schema of an open database; UNAVAILABLE when it is not Navidrome's.

    Two path layouts exist: ``relative`` (Navidrome >= 0.55) is told by
    ``media_file.missing``, the column the same migration added that made
    paths relative to ``library.path`` (and a ``library`` table with
    ``media_file.library_id``); anything else is ``absolute``.
    """
    async with db.execute("PRAGMA table_info(media_file)") as cur:
        columns = {row[1] for row in await cur.fetchall()}
    if not columns:
        raise unavailable(db_path, "is not a Navidrome database: it has no media_file table")
    lacking = _REQUIRED_COLUMNS - columns
    if lacking:
        raise unavailable(db_path, f"is not a Navidrome database: media_file lacks {', '.join(sorted(lacking))}")
    async with db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'library'") as cur:
        has_library_table = await cur.fetchone() is not None
    has_missing = "missing" in columns
    relative = has_missing and has_library_table and "library_id" in columns
    mbid_column = next((c for c in ("mbz_recording_id", "mbz_track_id") if c in columns), None)
    return Schema("relative" if relative else "absolute", has_library_table, has_missing, mbid_column, "artist_id" in columns)


async def fetchall(db: aiosqlite.Connection, db_path: str, sql: str, params: tuple = ()) -> list[sqlite3.Row | tuple]:
    """All rows of one statement; UNAVAILABLE (naming ``db_path``) when SQLite fails."""
    try:
        async with db.execute(sql, params) as cur:
            return list(await cur.fetchall())  # exhausting the cursor ends the read transaction
    except sqlite3.Error as exc:
        raise unavailable(db_path, "could not be read", exc) from exc

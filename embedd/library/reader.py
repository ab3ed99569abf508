"""The track source: :class:`NavidromeLibrary`, a paged, read-only reader of Navidrome's tracks.

It owns the queries; how the database is opened and its schema told apart is
:mod:`embedd.library.database`, how a row's path becomes a file the daemon
can open is :mod:`embedd.library.paths`. Navidrome keeps writing to its
database while a batch job reads it, so the reader never holds it up:

* Rows are read in pages by keyset pagination (``WHERE id > ? ORDER BY id
  LIMIT ?``), one short autocommit ``SELECT`` per page on a connection opened
  for that page and closed right after. No read transaction (WAL snapshot)
  lives across pages, so Navidrome's writers and its WAL checkpoints never wait
  on us for longer than one page takes to read, and rows Navidrome adds or
  removes while a job runs are seen by the pages not yet read.
* Nothing holds the whole library: an iteration keeps one page of rows.
* Shards are filtered inside SQLite (``embedd_shard(id, n) = i``, see
  :mod:`embedd.library.shard`), so a shard's page is a page of its own tracks.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator

import aiosqlite

from embedd.errors import Code, EmbeddError
from embedd.library.database import Layout, Schema, connect, fetchall
from embedd.library.paths import Roots, daemon_path, load_roots, stored_path
from embedd.library.records import Artist, Identity, Track
from embedd.library.shard import Shard, shard_of
from embedd.library.timestamps import parse_navidrome_time

__all__ = ["NavidromeLibrary", "require_library"]

_COUNT_PAGE = 10_000  # ids per count() statement: a short read, few round trips
_IN_BATCH = 500  # values per ``IN (...)`` list: under every SQLite build's variable limit (999 before 3.32)


def require_library(library: "NavidromeLibrary | None") -> "NavidromeLibrary":
    """The configured library, or the contract error saying that none is."""
    if library is None:
        raise EmbeddError(
            Code.UNAVAILABLE,
            "no Navidrome database is configured; set NAVIDROME_DB_PATH (or --navidrome-db)",
        )
    return library


class NavidromeLibrary:
    """Read-only, paged access to Navidrome's tracks.

    Every call opens its own short-lived read-only connection (one per page
    while iterating): cheap next to a page of rows, and it leaves no
    connection, thread or WAL snapshot behind when a caller abandons an
    iteration halfway.
    """

    __slots__ = ("db_path", "music_root", "original_root", "page_size")

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        music_root: str | os.PathLike[str] | None = None,
        original_root: str | os.PathLike[str] | None = None,
        page_size: int = 500,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.db_path = os.path.abspath(os.fspath(db_path))
        self.music_root = os.path.normpath(os.fspath(music_root)) if music_root else None
        self.original_root = os.path.normpath(os.fspath(original_root)) if original_root else None
        self.page_size = page_size

    # ---- connection, schema and rows

    def _connect(self) -> AbstractAsyncContextManager[tuple[aiosqlite.Connection, Schema]]:
        return connect(self.db_path)

    async def layout(self) -> Layout:
        """Which path layout the database uses (for ``status`` and logs)."""
        async with self._connect() as (_, schema):
            return schema.layout

    async def _fetchall(self, db: aiosqlite.Connection, sql: str, params: tuple = ()) -> list[sqlite3.Row | tuple]:
        return await fetchall(db, self.db_path, sql, params)

    async def _roots(self, db: aiosqlite.Connection, schema: Schema) -> Roots:
        return await load_roots(
            schema, lambda sql: self._fetchall(db, sql), music_root=self.music_root, original_root=self.original_root
        )

    @staticmethod
    def _track(row: tuple, roots: Roots, schema: Schema) -> Track | None:
        track_id, path, title, artist, album, duration, size, updated_at, library_id = row
        full = daemon_path(path or "", library_id, roots, schema)
        if full is None:
            return None
        return Track(
            track_id=str(track_id),
            path=full,
            title=title or "",
            artist=artist or "",
            album=album or "",
            duration_s=float(duration or 0.0),
            file_size=int(size or 0),
            file_mtime=parse_navidrome_time(updated_at),
            library_id=int(library_id) if library_id is not None else None,
        )

    @staticmethod
    def _select(schema: Schema) -> str:
        library_id = "library_id" if schema.has_library_table or schema.layout == "relative" else "NULL"
        return f"SELECT id, path, title, artist, album, duration, size, updated_at, {library_id} FROM media_file"

    @staticmethod
    def _filters(schema: Schema, shard: Shard | None, include_missing: bool = False) -> tuple[str, tuple]:
        sql, params = "", ()
        if schema.has_missing and not include_missing:
            # ``+missing``: keep the planner on the primary-key index (keyset
            # order) rather than Navidrome's index on ``missing`` plus a sort.
            sql += " AND NOT +missing"
        if shard is not None and shard.count > 1:
            sql += " AND embedd_shard(id, ?) = ?"
            params = (shard.count, shard.index)
        return sql, params

    @staticmethod
    async def _register_shard(db: aiosqlite.Connection) -> None:
        await db.create_function("embedd_shard", 2, lambda tid, n: shard_of(str(tid), int(n)), deterministic=True)

    # ---- public API

    async def music_roots(self) -> list[str]:
        """The directories, as this host sees them, that hold the library's files.

        embed_file may read below these; they are what the daemon's path check allows.
        """
        async with self._connect() as (db, schema):
            roots = await self._roots(db, schema)
            if schema.layout == "relative":
                return sorted(set(roots.libraries.values()))
            if roots.replacement is not None:
                return [roots.replacement]
            if roots.original is not None:
                return [roots.original]
            lib_paths = []
            if schema.has_library_table:
                lib_paths = [os.path.normpath(p) for (_, p) in await self._fetchall(db, "SELECT id, path FROM library")]
            return sorted(set(lib_paths))

    async def count(self, shard: Shard | None = None) -> int:
        """Tracks present (not missing) in the library, or in one shard of it.

        Counted in keyset pages, so even a huge library never holds one long
        read. Navidrome may change rows meanwhile: the number is the library's
        size at about this moment, not a promise about a later iteration.
        """
        total, after = 0, ""
        while True:
            async with self._connect() as (db, schema):
                await self._register_shard(db)
                filt, params = self._filters(schema, shard)
                rows = await self._fetchall(
                    db,
                    f"SELECT count(*), max(id) FROM (SELECT id FROM media_file WHERE id > ?{filt} ORDER BY id LIMIT ?)",
                    (after, *params, _COUNT_PAGE),
                )
            n, last = rows[0]
            total += int(n)
            if n < _COUNT_PAGE or last is None:
                return total
            after = str(last)

    async def iter_tracks(
        self, shard: Shard | None = None, after_id: str | None = None, *, include_missing: bool = False
    ) -> AsyncIterator[Track]:
        """Yield present tracks in ascending id order, one page at a time.

        ``include_missing`` also yields rows Navidrome marked missing: files it
        could not see at its last scan (an unmounted share, say), which it keeps
        so that they come back intact — they are still part of the library.

        ``after_id`` starts after that id (a caller's own cursor). Pages are
        independent reads: a track added behind the cursor during the
        iteration is not yielded, one added ahead of it is, and a track deleted
        ahead of it is not.
        """
        after = after_id if after_id is not None else ""
        roots: Roots | None = None
        while True:
            async with self._connect() as (db, schema):
                await self._register_shard(db)
                if roots is None:
                    roots = await self._roots(db, schema)
                filt, params = self._filters(schema, shard, include_missing)
                rows = await self._fetchall(
                    db, f"{self._select(schema)} WHERE id > ?{filt} ORDER BY id LIMIT ?", (after, *params, self.page_size)
                )
                if schema.layout == "relative" and any(
                    r[8] is not None and int(r[8]) not in roots.libraries for r in rows
                ):
                    roots = await self._roots(db, schema)  # a library was added since the iteration began
            # The connection is closed before the caller sees the first row of the page.
            for row in rows:
                track = self._track(tuple(row), roots, schema)
                if track is not None:
                    yield track
            if len(rows) < self.page_size:
                return
            after = str(rows[-1][0])
            del rows

    async def find_artists(self, keys: list[str], *, max_tracks: int = 50) -> dict[str, Artist]:
        """Each key that is an artist id or (case-insensitively) an artist name, with that artist.

        One scan of ``media_file`` per 200 keys; an artist's first ``max_tracks``
        present tracks by id. Schemas without ``artist_id`` match names only.
        """
        found: dict[str, Artist] = {}
        async with self._connect() as (db, schema):
            filt, _ = self._filters(schema, None)
            for start in range(0, len(keys), 200):
                chunk = keys[start : start + 200]
                names = list({*chunk, *(k.lower() for k in chunk)})
                marks = ", ".join("?" * len(names))
                where = f"(artist IN ({marks}) OR lower(artist) IN ({marks}))"
                if schema.has_artist_id:
                    rows = await self._fetchall(
                        db,
                        f"SELECT artist_id, artist, id, title FROM media_file WHERE ({where} OR artist_id IN "
                        f"({', '.join('?' * len(chunk))})){filt} ORDER BY id",
                        (*names, *names, *chunk),
                    )
                else:  # no artist_id column (not in every schema): names only
                    rows = await self._fetchall(
                        db, f"SELECT NULL, artist, id, title FROM media_file WHERE {where}{filt} ORDER BY id", (*names, *names)
                    )
                by_id = {k: k for k in chunk}
                by_name = {k.casefold(): k for k in chunk}
                collected: dict[str, tuple[str | None, str, list[tuple[str, str]]]] = {}
                for artist_id, name, track_id, title in rows:
                    key = by_id.get(artist_id) if artist_id else None
                    key = key or by_name.get((name or "").casefold())
                    if key is None:
                        continue
                    entry = collected.setdefault(key, (artist_id or None, name or "", []))
                    if len(entry[2]) < max_tracks and (entry[0] is None or artist_id in (None, "", entry[0])):
                        entry[2].append((str(track_id), title or ""))
                for key, (artist_id, name, tracks) in collected.items():
                    found[key] = Artist(artist_id, name, tuple(tracks))
        return found

    async def facets(self, track_ids: list[str]) -> dict[str, tuple[int | None, str]]:
        """track id -> (its ``library_id``, its ``artist_id``), for the present tracks among ``track_ids``.

        ``library_id`` is None in schemas without libraries, ``artist_id`` "" in
        schemas without it. For the recommender's library filter and disliked artists.
        """
        found: dict[str, tuple[int | None, str]] = {}
        if not track_ids:
            return found
        async with self._connect() as (db, schema):
            filt, _ = self._filters(schema, None)
            library_id = "library_id" if schema.has_library_table or schema.layout == "relative" else "NULL"
            ids = list(dict.fromkeys(track_ids))
            artist = "artist_id" if schema.has_artist_id else "''"  # no artist_id column (not in every schema)
            for start in range(0, len(ids), _IN_BATCH):
                batch = ids[start : start + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                rows = await self._fetchall(
                    db, f"SELECT id, {library_id}, {artist} FROM media_file WHERE id IN ({marks}){filt}", tuple(batch)
                )
                for tid, lib_id, artist_id in rows:
                    found[str(tid)] = (int(lib_id) if lib_id is not None else None, str(artist_id or ""))
        return found

    async def get_track(self, track_id: str) -> Track | None:
        """One present track by id; None when unknown or marked missing."""
        async with self._connect() as (db, schema):
            filt, _ = self._filters(schema, None)
            rows = await self._fetchall(db, f"{self._select(schema)} WHERE id = ?{filt}", (track_id,))
            if not rows:
                return None
            roots = await self._roots(db, schema)
        return self._track(tuple(rows[0]), roots, schema)

    async def tracks_by_ids(self, track_ids: list[str]) -> list[Track]:
        """The present (not missing) tracks among ``track_ids``, in id order; one read per 500 ids."""
        ids = sorted(set(track_ids))
        out: list[Track] = []
        if not ids:
            return out
        async with self._connect() as (db, schema):
            filt, _ = self._filters(schema, None)
            roots = await self._roots(db, schema)
            for start in range(0, len(ids), _IN_BATCH):
                batch = ids[start : start + _IN_BATCH]
                sql = f"{self._select(schema)} WHERE id IN ({', '.join('?' * len(batch))}){filt} ORDER BY id"
                for row in await self._fetchall(db, sql, tuple(batch)):
                    track = self._track(tuple(row), roots, schema)
                    if track is not None:
                        out.append(track)
        return out

    async def identify(self, stored: list[tuple[str, str]]) -> dict[str, Identity]:
        """Navidrome's current id and MusicBrainz id of stored tracks, given as (stored id, stored path).

        By id first; a stored id that Navidrome no longer has (its canonical-id
        migration after v0.63.2 renames most tracks while paths stay) is found by
        its path, so an answer names the track Navidrome has now even before a
        batch job re-keys the vectors. Tracks found neither way are left out.
        """
        if not stored:
            return {}
        async with self._connect() as (db, schema):
            mbid = f"coalesce({schema.mbid_column}, '')" if schema.mbid_column else "''"
            filt, _ = self._filters(schema, None)
            ids = list(dict.fromkeys(tid for tid, _ in stored))
            found: dict[str, Identity] = {}
            for start in range(0, len(ids), _IN_BATCH):
                batch = ids[start : start + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                sql = f"SELECT id, {mbid} FROM media_file WHERE id IN ({marks}){filt}"
                for tid, mb in await self._fetchall(db, sql, tuple(batch)):
                    found[str(tid)] = Identity(str(tid), str(mb or ""))
            lost = [(tid, path) for tid, path in stored if tid not in found and path]
            if not lost:
                return found
            roots = await self._roots(db, schema)
            wanted: dict[tuple[int | None, str], str] = {}
            for tid, path in lost:
                key = stored_path(path, roots, schema)
                if key is not None:
                    wanted[key] = tid
            library_id = "library_id" if schema.layout == "relative" else "NULL"
            paths = list(dict.fromkeys(p for _, p in wanted))
            for start in range(0, len(paths), _IN_BATCH):
                batch = paths[start : start + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                sql = f"SELECT id, {mbid}, {library_id}, path FROM media_file WHERE path IN ({marks}){filt}"
                for tid, mb, lib_id, path in await self._fetchall(db, sql, tuple(batch)):
                    old = wanted.get((int(lib_id) if lib_id is not None else None, path))
                    if old is not None:
                        found[old] = Identity(str(tid), str(mb or ""))
        return found

"""The track source: Navidrome's library, read from its own SQLite database.

Navidrome owns that database and keeps writing to it (WAL mode) while a batch
job reads it, so this module must never get in its way:

* The file is opened through the URI ``file:...?mode=ro`` with
  ``PRAGMA query_only``: nothing here can write, create or lock it for writing.
* Rows are read in pages by keyset pagination (``WHERE id > ? ORDER BY id
  LIMIT ?``), one short autocommit ``SELECT`` per page on a connection opened
  for that page and closed right after. No read transaction (WAL snapshot)
  lives across pages, so Navidrome's writers and its WAL checkpoints never wait
  on us for longer than one page takes to read, and rows Navidrome adds or
  removes while a job runs are seen by the pages not yet read.
* Nothing holds the whole library: an iteration keeps one page of rows.

Two path layouts exist, told apart by the schema (``PRAGMA table_info``):

* ``relative`` (Navidrome >= 0.55, the "new scanner"): a ``library`` table
  (several libraries possible), ``media_file.path`` relative to
  ``library.path`` with ``/`` separators, and a ``media_file.missing`` flag for
  files the scanner no longer finds. Detected by ``media_file.missing``; the
  same migration added that column and stripped the library prefix.
* ``absolute`` (older Navidrome): ``media_file.path`` is the absolute path.
  Versions 0.52-0.54 already have a ``library`` table (one row, the music
  folder) but still absolute paths.

``music_root`` (``NAVIDROME_MUSIC_ROOT``) is for a daemon that sees the music
at another mount than Navidrome does. It replaces the *original root*, the
directory Navidrome's paths hang from:

* relative layout: the longest common directory of all ``library.path``
  values. With one library that is exactly ``library.path``; with libraries
  ``/music/a`` and ``/music/b`` it is ``/music``, so ``music_root=/mnt/nas``
  maps them to ``/mnt/nas/a`` and ``/mnt/nas/b`` (mount their common parent).
* absolute layout: ``original_root`` when given (Navidrome's ``MusicFolder``),
  else the common directory of the library paths when a ``library`` table
  exists, else the longest common directory of all track paths (computed from
  the smallest and the largest path, two index look-ups). The last guess equals
  Navidrome's music folder as soon as the library holds two top-level folders;
  a library of a single artist folder needs ``original_root``.

A path outside the original root is left as it is (it fails later with a
per-track error that names it, instead of being silently misplaced).

Change detection uses the database, not ``stat()``: Navidrome's scanner sets
``media_file.updated_at`` to the file's modification time (``mf.UpdatedAt =
md.ModTime()``) and ``size`` to its size, so ``(file_size, file_mtime)`` of a
:class:`Track` tell whether the file changed since it was embedded without a
``stat()`` per row over a network mount. A file changed on disk but not yet
rescanned by Navidrome is picked up by the first job after Navidrome's scan.

Shards split one library between n daemons: track ``t`` belongs to shard
``i/n`` (0-based ``i``) when ``blake2b-64(t) mod n == i``; see :func:`shard_of`.

Long because: one reader of Navidrome's schema across its versions.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import re
import sqlite3
import urllib.parse
from contextlib import asynccontextmanager
from typing import AsyncIterator, Literal

import aiosqlite

from embedd.errors import Code, EmbeddError

__all__ = [
    "Artist",
    "Identity",
    "Layout",
    "NavidromeLibrary",
    "Shard",
    "Track",
    "parse_shard",
    "require_library",
    "shard_of",
]

Layout = Literal["relative", "absolute"]

# Columns every Navidrome schema since 2020 has; without them it is not Navidrome's.
_REQUIRED_COLUMNS = frozenset({"id", "path", "title", "artist", "album", "duration", "size", "updated_at"})
_COUNT_PAGE = 10_000  # ids per count() statement: a short read, few round trips
_BUSY_TIMEOUT_MS = 5_000  # a WAL reader only waits during WAL recovery
_IN_BATCH = 500  # values per ``IN (...)`` list: under every SQLite build's variable limit (999 before 3.32)


def require_library(library: "NavidromeLibrary | None") -> "NavidromeLibrary":
    """The configured library, or the contract error saying that none is."""
    if library is None:
        raise EmbeddError(
            Code.UNAVAILABLE,
            "no Navidrome database is configured; set NAVIDROME_DB_PATH (or --navidrome-db)",
        )
    return library


# ---------------------------------------------------------------- shards


def shard_of(track_id: str, n: int) -> int:
    """The shard (0..n-1) a track belongs to among ``n``.

    A stable hash (first 8 bytes of BLAKE2b over the UTF-8 id, big-endian, mod
    n), not Python's salted ``hash()``: daemons on different hosts, Python
    versions and restarts must agree on it, or a library split would overlap
    or leave holes.
    """
    digest = hashlib.blake2b(track_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): ``0/1`` is the whole library."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise EmbeddError(Code.BAD_REQUEST, f"shard {self.index}/{self.count} is out of range: 'i/n' needs n >= 1 and 0 <= i < n.")

    def contains(self, track_id: str) -> bool:
        return self.count == 1 or shard_of(track_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


_SHARD_RE = re.compile(r"([0-9]{1,9})/([0-9]{1,9})", re.ASCII)


def parse_shard(text: object, *, argument: str = "shard") -> Shard:
    """Parse the wire form ``"i/n"``: ``i`` is 0-based, ``0 <= i < n``, ``n >= 1``.

    ``argument`` names the request argument in the error sentence.
    """
    if not isinstance(text, str):
        raise EmbeddError(Code.BAD_REQUEST, f"argument {argument!r} must be a string like '0/2', not {type(text).__name__}.")
    m = _SHARD_RE.fullmatch(text)
    if m is None:
        raise EmbeddError(Code.BAD_REQUEST, f"argument {argument!r} must look like 'i/n' (e.g. '0/2'), got {text!r}.")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise EmbeddError(Code.BAD_REQUEST, f"argument {argument!r} is {text!r}, but the shard count n must be at least 1.")
    if index >= count:
        raise EmbeddError(
            Code.BAD_REQUEST, f"argument {argument!r} is {text!r}, but the shard index i is 0-based and must be below n ({count})."
        )
    return Shard(index, count)


# ---------------------------------------------------------------- tracks


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


_TIME_RE = re.compile(
    r"\s*(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?\s*(Z|[+-]\d{2}:?\d{2})?\s*$",
    re.ASCII,
)


def parse_navidrome_time(value: object) -> float | None:
    """Unix seconds from a Navidrome timestamp column, or None when unset.

    Go's SQLite driver writes ``time.Time`` as ``2006-01-02 15:04:05.999999999-07:00``
    (nanoseconds, which ``datetime.fromisoformat`` rejects); defaults and old
    rows hold ``0000-00-00 00:00:00`` or SQL ``current_timestamp`` (UTC, no
    zone). Numbers are taken as Unix seconds.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    m = _TIME_RE.match(value)
    if m is None:
        return None
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if year < 1971:  # '0000-00-00' and Go's zero time '0001-01-01' mean "unset"
        return None
    hour, minute, second = (int(g) if g else 0 for g in m.group(4, 5, 6))
    frac = m.group(7) or ""
    micro = int((frac + "000000")[:6])
    zone = m.group(8)
    if zone is None or zone == "Z":
        tz = _dt.timezone.utc
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        tz = _dt.timezone(sign * _dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        return _dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz).timestamp()
    except ValueError:  # month 13, day 0, ...
        return None


# ---------------------------------------------------------------- the library


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    layout: Layout
    has_library_table: bool
    has_missing: bool
    #: the MusicBrainz recording id's column: mbz_track_id (2020), renamed mbz_recording_id in 2023; None before
    mbid_column: str | None = None


@dataclasses.dataclass(slots=True)
class _Roots:
    """How to turn a row's path into the path the daemon opens (one iteration's view)."""

    libraries: dict[int, str]  # relative layout: library id -> daemon-visible root
    original: str | None  # absolute layout: the prefix music_root replaces (None: no remap)
    replacement: str | None


def _common_dir(paths: list[str]) -> str | None:
    paths = [os.path.normpath(p) for p in paths if p]
    if not paths:
        return None
    try:
        return os.path.commonpath(paths)
    except ValueError:  # mixed absolute and relative
        return None


def _quiescent_wal(path: str) -> bool:
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

    # ---- connection and schema

    def _unavailable(self, what: str, exc: BaseException | None = None) -> EmbeddError:
        detail = f" ({exc})" if exc is not None else ""
        return EmbeddError(Code.UNAVAILABLE, f"Navidrome database {self.db_path} {what}{detail}.")

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[tuple[aiosqlite.Connection, _Schema]]:
        # UNAVAILABLE, not NOT_FOUND: the database is the daemon's configured
        # dependency, not something a client named; the operator fixes it and retries.
        if not os.path.exists(self.db_path):
            raise self._unavailable("does not exist (check NAVIDROME_DB_PATH)")
        if not os.path.isfile(self.db_path):
            raise self._unavailable("is not a file (check NAVIDROME_DB_PATH)")
        uri = "file:" + urllib.parse.quote(self.db_path) + "?mode=ro"
        if _quiescent_wal(self.db_path):
            uri += "&immutable=1"
        try:
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise self._unavailable("cannot be opened read-only", exc) from exc
        try:
            try:
                await db.execute("PRAGMA query_only = 1")
                schema = await self._inspect(db)
            except sqlite3.DatabaseError as exc:
                raise self._unavailable("is not a readable SQLite database", exc) from exc
            yield db, schema
        finally:
            await db.close()

    async def _inspect(self, db: aiosqlite.Connection) -> _Schema:
        async with db.execute("PRAGMA table_info(media_file)") as cur:
            columns = {row[1] for row in await cur.fetchall()}
        if not columns:
            raise self._unavailable("is not a Navidrome database: it has no media_file table")
        lacking = _REQUIRED_COLUMNS - columns
        if lacking:
            raise self._unavailable(f"is not a Navidrome database: media_file lacks {', '.join(sorted(lacking))}")
        async with db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'library'") as cur:
            has_library_table = await cur.fetchone() is not None
        has_missing = "missing" in columns
        relative = has_missing and has_library_table and "library_id" in columns
        mbid_column = next((c for c in ("mbz_recording_id", "mbz_track_id") if c in columns), None)
        return _Schema("relative" if relative else "absolute", has_library_table, has_missing, mbid_column)

    async def layout(self) -> Layout:
        """Which path layout the database uses (for ``status`` and logs)."""
        async with self._connect() as (_, schema):
            return schema.layout

    async def _fetchall(self, db: aiosqlite.Connection, sql: str, params: tuple = ()) -> list[sqlite3.Row | tuple]:
        try:
            async with db.execute(sql, params) as cur:
                return list(await cur.fetchall())  # exhausting the cursor ends the read transaction
        except sqlite3.Error as exc:
            raise self._unavailable("could not be read", exc) from exc

    async def _roots(self, db: aiosqlite.Connection, schema: _Schema) -> _Roots:
        lib_paths: dict[int, str] = {}
        if schema.has_library_table:
            for lib_id, lib_path in await self._fetchall(db, "SELECT id, path FROM library"):
                lib_paths[int(lib_id)] = os.path.normpath(lib_path)
        if schema.layout == "relative":
            if self.music_root is not None and lib_paths:
                common = _common_dir(list(lib_paths.values()))
                if common is not None:
                    lib_paths = {
                        i: os.path.normpath(os.path.join(self.music_root, os.path.relpath(p, common)))
                        for i, p in lib_paths.items()
                    }
            return _Roots(lib_paths, None, None)
        if self.music_root is None:
            return _Roots({}, None, None)
        original = self.original_root
        if original is None and lib_paths:
            original = _common_dir(list(lib_paths.values()))
        if original is None:
            where = " WHERE NOT +missing" if schema.has_missing else ""
            rows = await self._fetchall(db, f"SELECT min(path), max(path) FROM media_file{where}")
            lo, hi = rows[0] if rows else (None, None)
            if lo and hi:
                original = _common_dir([lo, hi])
                if original in (os.path.normpath(lo), os.path.normpath(hi)):  # a file, not its folder
                    original = os.path.dirname(original)
        return _Roots({}, original, self.music_root)

    def _track(self, row: tuple, roots: _Roots, schema: _Schema) -> Track | None:
        track_id, path, title, artist, album, duration, size, updated_at, library_id = row
        path = path or ""
        if schema.layout == "relative":
            root = roots.libraries.get(int(library_id)) if library_id is not None else None
            if root is None:
                return None  # its library row is gone (Navidrome deletes such tracks by cascade)
            full = os.path.normpath(os.path.join(root, path.replace("\\", "/").lstrip("/")))
        else:
            full = path
            original = roots.original
            if original is not None and roots.replacement is not None:
                norm = os.path.normpath(path)
                if norm == original or norm.startswith(original.rstrip("/") + "/"):
                    full = os.path.normpath(roots.replacement + "/" + norm[len(original) :].lstrip("/"))
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
    def _stored_path(full: str, roots: _Roots, schema: _Schema) -> tuple[int | None, str] | None:
        """The (library id, media_file.path) a daemon-visible path was read from: :meth:`_track` backwards."""
        norm = os.path.normpath(full)
        if schema.layout == "relative":
            for lib_id, root in roots.libraries.items():
                if norm.startswith(root.rstrip("/") + "/"):
                    return lib_id, norm[len(root.rstrip("/")) + 1 :]
            return None
        if roots.original is not None and roots.replacement is not None:
            replacement = roots.replacement.rstrip("/")
            if norm.startswith(replacement + "/"):
                return None, os.path.normpath(roots.original + "/" + norm[len(replacement) + 1 :])
        return None, norm

    @staticmethod
    def _select(schema: _Schema) -> str:
        library_id = "library_id" if schema.has_library_table or schema.layout == "relative" else "NULL"
        return f"SELECT id, path, title, artist, album, duration, size, updated_at, {library_id} FROM media_file"

    @staticmethod
    def _filters(schema: _Schema, shard: Shard | None, include_missing: bool = False) -> tuple[str, tuple]:
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
        roots: _Roots | None = None
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
                try:
                    rows = await self._fetchall(
                        db,
                        f"SELECT artist_id, artist, id, title FROM media_file WHERE ({where} OR artist_id IN "
                        f"({', '.join('?' * len(chunk))})){filt} ORDER BY id",
                        (*names, *names, *chunk),
                    )
                except EmbeddError:  # no artist_id column (not in every schema): names only
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
            artist = "artist_id"
            for start in range(0, len(ids), _IN_BATCH):
                batch = ids[start : start + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                try:
                    rows = await self._fetchall(
                        db, f"SELECT id, {library_id}, {artist} FROM media_file WHERE id IN ({marks}){filt}", tuple(batch)
                    )
                except EmbeddError:
                    if artist == "''":
                        raise
                    artist = "''"  # no artist_id column (not in every schema)
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
                key = self._stored_path(path, roots, schema)
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

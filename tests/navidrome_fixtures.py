"""Navidrome-schema SQLite databases for tests, in both path layouts.

The DDL is Navidrome's own SQLite schema (``db/migrations`` of
navidrome/navidrome: ``20200130083147_create_schema``, the float duration of
``20200220143731``, the MusicBrainz ids of ``20201021085410`` (the recording id's
column renamed by ``20230616214944``: the absolute layout keeps the old name),
``20240511220020_add_library_table`` and
``20241026183640_support_new_scanner``), trimmed to the columns and indexes
that matter for reading tracks but keeping their names, types and defaults.
Timestamps are written the way Go's SQLite driver writes ``time.Time``
(``2006-01-02 15:04:05.999999999-07:00``), ids the way Navidrome's legacy
track PID does (md5 of the path), and the database runs in WAL mode like a
live Navidrome.

``ConcurrentWriter`` plays Navidrome's scanner: a thread that keeps committing
with ``busy_timeout = 0``, so any lock held by a reader shows up as an error
instead of a silent wait.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import sqlite3
import threading
import time
from typing import Iterable, Literal

__all__ = [
    "ConcurrentWriter",
    "FixtureTrack",
    "NavidromeDB",
    "go_time",
]

Layout = Literal["relative", "absolute", "absolute_with_library"]

_MEDIA_FILE_LEGACY = """
create table if not exists media_file
(
	id varchar(255) not null
		primary key,
	path varchar(255) default '' not null,
	title varchar(255) default '' not null,
	album varchar(255) default '' not null,
	artist varchar(255) default '' not null,
	artist_id varchar(255) default '' not null,
	album_artist varchar(255) default '' not null,
	album_id varchar(255) default '' not null,
	has_cover_art bool default FALSE not null,
	track_number integer default 0 not null,
	disc_number integer default 0 not null,
	year integer default 0 not null,
	size integer default 0 not null,
	suffix varchar(255) default '' not null,
	duration real default 0 not null,
	bit_rate integer default 0 not null,
	genre varchar(255) default '' not null,
	compilation bool default FALSE not null,
	created_at datetime,
	updated_at datetime
);
create index if not exists media_file_album_id
	on media_file (album_id);
create index if not exists media_file_path
	on media_file (path);
create index if not exists media_file_title
	on media_file (title);
alter table media_file
	add mbz_track_id varchar(255);
"""

_RENAME_MBID = """
alter table media_file
	rename column mbz_track_id to mbz_recording_id;
"""

_LIBRARY = """
create table library (
	id integer primary key autoincrement,
	name text not null unique,
	path text not null unique,
	remote_path text null default '',
	last_scan_at datetime not null default '0000-00-00 00:00:00',
	updated_at datetime not null default current_timestamp,
	created_at datetime not null default current_timestamp
);
alter table media_file add column library_id integer not null default 1
	references library(id) on delete cascade;
"""

_NEW_SCANNER = """
alter table library
	add column last_scan_started_at datetime default '0000-00-00 00:00:00' not null;
alter table library
	add column full_scan_in_progress boolean default false not null;
alter table media_file
	add column folder_id varchar default '' not null;
alter table media_file
	add column pid varchar default '' not null;
alter table media_file
	add column missing boolean default false not null;
alter table media_file
	add column birth_time datetime default current_timestamp not null;
create index if not exists media_file_folder_id
	on media_file (folder_id);
create index if not exists media_file_pid
	on media_file (pid);
create index if not exists media_file_missing
	on media_file (missing);
"""


def go_time(t: float) -> str:
    """``t`` (Unix seconds) the way Go's SQLite driver stores a ``time.Time``."""
    d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    nanos = f"{d.microsecond * 1000:09d}".rstrip("0")
    return d.strftime("%Y-%m-%d %H:%M:%S") + (f".{nanos}" if nanos else "") + "+00:00"


@dataclasses.dataclass(slots=True)
class FixtureTrack:
    """What a test put in the database (paths as stored, not remapped)."""

    track_id: str
    stored_path: str
    library_id: int
    title: str
    artist: str
    album: str
    duration: float
    size: int
    mtime: float
    missing: bool = False
    mbid: str = ""  # MusicBrainz recording id


class NavidromeDB:
    """A Navidrome database file that tests write to the way Navidrome does.

    ``layout``: ``relative`` (current Navidrome: libraries, relative paths,
    ``missing``), ``absolute`` (before 0.52: absolute paths, no ``library``),
    ``absolute_with_library`` (0.52-0.54: a ``library`` row, absolute paths).
    ``libraries`` maps library id to its root path (absolute layouts use the
    first one as the music folder). Opening an existing file reuses its schema.
    """

    def __init__(self, path: str | os.PathLike[str], layout: Layout = "relative", libraries: dict[int, str] | None = None) -> None:
        self.path = os.fspath(path)
        self.layout: Layout = layout
        self.libraries = dict(libraries or {1: "/music"})
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self._seq = 0
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(media_file)")}
        self.mbid_column = "mbz_track_id" if "mbz_track_id" in columns or (not columns and layout == "absolute") else "mbz_recording_id"
        if columns:
            # Reopening (Navidrome restarted): keep the schema, continue the numbering.
            self._seq = self.conn.execute("select count(*) from media_file").fetchone()[0]
            return
        self.conn.executescript(_MEDIA_FILE_LEGACY)
        if layout != "absolute":
            self.conn.executescript(_RENAME_MBID)
            self.conn.executescript(_LIBRARY)
            now = go_time(time.time())
            for lib_id, lib_path in self.libraries.items():
                self.conn.execute(
                    "insert into library(id, name, path, updated_at, created_at) values (?, ?, ?, ?, ?)",
                    (lib_id, f"Library {lib_id}", lib_path, now, now),
                )
        if layout == "relative":
            self.conn.executescript(_NEW_SCANNER)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "NavidromeDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- building rows

    def make_track(self, rel_path: str | None = None, *, library_id: int | None = None, **overrides: object) -> FixtureTrack:
        """A track row (not yet inserted) under library ``library_id``; rel_path uses '/'."""
        self._seq += 1
        lib = library_id if library_id is not None else min(self.libraries)
        rel = rel_path or f"Artist {self._seq % 7}/Album {self._seq % 3}/{self._seq:05d} - Song.flac"
        if self.layout == "relative":
            stored = rel
        else:
            stored = os.path.join(self.libraries[lib], rel)
        fields: dict[str, object] = dict(
            track_id=hashlib.md5(f"{lib}:{stored}".encode()).hexdigest(),
            stored_path=stored,
            library_id=lib,
            title=f"Song {self._seq}",
            artist=f"Artist {self._seq % 7}",
            album=f"Album {self._seq % 3}",
            duration=180.0 + self._seq % 60,
            size=4_000_000 + self._seq,
            mtime=1_700_000_000.0 + self._seq + 0.123456789,
        )
        fields.update(overrides)
        return FixtureTrack(**fields)  # type: ignore[arg-type]

    def _row(self, t: FixtureTrack) -> dict[str, object]:
        row: dict[str, object] = dict(
            id=t.track_id,
            path=t.stored_path,
            title=t.title,
            album=t.album,
            artist=t.artist,
            album_artist=t.artist,
            size=t.size,
            suffix=os.path.splitext(t.stored_path)[1].lstrip("."),
            duration=t.duration,
            created_at=go_time(t.mtime),
            updated_at=go_time(t.mtime),
        )
        row[self.mbid_column] = t.mbid
        if self.layout != "absolute":
            row["library_id"] = t.library_id
        if self.layout == "relative":
            row.update(folder_id=hashlib.md5(os.path.dirname(t.stored_path).encode()).hexdigest(), pid=t.track_id, missing=int(t.missing))
        return row

    def insert(self, tracks: Iterable[FixtureTrack], conn: sqlite3.Connection | None = None) -> list[FixtureTrack]:
        """Insert (or replace) tracks in one transaction, as a scan batch would."""
        tracks = list(tracks)
        if not tracks:
            return tracks
        rows = [self._row(t) for t in tracks]
        cols = list(rows[0])
        sql = f"insert or replace into media_file ({', '.join(cols)}) values ({', '.join('?' for _ in cols)})"
        c = conn or self.conn
        c.execute("begin immediate")
        try:
            c.executemany(sql, [tuple(r[k] for k in cols) for r in rows])
            c.execute("commit")
        except BaseException:
            c.execute("rollback")
            raise
        return tracks

    def add_tracks(self, n: int, **kwargs: object) -> list[FixtureTrack]:
        return self.insert(self.make_track(**kwargs) for _ in range(n))  # type: ignore[arg-type]

    def change_track(self, t: FixtureTrack, **changes: object) -> FixtureTrack:
        """A rescanned file: new size/mtime/tags, same id."""
        changed = dataclasses.replace(t, **changes)
        self.insert([changed])
        return changed

    def mark_missing(self, t: FixtureTrack) -> FixtureTrack:
        """What the new scanner does when a file disappears (relative layout only)."""
        if self.layout != "relative":
            raise ValueError("only the relative layout has media_file.missing")
        self.conn.execute("update media_file set missing = true, updated_at = ? where id = ?", (go_time(time.time()), t.track_id))
        return dataclasses.replace(t, missing=True)

    def delete_track(self, t: FixtureTrack) -> None:
        self.conn.execute("delete from media_file where id = ?", (t.track_id,))

    def add_library(self, lib_id: int, path: str) -> None:
        if self.layout == "absolute":
            raise ValueError("the absolute layout has no library table")
        now = go_time(time.time())
        self.conn.execute(
            "insert into library(id, name, path, updated_at, created_at) values (?, ?, ?, ?, ?)", (lib_id, f"Library {lib_id}", path, now, now)
        )
        self.libraries[lib_id] = path


class ConcurrentWriter:
    """A thread committing small scan-like transactions until stopped.

    ``busy_timeout = 0``: a write that meets a lock fails at once and is
    counted in ``errors`` instead of waiting, so a test can assert that the
    reader never blocked Navidrome. ``checkpoint=True`` also runs
    ``wal_checkpoint(TRUNCATE)`` after each commit; that needs every reader to
    have left its snapshot, and ``checkpoint_busy`` counts the times it could not.
    """

    def __init__(self, db: NavidromeDB, *, interval_s: float = 0.002, checkpoint: bool = False) -> None:
        self.db = db
        self.interval_s = interval_s
        self.checkpoint = checkpoint
        self.commits = 0
        self.checkpoints = 0
        self.checkpoint_busy = 0
        self.errors: list[BaseException] = []
        self.written: list[FixtureTrack] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="navidrome-writer", daemon=True)

    def _run(self) -> None:
        conn = sqlite3.connect(self.db.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            while not self._stop.is_set():
                track = self.db.make_track()
                try:
                    self.db.insert([track], conn=conn)
                    self.written.append(track)
                    self.commits += 1
                    if self.checkpoint:
                        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                        self.checkpoints += 1
                        self.checkpoint_busy += int(busy)
                except sqlite3.Error as exc:
                    self.errors.append(exc)
                time.sleep(self.interval_s)
        finally:
            conn.close()

    def __enter__(self) -> "ConcurrentWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

"""The library watcher's look at Navidrome's database: cheap change signals, scan state, media_file pages.

Owns every read of Navidrome's database the watcher makes (:mod:`embedd.batch.watch`),
all read-only (``mode=ro``, ``query_only``) and synchronous (the watcher calls
them on a thread): the poll's signature (``stat()`` of the database and its
``-wal`` plus ``PRAGMA data_version``, no rows read), the ``library`` table's
scan bookkeeping (or, before Navidrome 0.52, two index look-ups), and the
keyset pages of ``media_file`` a diff reads. Kept apart from the watcher's
decisions so the SQL and the schema differences between Navidrome versions
live in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import urllib.parse
from typing import Any

from embedd.errors import Code, EmbeddError
from embedd.library import _quiescent_wal, parse_navidrome_time

__all__ = ["NavidromeProbe", "ScanState"]


@dataclasses.dataclass(frozen=True, slots=True)
class ScanState:
    token: str  # changes when a scan finished (or, on old schemas, when media_file changed)
    in_progress: bool
    last_scan_at: float | None
    rows_read: int


class NavidromeProbe:
    """Read-only looks at Navidrome's database; synchronous (call it on a thread)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = os.path.abspath(os.fspath(db_path))

    _version_conn: sqlite3.Connection | None = None

    def _data_version(self) -> int | None:
        """``PRAGMA data_version`` on a connection kept open for it: it changes with every commit by
        another connection (a stat() can miss a write within one timestamp tick after a WAL reset).
        Autocommit and never inside a read, so it holds no WAL snapshot and delays no checkpoint."""
        try:
            if self._version_conn is None:
                uri = "file:" + urllib.parse.quote(self.db_path) + "?mode=ro"
                self._version_conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0, check_same_thread=False)
            return int(self._version_conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            self.close()
            return None

    def close(self) -> None:
        conn, self._version_conn = self._version_conn, None
        if conn is not None:
            conn.close()

    def signature(self) -> tuple:
        """stat() of the database and its WAL plus data_version: equal signatures, nothing was written in between."""
        out: list[Any] = [self._data_version() if os.path.exists(self.db_path + "-wal") else None]
        for suffix in ("", "-wal"):
            try:
                st = os.stat(self.db_path + suffix)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    @contextlib.contextmanager
    def _connect(self):
        if not os.path.isfile(self.db_path):
            raise EmbeddError(Code.UNAVAILABLE, f"Navidrome database {self.db_path} does not exist.")
        uri = "file:" + urllib.parse.quote(self.db_path) + "?mode=ro"
        if _quiescent_wal(self.db_path):
            uri += "&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise EmbeddError(Code.UNAVAILABLE, f"Navidrome database {self.db_path} cannot be opened ({exc}).") from exc
        try:
            conn.execute("PRAGMA query_only = 1")
            yield conn
        except sqlite3.Error as exc:
            raise EmbeddError(Code.UNAVAILABLE, f"Navidrome database {self.db_path} could not be read ({exc}).") from exc
        finally:
            conn.close()

    @staticmethod
    def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}

    def scan_state(self) -> ScanState:
        with self._connect() as conn:
            lib = self._columns(conn, "library")
            if "last_scan_at" in lib:
                started = "last_scan_started_at" if "last_scan_started_at" in lib else "NULL"
                full = "full_scan_in_progress" if "full_scan_in_progress" in lib else "0"
                rows = conn.execute(f"SELECT id, last_scan_at, {started}, {full} FROM library ORDER BY id").fetchall()
                in_progress, last = False, None
                for _, done_at, started_at, full_scan in rows:
                    done, begun = parse_navidrome_time(done_at), parse_navidrome_time(started_at)
                    if full_scan or (begun is not None and (done is None or begun > done)):
                        in_progress = True
                    if done is not None:
                        last = max(last or done, done)
                token = json.dumps([[r[0], str(r[1])] for r in rows])
                return ScanState(token, in_progress, last, len(rows))
            # Before Navidrome 0.52: no scan bookkeeping; the newest row and the newest change (index look-ups).
            row = conn.execute("SELECT max(rowid), max(updated_at), (SELECT count(*) FROM media_file) FROM media_file").fetchone()
            return ScanState(json.dumps([str(v) for v in row]), False, None, 3)

    def page(self, after: str, limit: int) -> list[tuple[str, int, str, int, str, int]]:
        """(id, library_id, path, size, updated_at, missing) of ``limit`` rows after ``after``, by id."""
        with self._connect() as conn:
            cols = self._columns(conn, "media_file")
            lib = "library_id" if "library_id" in cols else "0"
            missing = "missing" if "missing" in cols else "0"
            return [
                (str(r[0]), int(r[1] or 0), str(r[2] or ""), int(r[3] or 0), str(r[4] or ""), int(bool(r[5])))
                for r in conn.execute(
                    f"SELECT id, {lib}, path, size, updated_at, {missing} FROM media_file WHERE id > ? ORDER BY id LIMIT ?",
                    (after, limit),
                )
            ]


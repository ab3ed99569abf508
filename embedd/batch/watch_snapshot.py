"""The library watcher's own snapshot: the library as last seen, the diff, pending and taken tracks.

Owns the watcher's SQLite file (``DATA_DIR/library-watch.sqlite3``): one row
per Navidrome track (id, library, path, size, ``updated_at``, ``missing``),
the tracks pending for the next automatic job (added, changed, removed), those
an automatic job took (given back if it fails), and those held missing. Its
:meth:`Snapshot.diff` compares ``media_file`` with it page by page, once per
finished scan, and applies the mass-missing guard (:data:`MASS_MISSING_SHARE`).
Kept apart from the watcher's poll and debounce (:mod:`embedd.batch.watch`)
and from Navidrome's side (:mod:`embedd.batch.watch_probe`): this is the one
place the watcher writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedd.batch.watch_probe import NavidromeProbe

__all__ = ["MASS_MISSING_MIN", "MASS_MISSING_SHARE", "PAGE", "WATCH_FILE", "DiffStats", "Snapshot"]

# The watcher's logger: its messages read the same whichever of its modules says them.
log = logging.getLogger("embedd.batch.watch")

#: The snapshot's file, under DATA_DIR.
WATCH_FILE = "library-watch.sqlite3"
#: media_file rows per diff page (one short read each).
PAGE = 5000
#: A scan that marks more than this share of the library missing (and at least MASS_MISSING_MIN tracks) is held.
MASS_MISSING_SHARE = 0.10
MASS_MISSING_MIN = 20
_KINDS = ("added", "changed", "removed")


@dataclasses.dataclass(slots=True)
class DiffStats:
    added: int = 0
    changed: int = 0
    removed: int = 0
    held: int = 0
    rows_read: int = 0
    baseline: bool = False

    @property
    def any(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.held)


class Snapshot:
    """The watcher's own SQLite file: the library as last seen, what is pending, what a job took."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        c = self._conn
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute(
            "CREATE TABLE IF NOT EXISTS snap (id TEXT PRIMARY KEY, lib INTEGER NOT NULL, path TEXT NOT NULL,"
            " size INTEGER NOT NULL, updated_at TEXT NOT NULL, missing INTEGER NOT NULL) WITHOUT ROWID"
        )
        c.execute("CREATE TABLE IF NOT EXISTS pending (id TEXT PRIMARY KEY, kind TEXT NOT NULL) WITHOUT ROWID")
        c.execute(
            "CREATE TABLE IF NOT EXISTS taken (job_id TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL,"
            " PRIMARY KEY (job_id, id)) WITHOUT ROWID"
        )
        c.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID")
        # missing tracks whose vectors are kept (a mass-missing scan), until they are deleted or come back
        c.execute("CREATE TABLE IF NOT EXISTS held (id TEXT PRIMARY KEY) WITHOUT ROWID")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def held_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM held").fetchone()[0])

    def pending_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._conn.execute("SELECT kind, count(*) FROM pending GROUP BY kind").fetchall())
        return {k: int(counts.get(k, 0)) for k in _KINDS}

    def diff(self, probe: NavidromeProbe, page: int = PAGE) -> DiffStats:
        """Compare media_file with the snapshot page by page; record what changed as pending."""
        stats = DiffStats(baseline=self.meta("baseline") is None)
        newly_missing: list[str] = []
        present = 0
        after = ""
        while True:
            rows = probe.page(after, page)
            stats.rows_read += len(rows)
            last = rows[-1][0] if len(rows) == page else None
            with self._lock:
                sql = "SELECT id, lib, path, size, updated_at, missing FROM snap WHERE id > ?"
                args: tuple = (after,)
                if last is not None:
                    sql, args = sql + " AND id <= ?", (after, last)
                known = {r[0]: r for r in self._conn.execute(sql, args)}
            upserts, pend = [], []
            for row in rows:
                tid, missing = row[0], row[5]
                present += not missing
                old = known.pop(tid, None)
                if old == row:
                    continue
                upserts.append(row)
                if old is None:
                    if not missing:
                        pend.append((tid, "added"))
                elif missing and not old[5]:
                    newly_missing.append(tid)
                elif not missing:
                    pend.append((tid, "changed"))  # changed in place, or back from missing
            gone = list(known)  # in the snapshot, no longer in media_file: deleted
            pend.extend((tid, "removed") for tid in gone)
            with self._lock:
                c = self._conn
                c.execute("BEGIN IMMEDIATE")
                c.executemany("INSERT OR REPLACE INTO snap (id, lib, path, size, updated_at, missing) VALUES (?, ?, ?, ?, ?, ?)", upserts)
                c.executemany("DELETE FROM snap WHERE id = ?", ((t,) for t in gone))
                c.executemany("DELETE FROM held WHERE id = ?", [(r[0],) for r in upserts if not r[5]] + [(t,) for t in gone])
                if not stats.baseline:
                    self._add_pending(pend)
                c.execute("COMMIT")
            if not stats.baseline:
                for _, kind in pend:
                    setattr(stats, kind, getattr(stats, kind) + 1)
            if last is None:
                break
            after = last
        if stats.baseline:
            self.set_meta("baseline", str(time.time()))
        elif newly_missing:
            if len(newly_missing) >= MASS_MISSING_MIN and len(newly_missing) > MASS_MISSING_SHARE * (present + len(newly_missing)):
                stats.held = len(newly_missing)
                log.warning(
                    "library watch: %d tracks were marked missing at once (an unmounted share?); their vectors are kept "
                    "until Navidrome deletes the rows or the files come back", len(newly_missing),
                )  # fmt: skip
                with self._lock:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.executemany("INSERT OR IGNORE INTO held (id) VALUES (?)", ((t,) for t in newly_missing))
                    self._conn.execute("COMMIT")
            else:
                with self._lock:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._add_pending([(t, "removed") for t in newly_missing])
                    self._conn.execute("COMMIT")
                stats.removed += len(newly_missing)
        return stats

    def _add_pending(self, items: list[tuple[str, str]]) -> None:
        # Added then changed stays "added"; anything else: the latest word.
        self._conn.executemany(
            "INSERT INTO pending (id, kind) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET kind ="
            " CASE WHEN pending.kind = 'added' AND excluded.kind = 'changed' THEN 'added' ELSE excluded.kind END",
            items,
        )

    def take(self, job_id: str) -> list[str]:
        """Move every pending track to ``job_id``'s share; returns their ids."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT OR REPLACE INTO taken (job_id, id, kind) SELECT ?, id, kind FROM pending", (job_id,))
            c.execute("DELETE FROM pending")
            ids = [r[0] for r in c.execute("SELECT id FROM taken WHERE job_id = ? ORDER BY id", (job_id,))]
            c.execute("COMMIT")
        return ids

    def pending_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT id FROM pending ORDER BY id")]

    def taken_jobs(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT DISTINCT job_id FROM taken")]

    def settle(self, job_id: str, *, give_back: bool) -> int:
        """The job ended: forget its share, or (it failed) give its tracks back to pending."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            n = 0
            if give_back:
                rows = c.execute("SELECT id, kind FROM taken WHERE job_id = ?", (job_id,)).fetchall()
                c.executemany("INSERT OR IGNORE INTO pending (id, kind) VALUES (?, ?)", rows)
                n = len(rows)
            c.execute("DELETE FROM taken WHERE job_id = ?", (job_id,))
            c.execute("COMMIT")
        return n

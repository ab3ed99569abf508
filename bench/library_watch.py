"""The library watcher's cost per poll at 1k, 10k and 100k tracks (issue 20): time and rows read.

    .venv/bin/python bench/library_watch.py [--sizes 1000,10000,100000]

Over a Navidrome-schema database in WAL mode (tests/navidrome_fixtures.py),
never checkpointed during the run, it measures what one watcher poll costs:

* idle: nothing was written since the last poll (stat + data_version only);
* write: Navidrome wrote something else (a play count, say): the library row;
* scan: a scan finished with 10 tracks added, 10 changed and 10 marked missing:
  the library row plus the one diff of media_file against the snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedd.batch.job import Job  # noqa: E402
from embedd.batch.watch import LibraryWatcher, NavidromeProbe, Snapshot, WatchConfig  # noqa: E402
from tests.navidrome_fixtures import NavidromeDB, go_time  # noqa: E402


class _NoJobs:
    active_job: Job | None = None

    async def start_auto(self, models, scope) -> Job:
        raise AssertionError("the bench never starts a job")

    async def finished_job(self, job_id: str) -> Job | None:
        return None


async def _poll(w: LibraryWatcher) -> tuple[float, int]:
    t = time.perf_counter()
    await w.poll()
    return time.perf_counter() - t, w.last_poll["rows_read"] + w.last_poll["diff_rows_read"]


async def measure(n: int, repeats: int) -> dict[str, tuple[float, int]]:
    with tempfile.TemporaryDirectory() as d:
        db = NavidromeDB(os.path.join(d, "navidrome.db"), "relative")
        db.conn.execute("PRAGMA wal_autocheckpoint = 0")
        for start in range(0, n, 10_000):
            db.add_tracks(min(10_000, n - start))
        db.conn.execute("update library set last_scan_at = ?", (go_time(time.time() - 60),))

        async def models() -> list[str]:
            return []

        w = LibraryWatcher(
            WatchConfig(quiet_s=1e9), probe=NavidromeProbe(db.path), snapshot=Snapshot(os.path.join(d, "watch.sqlite3")),
            jobs=_NoJobs(), models_with_vectors=models,
        )  # fmt: skip
        out = {"baseline": await _poll(w)}
        idle, write, scan = [], [], []
        for i in range(repeats):
            idle.append(await _poll(w))
            db.conn.execute("update library set updated_at = ?", (go_time(time.time()),))  # not a scan
            write.append(await _poll(w))
            db.add_tracks(10)
            changed = db.conn.execute("select id from media_file order by random() limit 20").fetchall()
            for (tid,) in changed[:10]:
                db.conn.execute("update media_file set size = size + 1, updated_at = ? where id = ?", (go_time(time.time()), tid))
            for (tid,) in changed[10:]:
                db.conn.execute("update media_file set missing = true where id = ?", (tid,))
            db.conn.execute("update library set last_scan_at = ?", (go_time(time.time() + i),))
            scan.append(await _poll(w))
        for name, samples in (("idle", idle), ("write", write), ("scan", scan)):
            out[name] = (statistics.median(s[0] for s in samples), max(s[1] for s in samples))
        await w.stop()
        db.close()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'tracks':>8}  {'poll':<30} {'median ms':>10} {'rows read':>10}")
    for n in (int(x) for x in args.sizes.split(",")):
        res = asyncio.run(measure(n, args.repeats))
        for name, label in (("idle", "idle (nothing written)"), ("write", "other write (library row)"),
                            ("scan", "scan finished (diff)"), ("baseline", "first poll (snapshot)")):  # fmt: skip
            t, rows = res[name]
            print(f"{n:>8}  {label:<30} {t * 1000:>10.2f} {rows:>10}")


if __name__ == "__main__":
    main()

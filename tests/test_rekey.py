"""Which stored vectors an incremental job re-keys: the scan index's set logic (pure SQLite).

The end-to-end behaviour (every Navidrome id rewritten, the job re-keys instead
of re-embedding) is tested through the daemon in tests/test_migration.py.
"""

from __future__ import annotations

from pathlib import Path

from embedd.batch.scan import MTIME_TOLERANCE_S, ScanIndex as _ScanIndex
from embedd.library import Track


def _track(tid: str, path: str, size: int = 100, mtime: float = 1_700_000_000.25) -> Track:
    return Track(tid, path, f"title {tid}", "artist", "album", 180.0, size, mtime)


def _index(tmp_path: Path) -> _ScanIndex:
    scan = _ScanIndex(str(tmp_path / "scan.sqlite3"))
    scan.reset("job-1")
    return scan


def test_same_file_under_a_new_id_is_a_move_and_nothing_else_is(tmp_path: Path) -> None:
    scan = _index(tmp_path)
    t = 1_700_000_000.25
    scan.add("muq", [
        ("old-a", 100, t, "/m/a.flac"),  # moved: same path, size, mtime
        ("old-b", 100, t, "/m/b.flac"),  # the file changed (size): embedded again, not moved
        ("old-c", 100, t, "/m/c.flac"),  # the new id has a vector already: nothing to move
        ("new-c", 100, t, "/m/c.flac"),
        ("old-d", 100, t, "/m/d.flac"),  # mtime within the tolerance: moved
        ("kept", 100, t, "/m/k.flac"),  # still in the library
        ("gone", 100, t, "/m/gone.flac"),  # really left: deleted, not moved
        ("legacy", 100, t, ""),  # no path recorded: never moved
    ])  # fmt: skip
    library = [
        _track("new-a", "/m/a.flac"), _track("new-b", "/m/b.flac", size=101), _track("new-c", "/m/c.flac"),
        _track("new-d", "/m/d.flac", mtime=t + MTIME_TOLERANCE_S / 2), _track("kept", "/m/k.flac"),
    ]  # fmt: skip
    scan.mark_seen([x.track_id for x in library])
    scan.add_library(library)
    moves = scan.moves("muq", 100)
    assert [(m.old_id, m.new_id) for m in moves] == [("old-a", "new-a"), ("old-d", "new-d")]
    assert moves[0].title == "title new-a" and moves[0].path == "/m/a.flac" and moves[0].file_size == 100
    assert scan.moves("latent", 100) == []  # per model

    scan.moved("muq", moves, done={"new-a"})  # old-d's vector turned out to be gone already
    assert scan.moves("muq", 100) == [] and scan.rekeyed_count() == 1
    assert scan.lookup(["new-a", "old-a", "new-d"]) == {("muq", "new-a"): (100, t)}
    assert sorted(scan.unseen("", 100)) == [("gone", "muq"), ("legacy", "muq"), ("old-b", "muq"), ("old-c", "muq")]
    scan.close()


def test_one_move_per_old_and_per_new_id(tmp_path: Path) -> None:
    scan = _index(tmp_path)
    t = 1_700_000_000.0
    # two stored ids for one file (an earlier embed_file store=true, say), one library row for it
    scan.add("mert", [("old-1", 5, t, "/m/x.flac"), ("old-2", 5, t, "/m/x.flac")])
    scan.mark_seen(["new"])
    scan.add_library([_track("new", "/m/x.flac", size=5, mtime=t)])
    first = scan.moves("mert", 100)
    assert [(m.old_id, m.new_id) for m in first] == [("old-1", "new")]
    scan.moved("mert", first, done={"new"})
    assert scan.moves("mert", 100) == []  # old-2 is stale now: deleted by the job, not moved
    assert scan.unseen("", 10) == [("old-2", "mert")]


def test_the_count_survives_a_rescan_of_the_same_job_only(tmp_path: Path) -> None:
    scan = _index(tmp_path)
    scan.add("muq", [("o", 1, 0.0, "/p")])
    scan.add_library([_track("n", "/p", size=1, mtime=0.0)])
    scan.moved("muq", scan.moves("muq", 10), done={"n"})
    scan.reset("job-1")  # a resumed job scans again: what it re-keyed before still counts
    assert scan.rekeyed_count() == 1
    scan.reset("job-2")
    assert scan.rekeyed_count() == 0
    scan.close()
    again = _ScanIndex(scan.path)  # reopened: same layout, kept
    assert again.state() == ("job-2", False)
    again.close()

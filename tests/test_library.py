"""The track source against Navidrome-schema databases in every layout."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import os
import sqlite3
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.errors import Code, EmbeddError
from embedd.library import Identity, NavidromeLibrary, Shard, Track, parse_navidrome_time, parse_shard, shard_of
from tests.navidrome_fixtures import ConcurrentWriter, NavidromeDB, go_time

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_db():
    """NavidromeDB factory whose connections are closed after the test."""
    made: list[NavidromeDB] = []

    def make(*args: object, **kwargs: object) -> NavidromeDB:
        db = NavidromeDB(*args, **kwargs)  # type: ignore[arg-type]
        made.append(db)
        return db

    yield make
    for db in made:
        db.close()


async def collect(lib: NavidromeLibrary, **kw: object) -> list[Track]:
    return [t async for t in lib.iter_tracks(**kw)]  # type: ignore[arg-type]


# ---------------------------------------------------------------- layouts


@pytest.mark.asyncio
async def test_relative_layout_several_libraries_and_missing(tmp_path, make_db):
    db = make_db(tmp_path / "navidrome.db", "relative", {1: "/srv/music/main", 2: "/srv/music/classical"})
    a = db.insert([db.make_track("A/One/01 - x.flac", library_id=1, title="X", artist="A")])[0]
    b = db.insert([db.make_track("Bach/Suite/02 - y.mp3", library_id=2)])[0]
    gone = db.insert([db.make_track("A/One/03 - gone.flac", library_id=1)])[0]
    db.mark_missing(gone)
    lib = NavidromeLibrary(db.path, page_size=2)
    assert await lib.layout() == "relative"
    tracks = {t.track_id: t for t in await collect(lib)}
    assert set(tracks) == {a.track_id, b.track_id}
    assert tracks[a.track_id].path == "/srv/music/main/A/One/01 - x.flac"
    assert tracks[b.track_id].path == "/srv/music/classical/Bach/Suite/02 - y.mp3"
    assert tracks[a.track_id].library_id == 1 and tracks[b.track_id].library_id == 2
    t = tracks[a.track_id]
    assert (t.title, t.artist, t.display_name) == ("X", "A", "A - X")
    assert t.file_size == a.size and t.duration_s == pytest.approx(a.duration)
    assert t.file_mtime == pytest.approx(a.mtime, abs=1e-6)
    assert await lib.count() == 2
    assert await lib.get_track(gone.track_id) is None
    assert await lib.get_track("no-such-id") is None
    assert (await lib.get_track(b.track_id)) == tracks[b.track_id]


@pytest.mark.asyncio
async def test_music_root_remaps_common_root_of_libraries(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db", "relative", {1: "/srv/music/main", 2: "/srv/music/classical"})
    a = db.insert([db.make_track("A/01.flac", library_id=1)])[0]
    b = db.insert([db.make_track("B/02.flac", library_id=2)])[0]
    lib = NavidromeLibrary(db.path, music_root="/mnt/nas/")
    paths = {t.track_id: t.path for t in await collect(lib)}
    assert paths == {a.track_id: "/mnt/nas/main/A/01.flac", b.track_id: "/mnt/nas/classical/B/02.flac"}
    assert (await lib.get_track(a.track_id)).path == "/mnt/nas/main/A/01.flac"  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_music_root_single_library_replaces_library_path(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db", "relative", {1: "/music"})
    a = db.insert([db.make_track("Solo Artist/Album/01.flac")])[0]
    lib = NavidromeLibrary(db.path, music_root="/data/music")
    assert [t.path for t in await collect(lib)] == ["/data/music/Solo Artist/Album/01.flac"]
    assert a.track_id == (await collect(lib))[0].track_id


@pytest.mark.asyncio
async def test_library_added_during_iteration_is_resolved(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db", "relative", {1: "/music"})
    db.add_tracks(5)
    lib = NavidromeLibrary(db.path, page_size=2)
    seen: list[Track] = []
    async for t in lib.iter_tracks():
        if not seen:
            db.add_library(2, "/other")
            db.insert([db.make_track("New/zz.flac", library_id=2, track_id="ffffffff")])
        seen.append(t)
    assert seen[-1].track_id == "ffffffff" and seen[-1].path == "/other/New/zz.flac"


@pytest.mark.asyncio
@pytest.mark.parametrize("layout", ["absolute", "absolute_with_library"])
async def test_absolute_layouts(tmp_path, layout, make_db):
    db = make_db(tmp_path / "nd.db", layout, {1: "/home/nd/Music"})
    a, b = db.insert([db.make_track("A/01.flac"), db.make_track("B/02.flac")])
    lib = NavidromeLibrary(db.path)
    assert await lib.layout() == "absolute"
    assert {t.path for t in await collect(lib)} == {"/home/nd/Music/A/01.flac", "/home/nd/Music/B/02.flac"}
    remapped = NavidromeLibrary(db.path, music_root="/mnt/music")
    assert {t.path for t in await collect(remapped)} == {"/mnt/music/A/01.flac", "/mnt/music/B/02.flac"}
    assert await remapped.count() == 2
    assert (await remapped.get_track(a.track_id)).path == "/mnt/music/A/01.flac"  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_absolute_layout_single_folder_needs_original_root(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db", "absolute", {1: "/music"})
    db.insert([db.make_track("Only Artist/A/01.flac"), db.make_track("Only Artist/B/02.flac")])
    guessed = NavidromeLibrary(db.path, music_root="/mnt")
    # The guess (common folder of all paths) is one level too deep here ...
    assert {t.path for t in await collect(guessed)} == {"/mnt/A/01.flac", "/mnt/B/02.flac"}
    # ... which Navidrome's music folder, given explicitly, fixes.
    exact = NavidromeLibrary(db.path, music_root="/mnt", original_root="/music")
    assert {t.path for t in await collect(exact)} == {"/mnt/Only Artist/A/01.flac", "/mnt/Only Artist/B/02.flac"}
    # A path outside the original root is left alone, not misplaced.
    db.insert([db.make_track(track_id="elsewhere", stored_path="/elsewhere/x.flac")])
    assert "/elsewhere/x.flac" in {t.path for t in await collect(exact)}


@pytest.mark.asyncio
@pytest.mark.parametrize("layout", ["relative", "absolute", "absolute_with_library"])
async def test_identify_finds_current_ids_by_path_after_an_id_migration(tmp_path, layout, make_db):
    """Stored (id, path) pairs resolve to Navidrome's current id and MusicBrainz id, by id and else by path."""
    libraries = {1: "/srv/music/main", 2: "/srv/music/classical"} if layout == "relative" else {1: "/srv/music"}
    db = make_db(tmp_path / "navidrome.db", layout, libraries)
    kept = db.insert([db.make_track("A/One/01 - kept.flac", mbid="mb-kept")])[0]
    renamed = db.insert([db.make_track("A/One/02 - renamed.flac", mbid="mb-renamed")])[0]
    untagged = db.insert([db.make_track("A/One/03 - untagged.flac")])[0]
    same_rel = None
    if layout == "relative":  # the same relative path in another library is another file
        same_rel = db.insert([db.make_track("A/One/02 - renamed.flac", library_id=2, mbid="mb-other-library")])[0]
    lib = NavidromeLibrary(db.path, music_root="/mnt/music")
    paths = {t.track_id: t.path for t in await collect(lib)}
    db.conn.execute("update media_file set id = 'new-' || id where id = ?", (renamed.track_id,))
    gone = ("gone-id", paths[kept.track_id].replace("01 - kept", "09 - gone"))
    stored = [(kept.track_id, paths[kept.track_id]), (renamed.track_id, paths[renamed.track_id]),
              (untagged.track_id, ""), gone]  # fmt: skip
    found = await lib.identify(stored)
    assert found == {
        kept.track_id: Identity(kept.track_id, "mb-kept"),
        renamed.track_id: Identity("new-" + renamed.track_id, "mb-renamed"),
        untagged.track_id: Identity(untagged.track_id, ""),
    }
    if same_rel is not None:
        assert (await lib.identify([(same_rel.track_id, paths[same_rel.track_id])]))[same_rel.track_id].mbid == "mb-other-library"
    if layout == "relative":
        db.mark_missing(kept)
    else:
        db.delete_track(kept)
    assert kept.track_id not in await lib.identify(stored)  # a file Navidrome no longer has is nobody
    assert await lib.identify([]) == {}


def test_display_name_fallbacks():
    t = Track("id1", "/m/a/01 - Song.flac", "", "", "", 0.0, 0, None)
    assert t.display_name == "01 - Song"
    assert Track("id1", "/m/x.flac", "Title", "", "", 0.0, 0, None).display_name == "Title"
    assert Track("id1", "/m/x.flac", "T", "Art", "", 0.0, 0, None).display_name == "Art - T"


def test_parse_navidrome_time():
    assert parse_navidrome_time("2024-05-11 22:00:20.123456789+00:00") == pytest.approx(1715464820.123456)
    assert parse_navidrome_time("2024-05-11 22:00:20+02:00") == pytest.approx(1715464820 - 7200)
    assert parse_navidrome_time("2024-05-11 22:00:20") == pytest.approx(1715464820)
    assert parse_navidrome_time("2024-05-11T22:00:20Z") == pytest.approx(1715464820)
    assert parse_navidrome_time("0000-00-00 00:00:00") is None
    assert parse_navidrome_time("0001-01-01 00:00:00+00:00") is None
    assert parse_navidrome_time(None) is None and parse_navidrome_time("garbage") is None
    assert parse_navidrome_time(1715464820) == 1715464820.0
    assert parse_navidrome_time(go_time(1_700_000_000.5)) == pytest.approx(1_700_000_000.5)


@given(
    st.integers(min_value=63_072_000, max_value=4_102_444_800),  # 1972 .. 2100 (before 1971 means unset)
    st.integers(min_value=0, max_value=999_999_999),
    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
)
def test_parse_navidrome_time_reads_go_times_in_any_zone(seconds, nanos, offset_min):
    """Go's ``2006-01-02 15:04:05.999999999-07:00``: nanoseconds truncated to microseconds, any offset."""
    zone = dt.timezone(dt.timedelta(minutes=offset_min))
    local = dt.datetime.fromtimestamp(seconds, zone)
    sign, hours, minutes = "+" if offset_min >= 0 else "-", abs(offset_min) // 60, abs(offset_min) % 60
    text = local.strftime("%Y-%m-%d %H:%M:%S") + f".{nanos:09d}".rstrip("0").rstrip(".") + f"{sign}{hours:02d}:{minutes:02d}"
    assert parse_navidrome_time(text) == pytest.approx(seconds + nanos // 1000 / 1e6, rel=0, abs=1e-6)
    assert parse_navidrome_time(text.encode()) == parse_navidrome_time(f" {text}\n")


# ---------------------------------------------------------------- errors


@pytest.mark.asyncio
async def test_missing_database_is_unavailable_and_named(tmp_path):
    path = tmp_path / "absent.db"
    with pytest.raises(EmbeddError) as e:
        await NavidromeLibrary(path).count()
    assert e.value.code is Code.UNAVAILABLE and str(path) in e.value.message
    assert not path.exists()  # read-only open never creates it


@pytest.mark.asyncio
async def test_not_sqlite_and_not_navidrome(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(EmbeddError) as e:
        await collect(NavidromeLibrary(junk))
    assert e.value.code is Code.UNAVAILABLE and str(junk) in e.value.message

    other = tmp_path / "other.db"
    sqlite3.connect(other).executescript("create table t(x); insert into t values (1);")
    with pytest.raises(EmbeddError) as e:
        await NavidromeLibrary(other).get_track("x")
    assert e.value.code is Code.UNAVAILABLE and "not a Navidrome database" in e.value.message

    partial = tmp_path / "partial.db"
    sqlite3.connect(partial).executescript("create table media_file(id, path);")
    with pytest.raises(EmbeddError) as e:
        await NavidromeLibrary(partial).count()
    assert "lacks" in e.value.message and "title" in e.value.message


@pytest.mark.asyncio
async def test_reader_cannot_write(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    db.add_tracks(3)
    lib = NavidromeLibrary(db.path)
    async with lib._connect() as (conn, _):
        with pytest.raises(sqlite3.OperationalError):
            await conn.execute("delete from media_file")
    assert await lib.count() == 3


# ---------------------------------------------------------------- never lock Navidrome out


@pytest.mark.asyncio
async def test_stopped_navidrome_gets_no_side_files_from_us(tmp_path):
    db = NavidromeDB(tmp_path / "nd.db")
    db.add_tracks(30)
    db.close()  # Navidrome stopped: its last connection removed -wal and -shm
    assert sorted(os.listdir(tmp_path)) == ["nd.db"]
    lib = NavidromeLibrary(tmp_path / "nd.db", page_size=7)
    assert len(await collect(lib)) == 30 and await lib.count() == 30
    # Files we created would belong to the daemon's user and could lock Navidrome out.
    assert sorted(os.listdir(tmp_path)) == ["nd.db"]
    # Navidrome starts again and writes while we read: we see its WAL.
    db = NavidromeDB(tmp_path / "nd.db")
    db.add_tracks(5)
    assert await lib.count() == 35
    db.close()



@pytest.mark.asyncio
async def test_paging_alongside_a_writer_never_blocks_it(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    db.add_tracks(2_000)
    lib = NavidromeLibrary(db.path, page_size=100)
    with ConcurrentWriter(db, interval_s=0.001) as writer:
        n = 0
        async for _ in lib.iter_tracks():
            n += 1
            if n % 100 == 50:
                await asyncio.sleep(0.005)  # a slow consumer: the writer keeps committing
        before = writer.commits
        deadline = time.monotonic() + 5
        while writer.commits <= before and time.monotonic() < deadline:  # the writer is still committing
            await asyncio.sleep(0.001)
    assert writer.errors == []  # busy_timeout=0: any lock we held would have failed a commit
    assert before > 10 and writer.commits > before
    assert n >= 2_000


@pytest.mark.asyncio
async def test_no_read_snapshot_survives_a_page(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    db.add_tracks(1_000)
    lib = NavidromeLibrary(db.path, page_size=100)
    probe = sqlite3.connect(db.path, isolation_level=None)
    probe.execute("PRAGMA busy_timeout = 0")
    truncated = 0
    n = 0
    async for _ in lib.iter_tracks():
        n += 1
        if n % 100 in (0, 50):  # between pages, and mid-page while the consumer works
            db.insert([db.make_track()])  # something in the WAL to checkpoint
            # TRUNCATE finishes only when no reader holds a WAL snapshot: the
            # iteration keeps none open while its caller has control.
            busy, log, done = probe.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            assert busy == 0 and log == done == 0, f"a read snapshot outlived its page (row {n})"
            truncated += 1
    probe.close()
    assert truncated >= 20 and n >= 1_000


@pytest.mark.asyncio
async def test_pages_see_changes_ahead_of_the_cursor(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    tracks = db.insert(db.make_track(track_id=f"id{i:04d}") for i in range(50))
    lib = NavidromeLibrary(db.path, page_size=10)
    seen = []
    async for t in lib.iter_tracks():
        if t.track_id == "id0005":  # in the first page
            db.delete_track(tracks[40])
            db.mark_missing(tracks[41])
            db.insert([db.make_track(track_id="id9999")])
            db.insert([db.make_track(track_id="id0000a")])  # behind the cursor
        seen.append(t.track_id)
    assert "id0040" not in seen and "id0041" not in seen
    assert "id9999" in seen and "id0000a" not in seen
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 49


@pytest.mark.asyncio
async def test_after_id_resumes_a_cursor(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    db.insert(db.make_track(track_id=f"id{i:03d}") for i in range(30))
    lib = NavidromeLibrary(db.path, page_size=7)
    assert [t.track_id for t in await collect(lib, after_id="id019")] == [f"id{i:03d}" for i in range(20, 30)]


@pytest.mark.asyncio
async def test_query_plan_walks_the_primary_key(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    db.add_tracks(100)
    lib = NavidromeLibrary(db.path)
    async with lib._connect() as (conn, schema):
        await lib._register_shard(conn)
        filt, params = lib._filters(schema, Shard(1, 3))
        sql = f"EXPLAIN QUERY PLAN {lib._select(schema)} WHERE id > ?{filt} ORDER BY id LIMIT ?"
        async with conn.execute(sql, ("", *params, 10)) as cur:
            plan = " ".join(str(r[-1]) for r in await cur.fetchall())
    assert "sqlite_autoindex_media_file_1" in plan and "TEMP B-TREE" not in plan, plan


@pytest.mark.asyncio
async def test_twenty_thousand_rows_in_bounded_memory(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    db.insert(db.make_track(f"Artist {i % 300}/Album {i % 40}/{i:05d} - a rather long track title here.flac") for i in range(20_000))
    lib = NavidromeLibrary(db.path, page_size=500)
    gc.collect()
    tracemalloc.start()
    try:
        n = 0
        async for t in lib.iter_tracks():
            n += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 20_000
    # 20,000 Track objects with their strings take > 10 MiB; one page ~0.3 MiB.
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB: the iteration holds more than a page"
    assert await lib.count() == 20_000


# ---------------------------------------------------------------- shards


@pytest.mark.asyncio
async def test_shards_split_the_library_disjointly_and_completely(tmp_path, make_db):
    db = make_db(tmp_path / "nd.db")
    db.add_tracks(300)
    lib = NavidromeLibrary(db.path, page_size=37)
    everything = {t.track_id for t in await collect(lib)}
    parts = [{t.track_id for t in await collect(lib, shard=Shard(i, 3))} for i in range(3)]
    assert set().union(*parts) == everything
    assert sum(map(len, parts)) == len(everything) == 300
    assert all(len(p) > 50 for p in parts)  # a hash, not a degenerate split
    assert [await lib.count(Shard(i, 3)) for i in range(3)] == [len(p) for p in parts]
    assert all(shard_of(t, 3) == i for i, p in enumerate(parts) for t in p)


def test_shard_hash_is_pinned():
    # blake2b-64 of the UTF-8 id, big-endian, mod n. Daemons of different
    # versions and hosts must agree: changing this splits a library wrongly.
    assert [shard_of(f"track-{i}", 7) for i in range(8)] == [5, 0, 0, 1, 2, 1, 1, 4]
    assert shard_of("8f1e0b6f6c8e4b39a6b1d3c2e1f0a9b8", 1_000_003) == 912185
    assert shard_of("anything", 1) == 0


@given(st.integers(min_value=1, max_value=10_000), st.data())
def test_parse_shard_accepts_every_valid_pair(n, data):
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    s = parse_shard(f"{i}/{n}")
    assert (s.index, s.count) == (i, n) and str(s) == f"{i}/{n}" and parse_shard(str(s)) == s


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=10_000))
def test_parse_shard_rejects_out_of_range(i, n):
    if n >= 1 and i < n:
        return
    with pytest.raises(EmbeddError) as e:
        parse_shard(f"{i}/{n}")
    assert e.value.code is Code.BAD_REQUEST and "'shard'" in e.value.message


@given(st.one_of(st.text(max_size=12), st.integers(), st.none(), st.binary(max_size=5)))
def test_parse_shard_never_raises_anything_else(value):
    try:
        s = parse_shard(value, argument="shard")
    except EmbeddError as e:
        assert e.code is Code.BAD_REQUEST and "'shard'" in e.message
    else:
        assert isinstance(value, str) and 0 <= s.index < s.count


@settings(max_examples=200)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=50, unique=True), st.integers(min_value=1, max_value=12))
def test_every_track_is_in_exactly_one_shard(ids, n):
    shards = [Shard(i, n) for i in range(n)]
    for tid in ids:
        assert sum(s.contains(tid) for s in shards) == 1


def test_shard_constructor_validates():
    with pytest.raises(EmbeddError):
        Shard(2, 2)
    with pytest.raises(EmbeddError):
        Shard(0, 0)

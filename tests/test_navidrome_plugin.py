"""embedd inside a stock Navidrome: the real server, the real scanner, the real plugin.

Navidrome's latest release served by the Go module proxy (built once by
scripts/build-navidrome, cached outside the repository) scans a tagged music
folder into its own database; an embedd daemon with the tiny test models embeds
that database's tracks and serves HTTP; embedd.ndp (scripts/build-plugin) is
copied into Navidrome's plugins folder, configured, allowed for all users and
enabled through Navidrome's native API, and made the first agent (ND_AGENTS).
Every answer Navidrome's Subsonic API gives is then checked against what
embedd's HTTP API says directly.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import model_args
from tests.daemon import Daemon, short_tmpdir
from tests.http_fixtures import wait_http
from tests.navidrome_server import NavidromeServer, build_navidrome, build_plugin, free_port, write_tagged_library

pytestmark = pytest.mark.timeout(900)  # the first test also builds Navidrome when its cache is cold

LAYOUT = {
    "Aurora Lane": {"Night Drive": ["Neon Rain", "Glass Harbour", "Low Tide"], "Daybreak": ["First Light", "Salt"]},
    "Kestrel": {"Field Notes": ["Hollow Oak", "Iron Bell", "Moss"]},
    "The Quiet Hours": {"Harbour": ["Paper Boats", "Lanterns", "Still Water", "Drift"]},
}
N_TRACKS = sum(len(t) for albums in LAYOUT.values() for t in albums.values())
SEED_TRACKS = 3  # the plugin's default seedTracks
FINAL = {"completed", "completed_with_errors", "failed", "cancelled"}


def _toolchain_missing() -> str | None:
    """Why Navidrome cannot be built here, if it cannot (the build scripts look in the same places)."""
    if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
        return "cannot build Navidrome here: no 'go' on PATH or in /usr/local/go (Go 1.25+ is needed)"
    if shutil.which("cc") is None:
        return "cannot build Navidrome here: no C compiler 'cc' (cgo builds its SQLite)"
    return None


class Stack:
    """Navidrome + embedd daemon + plugin, wired as the docs tell an operator."""

    def __init__(self, root: Path, navidrome: NavidromeServer, daemon: Daemon, http_base: str) -> None:
        self.root = root
        self.nd = navidrome
        self.daemon = daemon
        self.http = http_base
        self.plugin_config = {"embeddUrl": http_base, "model": "muq", "eliminateDuplicates": True}

    def embedd(self, route: str, **params) -> tuple[int, object]:
        url = f"{self.http}{route}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def neighbours(self, item_id: str, n: int) -> list[dict]:
        status, body = self.embedd("/api/similar_tracks", item_id=item_id, n=n, eliminate_duplicates="true", model="muq")
        assert status == 200, body
        return body  # type: ignore[return-value]

    def songs(self) -> list[dict]:
        return self.nd.subsonic("search3", query="", songCount=500, artistCount=0, albumCount=0)["searchResult3"]["song"]


@pytest.fixture(scope="module")
def stack(tiny_models):
    reason = _toolchain_missing()
    if reason:
        pytest.skip(reason)
    binary = build_navidrome()
    ndp = build_plugin()

    root = short_tmpdir("nd-")
    music = root / "music"
    write_tagged_library(music, LAYOUT)
    # trace: Navidrome logs each plugin call with its duration ("pluginDuration")
    nd = NavidromeServer(binary, root, music, env={"ND_AGENTS": "embedd", "ND_LOGLEVEL": "trace"})
    nd.install_plugin(ndp)
    daemon = None
    try:
        nd.start()
        nd.create_admin()
        nd.wait_scanned(N_TRACKS)

        port = free_port()
        daemon = Daemon(
            root / "embedd",
            args=[*model_args(tiny_models), "--navidrome-db", str(nd.db_path), "--http", f"127.0.0.1:{port}", "--decode-workers", "1"],
        )
        (root / "embedd").mkdir()
        daemon.start()
        started = daemon.call("batch_start", models=["muq"])
        assert started.get("ok"), started
        deadline = time.monotonic() + 300
        while (p := daemon.call("batch_progress")["result"])["status"] not in FINAL:
            assert time.monotonic() < deadline, f"batch not done: {p}\n{daemon.log()}"
            time.sleep(0.2)
        assert p["status"] == "completed" and p["processed_tracks"] == N_TRACKS, p

        s = Stack(root, nd, daemon, f"http://127.0.0.1:{port}")
        listed = {p["id"]: p for p in nd.plugins_list()}
        assert "embedd" in listed, f"Navidrome did not discover embedd.ndp: {listed}\n{nd.log()}"
        enabled = nd.update_plugin("embedd", config=s.plugin_config, allUsers=True, enabled=True)
        assert enabled["enabled"] and not enabled.get("lastError"), enabled
        yield s
    finally:
        if daemon is not None:
            daemon.stop()
        nd.stop()
        shutil.rmtree(root, ignore_errors=True)


def by_title(stack: Stack) -> dict[str, dict]:
    return {s["title"]: s for s in stack.songs()}


def test_navidrome_scanned_the_tagged_library_itself(stack):
    songs = stack.songs()
    assert len(songs) == N_TRACKS
    assert {s["artist"] for s in songs} == set(LAYOUT)
    # the real scanner read the MusicBrainz tags: Navidrome can match by MBID, too
    assert all(s.get("musicBrainzId") for s in songs), songs[0]


def test_plugin_is_enabled_and_first_agent(stack):
    plugin = {p["id"]: p for p in stack.nd.plugins_list()}["embedd"]
    assert plugin["enabled"] and not plugin.get("lastError")
    manifest = json.loads(plugin["manifest"])
    assert manifest["name"] == "embedd"
    assert json.loads(plugin["config"]) == stack.plugin_config


def test_instant_mix_of_a_track_is_embedds_neighbours(stack):
    seed = by_title(stack)["Neon Rain"]
    got = stack.nd.subsonic("getSimilarSongs2", id=seed["id"], count=5)["similarSongs2"]["song"]
    want = stack.neighbours(seed["id"], 5)
    assert [s["id"] for s in got] == [h["item_id"] for h in want]
    assert seed["id"] not in {s["id"] for s in got}


def test_sonic_similar_tracks_are_embedds_neighbours_with_their_similarity(stack):
    seed = by_title(stack)["Iron Bell"]
    got = stack.nd.subsonic("getSonicSimilarTracks", id=seed["id"], count=4)["sonicMatch"]
    want = stack.neighbours(seed["id"], 4)
    assert [m["entry"]["id"] for m in got] == [h["item_id"] for h in want]
    for m, h in zip(got, want):
        assert m["similarity"] == pytest.approx(1 - h["distance"], abs=1e-6)
        assert (m["entry"]["title"], m["entry"]["artist"]) == (h["title"], h["author"])


def test_embedds_answers_carry_the_musicbrainz_ids_navidrome_scanned(stack):
    """The second key of Navidrome's matcher: read from its own database, as its scanner tagged it."""
    songs = by_title(stack)
    want = stack.neighbours(songs["Iron Bell"]["id"], 6)
    assert len(want) == 6
    by_id = {s["id"]: s for s in songs.values()}
    for h in want:
        assert h["mbid"] and h["mbid"] == by_id[h["item_id"]]["musicBrainzId"], (h, by_id[h["item_id"]])


def test_sonic_path_is_embedds_path(stack):
    titles = by_title(stack)
    a, b = titles["Neon Rain"]["id"], titles["Drift"]["id"]
    got = stack.nd.subsonic("findSonicPath", startSongId=a, endSongId=b, count=5)["sonicMatch"]
    status, want = stack.embedd("/api/find_path", start_song_id=a, end_song_id=b, count=5, model="muq")
    assert status == 200, want
    ids = [m["entry"]["id"] for m in got]
    assert ids == [h["item_id"] for h in want["path"]]
    assert ids[0] == a and ids[-1] == b and len(set(ids)) == len(ids)


def _merged_mix(stack: Stack, album_track_ids: list[str], count: int) -> list[str]:
    """What the plugin's album and artist mixes promise: the seeds' neighbours, merged best first."""
    seeds = album_track_ids if len(album_track_ids) <= SEED_TRACKS else [
        album_track_ids[i * len(album_track_ids) // SEED_TRACKS] for i in range(SEED_TRACKS)
    ]  # fmt: skip
    best: dict[str, float] = {}
    for seed in seeds:
        for h in stack.neighbours(seed, count):
            if h["item_id"] not in album_track_ids:
                best[h["item_id"]] = max(best.get(h["item_id"], -2.0), 1 - h["distance"])
    return [i for i, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))][:count]


def test_instant_mix_of_an_album_is_its_tracks_neighbours(stack):
    album = next(a for a in stack.nd.subsonic("getAlbumList2", type="alphabeticalByName", size=50)["albumList2"]["album"] if a["name"] == "Harbour")
    tracks = [s["id"] for s in stack.nd.subsonic("getAlbum", id=album["id"])["album"]["song"]]
    got = stack.nd.subsonic("getSimilarSongs2", id=album["id"], count=6)["similarSongs2"]["song"]
    assert [s["id"] for s in got] == _merged_mix(stack, tracks, 6)


def test_artist_radio_is_the_artists_tracks_neighbours(stack):
    artist = next(
        a for idx in stack.nd.subsonic("getArtists")["artists"]["index"] for a in idx["artist"] if a["name"] == "Aurora Lane"
    )
    albums = stack.nd.subsonic("getArtist", id=artist["id"])["artist"]["album"]
    tracks = [s["id"] for al in albums for s in stack.nd.subsonic("getAlbum", id=al["id"])["album"]["song"]]
    got = stack.nd.subsonic("getSimilarSongs2", id=artist["id"], count=4)["similarSongs2"]["song"]
    assert [s["id"] for s in got] == _merged_mix(stack, tracks, 4)


def test_similar_artists_come_from_embedd(stack):
    artist = next(
        a for idx in stack.nd.subsonic("getArtists")["artists"]["index"] for a in idx["artist"] if a["name"] == "Kestrel"
    )
    info = stack.nd.subsonic("getArtistInfo2", id=artist["id"], count=5)["artistInfo2"]
    status, want = stack.embedd("/api/similar_artists", artist="Kestrel", n=5, model="muq")
    assert status == 200, want
    assert [a["name"] for a in info.get("similarArtist", [])] == [w["artist"] for w in want]


def test_a_model_without_vectors_is_an_empty_answer_not_an_error(stack):
    seed = by_title(stack)["Moss"]
    stack.nd.update_plugin("embedd", config={**stack.plugin_config, "model": "latent"})
    try:
        status, body = stack.nd.subsonic_raw("getSonicSimilarTracks", id=seed["id"], count=3)
        assert status == 200 and body["status"] == "ok", body
        assert body.get("sonicMatch", []) == []
    finally:
        stack.nd.update_plugin("embedd", config=stack.plugin_config)
    assert stack.nd.subsonic("getSonicSimilarTracks", id=seed["id"], count=3)["sonicMatch"]


_GO_DURATION = re.compile(r"([0-9.]+)(ns|µs|us|ms|s)")
_UNIT_MS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}


def plugin_durations_ms(log: str, function: str) -> list[float]:
    """Navidrome's own measure of each successful call of one plugin function (trace log)."""
    out = []
    for line in log.splitlines():
        if "Plugin call succeeded" in line and f"function={function}" in line:
            m = re.search(r"pluginDuration=(\S+)", line)
            if m:
                out.append(sum(float(v) * _UNIT_MS[u] for v, u in _GO_DURATION.findall(m.group(1))))
    return out


def test_latency_as_seen_from_navidrome(stack, capsys):
    """Navidrome's measure of the plugin calls, the Subsonic round trip, and embedd's own HTTP time."""
    seed = by_title(stack)["Salt"]["id"]
    end = by_title(stack)["Lanterns"]["id"]
    log_start = stack.nd.log_path.stat().st_size

    def timed(fn, n=20):
        fn()  # warm: the plugin instance and the HTTP connection
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1000, max(samples) * 1000

    direct = timed(lambda: stack.neighbours(seed, 10))
    sonic = timed(lambda: stack.nd.subsonic("getSonicSimilarTracks", id=seed, count=10))
    mix = timed(lambda: stack.nd.subsonic("getSimilarSongs2", id=seed, count=10))
    path = timed(lambda: stack.nd.subsonic("findSonicPath", startSongId=seed, endSongId=end, count=6))
    with open(stack.nd.log_path, errors="replace") as f:
        f.seek(log_start)
        log = f.read()
    inside = {
        fn: plugin_durations_ms(log, fn)
        for fn in ("nd_get_sonic_similar_tracks", "nd_get_similar_songs_by_track", "nd_find_sonic_path")
    }
    with capsys.disabled():
        print("\nplugin latency, ms, median / max of 21 calls:")
        print(f"  embedd GET /api/similar_tracks directly      {direct[0]:7.1f} / {direct[1]:7.1f}")
        for (name, (med, worst)), fn in zip(
            (("getSonicSimilarTracks", sonic), ("getSimilarSongs2", mix), ("findSonicPath", path)), inside
        ):
            d = inside[fn]
            print(
                f"  {name:22s} Subsonic round trip {med:7.1f} / {worst:7.1f};"
                f" {fn} in Navidrome {statistics.median(d):7.1f} / {max(d):7.1f}"
            )
    for fn, d in inside.items():
        assert len(d) == 21, f"{fn}: Navidrome logged {len(d)} plugin calls, expected 21"
        assert max(d) < 5000, f"{fn} took {max(d):.0f} ms; Navidrome's limit is 30 s"
    for _, worst in (sonic, mix, path):
        assert worst < 5000, "a Subsonic call answered by the plugin took over 5 s"


def test_embedd_down_is_an_error_for_sonic_endpoints_and_a_fallback_for_instant_mix(stack):
    """embedd stopped: Navidrome reports the failure; Instant Mix falls through to its other agents.
    The daemon is started again afterwards, whatever happens, so that no test depends on running before this one."""
    seed = by_title(stack)["Hollow Oak"]["id"]
    stack.daemon.stop()
    try:
        status, body = stack.nd.subsonic_raw("getSonicSimilarTracks", id=seed, count=3, timeout_s=40)
        assert body is not None and body["status"] == "failed", (status, body)
        status, body = stack.nd.subsonic_raw("getSimilarSongs2", id=seed, count=3, timeout_s=40)
        assert status == 200 and body["status"] == "ok", body
    finally:
        stack.daemon.start()
        wait_http(stack.http + "/healthz")
    status, body = stack.nd.subsonic_raw("getSonicSimilarTracks", id=seed, count=3, timeout_s=40)
    assert body is not None and body["status"] == "ok", (status, body)  # back: the stack is as it was

"""Users first, measured: what a person waits for while a three-model library job runs.

A real daemon (socket and HTTP listener) embeds a library with all three
models, Music2Latent at stock size (233 MB, random weights: its forward passes
cost what the released model's cost), MuQ and MERT tiny unless ``--real-mert``.
While the job runs, one person at a time asks, in turn:

* a text search (``search`` by text through MuQ-MuLan, on the socket),
* a search by stored track (``search`` by ``track_id``, on the socket),
* AudioMuse-AI's ``GET /api/similar_tracks`` over HTTP (what Navidrome's plugins call),

and the script prints p50/p95/max of each. Then it cancels the job and prints
the time from ``batch_cancel`` to a text search answered, and (a daemon that
shows its lanes) to the batch lane idle.

The host: an ffmpeg transcode (Navidrome streaming to a phone) timed alone and
during a job at ``batch_nice`` 0 and 10.

Throughput with and without bounded passes, in the same run: the same job on
a fresh daemon with ``--pass-budget-s 1`` (the default) and with
``--pass-budget-s 0`` (passes sized by memory alone), tracks/s and audio
seconds per second, and their ratio.

    python bench/interactive.py                      # about 10 minutes on a 2-core CPU
    python bench/interactive.py --src /path/to/older/checkout --skip-throughput   # the same probes, older code

``--src`` runs the daemon from another checkout (the probes use only ops every
version has), which is how the "before" figures in BENCHMARKS.md were taken.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.batch_fixtures import BatchDaemon, Library  # noqa: E402
from tests.daemon import short_tmpdir  # noqa: E402

FINAL = {"completed", "completed_with_errors", "failed", "cancelled"}


def _models(real_mert: bool) -> dict[str, str]:
    """Tiny MuQ and MERT and the stock-size Music2Latent (and MERT), built once under .cache/."""
    from tests.tiny_models import PRESETS, _build_latent, _build_mert, build_tiny_models

    tiny = build_tiny_models(REPO / ".cache" / "tiny-models")
    root = REPO / ".cache" / "real-size-models"
    latent, mert, stamp = root / "music2latent" / "music2latent.pt", root / "mert", root / "built"
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        _build_latent(latent, PRESETS["full"], 7)
        _build_mert(mert, PRESETS["full"], 8)
        stamp.write_text("ok")
    return {**tiny, "latent": str(latent), "mert": str(mert) if real_mert else tiny["mert"]}


class BenchDaemon(BatchDaemon):
    """A daemon over the library, optionally running another checkout's code (``src``)."""

    def __init__(self, root: Path, lib: Library, models: dict[str, str], extra: list[str], src: str | None) -> None:
        super().__init__(root, lib, models, extra=extra)
        self.src = src

    def command(self) -> list[str]:
        cmd = super().command()
        if self.src is None:
            return cmd
        boot = f"import sys, runpy; sys.path.insert(0, {self.src!r}); runpy.run_module('embedd', run_name='__main__')"
        return [cmd[0], "-c", boot, *cmd[3:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _stats(name: str, samples: list[float]) -> dict:
    if not samples:
        return {"probe": name, "n": 0}
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"probe": name, "n": len(samples), "p50_s": round(statistics.median(ordered), 3),
            "p95_s": round(p95, 3), "max_s": round(ordered[-1], 3)}  # fmt: skip


def _job_rate(d: BenchDaemon, models: list[str], seconds_per_track: float) -> dict:
    """Run one job to the end; tracks/s and audio-s/s over the whole job."""
    started = time.perf_counter()
    d.ok("batch_start", models=models)
    p = d.wait_for(lambda p: p["status"] in FINAL, timeout=7200, poll=0.25)
    wall = time.perf_counter() - started
    done = p["processed_tracks"]
    return {"status": p["status"], "tracks": done, "wall_s": round(wall, 1), "tracks_per_s": round(done / wall, 4),
            "audio_s_per_s": round(done * seconds_per_track / wall, 3)}  # fmt: skip


def probe_phase(args, lib: Library, models: dict[str, str], root: Path) -> dict:
    port = _free_port()
    d = BenchDaemon(root / "probe", lib, models, ["--http", f"127.0.0.1:{port}"], args.src)
    d.start(wait=False)
    d.wait_ready(timeout=300)
    try:
        # a first job stores vectors for the by-track probes; the probes run during a second one
        d.ok("batch_start", models=["muq"])
        d.wait_for(lambda p: p["status"] in FINAL, timeout=600, poll=0.25)
        track = args.seed_track
        d.ok("batch_start", models=["muq", "mert", "latent"], clear_existing=True)
        time.sleep(args.warmup_s)  # let the job reach its steady state (every model loaded and busy)
        text, by_track, http = [], [], []
        url = f"http://127.0.0.1:{port}/api/similar_tracks?item_id={track}&n=10"

        def ask_text() -> None:
            r = d.call("search", model="muq", text="calm piano at night", limit=10, timeout=3600)
            assert r.get("ok"), r

        def ask_track() -> None:
            r = d.call("search", model="muq", track_id=track, limit=10, timeout=3600)
            assert r.get("ok"), r

        def ask_http() -> None:
            with urllib.request.urlopen(url, timeout=3600) as resp:
                json.loads(resp.read())

        deadline = time.monotonic() + args.probe_s
        while time.monotonic() < deadline:
            text.append(_timed(ask_text))
            by_track.append(_timed(ask_track))
            http.append(_timed(ask_http))
            time.sleep(args.think_s)  # a person does not fire requests back to back
            status = d.progress()["status"]
            if status in FINAL:
                print("warning: the job ended during the probes; raise the corpus size", file=sys.stderr)
                break
        # cancel, then how long until the models serve a person again, and until the batch lane is idle
        cancel_started = time.perf_counter()
        d.ok("batch_cancel")
        cancel_to_text = None
        done = threading.Event()

        def after_cancel() -> None:
            nonlocal cancel_to_text
            ask_text()
            cancel_to_text = time.perf_counter() - cancel_started
            done.set()

        threading.Thread(target=after_cancel, daemon=True).start()
        idle_at = None
        while idle_at is None:
            st = d.ok("status")
            lanes = (st.get("executor") or {}).get("lanes")
            if lanes is None:  # an older daemon shows no lanes
                break
            if lanes["batch"]["pass"] is None and lanes["batch"]["depth"] == 0:
                idle_at = time.perf_counter() - cancel_started
            else:
                time.sleep(0.05)
        done.wait(3600)
        final = d.wait_for(lambda p: p["status"] in FINAL, timeout=3600, poll=0.25)
        return {
            "probes": [_stats("text search", text), _stats("search by stored track", by_track),
                       _stats("HTTP similar_tracks", http)],
            "cancel_to_text_search_s": round(cancel_to_text or float("nan"), 2),
            "cancel_to_batch_lane_idle_s": round(idle_at, 2) if idle_at is not None else None,
            "job_status_after_cancel": final["status"],
        }  # fmt: skip
    finally:
        d.stop(timeout=60)


def throughput_phase(args, lib: Library, models: dict[str, str], root: Path) -> dict:
    out = {}
    for label, budget in (("bounded (pass_budget_s=1)", "1"), ("memory only (pass_budget_s=0)", "0")):
        d = BenchDaemon(root / f"tp-{budget}", lib, models, ["--pass-budget-s", budget], args.src)
        d.start(wait=False)
        d.wait_ready(timeout=300)
        try:
            out[label] = _job_rate(d, ["muq", "mert", "latent"], args.track_s)
        finally:
            d.stop(timeout=60)
    bounded, unbounded = out.values()
    out["bounded / memory-only throughput"] = round(bounded["tracks_per_s"] / unbounded["tracks_per_s"], 3)
    return out


def host_phase(args, lib: Library, models: dict[str, str], root: Path) -> dict:
    """Navidrome's own work beside a job: an ffmpeg transcode (what streaming to a phone costs) timed
    alone, then during a job at ``batch_nice`` 0 and at the default 10."""
    import subprocess

    source = next(lib.music.rglob("*.flac"))

    def transcode() -> float:
        return _timed(lambda: subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-stream_loop", "3", "-i", str(source), "-c:a", "libmp3lame",
             "-b:a", "192k", "-f", "null", "-"], check=True))  # fmt: skip

    out = {"alone_s": round(statistics.median(transcode() for _ in range(3)), 3)}
    for nice in ("0", "10"):
        d = BenchDaemon(root / f"host-{nice}", lib, models, ["--batch-nice", nice], args.src)
        d.start(wait=False)
        d.wait_ready(timeout=300)
        try:
            d.ok("batch_start", models=["muq", "mert", "latent"])
            time.sleep(args.warmup_s)
            out[f"during a job at batch_nice {nice}_s"] = round(statistics.median(transcode() for _ in range(3)), 3)
            d.ok("batch_cancel")
        finally:
            d.stop(timeout=60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=12, help="tracks in the library")
    parser.add_argument("--track-s", type=float, default=30.0, help="seconds per track")
    parser.add_argument("--probe-s", type=float, default=90.0, help="how long the person asks, seconds")
    parser.add_argument("--think-s", type=float, default=1.0, help="pause between a person's rounds")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="job time before the first probe")
    parser.add_argument("--tp-tracks", type=int, default=6, help="tracks in the throughput jobs")
    parser.add_argument("--real-mert", action="store_true", help="the 24-layer MERT too (much slower)")
    parser.add_argument("--src", help="run the daemon from this checkout instead (probes only)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--only-throughput", action="store_true", help="the throughput comparison alone")
    parser.add_argument("--skip-host", action="store_true", help="no ffmpeg transcode phase")
    args = parser.parse_args()
    models = _models(args.real_mert)
    root = short_tmpdir("bi-")
    try:
        lib = Library(root / "lib")
        args.seed_track = lib.add_good(args.tracks, duration_s=args.track_s)[0].track_id
        print(f"# {os.cpu_count()} CPUs; {args.tracks} tracks x {args.track_s:.0f} s; "
              f"models: muq tiny, mert {'real' if args.real_mert else 'tiny'}, latent real size; src {args.src or REPO}")  # fmt: skip
        result: dict = {}
        if not args.only_throughput:
            result["probe_phase"] = probe_phase(args, lib, models, root)
            print(json.dumps(result, indent=2), flush=True)
        if not args.skip_throughput and args.src is None:
            tp_lib = Library(root / "tplib")
            tp_lib.add_good(args.tp_tracks, duration_s=args.track_s)
            result["throughput"] = throughput_phase(args, tp_lib, models, root)
            print(json.dumps(result["throughput"], indent=2), flush=True)
        if args.src is None and not (args.skip_host or args.only_throughput):
            result["host"] = host_phase(args, lib, models, root)
            print(json.dumps({"ffmpeg transcode of a 4 x 30 s file": result["host"]}, indent=2), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

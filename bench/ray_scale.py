"""The library job in process and on a Ray cluster of this box, in one run: throughput and Ray's cost per track.

A two-node Ray cluster is started here (``ray start --head`` and a second
``ray start --address``, one CPU each, as ``tests/test_ray.py`` does). Over the
same library (tiny models, ``--tracks`` tracks of ``--seconds`` s), each case
runs a full job in a fresh daemon and prints the job's wall time (start to
completed) and its rate:

* in process, one torch thread (``--batch-threads 1``: what one CPU worker gets);
* in process, both cores (the default);
* Ray, one CPU worker (``--ray-cpu-workers 1``);
* Ray, two CPU workers (one per node).

Then Ray's own cost per track, with no model in it: a driver connected to the
same cluster calls an actor method that takes a track's encoded bytes
(``--payload-mb``) and returns 3 vectors of the real models' widths, and the
same with no payload; the median round trip is the serialisation, transfer
and scheduling a track pays on top of its model work.

    .venv/bin/python bench/ray_scale.py [--tracks 24] [--seconds 10] [--payload-mb 8]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray's token, before anything imports Ray (which reads it once): the cluster below and this driver share it.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

from tests.batch_fixtures import BatchDaemon, Library  # noqa: E402
from tests.daemon import short_tmpdir  # noqa: E402
from tests.test_ray import TwoNodes  # noqa: E402
from tests.tiny_models import build_models  # noqa: E402


def _job(root: Path, lib: Library, models: dict[str, str], extra: list[str], auth: dict[str, str]) -> dict:
    d = BatchDaemon(root, lib, models, extra=["--log-level", "warning", *extra])
    d.env.update(auth)
    d.start()
    try:
        d.ok("status")
        t0 = time.perf_counter()
        d.ok("batch_start")
        final = d.wait_final(timeout=3600)
        wall = time.perf_counter() - t0
        assert final["status"] == "completed", final
        workers = (final.get("cluster") or {}).get("workers") or []
        return {"wall": wall, "tracks": final["processed_tracks"], "workers": workers}
    finally:
        d.stop()


def _round_trips(address: str, auth: dict[str, str], payload_mb: float, calls: int) -> tuple[float, float]:
    import numpy as np
    import ray

    ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    try:

        @ray.remote(num_cpus=1)
        class Echo:
            def track(self, data: bytes | None, models: list[str]) -> dict:
                widths = {"muq": 1536, "mert": 76800, "latent": 576}
                return {m: ("ok", np.zeros(widths[m], "<f4").tobytes()) for m in models}

        echo = Echo.remote()
        models = ["muq", "mert", "latent"]
        ray.get(echo.track.remote(None, models))
        payload = bytes(int(payload_mb * 2**20))

        def median(data: bytes | None) -> float:
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                ray.get(echo.track.remote(data, models))
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        return median(payload), median(None)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--payload-mb", type=float, default=8.0)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()

    root = short_tmpdir("rs-")
    models = build_models(REPO / ".cache" / "tiny-models")
    lib = Library(root / "lib")
    lib.add_good(args.tracks, duration_s=args.seconds)
    nodes = TwoNodes()
    nodes.start()
    try:
        ray = ["--ray-address", nodes.address]
        cases = [
            ("in process, 1 thread", ["--batch-threads", "1"]),
            ("in process, 2 cores", []),
            ("Ray, 1 CPU worker", [*ray, "--ray-cpu-workers", "1"]),
            ("Ray, 2 CPU workers", [*ray, "--ray-cpu-workers", "2"]),
        ]
        results = {name: _job(root / f"d{i}", lib, models, extra, nodes.auth_env) for i, (name, extra) in enumerate(cases)}
        with_payload, bare = _round_trips(nodes.address, nodes.auth_env, args.payload_mb, args.calls)
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)

    base = results["in process, 1 thread"]["wall"]
    print(f"{args.tracks} tracks of {args.seconds:.0f} s, tiny muq + mert + latent, this box ({time.strftime('%Y-%m-%d')})")
    print(f"{'case':24} {'job s':>8} {'tracks/s':>9} {'vs 1 thread':>12}  per worker")
    for name, r in results.items():
        split = ", ".join(f"{w['name']} {w['tracks_done']}" for w in r["workers"])
        print(f"{name:24} {r['wall']:8.1f} {r['tracks'] / r['wall']:9.3f} {base / r['wall']:12.2f}  {split}")
    one = results["Ray, 1 CPU worker"]["wall"]
    print(f"Ray 1 worker against in process 1 thread: {(one - base) / args.tracks * 1000:+.0f} ms per track (job wall, incl. start)")
    print(f"Ray round trip per track, no model: {with_payload * 1000:.1f} ms with {args.payload_mb:g} MB of audio, "
          f"{bare * 1000:.1f} ms bare (3 vectors back, median of {args.calls})")


if __name__ == "__main__":
    main()

"""embed_file latency per model through the socket, and how much of it is decoding.

Builds the tiny real-architecture models (tests/tiny_models.py), starts a real
daemon on CPU, and for one generated track measures, in the same run:

- the end-to-end embed_file latency per model (and all three in one call),
  median over --runs calls through the socket;
- the decode-and-resample time of the same file for that model's targets,
  measured in-process with embedd.audio.decode_file;
- the share of the latency spent decoding.

    .venv/bin/python bench/embed_latency.py [--seconds 30] [--runs 5]

With the tiny models the model share is small by construction; the point is the
daemon's overhead and the decode cost, which do not depend on model size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embedd.audio import decode_file  # noqa: E402
from embedd.client import Client  # noqa: E402
from embedd.models import CATALOG  # noqa: E402
from tests.audio_fixtures import encode, distinct_signal  # noqa: E402
from tests.conftest import model_args  # noqa: E402
from tests.daemon import Daemon  # noqa: E402
from tests.tiny_models import build_tiny_models  # noqa: E402


async def latencies(socket: Path, path: str, models: list[str], runs: int) -> list[float]:
    async with await Client.connect(socket) as client:
        await client.call("embed_file", path=path, models=models)  # load the models first
        out = []
        for _ in range(runs):
            started = time.perf_counter()
            await client.call("embed_file", path=path, models=models)
            out.append(time.perf_counter() - started)
        return out


def decode_time(path: str, models: list[str], runs: int) -> float:
    targets = {(CATALOG[m].sample_rate, CATALOG[m].channels) for m in models}
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        decode_file(path, targets)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="track length")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--format", default="mp3", choices=["mp3", "flac"])
    args = parser.parse_args()

    models = build_tiny_models(REPO / ".cache" / "tiny-models")
    root = Path(tempfile.mkdtemp(prefix="ede-", dir="/tmp"))
    music = root / "music"
    music.mkdir()
    track = music / f"track.{args.format}"
    codec = {"mp3": ("mp3", "libmp3lame"), "flac": ("flac", "flac")}[args.format]
    track.write_bytes(encode(distinct_signal(1, duration_s=args.seconds), 44_100, container_format=codec[0], codec=codec[1]))
    daemon = Daemon(root, args=[*model_args(models), "--music-root", str(music)], env={"HF_HUB_OFFLINE": "1"}).start()
    try:
        print(f"machine: {os.cpu_count()} cores, CPU; tiny models; {args.seconds:.0f} s {args.format} track; "
              f"median of {args.runs}")
        print(f"{'models':<18}{'latency':>10}{'decode':>10}{'decode share':>14}{'audio-s/s':>11}")
        for selection in (["muq"], ["mert"], ["latent"], ["muq", "mert", "latent"]):
            lat = statistics.median(asyncio.run(latencies(daemon.socket, str(track), selection, args.runs)))
            dec = decode_time(str(track), selection, args.runs)
            print(f"{'+'.join(selection):<18}{lat * 1000:>8.0f}ms{dec * 1000:>8.0f}ms{dec / lat:>13.0%}"
                  f"{args.seconds / lat:>11.1f}")
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

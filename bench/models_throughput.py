"""Model throughput: audio-seconds embedded per second and peak GPU memory, per model.

Runs the real architectures with random weights through embedd's own backends
(the code path the daemon uses: ``backend_class(name)(ModelSpec(...))``,
``load()``, ``embed_audio_many()``), so the numbers include windowing, clip
reuse, batching and enrichment, but not decoding.

- default: the tiny preset on the CPU -- a smoke run that works anywhere;
- ``--full``: the released models' sizes (MuQ-large + XLM-R base + MuLan heads,
  a 24-layer 1024-wide HuBERT standing in for MERT-v1-330M's identical
  transformer, Music2Latent's stock UNet), meant for a GPU box. The models are
  built once into ``--models-dir`` (about 7 GB) and reused.

Random weights run the same arithmetic as trained ones, so speed and memory
are representative; the vectors are meaningless.

    python bench/models_throughput.py                      # tiny, CPU
    python bench/models_throughput.py --full --half        # full size, CUDA, float16 autocast
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _signal(seconds: float, sr: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n, dtype=np.float64) / sr
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([tone + 0.05 * rng.standard_normal(n) for _ in range(channels)]).astype(np.float32)


def bench_model(name: str, source: str, args: argparse.Namespace) -> dict[str, object]:
    import torch

    from embedd.models import backend_class
    from embedd.models.base import ModelSpec

    cuda = args.device.startswith("cuda")
    spec = ModelSpec(source=source, device=args.device, half=args.half, batch_size=args.batch_size)
    model = backend_class(name)(spec)
    t0 = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - t0
    sr, ch = model.info.sample_rate, model.info.channels
    model.embed_audio_many([_signal(min(args.seconds, 30.0), sr, ch, 0)])  # warm-up: kernels, allocator
    tracks = [_signal(args.seconds, sr, ch, i + 1) for i in range(args.tracks)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    results = model.embed_audio_many(tracks)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    row: dict[str, object] = {
        "model": name,
        "dim": model.dim,
        "load_s": round(load_s, 2),
        "tracks": len(tracks),
        "track_s": args.seconds,
        "windows_per_track": results[0].windows,
        "elapsed_s": round(elapsed, 3),
        "audio_s_per_s": round(args.tracks * args.seconds / elapsed, 1),
    }
    if cuda:
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if name == "muq":
        t0 = time.perf_counter()
        for _ in range(10):
            model.embed_text("calm piano music for a rainy evening")
        row["text_ms"] = round((time.perf_counter() - t0) * 100, 1)
    model.unload()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="embedd model throughput (random weights)")
    parser.add_argument("--full", action="store_true", help="the released models' sizes (GPU box)")
    parser.add_argument("--models", default="muq,mert,latent")
    parser.add_argument("--models-dir", type=Path, default=None, help="where to build/reuse the models")
    parser.add_argument("--device", default=None, help="default: cuda with --full, else cpu")
    parser.add_argument("--half", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--seconds", type=float, default=None, help="length of each synthetic track")
    parser.add_argument("--tracks", type=int, default=None, help="tracks per embed call")
    parser.add_argument("--build-only", action="store_true", help="build the models and stop")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if args.full else "cpu")
    args.batch_size = args.batch_size or (8 if args.full else 4)
    args.seconds = args.seconds or (240.0 if args.full else 20.0)
    args.tracks = args.tracks or (4 if args.full else 2)

    import torch

    from tests.tiny_models import build_models

    preset = "full" if args.full else "tiny"
    models_dir = args.models_dir or Path(tempfile.gettempdir()) / f"embedd-bench-models-{preset}"
    t0 = time.perf_counter()
    sources = build_models(models_dir, preset)
    print(f"# models ({preset}) ready in {models_dir} after {time.perf_counter() - t0:.1f} s", flush=True)
    if args.build_only:
        return 0
    device = args.device
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"# device {gpu}, half={args.half}, batch_size={args.batch_size}, "
          f"{args.tracks} tracks x {args.seconds:g} s per call", flush=True)
    header = f"{'model':<7} {'dim':>6} {'windows':>8} {'elapsed s':>10} {'audio s/s':>10} {'peak MiB':>9} {'load s':>7}"
    if not args.json:
        print(header)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        row = bench_model(name, sources[name], args)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            extra = f"  text {row['text_ms']} ms" if "text_ms" in row else ""
            print(
                f"{name:<7} {row['dim']:>6} {row['windows_per_track']:>8} {row['elapsed_s']:>10} "
                f"{row['audio_s_per_s']:>10} {row.get('peak_gpu_mib', '-'):>9} {row['load_s']:>7}{extra}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

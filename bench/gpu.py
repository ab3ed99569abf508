"""One CUDA run at real size: each model through embedd's backends, then a short batch through a real daemon.

Made to fit one lent GPU machine (under 5 minutes of device time after the
machine has started) and to print everything a closing note needs:

1. **Models** -- random weights of the released architectures, built by
   ``tests/tiny_models.py``'s ``build_models(DIR, "full")`` (cached in
   ``--models-dir``: a rerun on the same machine skips the build).
2. **The card's limit** -- the best square matmul (``--peak-n``) in fp32 (no
   TF32, torch's default), fp16 and bf16, measured in this run.
3. **Each model alone** -- loaded through embedd's backend as the daemon does
   (``precision auto`` -> fp16 on CUDA, the daemon's memory budget), one
   untimed warm-up track, then ``--tracks`` generated tracks of ``--track-s``
   seconds in calls of ``--group`` tracks (the executor coalesces queued
   tracks the same way). Prints tracks/s, audio-s/s, the FLOPs each track
   costs (the backend's own item layout and ``torch.utils.flop_counter``
   counts, from ``bench/flops.py``), the FLOP/s achieved and its fraction of
   the fp16 and bf16 matmul peaks, and peak GPU memory
   (``torch.cuda.max_memory_allocated``) next to the weights.
4. **A short batch** -- a real daemon (``python -m embedd serve``, Milvus Lite)
   over a generated Navidrome library (``tests/batch_fixtures.py``) of
   ``--batch-tracks`` rows of ``--batch-track-s`` seconds, all three models
   preloaded; prints the steady-state tracks/s and audio-s/s, the FLOP/s of
   all three models together against the peak, and the GPU memory the daemon
   used (device-wide used memory above the baseline before it started,
   sampled during the job; ``max_memory_allocated`` is per process).

    python bench/gpu.py                  # a CUDA machine (about 1 min of build, then ~2-3 min)
    python bench/gpu.py --dry-run        # tiny models on the CPU: the whole script, end to end, in ~1 min
    python bench/gpu.py --compile        # then compiled against eager per model (bench/compiled.py)

Output: one JSON line per result (``kind``: peak, model, batch), then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.flops import ADAPTERS, MODELS, count_item, measure_peaks, music_like_track, record_layout, track_cost  # noqa: E402

_FINAL = {"completed", "completed_with_errors", "failed", "cancelled"}


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _mib(n: float) -> int:
    return int(round(n / 2**20))


# -- each model alone ------------------------------------------------------------------------
def bench_model(name: str, source: str, args: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any]:
    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.memory import default_budget_bytes
    from embedd.models.precision import resolve_precision

    device = args.device
    cuda = device.startswith("cuda")
    precision = resolve_precision(args.precision, device)
    spec = ModelSpec(source=source, device=device, precision=precision, memory_budget=default_budget_bytes(device))
    model = backend_class(name)(spec)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model.load()
    _sync(device)
    load_s = time.perf_counter() - started
    weights = torch.cuda.memory_allocated() if cuda else 0
    adapter = ADAPTERS[name]
    try:
        # FLOPs: one item as the backend cuts it, then the backend's layout of each track length
        probe = record_layout(model, adapter, music_like_track(model, min(args.track_s, 30.0)))
        flops_by_key = {adapter.key(probe.items[0]): count_item(model, adapter, probe.items[0])}
        layout, track_flops, _ = track_cost(model, adapter, args.track_s, flops_by_key)
        _, batch_track_flops, _ = track_cost(model, adapter, args.batch_track_s, flops_by_key)

        tracks = [music_like_track(model, args.track_s, seed=i) for i in range(args.tracks)]
        model.embed_audio_many(tracks[:1])  # warm-up: kernels, allocator, autocast caches
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        vectors = []
        for i in range(0, len(tracks), args.group):
            vectors += [e.vector for e in model.embed_audio_many(tracks[i : i + args.group])]
        _sync(device)
        wall = time.perf_counter() - started
        achieved = track_flops * len(tracks) / wall
        row = {
            "kind": "model", "model": name, "device": device, "precision": precision,
            "tracks": len(tracks), "track_s": args.track_s, "load_s": round(load_s, 1),
            "items_per_track": len(layout.items), "items_per_pass": max(layout.passes),
            "item_gflop": round(flops_by_key[adapter.key(probe.items[0])]["counted"] / 1e9, 1),
            "tflop_per_track": round(track_flops / 1e12, 4),
            "wall_s": round(wall, 2),
            "tracks_per_s": round(len(tracks) / wall, 3),
            "audio_s_per_s": round(len(tracks) * args.track_s / wall, 1),
            "achieved_tflop_s": round(achieved / 1e12, 4),
            **{f"frac_{p}_peak": round(achieved / v, 3) for p, v in peaks.items() if p != "fp32"},
            "weights_mib": _mib(weights) if cuda else None,
            "peak_gpu_mib": _mib(torch.cuda.max_memory_allocated()) if cuda else None,
            "finite_unit_norm": all(np.isfinite(v).all() and abs(float(np.linalg.norm(v)) - 1) < 1e-3 for v in vectors),
        }
        emit(row)
        return {"row": row, "batch_track_flops": batch_track_flops}
    finally:
        model.unload()
        del model
        if cuda:
            torch.cuda.empty_cache()


# -- a short batch through a real daemon ------------------------------------------------------
def _device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def bench_batch(root: Path, sources: dict[str, str], args: argparse.Namespace, flops_per_track: float,
                peaks: dict[str, float]) -> dict[str, Any]:
    from embedd.models.precision import resolve_precision
    from tests.batch_fixtures import BatchDaemon, Library

    cuda = args.device.startswith("cuda")
    started = time.perf_counter()
    lib = Library(root / "lib")
    files = max(1, min(args.batch_files, args.batch_tracks))
    lib.add_good(args.batch_tracks, rows_per_file=-(-args.batch_tracks // files), duration_s=args.batch_track_s)
    library_s = time.perf_counter() - started

    baseline = _device_used() if cuda else 0
    daemon = BatchDaemon(root / "d", lib, sources, extra=[
        "--device", args.device, "--precision", args.precision, "--preload", ",".join(MODELS),
        "--decode-workers", str(args.decode_workers), "--log-level", "warning",
    ])  # fmt: skip
    daemon.start()
    try:
        deadline = time.monotonic() + 300
        while not all(m["loaded"] for m in daemon.ok("status")["models"].values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"models not loaded after 300 s:\n{daemon.log()}")
            time.sleep(0.2)
        loaded_used = _device_used() if cuda else _vm(daemon.proc.pid, "VmRSS")
        t0 = time.perf_counter()
        daemon.ok("batch_start", models=list(MODELS))
        first = last = None
        settled, peak_used = 0, loaded_used
        while True:
            p = daemon.progress()
            now = time.perf_counter()
            peak_used = max(peak_used, _device_used() if cuda else _vm(daemon.proc.pid, "VmHWM"))
            n = p["processed_tracks"] + p["failed_tracks"] + p["skipped_tracks"]
            if n and first is None:
                first = (now, n)
            if n != settled:
                last, settled = (now, n), n
            if p["status"] in _FINAL:
                break
            if now - t0 > args.batch_timeout_s:
                daemon.ok("batch_cancel")
                raise RuntimeError(f"batch did not finish in {args.batch_timeout_s} s: {p}\n{daemon.log()}")
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        if p["status"] != "completed" or p["failed_tracks"]:
            raise RuntimeError(f"batch ended {p['status']}: {p}\n{daemon.log()}")
        steady = (last[1] - first[1]) / (last[0] - first[0]) if first and last and last[0] > first[0] else settled / wall
        row = {
            "kind": "batch", "device": args.device, "precision": resolve_precision(args.precision, args.device),
            "models": list(MODELS),
            "tracks": settled, "track_s": args.batch_track_s, "files": files, "library_build_s": round(library_s, 1),
            "wall_s": round(wall, 2), "wall_tracks_per_s": round(settled / wall, 3),
            "tracks_per_s": round(steady, 3), "audio_s_per_s": round(steady * args.batch_track_s, 1),
            "tflop_per_track_all_models": round(flops_per_track / 1e12, 4),
            "achieved_tflop_s": round(steady * flops_per_track / 1e12, 4),
            **{f"frac_{p_}_peak": round(steady * flops_per_track / v, 3) for p_, v in peaks.items() if p_ != "fp32"},
        }
        if cuda:
            row["daemon_gpu_mib_loaded"] = _mib(loaded_used - baseline)
            row["daemon_gpu_mib_peak"] = _mib(peak_used - baseline)
        else:
            row["daemon_rss_mib_loaded"] = _mib(loaded_used)
            row["daemon_rss_mib_peak"] = _mib(peak_used)
        emit(row)
        return row
    finally:
        daemon.stop()


# -- the report -----------------------------------------------------------------------------
def summary(peaks: dict[str, float], models: list[dict], batch: dict | None) -> str:
    lines = ["", "matmul peak TFLOP/s: " + ", ".join(f"{p} {v / 1e12:.3g}" for p, v in peaks.items()), ""]
    lines.append(f"{'model':8} {'prec':5} {'tracks/s':>9} {'audio-s/s':>10} {'TFLOP/track':>11} {'TFLOP/s':>8} "
                 f"{'of fp16':>7} {'of bf16':>7} {'peak MiB':>9}")
    for r in models:
        lines.append(f"{r['model']:8} {r['precision']:5} {r['tracks_per_s']:9.3f} {r['audio_s_per_s']:10.1f} "
                     f"{r['tflop_per_track']:11.3g} {r['achieved_tflop_s']:8.3g} {r.get('frac_fp16_peak', 0):7.3f} "
                     f"{r.get('frac_bf16_peak', 0):7.3f} {r['peak_gpu_mib'] or 0:9d}")
    if batch:
        mem = batch.get("daemon_gpu_mib_peak", batch.get("daemon_rss_mib_peak"))
        lines.append(f"{'batch':8} {batch['precision']:5} {batch['tracks_per_s']:9.3f} {batch['audio_s_per_s']:10.1f} "
                     f"{batch['tflop_per_track_all_models']:11.3g} {batch['achieved_tflop_s']:8.3g} "
                     f"{batch.get('frac_fp16_peak', 0):7.3f} {batch.get('frac_bf16_peak', 0):7.3f} {mem:9d}"
                     f"  (all three models; {batch['tracks']} tracks of {batch['track_s']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, short tracks (a smoke test)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where the models are built (cached; default /tmp/embedd-gpu-models[-tiny])")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models of part 3")
    parser.add_argument("--tracks", type=int, default=None, help="tracks per model (default 8; 2 dry)")
    parser.add_argument("--track-s", type=float, default=None, help="seconds per track (default 240; 20 dry)")
    parser.add_argument("--group", type=int, default=4, help="tracks per embed_audio_many call")
    parser.add_argument("--batch-tracks", type=int, default=None, help="rows of the batch (default 20; 4 dry)")
    parser.add_argument("--batch-track-s", type=float, default=None, help="seconds per batch track (default 120; 8 dry)")
    parser.add_argument("--batch-files", type=int, default=5, help="distinct audio files behind the rows")
    parser.add_argument("--batch-timeout-s", type=float, default=240.0)
    parser.add_argument("--decode-workers", type=int, default=None, help="default: the CPUs, at most 8")
    parser.add_argument("--peak-n", type=int, default=None, help="matmul size of the peak (default 8192; 512 dry)")
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated library and daemon data")
    parser.add_argument("--compile", action="store_true",
                        help="then compiled against eager per model (bench/compiled.py on this device; minutes)")
    args = parser.parse_args(argv)

    dry = args.dry_run
    args.device = args.device or ("cpu" if dry else "cuda")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run with --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    preset = "tiny" if dry else "full"
    args.models_dir = args.models_dir or Path("/tmp/embedd-gpu-models" + ("-tiny" if dry else ""))
    args.tracks = args.tracks or (2 if dry else 8)
    args.track_s = args.track_s or (20.0 if dry else 240.0)
    args.batch_tracks = args.batch_tracks or (4 if dry else 20)
    args.batch_track_s = args.batch_track_s or (8.0 if dry else 120.0)
    args.decode_workers = args.decode_workers or max(1, min(8, len(os.sched_getaffinity(0))))
    args.peak_n = args.peak_n or (512 if dry else 8192)
    if not cuda:
        from embedd.models.runtime import use_available_cores

        use_available_cores()  # what the daemon does on a CPU

    from tests.daemon import short_tmpdir
    from tests.tiny_models import build_models

    t_all = time.perf_counter()
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"# bench/gpu.py {time.strftime('%Y-%m-%d %H:%M')} {args.device} ({where}), torch {torch.__version__}, "
          f"preset {preset}, precision {args.precision}", flush=True)

    started = time.perf_counter()
    sources = build_models(args.models_dir, preset)
    emit({"kind": "build", "preset": preset, "dir": str(args.models_dir), "s": round(time.perf_counter() - started, 1)})

    precisions = ["fp32", "fp16", "bf16"] if cuda else ["fp32", "bf16"]
    peaks = measure_peaks(torch.device(args.device), precisions, args.peak_n, 5)
    emit({"kind": "peak", "n": args.peak_n, "tflop_s": {p: round(v / 1e12, 2) for p, v in peaks.items()}})

    rows, batch_flops = [], 0.0
    for name in args.models:
        started = time.perf_counter()
        result = bench_model(name, sources[name], args, peaks)
        rows.append(result["row"])
        batch_flops += result["batch_track_flops"]
        print(f"#   {name}: {time.perf_counter() - started:.0f} s", flush=True)

    batch = None
    if not args.skip_batch:
        if set(args.models) != set(MODELS):  # the batch runs all three: count the missing ones' FLOPs
            print("# the batch's FLOP/s counts only the models of part 3", flush=True)
        root = short_tmpdir("gpu-")
        try:
            started = time.perf_counter()
            batch = bench_batch(root, sources, args, batch_flops, peaks)
            print(f"#   batch: {time.perf_counter() - started:.0f} s", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    print(summary(peaks, rows, batch))
    if args.compile:  # the same comparison as on a CPU: a cold and a warm compile per model, in fresh processes
        import subprocess

        subprocess.run([sys.executable, str(Path(__file__).with_name("compiled.py")), "--models-dir",
                        str(args.models_dir), "--device", args.device, "--models", *args.models], check=False)  # fmt: skip
    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compiled against eager forward passes, per model at real size, in one run.

For each model (random weights of the released architectures, built by
``python tests/tiny_models.py DIR --preset full``; loaded through embedd's own
backend with ``compile`` on, as the daemon does) two fresh processes:

1. **cold**: an empty inductor cache. The item is the first one the backend
   cuts from a music-like four-minute track (a MuQ 10 s clip, a MERT 30 s
   window, a Music2Latent chunk of ``--latent-chunk-s``): its FLOPs counted
   (``bench/flops.py``'s counter), its eager time (the better of two passes
   after a warm-up), the compilation (``compile_now``: what the daemon's batch
   lane runs), its compiled time the same way; the process's peak memory
   (VmHWM) before and after compiling.
2. **warm**: the same cache, a new process: the load, then ``compile_now``
   again, which should find everything in the cache (``misses`` 0).

Printed as JSON lines, then a table: seconds per item eager and compiled,
their ratio, each as a fraction of the matmul peak of the precision the
daemon would use (measured first, in the parent, on the same box), the
compile times, peak memory, and the hours a four-minute track costs per 1,000
tracks (model time only, every item of the track at the timed rate).

    python bench/compiled.py --models-dir /tmp/full
    python bench/compiled.py --models-dir /tmp/full --models latent --latent-chunk-s 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TRACK_S = 240.0


def child(args: argparse.Namespace) -> dict:
    """One process: load with compile on, (cold: time eager,) compile, time compiled."""
    import flops

    loaded = flops.load_real_size(args.models_dir, args.model, args.device, args.threads, TRACK_S, compile="always",
                                  chunk_s=args.latent_chunk_s if args.model == "latent" else None)  # fmt: skip
    model, layout, precision = loaded.model, loaded.layout, loaded.precision
    out: dict = {"model": args.model, "phase": args.phase, "precision": precision, "load_s": round(loaded.load_s, 1)}
    adapter = flops.ADAPTERS[args.model]
    item = layout.items[0]
    out["items_per_track"] = len(layout.items)
    if args.phase == "cold":
        out["gflop_item"] = round(flops.count_item(model, adapter, item)["counted"] / 1e9, 2)
        out["eager_s"] = round(flops.time_item(model, item, precision, warm=True), 3)
        out["eager_hwm_mb"] = round(flops.peak_rss_mb())
    started = time.perf_counter()
    model.compile_now()
    out["compile_s"] = round(time.perf_counter() - started, 1)
    view = model.compile_view() or {}
    out["state"], out["cache"], out["error"] = view.get("state"), view.get("cache"), view.get("error")
    # compile_now (compile = on: no eager comparison) runs two compiled calls: the first (tracing,
    # compiling or the cache, one forward) and a second pass; the first call less a pass is the compiler
    out["first_call_s"], out["check_eager_s"], out["check_compiled_s"] = (
        view.get("compile_s"), view.get("eager_s"), view.get("compiled_s"))
    if args.phase == "cold" and view.get("state") == "ready":
        out["compiled_s"] = round(flops.time_item(model, item, precision, warm=False), 3)
        out["items_compiled"] = (model.compile_view() or {}).get("items")  # > 0: the timed passes ran compiled
    out["hwm_mb"] = round(flops.peak_rss_mb())
    model.unload()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, type=Path, help="built by tests/tiny_models.py --preset full")
    parser.add_argument("--models", nargs="+", default=["muq", "mert", "latent"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--latent-chunk-s", type=float, default=60.0, help="the daemon's default: 60")
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    import torch

    import flops
    from embedd.models.precision import resolve_precision

    torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", args.device)
    # the peak of the precision the daemon uses here (auto): on a CPU without native bf16 a bf16 matmul is an
    # emulation tens of times slower than fp32, no limit to compare with (and minutes to measure)
    peaks = flops.measure_peaks(torch.device(args.device), [precision], args.peak_n, 3)
    print(json.dumps({"kind": "peaks", "precision": precision, **{k: round(v / 1e9, 1) for k, v in peaks.items()}}),
          flush=True)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="embedd-compile-bench-") as cache:
            row: dict = {}
            for phase in ("cold", "warm"):
                cmd = [sys.executable, __file__, "--models-dir", str(args.models_dir), "--device", args.device,
                       "--threads", str(args.threads), "--latent-chunk-s", str(args.latent_chunk_s),
                       "--model", name, "--phase", phase]  # fmt: skip
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if not lines:
                    print(json.dumps({"model": name, "phase": phase, "failed": done.stderr[-2000:]}), flush=True)
                    break
                result = json.loads(lines[-1][len("RESULT "):])
                print(json.dumps(result), flush=True)
                row[phase] = result
            rows.append((name, row))
    peak = peaks[precision]
    print("\nmatmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()) + f"; models in {precision}")
    print(f"{'model':7} {'eager s':>8} {'compiled':>9} {'ratio':>6} {'eager/peak':>10} {'comp/peak':>9} "
          f"{'cold compile':>12} {'warm':>6} {'warm misses':>11} {'peak MB e/c':>13} {'h/1000 e':>9} {'h/1000 c':>9}")  # fmt: skip
    totals = [0.0, 0.0]
    for name, row in rows:
        cold, warm = row.get("cold", {}), row.get("warm", {})
        if "compiled_s" not in cold:
            print(f"{name:7} {cold.get('eager_s', '-')!s:>8} not compiled: {cold.get('state')} {cold.get('error')}")
            continue
        flop = cold["gflop_item"] * 1e9
        hours = [cold[k] * cold["items_per_track"] * 1000 / 3600 for k in ("eager_s", "compiled_s")]
        totals = [totals[0] + hours[0], totals[1] + min(hours)]  # the daemon keeps eager where slower
        print(f"{name:7} {cold['eager_s']:8.2f} {cold['compiled_s']:9.2f} {cold['eager_s'] / cold['compiled_s']:6.2f} "
              f"{flop / cold['eager_s'] / peak:10.3f} {flop / cold['compiled_s'] / peak:9.3f} "
              f"{cold['compile_s']:11.0f}s {warm.get('compile_s', float('nan')):5.0f}s "
              f"{(warm.get('cache') or {}).get('misses', '-')!s:>11} "
              f"{cold['eager_hwm_mb']:6.0f}/{cold['hwm_mb']:<6.0f} {hours[0]:9.0f} {hours[1]:9.0f}")  # fmt: skip
    print(f"\nall three, four-minute tracks, model time on this box: {totals[0]:.0f} h per 1,000 eager, "
          f"{totals[1]:.0f} h compiled where faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
